"""`ssmkit convert` and `ssmkit generate`: conversions between formats, streaming output with
tokens/s, user errors as one line with exit status 2."""

import json

import pytest
import torch

import ssmkit
from ssmkit.cli.main import main


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    m = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-mamba")).eval()
    m.save_pretrained(tmp_path / "src", format="ssmkit")
    return m, tmp_path


def test_convert_through_every_format(ckpt, capsys):
    m, tmp = ckpt
    assert main(["convert", str(tmp / "src"), str(tmp / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp / "hf" / "config.json").read_text())["model_type"] == "mamba"
    assert main(["convert", str(tmp / "hf"), str(tmp / "ms"), "--to", "mamba_ssm"]) == 0
    assert (tmp / "ms" / "pytorch_model.bin").exists()
    assert main(["convert", str(tmp / "ms"), str(tmp / "back"), "--to", "ssmkit"]) == 0
    assert "converted" in capsys.readouterr().out
    ids = torch.randint(0, 257, (1, 6))
    back = ssmkit.from_pretrained(tmp / "back")
    with torch.no_grad():
        assert torch.allclose(m(ids).logits[..., :257], back(ids).logits[..., :257], atol=1e-6)


def test_generate_streams_text_and_reports_speed(ckpt, capsys):
    _, tmp = ckpt
    assert main(["generate", str(tmp / "src"), "--prompt", "Hi", "--max-new-tokens", "5", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hi") and "tokens/s" in err
    assert main(["generate", "tiny-hybrid", "--prompt", "a", "--max-new-tokens", "3", "--temperature", "0.8",
                 "--seed", "1"]) == 0


def test_generate_quantize_int8(ckpt, capsys):
    """--quantize int8: the same greedy text as float32 on this checkpoint, reported in the summary."""
    _, tmp = ckpt
    argv = ["generate", str(tmp / "src"), "--prompt", "Hi", "--max-new-tokens", "6", "--ignore-eos"]
    assert main(argv) == 0
    ref = capsys.readouterr().out
    assert main([*argv, "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hi") and "int8 weights" in err and "tokens/s" in err
    assert main([*argv, "--quantize", "int8", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("Hi") and ref.startswith("Hi")


@pytest.mark.parametrize("argv, match", [
    (["generate", "{tmp}/nope", "--prompt", "x"], "no checkpoint directory"),
    (["generate", "{tmp}/src", "--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "{tmp}/src", "--prompt", "x", "--top-p", "2"], "argument --top-p: expected a number in (0, 1]"),
    (["generate", "{tmp}/src", "--prompt", "x", "--quantize", "int4"], "argument --quantize: invalid choice"),
    (["generate", "{tmp}/src", "--prompt", "x", "--cuda-graph"], "--cuda-graph needs a CUDA device"),
    (["convert", "{tmp}/src", "{tmp}/src2", "--to", "hf"], None),
    (["convert", "{tmp}/src", "{tmp}/src2", "--to", "hf"], "already holds a checkpoint"),
])
def test_user_errors_are_one_line(ckpt, capsys, argv, match):
    _, tmp = ckpt
    argv = [a.format(tmp=tmp) for a in argv]
    if match is None:  # first convert succeeds, making the second one collide
        assert main(argv) == 0
        return
    if argv[0] == "convert":
        main(argv)
        capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err


def test_hybrid_cannot_be_converted_to_hf(tmp_path, capsys):
    m = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-hybrid"))
    m.save_pretrained(tmp_path / "h")
    assert main(["convert", str(tmp_path / "h"), str(tmp_path / "o"), "--to", "hf"]) == 2
    assert "cannot save this model in Hugging Face format" in capsys.readouterr().err


@pytest.mark.peer
def test_convert_copies_the_tokenizer_and_generate_uses_it(ckpt, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    _, tmp = ckpt
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world", "again"])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp / "src" / "tokenizer.json"))
    assert main(["convert", str(tmp / "src"), str(tmp / "hf"), "--to", "hf"]) == 0
    assert (tmp / "hf" / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["generate", str(tmp / "hf"), "--prompt", "hello world", "--max-new-tokens", "4",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    generated = out[len("hello world"):].split()
    assert out.startswith("hello world ") and len(generated) == 4 and set(generated) <= set(vocab)
