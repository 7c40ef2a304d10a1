"""Spectrum reports of a curvature matrix: extreme eigenvalues, trace and density.

The PyHessian report (Yao et al., 2020) from the matrix-free pieces of
:mod:`hvpopt.linalg`: Lanczos for the top eigenvalues and the smallest one
(negative curvature), Hutch++ for the trace, stochastic Lanczos quadrature for
the density.

Reference:
  Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural networks through the lens
  of the Hessian", IEEE BigData 2020.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from hvpopt import _checks, _moved
from hvpopt.linalg.density import SpectralDensity, spectral_density
from hvpopt.linalg.lanczos import EigshResult, eigsh
from hvpopt.linalg.trace_estimation import TraceEstimate, trace
from hvpopt.types import PyTree

__all__ = ["DENSITY_ITERS", "SpectrumReport", "curvature_spectrum", "summarize"]

DENSITY_ITERS = 40  # curvature_spectrum's default Lanczos steps per density probe


class SpectrumReport(NamedTuple):
    """The outcome of :func:`curvature_spectrum`; every field is arrays (jittable)."""

    top: EigshResult
    smallest: EigshResult
    trace: TraceEstimate
    density: SpectralDensity
    num_matvecs: jax.Array


def curvature_spectrum(
    matvec: Callable,
    like: PyTree,
    *,
    key: jax.Array,
    k: int = 5,
    tol: float | jax.Array | None = None,
    max_matvecs: int | None = None,
    num_iters: int | None = None,
    density_iters: int | None = None,
    density_probes: int = 4,
    trace_samples: int = 30,
) -> SpectrumReport:
    """Top-``k`` and smallest eigenvalues, trace and density of a symmetric operator.

    Args:
      matvec: ``v -> A v`` (a Hessian or Gauss-Newton operator).
      like: a pytree shaped like ``v``.
      key: a JAX PRNG key.
      k: how many of the largest eigenvalues.
      tol, max_matvecs, num_iters: :func:`~hvpopt.linalg.lanczos.eigsh`'s, for
        both eigenvalue runs: by default each runs until its relative residuals
        are below ``tol`` or its budget is spent; ``num_iters`` fixes the cost
        instead. Either way the report says which eigenvalues converged.
      density_iters, density_probes: stochastic Lanczos quadrature sizes
        (``density_iters`` is 40 by default, clamped to the number of
        parameters).
      trace_samples: products for the Hutch++ trace estimate.

    Returns:
      A :class:`SpectrumReport`; :func:`summarize` turns it into JSON-able
      numbers. ``report.top.all_converged & report.smallest.all_converged``
      says whether the eigenvalues can be trusted to ``tol``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from hvpopt.spectrum import curvature_spectrum, summarize
      >>> a = jnp.diag(jnp.linspace(-1.0, 4.0, 30))
      >>> report = jax.jit(lambda a: curvature_spectrum(
      ...     lambda v: a @ v, jnp.zeros(30), key=jax.random.key(0), k=2,
      ...     density_iters=10, density_probes=1, trace_samples=12))(a)
      >>> summary = summarize(report)
      >>> [round(x, 4) for x in summary["top_eigenvalues"]], round(summary["smallest_eigenvalue"], 4)
      ([4.0, 3.8276], -1.0)
      >>> summary["eigenvalues_converged"], summary["top_converged"]
      (True, [True, True])
    """
    _checks.check_positive_int("k", k)
    density_iters = DENSITY_ITERS if density_iters is None else density_iters
    density_iters = min(
        _checks.check_positive_int("density_iters", density_iters), ravel_pytree(like)[0].size
    )  # exact at P, as eigsh clamps too
    top_key, bottom_key, trace_key, density_key = jax.random.split(key, 4)
    options = {"tol": tol, "max_matvecs": max_matvecs, "num_iters": num_iters}
    top = eigsh(matvec, like, k, key=top_key, which="LA", **options)
    smallest = eigsh(matvec, like, 1, key=bottom_key, which="SA", **options)
    return SpectrumReport(
        top=top,
        smallest=smallest,
        trace=trace(matvec, like, key=trace_key, num_samples=trace_samples, method="hutch++"),
        density=spectral_density(matvec, like, key=density_key, num_iters=density_iters, num_probes=density_probes),
        num_matvecs=top.num_matvecs + smallest.num_matvecs + trace_samples + density_iters * density_probes,
    )


def summarize(report: SpectrumReport) -> dict[str, Any]:
    """The report's numbers as plain Python values, largest eigenvalue first.

    ``top_converged`` and ``smallest_converged`` are each eigenvalue's flag
    (relative residual ``residual_norm / ||A||_est`` within eigsh's ``tol``),
    ``eigenvalues_converged`` is all of them, ``eigenvalue_matvecs`` the
    products both eigsh runs used.
    """
    density = report.density
    top, smallest = report.top, report.smallest
    return {
        "top_eigenvalues": np.asarray(top.eigenvalues)[::-1].tolist(),
        "top_residual_norms": np.asarray(top.residual_norms)[::-1].tolist(),
        "top_converged": np.asarray(top.converged)[::-1].tolist(),
        "smallest_eigenvalue": float(smallest.eigenvalues[0]),
        "smallest_residual_norm": float(smallest.residual_norms[0]),
        "smallest_converged": bool(smallest.converged[0]),
        "eigenvalues_converged": bool(top.all_converged & smallest.all_converged),
        "eigenvalue_matvecs": int(top.num_matvecs + smallest.num_matvecs),
        "trace": float(report.trace.value),
        "trace_std_error": float(report.trace.std_error),
        "density_sigma": float(density.sigma),
        "num_matvecs": int(report.num_matvecs),
    }


# Drawn by the command line since 0.2; the old name works for this release.
__getattr__ = _moved.forwarding_getattr(
    "hvpopt.spectrum", {"save_density_plot": "hvpopt.cli.spectrum:save_density_plot"}
)
