"""Fused CUDA decoding (marked gpu): CUDA-graph generation equals eager generation, the Triton
decode step equals the PyTorch step in bf16 at the Mamba 1.4B layer shape, and the fused kernels
at batch 64."""

import pytest
import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, prefill
from ssmkit.ops.dispatch import force_backend
from ssmkit.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.triton]


def _model(pattern: str, d_model: int = 128, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, n_layer=len(pattern), vocab_size=1000, layer_pattern=pattern,
                      attn_cfg={"n_heads": 4}, **kw)
    return LanguageModel(cfg).cuda().to(dtype).eval()


@pytest.mark.parametrize("pattern,kw", [("MMMM", {}), ("MAMA", {"mlp": "swiglu", "d_intermediate": 256})])
@pytest.mark.parametrize("batch", [1, 5])
def test_cuda_graph_generate_equals_eager(pattern, kw, batch):
    from ssmkit.inference.cuda_graph import clear_graphs, generate_cuda_graph
    from ssmkit.inference.generate import generate

    m = _model(pattern, **kw)
    ids = torch.randint(0, 1000, (batch, 37), device="cuda")
    ref = generate(m, ids, max_new_tokens=20)
    assert torch.equal(ref, generate_cuda_graph(m, ids, max_new_tokens=20))
    assert torch.equal(ref, generate_cuda_graph(m, ids, max_new_tokens=20))  # reused graph
    assert torch.equal(ref, generate(m, ids, max_new_tokens=20, cuda_graph=True))
    clear_graphs()


@pytest.mark.parametrize("batch", [1, 64])
def test_fused_step_matches_pytorch_step_bf16_mamba_1_4b_layer(batch):
    """Two layers of the Mamba 1.4B shape (d_inner 4096, dt_rank 128), bf16: the Triton step
    (fused add+norm, conv update, dt_proj in the state update) vs the PyTorch forms."""
    m = _model("MM", d_model=2048, dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (batch, 64), device="cuda")
    c_ref = allocate_cache(m, batch, 80)
    with torch.inference_mode():
        prefill(m, ids, c_ref)
        c_tri = c_ref.clone()
        tok = ids[:, -1]
        for _ in range(4):
            with force_backend("reference"):
                ref = m.step(tok, c_ref)
            out = m.step(tok, c_tri)  # auto on CUDA: the Triton forms
            assert rel_err(ref, out) < 2e-2
            tok = ref.argmax(-1)
    for a, b in zip(c_ref.states, c_tri.states):
        assert rel_err(a.ssm_state, b.ssm_state) < 2e-2
        assert rel_err(a.conv_state.float(), b.conv_state.float()) < 2e-2


def test_add_rms_norm_bf16_rounds_like_reference():
    from ssmkit.ops.fused.norm import add_rms_norm_reference, add_rms_norm_triton

    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(64, 2048, device="cuda")
    w = (1 + 0.1 * torch.randn(2048, device="cuda")).to(torch.bfloat16)
    y, h = add_rms_norm_triton(x, r, w, 1e-5, torch.float32)
    yr, hr = add_rms_norm_reference(x, r, w, 1e-5, torch.float32)
    # the fp32 residual is one exact add; y may differ by one bfloat16 ulp (2**-7 relative) where
    # the fp32 sums of squares were accumulated in a different order
    assert rel_err(hr, h) < 1e-7
    assert ((y.float() - yr.float()).abs() <= 2 ** -7 * yr.float().abs() + 1e-6).all()


