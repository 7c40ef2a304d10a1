"""Curvature-vector products: Hessian, Gauss-Newton, Fisher, and their diagonals."""

from hvpopt.curvature.averaged import average_over_batches, average_over_chunks
from hvpopt.curvature.dense import dense_matrix
from hvpopt.curvature.diagonal import exact_diagonal, hutchinson_diagonal
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
    "mc_fisher_operator",
    "mc_fisher_vp",
    "output_hessian",
    "sandwich_operator",
]
