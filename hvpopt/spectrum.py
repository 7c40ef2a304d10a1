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

from hvpopt import _checks
from hvpopt.linalg.density import SpectralDensity, spectral_density
from hvpopt.linalg.lanczos import EigshResult, eigsh
from hvpopt.linalg.trace_estimation import TraceEstimate, trace

PyTree = Any


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
    num_iters: int | None = None,
    density_iters: int = 40,
    density_probes: int = 4,
    trace_samples: int = 30,
) -> SpectrumReport:
    """Top-``k`` and smallest eigenvalues, trace and density of a symmetric operator.

    Args:
      matvec: ``v -> A v`` (a Hessian or Gauss-Newton operator).
      like: a pytree shaped like ``v``.
      key: a JAX PRNG key.
      k: how many of the largest eigenvalues.
      num_iters: Lanczos steps for the eigenvalues (``eigsh``'s default if None).
      density_iters, density_probes: stochastic Lanczos quadrature sizes
        (``density_iters`` is clamped to the number of parameters).
      trace_samples: products for the Hutch++ trace estimate.

    Returns:
      A :class:`SpectrumReport`; :func:`summarize` turns it into JSON-able numbers.
    """
    _checks.check_positive_int("k", k)
    density_iters = min(_checks.check_positive_int("density_iters", density_iters),
                        ravel_pytree(like)[0].size)  # exact at P, as eigsh clamps too
    top_key, bottom_key, trace_key, density_key = jax.random.split(key, 4)
    top = eigsh(matvec, like, k, key=top_key, which="LA", num_iters=num_iters)
    smallest = eigsh(matvec, like, 1, key=bottom_key, which="SA", num_iters=num_iters)
    return SpectrumReport(
        top=top,
        smallest=smallest,
        trace=trace(matvec, like, key=trace_key, num_samples=trace_samples, method="hutch++"),
        density=spectral_density(
            matvec, like, key=density_key, num_iters=density_iters, num_probes=density_probes
        ),
        num_matvecs=top.num_matvecs + smallest.num_matvecs + trace_samples
        + density_iters * density_probes,
    )


def summarize(report: SpectrumReport) -> dict[str, Any]:
    """The report's numbers as plain Python values, largest eigenvalue first."""
    density = report.density
    return {
        "top_eigenvalues": np.asarray(report.top.eigenvalues)[::-1].tolist(),
        "top_residual_norms": np.asarray(report.top.residual_norms)[::-1].tolist(),
        "smallest_eigenvalue": float(report.smallest.eigenvalues[0]),
        "smallest_residual_norm": float(report.smallest.residual_norms[0]),
        "trace": float(report.trace.value),
        "trace_std_error": float(report.trace.std_error),
        "density_sigma": float(density.sigma),
        "num_matvecs": int(report.num_matvecs),
    }


def save_density_plot(density: SpectralDensity, path: str, title: str) -> None:
    """Writes the density as a PNG (log scale, as PyHessian draws it) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, values = np.asarray(density.grid), np.asarray(density.density)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.semilogy(grid, np.maximum(values, 1e-12))
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density (log scale)")
    axes.set_ylim(bottom=max(1e-8, values.max() * 1e-8))
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=120)
    finally:
        plt.close(figure)
