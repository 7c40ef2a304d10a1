"""Matrix-free linear algebra on pytrees: solvers, eigenvalues, traces, densities."""

from hvpopt.linalg.conjugate_gradient import CGResult, CGStatus, cg, jacobi_preconditioner
from hvpopt.linalg.neumann_series import LissaResult, lissa

__all__ = ["CGResult", "CGStatus", "LissaResult", "cg", "jacobi_preconditioner", "lissa"]
