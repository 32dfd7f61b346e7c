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

# An 8 MB tensor made and freed 20 times, each 4 KB larger than the last. With glibc's defaults
# each one is above the mmap threshold its predecessor's free set, so it is mapped and faulted
# in afresh (2049+ pages); with the thresholds raised it reuses the heap (one new page a round).
# Prints the page faults of the last 10 rounds.
_PROBE = """
import resource, torch
from ssmkit.ops import cpu_memory
print(cpu_memory.keep_freed_memory())
for i in range(20):
    if i == 10:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones((8 << 20) // 4 + 1024 * i)
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(keep: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc defaults
    env["SSMKIT_CPU_KEEP_MEMORY"] = keep
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    ok, faults = out.stdout.split()
    return ok, int(faults)


@glibc
def test_freed_memory_is_reused_without_page_faults():
    ok, faults = _probe("1")
    assert ok == "True" and faults < 100
    ok, faults = _probe("0")
    assert ok == "False" and faults > 10 * 2048


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
