"""CUDA-graph decoding of DeltaNet (D), Gated DeltaNet (G), Mamba-2 (2) and Mamba-3 (3; the
tiny-mamba3 and tiny-mamba3-mimo presets, SISO and rank-2 MIMO) language models and hybrids with
attention (marked gpu): the captured step gives the eager step's logits and
``generate_cuda_graph`` / ``generate(cuda_graph=True)`` / ``ssmkit generate --cuda-graph`` the
eager greedy tokens, with the step's default forms and with the Triton forms forced (the fused
delta-rule and Mamba-3 decode kernels).

    pytest -q -m gpu tests/gpu/test_cuda_graph_mixers.py
"""

import pytest
import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.inference import allocate_cache, decode_one_token, prefill
from ssmkit.inference.cuda_graph import CUDAGraphDecoder, generate_cuda_graph
from ssmkit.inference.generate import generate
from ssmkit.ops.dispatch import force_backend

pytestmark = pytest.mark.gpu

# layer patterns, or presets by name ("tiny-..."; byte-level vocabulary)
PATTERNS = ["DD", "GG", "22", "GA", "2A", "GDA2", "tiny-mamba3", "tiny-mamba3-mimo", "3A"]
BACKENDS = [None, "triton"]  # None: what "auto" picks; "triton": every Triton form forced


def build(pattern, dtype=torch.float32):
    if pattern.startswith("tiny-"):
        cfg = ModelConfig.from_name(pattern)
    else:
        cfg = ModelConfig(d_model=128, n_layer=len(pattern), vocab_size=1000, layer_pattern=pattern,
                          mamba2_cfg={"d_state": 32, "headdim": 32, "chunk_size": 32},
                          attn_cfg={"n_heads": 4, "n_kv_heads": 2},
                          deltanet_cfg={"num_heads": 2, "num_v_heads": 4, "head_dim": 64},
                          mamba3_cfg={"d_state": 32, "headdim": 32, "chunk_size": 32})
    torch.manual_seed(0)
    return LanguageModel(cfg).to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("backend", BACKENDS, ids=["auto", "triton"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_captured_step_gives_the_eager_logits(pattern, backend):
    m = build(pattern)
    vocab = m.config.vocab_size
    ids = torch.randint(0, vocab, (3, 21), device="cuda")
    with force_backend(backend), torch.inference_mode():
        cache = allocate_cache(m, 3, 40)
        prefill(m, ids, cache)
        eager_cache = cache.clone()
        ptrs = cache.data_ptrs()
        dec = CUDAGraphDecoder(m, cache)
        tok = ids[:, -1]
        for i in range(6):
            tok = (tok * 7 + i) % vocab
            want = decode_one_token(m, tok, eager_cache)
            got = dec(tok).clone()
            assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), (pattern, i)
        assert cache.data_ptrs() == ptrs and cache.seqlen_offset == eager_cache.seqlen_offset
        for a, b in zip(cache.states, eager_cache.states):
            for name, t in a.tensors().items():
                w = b.tensors()[name].float()  # (an attention cache's slot mask is bool)
                assert (t.float() - w).abs().max().item() <= 1e-4 * max(1.0, w.abs().max().item()), name
        dec.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=["auto", "triton"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_graph_generation_gives_the_eager_tokens(pattern, backend):
    m = build(pattern)
    ids = torch.randint(0, m.config.vocab_size, (2, 37), device="cuda")
    with force_backend(backend):
        ref = generate(m, ids, max_new_tokens=16)
        assert torch.equal(generate_cuda_graph(m, ids, max_new_tokens=16), ref)
        assert torch.equal(generate_cuda_graph(m, ids, max_new_tokens=16), ref)  # the kept graph, replayed
        assert torch.equal(generate(m, ids, max_new_tokens=16, cuda_graph=True), ref)


@pytest.mark.parametrize("pattern", ["GG", "GA", "3A"])
def test_bf16_graph_generation(pattern):
    m = build(pattern, torch.bfloat16)
    ids = torch.randint(0, 1000, (4, 64), device="cuda")
    with force_backend("triton"):
        ref = generate(m, ids, max_new_tokens=12)
        assert torch.equal(generate_cuda_graph(m, ids, max_new_tokens=12), ref)


@pytest.mark.parametrize("preset", ["tiny-gated-deltanet", "tiny-mamba3", "tiny-mamba3-mimo"])
def test_cli_generate_cuda_graph_runs_a_preset(preset, capsys):
    from ssmkit.cli.main import main

    outs = []
    for extra in ([], ["--cuda-graph"]):
        torch.manual_seed(0)  # the preset's random weights
        assert main(["generate", preset, "--prompt", "The state", "--max-new-tokens", "12",
                     "--device", "cuda", "--ignore-eos", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_bench_generation_takes_a_gated_deltanet_model(tmp_path, capsys):
    import json

    from ssmkit.cli.main import main

    out = tmp_path / "gen.json"
    assert main(["bench", "generation", "--device", "cuda", "--size", "tiny", "--ssm", "gated-deltanet",
                 "--prompt", "32", "--new", "8", "--max-batch", "2", "--reps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]["gated-deltanet"]] == [1, 2]
    assert "Gated DeltaNet tok/s" in capsys.readouterr().out
