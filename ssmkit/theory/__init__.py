"""Theory of linear state space models, as pure float64 functions.

* :mod:`~ssmkit.theory.hippo`: HiPPO transition matrices (A, B) and their normal-plus-low-rank form.
* :mod:`~ssmkit.theory.discretize`: zero-order hold, bilinear and Euler discretisation.
* :mod:`~ssmkit.theory.init`: S4D initialisations, log-uniform Δ and ``inverse_softplus``.
"""

from ssmkit.theory import discretize, hippo, init  # noqa: F401
from ssmkit.theory.init import inverse_softplus, log_uniform_dt, s4d_init  # noqa: F401
