"""Compiling Triton kernels for sm_90 on a machine without a GPU (Triton's NVIDIA backend and
ptxas), in a subprocess without the interpreter: the check that each kernel fits the H100's
227 KiB of shared memory per block. It takes minutes, so it runs on request only."""

import json
import os
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 227 * 1024


def assert_fits_sm90(script: str, arg: str, *, takes: str) -> None:
    """Run ``python -c script arg`` (it prints ``SHARED {json: kernel -> bytes}``) and check every
    kernel's shared memory; skip unless ``SSMKIT_COMPILE_SM90=1`` (``takes``: how long it takes,
    for the skip reason) or without Triton's NVIDIA backend."""
    from triton.backends import backends

    if os.environ.get("SSMKIT_COMPILE_SM90") != "1":
        pytest.skip(f"compiling the kernels for sm_90 takes {takes}: run with SSMKIT_COMPILE_SM90=1 after changing them")
    if "nvidia" not in backends:
        pytest.skip("Triton without its NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("SHARED ")]
    assert lines, out.stderr[-2000:]
    for name, nbytes in json.loads(lines[-1][7:]).items():
        assert nbytes <= H100_SHARED_BYTES, (name, nbytes)
