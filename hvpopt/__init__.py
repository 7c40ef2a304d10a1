"""hvpopt: second-order optimization in JAX.

The library, each layer importing only the ones above it:
  types, tree, losses, sharding, jacobians, compiled_memory   shared pieces
  frameworks   Flax NNX, Linen and Equinox models as (model_fn, params)
  curvature    Hessian, Gauss-Newton and Fisher products, operators averaged over data, K-FAC/EK-FAC
  linalg       cg, lissa, eigsh, trace, spectral_density, diagonals, dense matrices
  optim        Newton-CG, Hessian-free and natural gradient as optax transformations
  influence    influence scores and the protocols that validate them
  spectrum     a curvature spectrum report
Beside it, imported on first use: ``hvpopt.testbed`` (built-in models, data,
tasks, training loop, checkpoints) and ``hvpopt.cli`` (the ``hvpopt`` command).
The products, solvers and optimizers are also at the top level.

Moved in 0.2, the old names still working for this release with a
``DeprecationWarning``: ``hvpopt.{checkpoint,data,models,tasks,training}`` are in
``hvpopt.testbed`` (``from hvpopt.tasks import make_task`` still imports);
``hvpopt.curvature.{dense_matrix,exact_diagonal,hutchinson_diagonal}`` in
``hvpopt.linalg``; ``hvpopt.spectrum.save_density_plot`` in ``hvpopt.cli.spectrum``.
"""

import sys

__version__ = "0.2.0"

# The names packed to keep this file on one screen; each subpackage's __all__ lists them one per line.
# fmt: off
from hvpopt import _moved
from hvpopt import (compiled_memory, curvature, frameworks, influence, jacobians, linalg, losses, optim, sharding,
                    spectrum, tree, types)
from hvpopt.compiled_memory import ProgramMemory, program_memory
from hvpopt.curvature import (FISHER_TARGETS, HVP_MODES, KRONECKER_KINDS, DenseLayer, KroneckerFactors,
                              KroneckerStatistics, LeafTreatment, TappedModel, average_over_batches,
                              average_over_chunks, empirical_fisher_operator, empirical_fisher_vp, find_dense_layers,
                              fisher_operator, fisher_vp, fit_kronecker_factors, ggn_operator, ggn_vp,
                              hessian_operator, hvp, kronecker_factors, kronecker_fit_memory, kronecker_from_arrays,
                              kronecker_inverse, kronecker_operator, kronecker_statistics, kronecker_to_arrays,
                              layer_coverage, mc_fisher_operator, mc_fisher_vp, output_hessian, sampled_gradient,
                              sandwich_operator, tapped_model)
from hvpopt.frameworks import from_equinox, from_linen, from_nnx
from hvpopt.jacobians import SpectralNorm, jacobian, jacobian_spectral_norm
from hvpopt.linalg import (CGResult, CGStatus, EigshResult, LanczosDecomposition, LissaResult, LissaStatus,
                           SpectralDensity, TraceEstimate, cg, dense_matrix, eigsh, exact_diagonal, flat_operator,
                           hutchinson_diagonal, jacobi_preconditioner, lanczos_tridiagonal, lissa, spectral_density,
                           trace, tridiagonal)
from hvpopt.optim import (KFAC_STEP_RULES, DiagonalEstimatorState, HessianFreeState, KFACState, Minimum,
                          NaturalGradientState, NewtonCGState, gauss_newton_bartlett, hessian_free, hutchinson_hessian,
                          kfac, kronecker_preconditioner, minimize_newton_cg, natural_gradient, newton_cg,
                          sophia_win_rate)
from hvpopt.sharding import data_mesh, replicate, shard_batch, shard_params

__all__ = [
    "curvature", "frameworks", "influence", "jacobians", "linalg", "losses", "optim", "sharding", "spectrum", "tree",
    "types", "testbed", "cli", "compiled_memory", "from_equinox", "from_linen", "from_nnx", "ProgramMemory",
    "program_memory",
    *curvature.__all__, *linalg.__all__, *optim.__all__,
    "SpectralNorm", "jacobian", "jacobian_spectral_norm", "data_mesh", "replicate", "shard_batch", "shard_params",
]
# fmt: on

if not any(isinstance(finder, _moved.MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_moved.MovedModules())  # `from hvpopt.tasks import ...`, moved in 0.2, for this release

# hvpopt.testbed and hvpopt.cli import the library, so the library imports them only when asked.
__getattr__ = _moved.forwarding_getattr(
    "hvpopt", {old.rpartition(".")[2]: new for old, new in _moved.MOVED.items()}, lazy=("testbed", "cli")
)
