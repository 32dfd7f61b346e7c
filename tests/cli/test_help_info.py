"""Help text laid out for a terminal (examples keep their lines, every flag has help and shows its
default); `info` says which backends run here and why the others cannot; --tokenizer is honoured."""

import argparse
import io

import pytest

from ssmkit.cli.info import backend_status
from ssmkit.cli.main import build_parser, main

COMMANDS = ["info", "generate", "convert", "train", "eval", "reproduce", "bench"]


def _subparsers():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_flag_has_help_and_the_layout_survives(cmd, capsys):
    sp = _subparsers()[cmd]
    assert all(a.help for a in sp._actions), [a.dest for a in sp._actions if not a.help]
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "::" not in text
    if "Examples:" in text:  # each example on its own line, indented as written
        after = text.split("Examples:", 1)[1].splitlines()[1]
        assert after.startswith("  ssmkit ") or after.startswith("  torchrun ")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_defaults_are_shown(cmd, capsys):
    sp = _subparsers()[cmd]
    fmt = sp._get_formatter()
    for a in sp._actions:
        if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS):
            assert "%(default)" in fmt._get_help_string(a), a.dest
    if cmd == "train":
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "optimizer steps (default: 1000)" in text and "layer" in text and "(default: MM)" in text


def test_backend_status_says_why_not():
    assert backend_status("chunked", cuda=False, triton=False, interpreted=False) is None
    assert "not installed" in backend_status("triton", cuda=True, triton=False, interpreted=False)
    assert "no CUDA device" in backend_status("triton", cuda=False, triton=True, interpreted=False)
    assert backend_status("triton", cuda=True, triton=True, interpreted=False) is None


def test_info_does_not_list_triton_as_runnable_without_cuda(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for line in out.splitlines():
        if line.startswith("  ") and ":" in line:
            runnable = line.split(":", 1)[1].split(";")[0]
            assert "triton" not in runnable, line
    assert "triton cannot run here: " in out


def test_generate_uses_a_tokenizer_file_of_any_name(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    import ssmkit

    ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-mamba")).save_pretrained(tmp_path / "m")
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world"])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "my-words.json"))
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hello world", "--max-new-tokens", "3",
                 "--ignore-eos", "--tokenizer", str(tmp_path / "my-words.json")]) == 0
    words = capsys.readouterr().out.split()
    assert words[:2] == ["hello", "world"] and set(words[2:]) <= set(vocab)  # decoded by my-words.json


def test_training_progress_is_a_tqdm_bar_on_a_terminal():
    from ssmkit.training.trainer import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    p = Progress(10, stream=s)
    p.update(5, loss=1.5)
    p.close()
    assert type(p).__name__ == "Progress" and "5/10" in s.getvalue() and "loss=1.5" in s.getvalue()
    assert "step" in s.getvalue()  # tqdm's unit


def test_info_into_a_closed_pipe_stops_quietly():
    """`ssmkit info | head -0`: the reader is gone before the first line (it closes its end while
    the command still imports); no traceback, exit 141 (as SIGPIPE)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "ssmkit", "info"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err
