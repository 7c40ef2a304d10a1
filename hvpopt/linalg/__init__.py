"""Matrix-free linear algebra on pytrees: solvers, eigenvalues, traces, densities, diagonals.

Every routine takes a linear operator ``matvec: v -> A v`` on pytrees
(:data:`hvpopt.types.MatVec`) and knows nothing of models: the operators come
from :mod:`hvpopt.curvature` or from anywhere else.
"""

from hvpopt.linalg.conjugate_gradient import CGResult, CGStatus, cg, jacobi_preconditioner
from hvpopt.linalg.dense import dense_matrix
from hvpopt.linalg.density import SpectralDensity, spectral_density
from hvpopt.linalg.diagonal import exact_diagonal, hutchinson_diagonal
from hvpopt.linalg.flat import flat_operator
from hvpopt.linalg.lanczos import EigshResult, LanczosDecomposition, eigsh, lanczos_tridiagonal, tridiagonal
from hvpopt.linalg.neumann_series import LissaResult, LissaStatus, lissa
from hvpopt.linalg.trace_estimation import TraceEstimate, trace

__all__ = [
    "CGResult",
    "CGStatus",
    "EigshResult",
    "LanczosDecomposition",
    "LissaResult",
    "LissaStatus",
    "SpectralDensity",
    "TraceEstimate",
    "cg",
    "dense_matrix",
    "eigsh",
    "exact_diagonal",
    "flat_operator",
    "hutchinson_diagonal",
    "jacobi_preconditioner",
    "lanczos_tridiagonal",
    "lissa",
    "spectral_density",
    "trace",
    "tridiagonal",
]
