"""Curvature-vector products: Hessian, Gauss-Newton and Fisher, one batch or averaged over a dataset.

Each ``*_vp`` computes one product; each ``*_operator`` fixes the point and the
data and returns the operator ``v -> C v`` that :mod:`hvpopt.linalg` solves with.

Moved in 0.2: ``dense_matrix``, ``exact_diagonal`` and ``hutchinson_diagonal``
work on any operator and live in :mod:`hvpopt.linalg` (and at the top level).
``hvpopt.curvature.<name>`` still finds them in this release, with a
``DeprecationWarning``.
"""

from hvpopt import _moved
from hvpopt.curvature.averaged import average_over_batches, average_over_chunks
from hvpopt.curvature.fisher import (
    empirical_fisher_operator,
    empirical_fisher_vp,
    fisher_operator,
    fisher_vp,
    mc_fisher_operator,
    mc_fisher_vp,
)
from hvpopt.curvature.ggn import ggn_operator, ggn_vp, output_hessian
from hvpopt.curvature.hvp import HVP_MODES, hessian_operator, hvp
from hvpopt.curvature.sandwich import sandwich_operator

__all__ = [
    "HVP_MODES",
    "average_over_batches",
    "average_over_chunks",
    "empirical_fisher_operator",
    "empirical_fisher_vp",
    "fisher_operator",
    "fisher_vp",
    "ggn_operator",
    "ggn_vp",
    "hessian_operator",
    "hvp",
    "mc_fisher_operator",
    "mc_fisher_vp",
    "output_hessian",
    "sandwich_operator",
]

__getattr__ = _moved.forwarding_getattr(
    "hvpopt.curvature",
    {name: f"hvpopt.linalg:{name}" for name in ("dense_matrix", "exact_diagonal", "hutchinson_diagonal")},
)
