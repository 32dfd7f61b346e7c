"""ssmkit.ops.cpu_memory: glibc's malloc keeps freed memory for the next allocation (no page faults
for a forward's temporaries), opt-out by SSMKIT_CPU_KEEP_MEMORY=0; the language model asks for
it on its first CPU forward."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from ssmkit.ops import cpu_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"),
                           reason="glibc's mallopt on Linux")

# Three 8 MB tensors at a time, freed together (as a forward's temporaries); prints the page
# faults of the last 10 of 20 rounds.
_PROBE = """
import resource, torch
from ssmkit.ops import cpu_memory
print(cpu_memory.keep_freed_memory())
for i in range(20):
    if i == 10:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.ones(2 << 20) for _ in range(3)]
    del ts
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(keep: str) -> tuple[str, int]:
    env = dict(os.environ, SSMKIT_CPU_KEEP_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    ok, faults = out.stdout.split()
    return ok, int(faults)


@glibc
def test_freed_memory_is_reused_without_page_faults():
    ok, faults = _probe("1")
    assert ok == "True" and faults < 100  # (10 rounds x 6144 pages if each round were faulted in)
    ok, _ = _probe("0")  # glibc's own heuristics decide how often it faults then: not asserted
    assert ok == "False"


def test_opt_out_and_once(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_done", None)
    monkeypatch.setenv("SSMKIT_CPU_KEEP_MEMORY", "0")
    assert cpu_memory.keep_freed_memory() is False
    monkeypatch.setenv("SSMKIT_CPU_KEEP_MEMORY", "1")
    assert cpu_memory.keep_freed_memory() is False  # decided once per process


def test_language_model_asks_on_cpu_forward(monkeypatch):
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    model = LanguageModel(ModelConfig.from_name("tiny-mamba")).eval()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert calls
