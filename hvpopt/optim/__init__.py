"""Second-order optimizers as optax transformations, called the way ``optax.lbfgs`` is.

Each ``update`` takes what it needs beyond the gradient as keywords: the value,
the gradient and ``value_fn`` for the line search, and a curvature batch where
the optimizer builds Gauss-Newton or Fisher products. :func:`minimize_newton_cg`
runs Newton-CG as an inner minimisation inside a jitted computation.
Hessian-free and natural gradient take a ``precond`` factory, e.g.
:func:`kronecker_preconditioner` (K-FAC fitted on each step's curvature batch).
:func:`kfac` is K-FAC itself, with moving-average factors refreshed every few
steps; :func:`gauss_newton_bartlett` and :func:`hutchinson_hessian` are the
curvature-diagonal estimators of Sophia-G and Sophia-H for
``optax.contrib.sophia``.
"""

from hvpopt.optim.hessian_free import HessianFreeState, hessian_free
from hvpopt.optim.kfac import KFAC_STEP_RULES, KFACState, kfac
from hvpopt.optim.minimize import Minimum, minimize_newton_cg
from hvpopt.optim.natural_gradient import NaturalGradientState, natural_gradient
from hvpopt.optim.newton_cg import NewtonCGState, newton_cg
from hvpopt.optim.preconditioners import kronecker_preconditioner
from hvpopt.optim.sophia import DiagonalEstimatorState, gauss_newton_bartlett, hutchinson_hessian, sophia_win_rate

__all__ = [
    "KFAC_STEP_RULES",
    "DiagonalEstimatorState",
    "HessianFreeState",
    "KFACState",
    "Minimum",
    "NaturalGradientState",
    "NewtonCGState",
    "gauss_newton_bartlett",
    "hessian_free",
    "hutchinson_hessian",
    "kfac",
    "kronecker_preconditioner",
    "minimize_newton_cg",
    "natural_gradient",
    "newton_cg",
    "sophia_win_rate",
]
