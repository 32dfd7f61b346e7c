"""Helpers for CLI tests: run ``python -m ssmkit`` in a subprocess, fingerprint a directory's files."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def ssmkit_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_ssmkit(*argv, cwd=None, timeout=120, module=("-m", "ssmkit")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *module, *map(str, argv)], cwd=cwd, env=ssmkit_env(),
                          capture_output=True, text=True, timeout=timeout)


def fingerprint(directory) -> dict[str, tuple[int, str]]:
    """Every file under ``directory``: (size, sha256) -- to show that a command changed nothing."""
    out = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(directory))] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """`ssmkit train --deterministic`, --threads and `reproduce` set process-wide torch state, as a
    command should in its own process; tests that call ``main`` in-process put it back."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


@pytest.fixture()
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("the selective scan keeps a state. " * 60)
    return f


TINY = ["--seqlen", "16", "--pattern", "MM", "--d-model", "16", "--batch-size", "4", "--device", "cpu", "--quiet"]
