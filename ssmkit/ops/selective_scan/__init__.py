"""The selective scan of Mamba (S6): public entry points with input validation.

Forms of ``"selective_scan"``: ``reference`` (sequential, autograd), ``chunked`` (fast CPU form,
hand-written backward), ``triton`` (GPU, when present). :func:`selective_scan_step` (op
``"selective_scan_step"``) advances a state by T >= 1 tokens for decoding. See ``README.md`` in
this folder for the math.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from ssmkit._checks import check_cu_seqlens, check_same_device, check_tensor, read_values
from ssmkit.ops.dispatch import get
from ssmkit.ops.selective_scan import chunked, reference, step  # noqa: F401  (register forms)

if importlib.util.find_spec("triton") is not None and importlib.util.find_spec(
    "ssmkit.ops.selective_scan.triton"
) is not None:  # the GPU form lives in its own module and imports Triton lazily
    try:
        from ssmkit.ops.selective_scan import triton as _triton  # noqa: F401
    except ImportError:  # pragma: no cover - a broken Triton install must not break the CPU path
        pass

__all__ = ["selective_scan", "selective_scan_step", "selective_state_update"]


def _check_real(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.is_complex():
        raise TypeError(f"{name} must be real (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_A(A: torch.Tensor, dim: int, values: bool) -> int:
    check_tensor("A", A, 2, desc=f"(dim={dim}, N)")
    _check_real("A", A)
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, N), got {tuple(A.shape)}")
    if A.shape[1] < 1:
        raise ValueError(f"A must have N >= 1 state columns, got shape {tuple(A.shape)}")
    if values and bool((A > 0).any()):
        raise ValueError("A must be non-positive (a stable SSM: A = -exp(A_log)); got positive entries")
    return A.shape[1]


def _check_BC(name: str, M: torch.Tensor, lead: tuple[int, ...], dim: int, N: int, lead_desc: str) -> int:
    k = len(lead)
    check_tensor(name, M, (k + 1, k + 2), desc=f"({lead_desc}, N={N}) or ({lead_desc}, G, N={N})")
    _check_real(name, M)
    if tuple(M.shape[:k]) != lead or M.shape[-1] != N:
        raise ValueError(
            f"{name} must have shape ({lead_desc}, N={N}) or ({lead_desc}, G, N={N}) with "
            f"{lead_desc} = {lead}, got {tuple(M.shape)}"
        )
    G = 1 if M.dim() == k + 1 else M.shape[k]
    if G < 1 or dim % G:
        raise ValueError(f"{name}: the number of groups G={G} must divide dim={dim}")
    return G


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    *,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective SSM scan (Mamba, Gu & Dao 2023, Algorithm 2):

        Δ_t = softplus(dt_t + dt_bias)   (or dt_t + dt_bias without ``dt_softplus``)
        h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t x_t B_t        (ZOH Ā, Euler B̄ = ΔB)
        y_t = (C_t · h_t + D x_t) * silu(z_t)

    Args:
        x, dt: ``(batch, seqlen, dim)``.
        A: ``(dim, N)``, real and non-positive.
        B, C: ``(batch, seqlen, N)`` or ``(batch, seqlen, G, N)``; channel ``d`` uses group
            ``d // (dim // G)``.
        D, dt_bias: ``(dim,)`` or None. z: ``(batch, seqlen, dim)`` or None (no gate).
        initial_state: ``(batch, dim, N)`` (``(num_seqs, dim, N)`` with ``cu_seqlens``), zeros if
            None; gradients flow into it.
        return_final_state: also return the final state ``(batch, dim, N)`` (float32, or float64
            for float64 input), differentiable.
        cu_seqlens: ``(num_seqs + 1,)`` int32/int64 cumulative lengths of sequences packed along
            seqlen (batch must be 1); the state restarts at every boundary.
        backend: ``"auto" | "reference" | "chunked" | "triton"``.
        check: also check values (A <= 0, ``cu_seqlens`` sorted). None: only for CPU tensors,
            since reading GPU data synchronises with the host and cannot be captured in a CUDA
            graph. Shapes, dtypes and devices are always checked.

    Every argument after ``dt_bias`` is keyword-only.

    Returns:
        ``y`` ``(batch, seqlen, dim)`` in ``x``'s dtype, and the final state if asked.
    """
    check_tensor("x", x, 3, desc="(batch, seqlen, dim)")
    _check_real("x", x)
    bsz, L, dim = x.shape
    lead = f"(batch={bsz}, seqlen={L}, dim={dim})"
    check_tensor("dt", dt, shape=(bsz, L, dim), desc=lead)
    _check_real("dt", dt)
    values = read_values(check, x)
    N = _check_A(A, dim, values)
    G = _check_BC("B", B, (bsz, L), dim, N, "batch, seqlen")
    _check_BC("C", C, (bsz, L), dim, N, "batch, seqlen")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    del G
    check_tensor("D", D, shape=(dim,), desc=f"(dim={dim},)", allow_none=True)
    check_tensor("dt_bias", dt_bias, shape=(dim,), desc=f"(dim={dim},)", allow_none=True)
    check_tensor("z", z, shape=(bsz, L, dim), desc=lead, allow_none=True)
    for name, t in (("D", D), ("dt_bias", dt_bias), ("z", z)):
        _check_real(name, t)
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    check_cu_seqlens(cu_seqlens, bsz, L, values)
    nstate = bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    check_tensor(
        "initial_state", initial_state, shape=(nstate, dim, N),
        desc=f"({'num_seqs' if cu_seqlens is not None else 'batch'}={nstate}, dim={dim}, N={N})",
        allow_none=True,
    )
    _check_real("initial_state", initial_state)
    check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      initial_state=initial_state, cu_seqlens=cu_seqlens)
    fn = get("selective_scan", backend, x)
    return fn(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state, cu_seqlens)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           backend="auto"):
    """Deprecated name of :func:`selective_scan_step` (same arguments, options positional)."""
    warnings.warn("selective_state_update is deprecated: use selective_scan_step (same arguments; "
                  "dt_softplus and backend keyword-only)", DeprecationWarning, stacklevel=2)
    return selective_scan_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus, backend=backend)


