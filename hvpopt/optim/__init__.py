"""Second-order optimizers as optax transformations, called the way ``optax.lbfgs`` is.

Each ``update`` takes what it needs beyond the gradient as keywords: the value,
the gradient and ``value_fn`` for the line search, and a curvature batch where
the optimizer builds Gauss-Newton or Fisher products. :func:`minimize_newton_cg`
runs Newton-CG as an inner minimisation inside a jitted computation.
Hessian-free and natural gradient take a ``precond`` factory, e.g.
:func:`kronecker_preconditioner` (K-FAC fitted on each step's curvature batch).
"""

from hvpopt.optim.hessian_free import HessianFreeState, hessian_free
from hvpopt.optim.minimize import Minimum, minimize_newton_cg
from hvpopt.optim.natural_gradient import NaturalGradientState, natural_gradient
from hvpopt.optim.newton_cg import NewtonCGState, newton_cg
from hvpopt.optim.preconditioners import kronecker_preconditioner

__all__ = [
    "HessianFreeState",
    "Minimum",
    "NaturalGradientState",
    "NewtonCGState",
    "hessian_free",
    "kronecker_preconditioner",
    "minimize_newton_cg",
    "natural_gradient",
    "newton_cg",
]
