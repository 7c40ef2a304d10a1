"""Curvature-vector products: Hessian, Gauss-Newton and Fisher, one batch or averaged over a dataset.

Each ``*_vp`` computes one product; each ``*_operator`` fixes the point and the
data and returns the operator ``v -> C v`` that :mod:`hvpopt.linalg` solves with.
Beside them, structured curvature: K-FAC and EK-FAC fitted on a dataset
(:func:`fit_kronecker_factors`) on the dense layers found in any model
(:func:`layer_coverage`), applied by :func:`kronecker_operator` and
:func:`kronecker_inverse` without an iterative solve.

Moved in 0.2: ``dense_matrix``, ``exact_diagonal`` and ``hutchinson_diagonal``
work on any operator and live in :mod:`hvpopt.linalg` (and at the top level).
``hvpopt.curvature.<name>`` still finds them in this release, with a
``DeprecationWarning``.
"""

from hvpopt import _moved
from hvpopt.curvature.averaged import average_over_batches, average_over_chunks
from hvpopt.curvature.dense_layers import DenseLayer, LeafTreatment, find_dense_layers, layer_coverage
from hvpopt.curvature.fisher import (
    empirical_fisher_operator,
    empirical_fisher_vp,
    fisher_operator,
    fisher_vp,
    mc_fisher_operator,
    mc_fisher_vp,
    sampled_gradient,
)
from hvpopt.curvature.ggn import ggn_operator, ggn_vp, output_hessian
from hvpopt.curvature.hvp import HVP_MODES, hessian_operator, hvp
from hvpopt.curvature.kronecker import (
    FISHER_TARGETS,
    KRONECKER_KINDS,
    KroneckerFactors,
    KroneckerStatistics,
    fit_kronecker_factors,
    kronecker_factors,
    kronecker_fit_memory,
    kronecker_from_arrays,
    kronecker_inverse,
    kronecker_operator,
    kronecker_statistics,
    kronecker_to_arrays,
)
from hvpopt.curvature.sandwich import sandwich_operator
from hvpopt.curvature.tapped import TappedModel, tapped_model

__all__ = [
    "FISHER_TARGETS",
    "HVP_MODES",
    "KRONECKER_KINDS",
    "DenseLayer",
    "KroneckerFactors",
    "KroneckerStatistics",
    "LeafTreatment",
    "TappedModel",
    "average_over_batches",
    "average_over_chunks",
    "empirical_fisher_operator",
    "empirical_fisher_vp",
    "find_dense_layers",
    "fisher_operator",
    "fisher_vp",
    "fit_kronecker_factors",
    "kronecker_factors",
    "kronecker_fit_memory",
    "ggn_operator",
    "ggn_vp",
    "hessian_operator",
    "hvp",
    "kronecker_from_arrays",
    "kronecker_inverse",
    "kronecker_operator",
    "kronecker_statistics",
    "kronecker_to_arrays",
    "layer_coverage",
    "mc_fisher_operator",
    "mc_fisher_vp",
    "output_hessian",
    "sampled_gradient",
    "sandwich_operator",
    "tapped_model",
]

__getattr__ = _moved.forwarding_getattr(
    "hvpopt.curvature",
    {name: f"hvpopt.linalg:{name}" for name in ("dense_matrix", "exact_diagonal", "hutchinson_diagonal")},
)