def selective_scan_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    *,
    dt_softplus: bool = False,
    backend: str = "auto",
    check: bool | None = None,
) -> torch.Tensor:
    """Advance the scan state by T >= 1 tokens, in place (decoding): :func:`selective_scan`
    continued from ``state``.

    Args:
        state: ``(batch, dim, N)`` float32 (or float64); updated in place.
        x, dt, z: ``(batch, dim)`` for one token or ``(batch, T, dim)`` for T tokens.
        A: ``(dim, N)`` non-positive. B, C: ``(batch, N)`` / ``(batch, G, N)`` for one token,
            ``(batch, T, N)`` / ``(batch, T, G, N)`` for T tokens.
        D, dt_bias: ``(dim,)`` or None. dt_softplus: Δ = softplus(dt + dt_bias).
        backend: ``"auto" | "reference" | "triton"``. check: as in :func:`selective_scan`.

    Returns:
        ``y`` with the shape and dtype of ``x``.
    """
    check_tensor("state", state, 3, desc="(batch, dim, N)")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"state must be float32 (or float64), got {state.dtype}")
    check_tensor("x", x, (2, 3), desc="(batch, dim) or (batch, T, dim)")
    _check_real("x", x)
    single = x.dim() == 2
    x3 = x.unsqueeze(1) if single else x
    bsz, T, dim = x3.shape
    N = _check_A(A, dim, read_values(check, x))
    if tuple(state.shape) != (bsz, dim, N):
        raise ValueError(f"state must have shape (batch={bsz}, dim={dim}, N={N}), got {tuple(state.shape)}")
    xdesc = f"(batch={bsz}, dim={dim})" if single else f"(batch={bsz}, T={T}, dim={dim})"
    lead = (bsz,) if single else (bsz, T)
    ldesc = "batch" if single else "batch, T"
    check_tensor("dt", dt, shape=x.shape, desc=xdesc)
    check_tensor("z", z, shape=x.shape, desc=xdesc, allow_none=True)
    _check_BC("B", B, lead, dim, N, ldesc)
    _check_BC("C", C, lead, dim, N, ldesc)
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    check_tensor("D", D, shape=(dim,), desc=f"(dim={dim},)", allow_none=True)
    check_tensor("dt_bias", dt_bias, shape=(dim,), desc=f"(dim={dim},)", allow_none=True)
    for name, t in (("dt", dt), ("z", z), ("B", B), ("C", C), ("D", D), ("dt_bias", dt_bias)):
        _check_real(name, t)
    check_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if single:
        dt, z, B, C = dt.unsqueeze(1), None if z is None else z.unsqueeze(1), B.unsqueeze(1), C.unsqueeze(1)
    if B.dim() == 3:  # (batch, T, N) -> (batch, T, 1, N)
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    fn = get("selective_scan_step", backend, x)
    y = fn(state, x3, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return y.squeeze(1) if single else y
