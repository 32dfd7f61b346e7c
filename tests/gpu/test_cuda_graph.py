"""CUDA-graph decoding gives the same greedy tokens as ``ssmkit.generate`` (marked gpu)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("pattern", ["MMMM", "MAMA"])
def test_graph_generation_matches_eager(pattern):
    from ssmkit.inference.cuda_graph import clear_graphs, generate_cuda_graph
    from ssmkit.inference.generate import generate
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    cfg = ModelConfig(d_model=128, n_layer=4, vocab_size=1000, layer_pattern=pattern,
                      attn_cfg={"n_heads": 4})
    torch.manual_seed(0)
    m = LanguageModel(cfg).cuda().eval()
    ids = torch.randint(0, 1000, (3, 37), device="cuda")
    ref = generate(m, ids, max_new_tokens=20)
    out = generate_cuda_graph(m, ids, max_new_tokens=20)
    assert torch.equal(ref, out)
    out2 = generate_cuda_graph(m, ids, max_new_tokens=20)  # reuses the captured graph
    assert torch.equal(ref, out2)
    clear_graphs()
