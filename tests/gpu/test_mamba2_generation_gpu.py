"""Mamba-2 generation on a CUDA device (marked gpu): a captured prefill plus CUDA-graph decoding
gives the eager greedy tokens for a Mamba-2 LM (prefill captured automatically) and a Mamba-2 +
attention hybrid (eager prefill, graph decode) at batch 1 and batch 4, with the default forms and
with the Triton forms forced (``ssd_step``, the gated RMSNorm; at batch 1 then the fused step_norm
form of the step); the device step of one layer against the forward in float32 at a wide shape.

    pytest -q -m gpu tests/gpu/test_mamba2_generation_gpu.py
"""

import pytest
import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference.cuda_graph import _DECODERS, generate_cuda_graph
from ssmkit.inference.generate import generate
from ssmkit.layers.mamba2 import Mamba2
from ssmkit.ops.dispatch import force_backend
from ssmkit.testing import rel_err

pytestmark = pytest.mark.gpu


def build(pattern, dtype=torch.float32):
    cfg = ModelConfig(d_model=128, n_layer=len(pattern), vocab_size=1000, layer_pattern=pattern,
                      mamba2_cfg={"d_state": 32, "headdim": 32, "chunk_size": 32, "ngroups": 2},
                      attn_cfg={"n_heads": 4, "n_kv_heads": 2})
    torch.manual_seed(0)
    return LanguageModel(cfg).to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("pattern", ["2222", "22A2"])
def test_captured_prefill_and_graph_decode_give_the_eager_tokens(pattern, batch, backend):
    m = build(pattern)
    ids = torch.randint(0, 1000, (batch, 45), device="cuda")  # not a multiple of the chunk
    with force_backend(backend):
        ref = generate(m, ids, max_new_tokens=12)
        first = generate_cuda_graph(m, ids, max_new_tokens=12)  # eager prefill, then its capture
        again = generate_cuda_graph(m, ids, max_new_tokens=12)  # replays the captured prefill
    assert torch.equal(first, ref) and torch.equal(again, ref)
    (dec,) = [d for key, d in _DECODERS.items() if key[0] == id(m)]
    assert (45 in dec.prefills) == ("A" not in pattern)  # attention: eager prefill


@pytest.mark.parametrize("batch", [1, 4])
def test_device_step_equals_forward(batch):
    torch.manual_seed(0)
    m = Mamba2(1024, d_state=128, headdim=64, ngroups=2, chunk_size=64, dt_limit=(0.001, 0.2),
               device="cuda").eval()
    x = torch.randn(batch, 40, 1024, device="cuda")
    with torch.no_grad():
        full, st_full = m(x, return_state=True)
        for backend in (None, "triton"):
            _, st = m(x[:, :33], return_state=True)
            with force_backend(backend):
                y = torch.stack([m.step(x[:, t], st) for t in range(33, 40)], 1)
            # float32 both ways (chunked forward, recurrent step; in_proj as GEMM and GEMV)
            assert rel_err(full[:, 33:].double(), y.double()) <= 2e-5, backend
            assert rel_err(st_full.ssm_state.double(), st.ssm_state.double()) <= 2e-5, backend
            assert rel_err(st_full.conv_state.double(), st.conv_state.double()) <= 1e-5, backend


def test_bf16_batch1_graph_generation_uses_the_fused_step():
    m = build("2222", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    with force_backend("triton"):
        with torch.no_grad():
            assert m.backbone.layers[0].mixer.can_step_norm(torch.zeros(1, 128, device="cuda"))
        ref = generate(m, ids, max_new_tokens=16)
        assert torch.equal(generate_cuda_graph(m, ids, max_new_tokens=16), ref)
        assert torch.equal(generate_cuda_graph(m, ids, max_new_tokens=16), ref)
