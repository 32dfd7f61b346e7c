"""H3 block (Fu, Dao, Saab, Thomas, Rudra & Ré 2023, "Hungry Hungry Hippos"), head dimension 1.

    Q, K, V = x W_Q, x W_K, x W_V                        (batch, seqlen, d_model) each
    y = ( Q ⊙ SSM_diag( SSM_shift(K) ⊙ V ) ) W_O

``SSM_shift`` is a shift SSM (A the shift matrix, B = e_1: a learned FIR filter of ``shift_state``
taps that remembers the last few tokens), ``SSM_diag`` a diagonal SSM (S4D) that carries the
gated product across the sequence; the two multiplicative gates let the block compare tokens
(H3 Sec. 3.1). The inner sequence layer is an option (the Mamba paper's Table 1 grid, block x
inner layer): ``inner="s4d"`` (H3 as published), ``"s6"`` (a selective SSM, Mamba's S6, in the
diagonal SSM's place) or ``"hyena"`` (Hyena's implicit long filter in its place).

Decoding cost per token: the shift SSM O(shift_state d), the inner layer O(d_state d) for
``"s4d"`` / ``"s6"`` (constant-size state); O(t d) for ``"hyena"``, whose long filter has no
finite recurrence, so the state caches every input of the inner layer (``l_max`` positions).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ssmkit._checks import check_cu_seqlens, check_positive_int
from ssmkit.layers.linear import Linear
from ssmkit.layers.long_conv import (
    DiagSSM,
    ImplicitFilter,
    SelectiveSSM,
    ShiftSSM,
    check_backend,
    run_rows,
)
from ssmkit.layers.state import LayerState, check_mixer_inputs, check_step_inputs

INNER = ("s4d", "s6", "hyena")


@dataclasses.dataclass
class H3State(LayerState):
    """``shift (batch, d_model, shift_state)``: the last keys, newest first; ``ssm``: the inner
    SSM's state (``(batch, d_model, d_state/2)`` complex for s4d, ``(batch, d_model, d_state)``
    for s6, None for hyena); ``cache (batch, n, d_model)`` and ``pos (batch,)``: the inner
    layer's past inputs and their count (hyena only)."""

    shift: torch.Tensor
    ssm: torch.Tensor | None = None
    cache: torch.Tensor | None = None
    pos: torch.Tensor | None = None


class H3(nn.Module):
    """``H3(d_model, d_state=64, *, inner="s4d", shift_state=4, inner_cfg=None, backend="auto")``.

    ``inner_cfg``: keyword arguments of the inner layer (:class:`~ssmkit.layers.long_conv.DiagSSM`,
    :class:`~ssmkit.layers.long_conv.SelectiveSSM` or
    :class:`~ssmkit.layers.long_conv.ImplicitFilter`, e.g. ``{"l_max": 4096}``). ``backend``:
    the convolution / scan form (``"reference"``: direct causal sum or sequential scan;
    ``"chunked"``: FFT convolution or chunked scan; ``"auto"``).
    """

    def __init__(self, d_model: int, d_state: int = 64, *, inner: str = "s4d", shift_state: int = 4,
                 inner_cfg: dict | None = None, backend: str = "auto", layer_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_state", d_state)
        check_positive_int("shift_state", shift_state)
        check_backend(backend)
        if inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {inner!r}")
        if inner_cfg is not None and not isinstance(inner_cfg, dict):
            raise TypeError(f"inner_cfg must be a dict, got {type(inner_cfg).__name__}")
        self.d_model, self.d_state, self.inner_name, self.layer_idx = d_model, d_state, inner, layer_idx
        self.in_proj = Linear(d_model, 3 * d_model)
        self.out_proj = Linear(d_model, d_model)
        self.shift = ShiftSSM(d_model, shift_state, backend=backend)
        kw = dict(inner_cfg or {})
        kw["backend"] = backend
        if inner == "s4d":
            self.inner = DiagSSM(d_model, d_state, **kw)
        elif inner == "s6":
            self.inner = SelectiveSSM(d_model, d_state, **kw)
        else:
            self.inner = ImplicitFilter(d_model, **kw)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # -- contract ------------------------------------------------------------------------------

    def allocate_state(self, batch_size: int, device=None, dtype=None, max_seqlen: int | None = None) -> H3State:
        """Zero state (float32 SSM parts; float64 for a float64 layer). ``max_seqlen`` bounds the
        hyena inner layer's cache (``l_max`` otherwise)."""
        check_positive_int("batch_size", batch_size)
        dev = device if device is not None else self.in_proj.weight.device
        st = dict(self.shift.allocate(batch_size, dev))
        if isinstance(self.inner, ImplicitFilter):
            st.update(self.inner.allocate(batch_size, dev, max_seqlen))
        else:
            st.update(self.inner.allocate(batch_size, dev))
        return H3State(**st)

    def forward(self, x: torch.Tensor, state: H3State | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``x: (batch, seqlen, d_model)`` -> ``y`` of the same shape (or ``(y, new_state)``)."""
        check_mixer_inputs(self, x, state, cu_seqlens, mask, H3State)
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
        n_rows = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if state is not None and state.shift.shape[0] != n_rows:
            raise ValueError(f"state has batch {state.shift.shape[0]}, expected {n_rows}")
        if mask is not None and bool(mask.all()):
            mask = None
        uneven = state is not None and state.pos is not None and bool((state.pos != state.pos[0]).any())
        if uneven and mask is None and cu_seqlens is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # rows one at a time
        if cu_seqlens is None and mask is None:
            y, new = self._seq(x, state, return_state)
        else:
            y, new = run_rows(self._seq, x, state, return_state, cu_seqlens, mask,
                              lambda n: self.allocate_state(n, x.device), _cat_states)
        return (y, new) if return_state else y

    def step(self, x_t: torch.Tensor, state: H3State) -> torch.Tensor:
        """One token ``x_t: (batch, d_model)`` -> ``y_t: (batch, d_model)``; updates ``state``."""
        check_step_inputs(self, x_t, state, H3State, "shift")
        rd = self._rd()
        q, k, v = self.in_proj(x_t).to(rd).chunk(3, dim=-1)
        u = self.shift.step(k, {"shift": state.shift}) * v
        if isinstance(self.inner, ImplicitFilter):
            s = self.inner.step(u, state.cache, state.pos)
            state.pos += 1
        else:
            s = self.inner.step(u, {"ssm": state.ssm})
        return self.out_proj((q * s).to(self.out_proj.weight.dtype))

    # -- pieces --------------------------------------------------------------------------------

    def _rd(self) -> torch.dtype:
        return torch.float64 if self.in_proj.weight.dtype == torch.float64 else torch.float32

    def _seq(self, x: torch.Tensor, state: H3State | None, want: bool):
        rd = self._rd()
        q, k, v = self.in_proj(x).to(rd).chunk(3, dim=-1)
        st = None if state is None else {k_: t for k_, t in state.tensors().items()}
        ks, new_shift = self.shift(k, st, want)
        s, new_inner = self.inner(ks * v, st, want)
        y = self.out_proj((q * s).to(self.out_proj.weight.dtype))
        new = H3State(**new_shift, **new_inner) if want else None
        return y, new

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, inner={self.inner_name!r}"


def _cat_states(states: list[H3State]) -> H3State:
    first = states[0]
    return dataclasses.replace(first, **{k: torch.cat([getattr(s, k) for s in states]) for k in first.tensors()})


__all__ = ["H3", "H3State", "INNER"]
