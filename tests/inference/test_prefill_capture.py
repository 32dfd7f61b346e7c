"""What capturing the prefill in a CUDA graph (:class:`ssmkit.inference.cuda_graph.CUDAGraphPrefill`)
needs, checked on the CPU for Mamba and Mamba-2 language models: the prefill never reads a tensor's
value on the host, on the meta device (where any such read raises) with the default forms, and
with the Triton forms forced (the interpreter) under a dispatch mode that records host reads. The
input ids' range check is left out as under a capture (the captured prefill checks the ids before
each replay). The capture itself runs on a GPU (tests/gpu/test_mamba2_generation_gpu.py)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssmkit.models.lm as lm
from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, prefill
from ssmkit.inference.cuda_graph import _prefill_capturable
from ssmkit.ops.dispatch import force_backend

# aten ops that read a tensor's value back to the host (a synchronisation on a GPU)
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}


def build(pattern, device="cpu", **kw):
    cfg = ModelConfig(d_model=32, n_layer=len(pattern), vocab_size=64, layer_pattern=pattern,
                      mamba2_cfg={"d_state": 8, "headdim": 8, "chunk_size": 8}, attn_cfg={"n_heads": 2},
                      ssm_cfg={"d_state": 8}, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        return LanguageModel(cfg).eval()


@pytest.fixture
def no_ids_check(monkeypatch):
    """The ids' range check off, as during a capture."""
    check = lm._check_ids
    monkeypatch.setattr(lm, "_check_ids", lambda name, ids, vocab, ndim: check(name, ids, 0, ndim))


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def test_capturable_models():
    assert _prefill_capturable(build("2")) and _prefill_capturable(build("M2"))
    assert not _prefill_capturable(build("2A"))  # attention reads its cache's fill level
    assert not _prefill_capturable(build("2", mlp="swiglu", d_intermediate=48))
    assert not _prefill_capturable(build("G"))


@pytest.mark.parametrize("pattern", ["2", "M2"])
def test_prefill_reads_no_value_on_the_host(pattern, no_ids_check):
    m = build(pattern, device="meta")
    cache = allocate_cache(m, 2, 16, device="meta")
    with torch.inference_mode():
        out = prefill(m, torch.zeros(2, 8, dtype=torch.long, device="meta"), cache)
    assert out.shape == (2, m.config.padded_vocab_size)


@pytest.mark.triton
def test_triton_prefill_reads_no_value_on_the_host(no_ids_check):
    m = build("2")
    cache = allocate_cache(m, 2, 16)
    with torch.inference_mode(), force_backend("triton"), _HostReads() as mode:
        prefill(m, torch.randint(0, 64, (2, 8)), cache)
    assert not mode.reads, dict(mode.reads)
    # the check is only as good as this: an attention layer's prefill into a cache is seen
    m = build("2A")
    cache = allocate_cache(m, 2, 16)
    with torch.inference_mode(), force_backend("triton"), _HostReads() as mode:
        prefill(m, torch.randint(0, 64, (2, 8)), cache)
    assert mode.reads
