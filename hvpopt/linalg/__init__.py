"""Matrix-free linear algebra on pytrees: solvers, eigenvalues, traces, densities."""

from hvpopt.linalg.conjugate_gradient import CGResult, CGStatus, cg, jacobi_preconditioner
from hvpopt.linalg.density import SpectralDensity, spectral_density
from hvpopt.linalg.lanczos import EigshResult, LanczosDecomposition, eigsh, lanczos_tridiagonal
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
    "eigsh",
    "jacobi_preconditioner",
    "lanczos_tridiagonal",
    "lissa",
    "spectral_density",
    "trace",
]
