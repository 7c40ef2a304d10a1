"""hvpopt: second-order optimization in JAX.

Curvature-vector products (Hessian, Gauss-Newton, Fisher) on any parameter
pytree, the matrix-free solvers built on them, and the optimizers and influence
estimators built on those.
"""

__version__ = "0.1.0"

from hvpopt import curvature, losses, models
from hvpopt.curvature import *  # noqa: F403  (the products are the top-level API)
from hvpopt.jacobian_modes import jacobian

__all__ = [*curvature.__all__, "jacobian", "losses", "models"]
