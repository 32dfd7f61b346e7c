"""Hyena operator (Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon & Ré 2023), order N.

    (v, x^1, ..., x^N) = split( ShortConv( x W_in ) )        (batch, seqlen, d_model) each
    z^1 = v ,   z^{n+1}_t = x^n_t ⊙ ( h^n * z^n + D^n z^n )_t ,   y = z^{N+1} W_out

``ShortConv`` is a causal depthwise convolution of ``short_kernel`` taps over the (N+1) d_model
projected channels; each ``h^n`` is an implicit long filter (:class:`~ssmkit.layers.long_conv.
ImplicitFilter`): an FFN over positional features times an exponential window, defined for
t < ``l_max``. The long convolutions are FFT convolutions (``backend="chunked"``) or direct causal
sums (``"reference"``).

Decoding: the filters have no finite-dimensional recurrence, so the state keeps every input of
every long convolution (``(batch, N, n, d_model)``, n = ``l_max`` or the ``max_seqlen`` given to
``allocate_state``) and token t costs O(N t d_model) (a dot product of the filter with the whole
prefix) on top of the projections: decoding a length-T sequence is O(T^2), against O(T log T)
for ``forward`` on the whole sequence at once.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ssmkit._checks import check_cu_seqlens, check_positive_int
from ssmkit.layers.linear import Linear
from ssmkit.layers.long_conv import ImplicitFilter, check_backend, run_rows
from ssmkit.layers.state import LayerState, check_mixer_inputs, check_step_inputs
from ssmkit.ops.conv.fftconv import fftconv


@dataclasses.dataclass
class HyenaState(LayerState):
    """``conv (batch, short_kernel - 1, (order+1) d_model)``: the last projected inputs, oldest
    first; ``cache (batch, order, n, d_model)``: the inputs z^n of each long convolution so far;
    ``pos (batch,)``: how many positions ``cache`` holds."""

    conv: torch.Tensor
    cache: torch.Tensor
    pos: torch.Tensor


class Hyena(nn.Module):
    """``Hyena(d_model, *, order=2, l_max=2048, short_kernel=3, filter_cfg=None, backend="auto")``.

    ``filter_cfg``: more keyword arguments of each :class:`~ssmkit.layers.long_conv.ImplicitFilter`
    (``d_hidden``, ``n_bands``, ``depth``, ``omega``, ``shift``, ``target``).
    """

    def __init__(self, d_model: int, *, order: int = 2, l_max: int = 2048, short_kernel: int = 3,
                 filter_cfg: dict | None = None, backend: str = "auto", layer_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("d_model", d_model), ("order", order), ("l_max", l_max), ("short_kernel", short_kernel)):
            check_positive_int(name, v)
        check_backend(backend)
        if filter_cfg is not None and not isinstance(filter_cfg, dict):
            raise TypeError(f"filter_cfg must be a dict, got {type(filter_cfg).__name__}")
        self.d_model, self.order, self.l_max, self.layer_idx = d_model, order, l_max, layer_idx
        self.short_kernel, self.backend = short_kernel, backend
        C = (order + 1) * d_model
        self.in_proj = Linear(d_model, C)
        self.short_conv = nn.Parameter(torch.randn(short_kernel, C) / short_kernel ** 0.5)  # (taps, channels)
        self.short_bias = nn.Parameter(torch.zeros(C))
        kw = dict(filter_cfg or {})
        self.filters = nn.ModuleList(ImplicitFilter(d_model, l_max=l_max, backend=backend, **kw)
                                     for _ in range(order))
        self.out_proj = Linear(d_model, d_model)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # -- contract ------------------------------------------------------------------------------

    def allocate_state(self, batch_size: int, device=None, dtype=None, max_seqlen: int | None = None) -> HyenaState:
        """Zero state; the cache holds ``min(max_seqlen, l_max)`` positions (``l_max`` if None)."""
        check_positive_int("batch_size", batch_size)
        if max_seqlen is not None:
            check_positive_int("max_seqlen", max_seqlen)
        dev = device if device is not None else self.in_proj.weight.device
        rd = self._rd()
        n = self.l_max if max_seqlen is None else min(max_seqlen, self.l_max)
        C = (self.order + 1) * self.d_model
        return HyenaState(conv=torch.zeros(batch_size, self.short_kernel - 1, C, dtype=rd, device=dev),
                          cache=torch.zeros(batch_size, self.order, n, self.d_model, dtype=rd, device=dev),
                          pos=torch.zeros(batch_size, dtype=torch.long, device=dev))

    def forward(self, x: torch.Tensor, state: HyenaState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``x: (batch, seqlen, d_model)`` -> ``y`` of the same shape (or ``(y, new_state)``)."""
        check_mixer_inputs(self, x, state, cu_seqlens, mask, HyenaState)
        check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
        n_rows = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if state is not None and state.conv.shape[0] != n_rows:
            raise ValueError(f"state has batch {state.conv.shape[0]}, expected {n_rows}")
        if x.shape[1] > self.l_max:
            raise ValueError(f"x has seqlen {x.shape[1]} > l_max={self.l_max} (the filters' length)")
        if mask is not None and bool(mask.all()):
            mask = None
        if cu_seqlens is None and mask is None and (state is None or not bool((state.pos != state.pos[0]).any())):
            y, new = self._seq(x, state, return_state)
        else:
            if mask is None and cu_seqlens is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # rows one at a time
            y, new = run_rows(self._seq, x, state, return_state, cu_seqlens, mask,
                              lambda n: self.allocate_state(n, x.device, max_seqlen=self._cache_len(state)),
                              _cat_states)
        return (y, new) if return_state else y

    def step(self, x_t: torch.Tensor, state: HyenaState) -> torch.Tensor:
        """One token ``x_t: (batch, d_model)`` -> ``y_t``; updates ``state``. O(order t d_model)."""
        check_step_inputs(self, x_t, state, HyenaState, "conv")
        rd = self._rd()
        p = self.in_proj(x_t).to(rd)
        window = torch.cat([state.conv.to(rd), p[:, None]], dim=1)  # (b, taps, C)
        state.conv.copy_(window[:, 1:].to(state.conv.dtype))
        uc = (window * self.short_conv.to(rd).flip(0)).sum(1) + self.short_bias.to(rd)  # K_l on u_{t-l}
        v, *xs = uc.chunk(self.order + 1, dim=-1)
        z = v
        for n, f in enumerate(self.filters):
            z = xs[n] * f.step(z, state.cache[:, n], state.pos)
        state.pos += 1
        return self.out_proj(z.to(self.out_proj.weight.dtype))

    # -- pieces --------------------------------------------------------------------------------

    def _rd(self) -> torch.dtype:
        return torch.float64 if self.in_proj.weight.dtype == torch.float64 else torch.float32

    def _cache_len(self, state: HyenaState | None) -> int | None:
        return None if state is None else state.cache.shape[2]

    def _seq(self, x: torch.Tensor, state: HyenaState | None, want: bool):
        """All rows at one position: ``x (b, L, d_model)``."""
        rd = self._rd()
        L = x.shape[1]
        P = 0 if state is None else int(state.pos[0])
        if P + L > (self.l_max if state is None else state.cache.shape[2]):
            raise ValueError(f"{P} cached + {L} new positions exceed the state's cache "
                             f"({self.l_max if state is None else state.cache.shape[2]} positions)")
        p = self.in_proj(x).to(rd)
        K = self.short_conv.to(rd)
        if state is None:
            full = p
            uc = fftconv(p, K, backend=self.backend)
        else:
            full = torch.cat([state.conv.to(rd), p], dim=1)
            uc = fftconv(full, K, backend=self.backend)[:, -L:]
        uc = uc + self.short_bias.to(rd)
        v, *xs = uc.chunk(self.order + 1, dim=-1)
        z, inputs = v, []
        for n, f in enumerate(self.filters):
            inputs.append(z)
            hist = None if P == 0 else state.cache[:, n, :P]
            z = xs[n] * f.conv(z, hist)
        y = self.out_proj(z.to(self.out_proj.weight.dtype))
        new = None
        if want:
            new = state.clone() if state is not None else self.allocate_state(x.shape[0], x.device)
            n_cache = new.cache.shape[2]
            if P + L > n_cache:
                raise ValueError(f"the state's cache holds {n_cache} positions; {P} used + {L} new do not fit "
                                 "(allocate_state(..., max_seqlen=...))")
            new.cache[:, :, P:P + L] = torch.stack(inputs, dim=1).to(new.cache.dtype)
            new.pos += L
            k1 = self.short_kernel - 1
            if k1:
                tail = full[:, -k1:]
                if tail.shape[1] < k1:
                    tail = torch.cat([tail.new_zeros(tail.shape[0], k1 - tail.shape[1], tail.shape[2]), tail], dim=1)
                new.conv.copy_(tail.to(new.conv.dtype))
        return y, new

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, order={self.order}, l_max={self.l_max}"


def _cat_states(states: list[HyenaState]) -> HyenaState:
    first = states[0]
    return dataclasses.replace(first, **{k: torch.cat([getattr(s, k) for s in states]) for k in first.tensors()})
