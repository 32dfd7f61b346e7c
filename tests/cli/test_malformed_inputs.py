"""Malformed input across the CLI: each gives exit status 2, one line on stderr naming the argument
(or path) and what is accepted, before any work starts -- and no file the user had changes.

``MALFORMED`` is also the list to show users: ``python tests/cli/test_malformed_inputs.py`` prints
each input with the line it gets.
"""

import importlib.util
import os
import sys

import pytest
import torch

from ssmkit.cli.main import main
from tests.cli.conftest import fingerprint

_HAS_WANDB = importlib.util.find_spec("wandb") is not None
_HAS_TB = importlib.util.find_spec("tensorboard") is not None
_NO_CUDA = not torch.cuda.is_available()

TINY = ["--seqlen", "16", "--pattern", "MM", "--d-model", "16", "--batch-size", "4", "--device", "cpu", "--quiet"]
TASK = ["--task", "induction-heads", "--task-arg", "length=12", "--task-arg", "vocab=6"]

# (argv, a piece of the one line it must print). Paths are relative to a directory holding the
# user's files: corpus.txt, run/ (a --data run), ih/ (a --task run), results/ (reproduce output),
# empty/, afile, garbage.pt.
MALFORMED = [
    # generate
    (["generate", "run", "--prompt", "x", "--temperature", "-1"], "argument --temperature: expected a number >= 0"),
    (["generate", "run", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: expected a number in (0, 1]"),
    (["generate", "run", "--prompt", "x", "--top-k", "-3"], "argument --top-k: expected an integer >= 0"),
    (["generate", "run", "--prompt", "x", "--min-p", "1"], "argument --min-p: expected a number in [0, 1)"),
    (["generate", "run", "--prompt", "x", "--repetition-penalty", "0"], "argument --repetition-penalty: expected a number > 0"),
    (["generate", "run", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1"),
    (["generate", "run", "--prompt", "x", "--max-new-tokens", "abc"], "argument --max-new-tokens: expected an integer >= 1"),
    (["generate", "tiny-hybrid", "--prompt", "x", "--max-new-tokens", "100000000000"], "bytes"),
    (["generate", "run", "--prompt", "x", "--device", "tpu9"], "argument --device: expected cpu, cuda or cuda:N"),
    pytest.param(["generate", "run", "--prompt", "x", "--device", "cuda"], "no CUDA device is available",
                 marks=pytest.mark.skipif(not _NO_CUDA, reason="has CUDA")),
    (["generate", "run", "--prompt", "x", "--tokenizer", "nope.json"], "--tokenizer nope.json does not exist"),
    (["generate", "run", "--prompt", "x", "--tokenizer", "empty"], "--tokenizer empty: the directory has no tokenizer.json"),
    (["generate", "run", "--prompt", "ab\udcffc"], "argument --prompt: not valid UTF-8 text (byte 0xff"),
    (["generate", "nope", "--prompt", "x"], "no checkpoint directory 'nope'"),
    (["generate", "run"], "the following arguments are required: --prompt"),
    (["generate", "run", "--prompt", ""], "--prompt is empty"),
    (["generate", "corpus.txt", "--prompt", "x"], "corpus.txt is a file"),
    (["generate", "run", "--prompt", "x", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["generate", "run", "--prompt", "x", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
    # convert
    (["convert", "run", "out"], "the following arguments are required: --to"),
    (["convert", "run", "out", "--to", "onnx"], "argument --to: invalid choice: 'onnx'"),
    (["convert", "run", "corpus.txt", "--to", "hf"], "DST corpus.txt: exists and is not a directory"),
    (["convert", "run", "ih", "--to", "ssmkit"], "ih already holds a checkpoint; pass --force"),
    (["convert", "nope", "out", "--to", "hf"], "no checkpoint directory 'nope'"),
    # train
    (["train", *TASK, "--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["train", *TASK, "--d-state", "0"], "argument --d-state: expected an integer >= 1"),
    (["train", *TASK, "--grad-clip", "-1"], "argument --grad-clip: expected a number >= 0"),
    (["train", *TASK, "--threads", "0"], "argument --threads: expected an integer >= 1"),
    (["train", *TASK, "--device", "tpu9"], "argument --device: expected cpu, cuda or cuda:N (or auto)"),
    (["train", *TASK, "--strategy", "fsdp", "--out", "new"], "--strategy fsdp shards the model over processes"),
    (["train", *TASK, "--context-parallel", "2", "--out", "new"], "--context-parallel 2 must divide the number of"),
    (["train", *TASK, "--context-parallel", "0"], "argument --context-parallel: expected an integer >= 1"),
    pytest.param(["train", *TASK, "--amp", "bf16", "--out", "new"], "--amp bf16 needs a CUDA device",
                 marks=pytest.mark.skipif(not _NO_CUDA, reason="has CUDA")),
    (["train", "--task", "selective-copying", "--task-arg", "n_tokens=abc", "--out", "new"],
     "--task-arg n_tokens: expected an integer, got 'abc'"),
    (["train", "--task", "copying", "--task-arg", "nope=1", "--out", "new"], "--task-arg nope: task 'copying' has no such option"),
    (["train", "--task", "copying", "--task-arg", "length"], "argument --task-arg: expected KEY=VALUE, got 'length'"),
    (["train", "--task", "no-such-task", "--out", "new"], "--task: unknown task 'no-such-task'"),
    (["train", *TASK, "--lr", "0"], "argument --lr: expected a number > 0"),
    (["train", *TASK, "--lr", "nan"], "argument --lr: expected a number > 0"),
    (["train", *TASK, "--batch-size", "6", "--accum", "4", "--out", "new"], "--batch-size 6 must be a multiple of"),
    (["train", *TASK, "--pattern", "MQ"], "argument --pattern: expected letters from"),
    (["train", *TASK, "--preset", "nope"], "argument --preset: unknown preset 'nope'"),
    (["train", "--data", "corpus.txt", *TINY, "--out", "run"], "--out run already holds a training run"),
    (["train", "--data", "corpus.txt", *TINY, "--out", "empty", "--resume"], "--resume: empty holds no checkpoint"),
    (["train", "--data", "corpus.txt", *TINY[:2], "--pattern", "A", *TINY[4:], "--out", "run", "--resume"],
     "--resume: the run in run has a model with layer_pattern='MM'"),
    (["train", "--data", "corpus.txt", *TINY, "--out", "corpus.txt"], "--out corpus.txt: exists and is not a directory"),
    (["train", "--data", "missing.txt", *TINY, "--out", "new"], "--data path missing.txt does not exist"),
    (["train", "--task", "copying", "--data", "corpus.txt", "--out", "new"], "give exactly one of --task NAME or --data"),
    (["train", "--data", "corpus.txt", "--out", "run", "--resume", "--force"], "argument --force: not allowed with argument --resume"),
    (["train", "--data", "corpus.txt", "--seqlen", "1"], "argument --seqlen: expected an integer >= 2"),
    (["train", "--data", "corpus.txt", "--seqlen", "100000", "--out", "new"], "fewer than seqlen + 1"),
    (["train", *TASK, "--warmup", "-5"], "argument --warmup: expected an integer >= 0"),
    (["train", *TASK, "--log", "mlflow"], "argument --log: invalid choice: 'mlflow'"),
    pytest.param(["train", *TASK, "--log", "wandb", "--out", "new"], "--log wandb: the wandb package is not installed",
                 marks=pytest.mark.skipif(_HAS_WANDB, reason="wandb is installed")),
    pytest.param(["train", *TASK, "--log", "tensorboard", "--out", "new"],
                 "--log tensorboard: the tensorboard package is not installed",
                 marks=pytest.mark.skipif(_HAS_TB, reason="tensorboard is installed")),
    # eval
    (["eval", "ih", "--sequences", "0"], "argument --sequences: expected an integer >= 1"),
    (["eval", "garbage.pt"], "garbage.pt cannot be read: truncated, corrupted, or not written by ssmkit train (UnpicklingError: Unsupported operand"),
    (["eval", "nope.pt"], "nope.pt does not exist"),
    (["eval", "empty"], "empty: no checkpoint-*.pt in this directory"),
    (["eval", "ih", "--lengths", "0"], "argument --lengths: expected an integer >= 2"),
    (["eval", "ih", "--task-arg", "length=abc"], "--task-arg length: expected an integer, got 'abc'"),
    (["eval", "run"], "give --task NAME"),
    (["eval", "ih", "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N (or auto)"),
    # reproduce
    (["reproduce", "--quick", "--out", "afile"], "--out afile: exists and is not a directory"),
    (["reproduce", "--quick", "--out", "results"], "--out results already holds results (reproduce.json)"),
    (["reproduce", "--jobs", "0"], "argument --jobs: expected an integer >= 1"),
    (["reproduce", "no-such-experiment"], "unknown experiment 'no-such-experiment'"),
    (["reproduce", "--rows", "lstm"], "--rows: unknown row 'lstm'"),
    (["reproduce", "--quick", "--full"], "argument --full: not allowed with argument --quick"),
    (["reproduce", "mamba"], "unknown experiment 'mamba' (a row: give it after --rows)"),
    (["reproduce", "--table1", "--lra"], "--table1 and --lra are separate runs: give one of them"),
    (["reproduce", "--quick", "--resume", "--force"], "--resume and --force contradict each other"),
    (["reproduce", "--table1", "induction-heads"], "unknown experiment 'induction-heads': choose from selective-copying"),
    # bench
    (["bench", "--device", "cpu", "--out", "missing_dir/x.json"], "--out missing_dir/x.json: the directory missing_dir does not exist"),
    (["bench", "--device", "cpu", "--out", "results"], "--out results: is a directory"),
    (["bench", "--device", "cpu", "--out", "bench.csv"], "--out bench.csv: expected a .json file name"),
    (["bench", "--device", "cpu", "--backends", "nope"], "--backends: none of nope runs here"),
    (["bench", "--device", "cpu", "--ops", "nope"], "--ops: unknown op(s) nope"),
    (["bench", "--seqlens", "0,256"], "argument --seqlens: expected comma-separated integers >= 1"),
    (["bench", "--device", "tpu9"], "argument --device: expected cpu, cuda or cuda:N"),
    # the command itself
    (["nope"], "argument COMMAND: invalid choice: 'nope'"),
]


def _make_user_files(d):
    """A directory as a user would have it: text, two finished runs, earlier results, odd files."""
    cwd = os.getcwd()
    os.chdir(d)
    try:
        (d / "corpus.txt").write_text("the selective scan keeps a state. " * 60)
        assert main(["train", "--data", "corpus.txt", *TINY, "--steps", "1", "--out", "run"]) == 0
        assert main(["train", *TASK, "--pattern", "M", "--d-model", "16", "--steps", "1", "--batch-size", "4",
                     "--device", "cpu", "--quiet", "--out", "ih"]) == 0
        (d / "results").mkdir()
        (d / "results" / "reproduce.json").write_text("{}\n")
        (d / "empty").mkdir()
        (d / "afile").write_text("mine\n")
        (d / "garbage.pt").write_bytes(b"\x80\x02not a checkpoint")
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    d = tmp_path_factory.mktemp("user")
    _make_user_files(d)
    yield d
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def run_one(argv, cwd) -> tuple[int, str]:
    """Exit status and stderr of ``ssmkit ARGV`` run in ``cwd`` (in this process)."""
    import contextlib
    import io

    err = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(list(argv))
    finally:
        os.chdir(old)
    return rc, err.getvalue()


@pytest.mark.parametrize("argv, needle", MALFORMED)
def test_malformed_input_is_one_line_exit_2_and_changes_nothing(user_dir, argv, needle):
    before = fingerprint(user_dir)
    rc, err = run_one(argv, user_dir)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("ssmkit") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert fingerprint(user_dir) == before
    assert not (user_dir / "new").exists() and not (user_dir / "out").exists()


def test_at_least_forty_malformed_inputs():
    assert len(MALFORMED) >= 40


if __name__ == "__main__":  # print every input with the line it gets
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        _make_user_files(Path(tmp))
        for item in MALFORMED:
            argv = item.values[0] if hasattr(item, "values") else item[0]
            skip = [m for m in getattr(item, "marks", ()) if m.name == "skipif" and m.args[0]]
            if skip:
                print(f"ssmkit {' '.join(argv)}\n    -> not run here: {skip[0].kwargs['reason']}")
                continue
            rc, err = run_one(argv, tmp)
            shown = " ".join(a.encode("utf-8", "backslashreplace").decode() for a in argv)
            print(f"ssmkit {shown}\n    -> exit {rc}: {err.strip()}")
    sys.exit(0)
