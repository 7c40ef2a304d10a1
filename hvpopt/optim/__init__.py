"""Second-order optimizers as optax transformations, called the way ``optax.lbfgs`` is."""

from hvpopt.optim.hessian_free import HessianFreeState, hessian_free
from hvpopt.optim.natural_gradient import NaturalGradientState, natural_gradient
from hvpopt.optim.newton_cg import NewtonCGState, newton_cg

__all__ = ["HessianFreeState", "NaturalGradientState", "NewtonCGState", "hessian_free",
           "natural_gradient", "newton_cg"]
