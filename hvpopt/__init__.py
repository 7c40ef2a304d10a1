"""hvpopt: second-order optimization in JAX.

Curvature-vector products (Hessian, Gauss-Newton, Fisher) on any parameter
pytree, the matrix-free solvers built on them, and the optimizers and influence
estimators built on those.
"""

from hvpopt import demo, losses, models
from hvpopt.curvature import (
    HVP_MODES,
    average_over_batches,
    average_over_chunks,
    dense_matrix,
    empirical_fisher_operator,
    empirical_fisher_vp,
    exact_diagonal,
    fisher_operator,
    fisher_vp,
    ggn_operator,
    ggn_vp,
    hessian_operator,
    hutchinson_diagonal,
    hvp,
    mc_fisher_operator,
    mc_fisher_vp,
)
from hvpopt.jacobian import jacobian

__version__ = "0.1.0"

__all__ = [
    "HVP_MODES",
    "average_over_batches",
    "average_over_chunks",
    "dense_matrix",
    "empirical_fisher_operator",
    "empirical_fisher_vp",
    "exact_diagonal",
    "fisher_operator",
    "fisher_vp",
    "ggn_operator",
    "ggn_vp",
    "hessian_operator",
    "hutchinson_diagonal",
    "hvp",
    "jacobian",
    "losses",
    "models",
    "mc_fisher_operator",
    "mc_fisher_vp",
]
