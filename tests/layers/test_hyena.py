"""Hyena's implicit filter, and a tiny language model with pattern "HY" (H3 then Hyena) that
trains and decodes."""

import torch

from ssmkit.layers.long_conv import ImplicitFilter
from ssmkit.testing import assert_close


def test_implicit_filter_window_decays():
    f = ImplicitFilter(4, l_max=64).double()
    h = f.filter(64, torch.float64)
    assert h.shape == (64, 4)
    win = torch.exp(-f.decay.double() * 63 / 64)
    assert bool((win[-1] < win[0]).item())  # the last channel decays fastest


def test_lm_pattern_hy_trains():
    from ssmkit.models import LanguageModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layer=2, vocab_size=11, layer_pattern="HY",
                      h3_cfg={"d_state": 8}, hyena_cfg={"l_max": 32, "filter_cfg": {"d_hidden": 8}})
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    model = LanguageModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 11, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1
    # decoding through the model's states (prefill, then one token at a time) == the full forward
    model.eval()
    with torch.no_grad():
        full = model(ids[:1, :8]).logits[0].float()
        states = model.allocate_states(1, 16)
        model(ids[:1, :5], cache=states)
        steps = [model.step(ids[:1, t], states)[0] for t in range(5, 8)]
    assert_close("lm decode", full[5:8], torch.stack(steps).float(), rel=1e-4)
    # a left-padded batch generates what each row generates alone
    from ssmkit.inference.generate import generate

    am = torch.ones(2, 8, dtype=torch.long)
    am[1, :3] = 0
    out = generate(model, ids[:2, :8], max_new_tokens=3, attention_mask=am)
    assert torch.equal(out[1, 8:], generate(model, ids[1:2, 3:8], max_new_tokens=3)[0, 5:])
