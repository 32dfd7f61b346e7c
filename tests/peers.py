"""Behaviour probes of the peer libraries the tests compare against.

A peer's behaviour changes with its releases (classes renamed, formulas fixed), so the tests ask
the installed peer what it computes instead of looking up names or versions.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def hf_mamba2_norm_per_group() -> bool | None:
    """Whether the installed ``transformers`` normalises Mamba-2's gated RMSNorm per group of
    ``d_inner / n_groups`` channels, as ``mamba_ssm`` does (True), over all of ``d_inner`` (False),
    or neither / cannot be probed (None: let the parity test decide)."""
    try:
        import transformers

        cfg = transformers.Mamba2Config(hidden_size=16, num_heads=8, head_dim=4, state_size=4, n_groups=2,
                                        expand=2, num_hidden_layers=1, vocab_size=8)
        norm = transformers.Mamba2Model(cfg).layers[0].mixer.norm
    except Exception:  # noqa: BLE001 - any failure means "cannot be probed"
        return None
    d = 32
    # group 0 small, group 1 large: per-group normalisation brings both to unit RMS
    h = torch.cat([torch.full((1, 1, d // 2), 0.01), torch.full((1, 1, d // 2), 10.0)], dim=-1)
    gate = torch.full_like(h, 20.0)  # silu(20) = 20 to float32 precision
    with torch.no_grad():
        out = norm(h, gate).float()
    w = norm.weight.detach().float()
    g = (h * gate).float()
    per_group = torch.cat([x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) for x in g.chunk(2, -1)], -1) * w
    whole = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + 1e-6) * w
    if torch.allclose(out, per_group, rtol=1e-3):
        return True
    if torch.allclose(out, whole, rtol=1e-3):
        return False
    return None


def hf_mamba2_norm_skip_reason() -> str:
    import transformers

    return (f"transformers {transformers.__version__} normalises Mamba-2's gated RMSNorm over all of d_inner, "
            "ignoring n_groups; mamba_ssm (and ssmkit) normalise per group, so n_groups > 1 cannot agree")
