"""What capturing the decode step in a CUDA graph needs, checked on the CPU for the DeltaNet (D),
Gated DeltaNet (G), Mamba-2 (2) and Mamba-3 (3, SISO and MIMO) language models and hybrids with
attention: the step updates
the cache in place (the same buffers at the same addresses), matches the full forward, and never
reads a tensor's value on the host (run on the meta device, where any such read raises). The
device path of the step runs under a forced Triton backend (the Triton interpreter on the CPU);
the capture itself is tested on a GPU (tests/gpu/test_cuda_graph_mixers.py)."""

import importlib

import pytest
import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, decode_one_token, prefill
from ssmkit.inference.cuda_graph import CUDAGraphDecoder
from ssmkit.ops.dispatch import force_backend, triton_installed
from ssmkit.ops.mamba3 import Mamba3Carry, mamba3_step

# "-mimo": the Mamba-3 layers rank-2 MIMO with the output norm (as the tiny-mamba3-mimo preset)
PATTERNS = ["D", "G", "2", "GA", "2A", "3", "3-mimo", "3A"]
MIMO = {"is_mimo": True, "mimo_rank": 2, "is_outproj_norm": True}


def build(case, device="cpu", dtype=torch.float64):
    pattern, _, variant = case.partition("-")
    cfg = ModelConfig(d_model=32, n_layer=len(pattern), vocab_size=64, layer_pattern=pattern,
                      mamba2_cfg={"d_state": 8, "headdim": 8, "chunk_size": 8}, attn_cfg={"n_heads": 2},
                      deltanet_cfg={"num_heads": 2, "num_v_heads": 4, "chunk_size": 8},
                      mamba3_cfg={"d_state": 8, "headdim": 8, "chunk_size": 8,
                                  **(MIMO if variant == "mimo" else {})})
    torch.manual_seed(0)
    with torch.device(device):
        m = LanguageModel(cfg)
    return m.to(dtype).eval() if device != "meta" else m.eval()


def _decode_matches_forward(m, steps):
    ids = torch.randint(0, 64, (2, 3 + steps))
    with torch.inference_mode():
        full = m(ids).logits
        cache = allocate_cache(m, 2, ids.shape[1])
        prefill(m, ids[:, :3], cache)
        ptrs, nbytes = cache.data_ptrs(), cache.nbytes()
        got = [decode_one_token(m, ids[:, t], cache) for t in range(3, 3 + steps)]
    assert cache.data_ptrs() == ptrs and cache.nbytes() == nbytes, "the step reallocated cache buffers"
    err = (torch.stack(got, 1) - full[:, 3:]).abs().max().item()
    assert err <= 1e-6, err  # (float32 logits)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_step_keeps_the_cache_buffers_and_matches_the_forward(pattern):
    _decode_matches_forward(build(pattern), steps=5)


@pytest.mark.triton
@pytest.mark.skipif(not triton_installed(), reason="needs triton")
@pytest.mark.parametrize("pattern", ["D", "G", "2", "3", "3-mimo"])
def test_triton_step_keeps_the_cache_buffers_and_matches_the_forward(pattern):
    # forced Triton: the device path of every mixer's step (the fused delta-rule and Mamba-3 step
    # kernels)
    m = build(pattern)
    with force_backend("triton"):
        _decode_matches_forward(m, steps=2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_step_reads_no_value_on_the_host(pattern):
    """The device path of the step on meta tensors: a ``.item()``, ``bool(tensor)`` or a shape that
    depends on values would raise here (on a GPU: a host synchronisation, which a capture forbids)."""
    m = build(pattern, device="meta")
    cache = allocate_cache(m, 2, 16, device="meta")
    with torch.inference_mode():
        out = m.step(torch.zeros(2, dtype=torch.long, device="meta"), cache)
    assert out.shape == (2, m.config.padded_vocab_size)
    with pytest.raises(Exception):  # noqa: B017  (the check above is only as good as this)
        bool(out[0, 0] > 0)


@pytest.mark.skipif(not triton_installed(), reason="needs triton")
@pytest.mark.parametrize("rank", [1, 2])
def test_mamba3_triton_step_reads_no_value_on_the_host(rank, monkeypatch):
    """The Triton Mamba-3 step's host code (everything around its kernel, the angle wrap included)
    on meta tensors, the kernel launch replaced by a stub that checks its arguments."""
    m3t = importlib.import_module("ssmkit.ops.mamba3.triton")  # (ssmkit.ops.mamba3 is also a function)
    launched = []

    class Stub:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                assert all(a.device.type == "meta" for a in args if isinstance(a, torch.Tensor))
                launched.append(grid)
            return launch

    monkeypatch.setattr(m3t, "_kernel", Stub)
    b, H, P, N, S, G, R = 2, 4, 8, 8, 2, 1, rank
    with torch.device("meta"):
        state = Mamba3Carry(torch.zeros(b, H, S), torch.zeros(b, H, P, N), torch.zeros(b, R, H, N),
                            torch.zeros(b, H, P))
        x, z = torch.zeros(b, H, P), torch.zeros(b, H, P)
        dt = dA = trap = torch.zeros(b, H)
        BC = torch.zeros(b, G, N) if R == 1 else torch.zeros(b, R, G, N)
        bias = torch.zeros(H, N) if R == 1 else torch.zeros(H, R, N)
        mimo = {} if R == 1 else {"mimo_x": torch.zeros(H, R, P), "mimo_z": torch.zeros(H, R, P),
                                  "mimo_o": torch.zeros(H, R, P)}
        y = mamba3_step(state, x, dt, dA, BC, BC, trap, torch.zeros(b, H, S), torch.zeros(H), z,
                        B_bias=bias, C_bias=bias, **mimo, backend="triton")
    assert y.shape == (b, H, P) and launched == [(b * H,)]


def test_decoder_needs_a_cuda_model():
    m = build("G")
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphDecoder(m, allocate_cache(m, 1, 4))
