"""ssmkit: state space sequence models on every machine.

S4 and S4D (HiPPO theory; convolution and recurrent views), Mamba (the selective SSM "S6"),
Mamba-2 (state space duality, chunked SSD), DeltaNet, and hybrid SSM + attention (+ MoE)
language models, in pure PyTorch on the CPU and Triton kernels on NVIDIA GPUs.

Layout (dependencies point one way)::

    theory -> ops -> layers -> models -> inference / training -> tasks -> cli

Tensor layout: every op takes ``(batch, seqlen, ...)``; per-op docstrings give full shapes.

Glossary of symbols (as in the papers)
--------------------------------------
===========  ===================================================================================
symbol       meaning
===========  ===================================================================================
u, x         input sequence. S4 writes the input u(t) and the state x(t); Mamba writes the input
             x_t and the state h_t. In ssmkit's op signatures ``x`` is always the *input* and
             ``h`` / ``state`` the hidden state.
h            hidden state, ``(batch, dim, N)`` for Mamba, ``(batch, H, P, N)`` for Mamba-2.
y            output sequence: y_t = C_t h_t + D x_t.
Δ (dt)       step size of the discretization; Mamba makes it input dependent
             (Δ = softplus(linear(x) + dt_bias)).
A            state matrix of the continuous system h'(t) = A h(t) + B x(t). HiPPO gives dense A
             (S4: diagonal plus low rank); S4D and Mamba keep it diagonal, ``(dim, N)``;
             Mamba-2 restricts it to one scalar per head, ``(H,)``.
B            input matrix; ``(batch, seqlen, G, N)`` when selective (input dependent).
C            output matrix; same shapes as B.
D            skip connection, ``(dim,)`` (Mamba-2: ``(H,)`` or ``(H, P)``).
Ā, B̄         discretized A and B. ZOH: Ā = exp(ΔA), B̄ = (ΔA)^{-1}(exp(ΔA) - I) ΔB; Mamba uses
             the simplified B̄ = ΔB (Gu & Dao 2023, Sec. 3.5 / Algorithm 2).
K            SSM convolution kernel of an LTI SSM: K_l = C Ā^l B̄ (S4, eq. 4-5).
z            gate branch: y * silu(z) (Mamba block).
N            state size per channel (d_state).
P            head dimension (Mamba-2 headdim; DeltaNet key/value dims K, V).
H            number of heads.
G            number of groups sharing B and C (Mamba-2 ngroups); G divides H (or dim).
L            sequence length (seqlen).
β, g (α)     DeltaNet's write strength β_t in (0, 1) and gate α_t = exp(g_t) (gated DeltaNet).
===========  ===================================================================================

References: HiPPO (Gu et al., 2020), S4 (Gu, Goel & Ré, 2022), S4D (Gu et al., 2022), Mamba
(Gu & Dao, 2023), Mamba-2 / SSD (Dao & Gu, 2024), DeltaNet (Schlag et al., 2021; Yang et al.,
2024), Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2024).
"""

from ssmkit import ops, theory  # noqa: F401
from ssmkit._version import __version__  # noqa: F401

# public API: models, generation, checkpoints
from ssmkit.inference.generate import generate  # noqa: F401
from ssmkit.models.config import ModelConfig  # noqa: F401
from ssmkit.models.lm import LanguageModel, from_pretrained  # noqa: F401