def test_decode_kernels_batch64_d4096():
    from ssmkit.ops.conv.causal_conv1d import causal_conv1d_step
    from ssmkit.ops.fused.decode import causal_conv1d_step_triton, selective_scan_step_triton
    from ssmkit.ops.selective_scan.step import selective_scan_step_reference

    bsz, dim, N, R, W = 64, 4096, 16, 128, 4
    xz = torch.randn(bsz, 1, 2 * dim, device="cuda", dtype=torch.bfloat16)
    st = torch.randn(bsz, dim, W - 1, device="cuda", dtype=torch.bfloat16)
    st2 = st.clone()
    w, b = torch.randn(dim, W, device="cuda"), torch.randn(dim, device="cuda")
    x = causal_conv1d_step_triton(xz[..., :dim], st, w, b, "silu")
    xr = causal_conv1d_step(st2, xz[..., :dim], w, b, activation="silu", backend="reference")
    assert rel_err(xr.float(), x.float()) < 1e-2 and torch.equal(st, st2)
    dbc = torch.randn(bsz, 1, R + 2 * N, device="cuda", dtype=torch.bfloat16)
    Wdt = (torch.randn(dim, R, device="cuda") * R ** -0.5).to(torch.bfloat16)
    A = -torch.rand(dim, N, device="cuda") - 0.1
    D, bias = torch.randn(dim, device="cuda"), torch.randn(dim, device="cuda") - 2
    s = torch.randn(bsz, dim, N, device="cuda")
    s2 = s.clone()
    Bm, Cm = dbc[..., R:R + N].unsqueeze(2), dbc[..., R + N:].unsqueeze(2)
    y = selective_scan_step_triton(s, x, dbc[..., :R], A, Bm, Cm, D, xz[..., dim:], bias, True,
                                      dt_proj_weight=Wdt)
    dt = torch.nn.functional.linear(dbc[..., :R], Wdt)
    yr = selective_scan_step_reference(s2, x, dt, A, Bm, Cm, D, xz[..., dim:], bias, True)
    assert rel_err(yr.float(), y.float()) < 1e-2 and rel_err(s2, s) < 1e-3


@pytest.mark.parametrize("pdl", [False, True])
def test_small_batch_fused_step_matches_unfused_bf16(pdl, monkeypatch):
    """Batch 1, Mamba 1.4B layer shape, bf16: the four-launch step (norm + in_proj GEMV, conv +
    x_proj parts, state update, out_proj GEMV; with and without programmatic dependent launch),
    eager and inside a CUDA graph, against the unfused Triton step (add_rms_norm + cuBLAS)."""
    from ssmkit.inference.cuda_graph import CUDAGraphDecoder
    from ssmkit.layers.mamba import Mamba
    from ssmkit.models import lm
    from ssmkit.ops import dispatch

    monkeypatch.setattr(dispatch, "PDL", pdl)
    m = _model("MM", d_model=2048, dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 40), device="cuda")
    runs = []
    for fused in (False, True, True):
        monkeypatch.setattr(Mamba, "FUSED_STEP_MAX_BATCH", 1 if fused else 0)
        monkeypatch.setattr(lm, "_FUSED_HEAD_MAX_BATCH", 1 if fused else 0)
        with torch.inference_mode():
            cache = allocate_cache(m, 1, 64, device="cuda")
            logits = [prefill(m, ids[:, :30], cache)]
            step = CUDAGraphDecoder(m, cache) if len(runs) == 2 else None
            for t in range(30, 40):
                if step is None:
                    logits.append(m.step(ids[:, t], cache))
                    cache.advance(1)
                else:
                    logits.append(step(ids[:, t]).clone())  # (the graph reuses its output)
            if step is not None:
                step.close()
        runs.append((torch.stack(logits), [s.ssm_state.clone() for s in cache.states]))
    (ref, ref_states), (eager, eager_states), (graph, graph_states) = runs
    assert rel_err(eager, ref) < 2e-2
    assert torch.equal(eager, graph)
    for a, b in zip(eager_states, ref_states):
        assert rel_err(a, b) < 2e-2
    for a, b in zip(eager_states, graph_states):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch,prompt", [(1, 8192), (3, 37)])
def test_prefill_graph_replay_matches_eager(batch, prompt):
    """generate_cuda_graph captures the prefill of a Mamba-only model on its first call and
    replays it on the next (same prompt shape, new ids): tokens equal eager generation."""
    from ssmkit.inference.cuda_graph import _DECODERS, clear_graphs, generate_cuda_graph
    from ssmkit.inference.generate import generate

    m = _model("MM", d_model=256, dtype=torch.bfloat16)
    clear_graphs()
    for seed in (0, 1):
        torch.manual_seed(seed)
        ids = torch.randint(0, 1000, (batch, prompt), device="cuda")
        out = generate_cuda_graph(m, ids, max_new_tokens=12)
        assert torch.equal(out, generate(m, ids, max_new_tokens=12))
    (dec,) = _DECODERS.values()
    assert dec.prefills[prompt] is not None  # the second call replayed the captured prefill
    clear_graphs()
