"""`ssmkit convert --to gguf`: a .gguf file or a directory receiving model.gguf, the tokenizer in
the file, --gguf-type; user errors as one line with exit status 2 and nothing written."""

import sys

import pytest
import torch

import ssmkit
from ssmkit.cli.main import main

gguf = pytest.importorskip("gguf")


@pytest.fixture()
def src(tmp_path):
    torch.manual_seed(0)
    m = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-mamba2")).eval()
    m.save_pretrained(tmp_path / "src", format="ssmkit")
    return tmp_path


def _meta(path, key):
    return gguf.GGUFReader(path).fields[key].contents()


def test_convert_to_a_gguf_file_and_to_a_directory(src, capsys):
    assert main(["convert", str(src / "src"), str(src / "m.gguf"), "--to", "gguf", "--gguf-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "m.gguf (gguf q8_0, ByteTokenizer)" in out
    assert _meta(src / "m.gguf", "general.architecture") == "mamba2"
    assert _meta(src / "m.gguf", "general.file_type") == 7
    # no tokenizer files, byte vocabulary: the byte tokenizer goes into the file
    assert _meta(src / "m.gguf", "tokenizer.ggml.eos_token_id") == 256
    assert main(["convert", str(src / "src"), str(src / "new" / "dir"), "--to", "gguf"]) == 0
    assert _meta(src / "new" / "dir" / "model.gguf", "general.file_type") == 0


@pytest.mark.parametrize("argv, match", [
    (["{tmp}/src", "{tmp}/m.gguf", "--to", "gguf"], "m.gguf already exists; pass --force to overwrite it"),
    (["{tmp}/src", "{tmp}/nodir/m.gguf", "--to", "gguf"], "the directory {tmp}/nodir does not exist"),
    (["{tmp}/src", "{tmp}/file.bin", "--to", "gguf"], "file.bin: exists and is not a directory"),
    (["{tmp}/src", "{tmp}/out", "--to", "hf", "--gguf-type", "f16"], "--gguf-type applies to --to gguf only"),
    (["{tmp}/src", "{tmp}/x.gguf", "--to", "gguf", "--gguf-type", "q4"], "argument --gguf-type: invalid choice"),
    (["{tmp}/hybrid", "{tmp}/x.gguf", "--to", "gguf"], "cannot export this model to GGUF: layer_pattern 'MA2M'"),
])
def test_user_errors_are_one_line(src, capsys, argv, match):
    (src / "m.gguf").write_bytes(b"keep")
    (src / "file.bin").write_bytes(b"keep")
    ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-hybrid")).save_pretrained(src / "hybrid")
    before = sorted(p.name for p in src.iterdir())
    assert main(["convert", *(a.format(tmp=src) for a in argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert match.format(tmp=src) in err and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in src.iterdir()) == before and (src / "m.gguf").read_bytes() == b"keep"


def test_without_the_gguf_package_the_error_names_the_extra(src, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["convert", str(src / "src"), str(src / "m.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'ssmkit[gguf]'" in err and "\n" not in err
    assert not (src / "m.gguf").exists()
