"""hvpopt: second-order optimization in JAX.

Curvature-vector products (Hessian, Gauss-Newton, Fisher) on any parameter
pytree, the matrix-free solvers built on them, and the optimizers and influence
estimators built on those, on one device or data-parallel over a
``jax.sharding`` mesh (:mod:`hvpopt.sharding`).
"""

__version__ = "0.1.0"

from hvpopt import checkpoint, curvature, data, influence, linalg, losses, models, optim, sharding, tasks, training
from hvpopt.curvature import *  # noqa: F403  (the products are the top-level API)
from hvpopt.jacobians import SpectralNorm, jacobian, jacobian_spectral_norm
from hvpopt.linalg import *  # noqa: F403  (so are the solvers)
from hvpopt.optim import *  # noqa: F403  (and the optimizers)
from hvpopt.sharding import data_mesh, replicate, shard_batch, shard_params

__all__ = [*curvature.__all__, *linalg.__all__, *optim.__all__, "optim", "SpectralNorm", "jacobian", "jacobian_spectral_norm",
           "checkpoint", "data", "losses", "models", "tasks", "training",
           "sharding", "data_mesh", "replicate", "shard_batch", "shard_params"]
