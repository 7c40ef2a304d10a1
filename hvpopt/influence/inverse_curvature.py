"""The inverse damped curvature ``(H + lambda I)^{-1}`` of a training set, by five methods.

``H`` is the Hessian (or Gauss-Newton matrix) of the mean training loss
``(1/n) sum_j l_j(theta)``. Every method is fitted once and then applied to
flat vectors (rows of a ``[m, P]`` array, ``P`` the number of parameters):

* ``"exact"``: the dense ``H`` (``P`` products) and its eigendecomposition;
  small models only.
* ``"cg"``: conjugate gradient per vector, vectorized over a block of rows.
* ``"lissa"``: the Neumann series of Agarwal et al. (2017), its scale set once
  to 1.1 times the top eigenvalue of ``H + lambda I`` found by Lanczos.
* ``"arnoldi"``: the top ``rank`` eigenpairs by Lanczos (the symmetric
  Arnoldi iteration), fitted once for every query (Schioppa et al., 2022),
  ``(H + lambda I)^{-1} v ~ V diag(1 / (w + lambda)) V^T v + (v - V^T V v) / lambda``:
  the directions left out get ``1/lambda``, as if their curvature were zero
  (Schioppa et al. drop them; keeping them is closer wherever the spectrum's
  tail is small against ``lambda``, and is the same at ``lambda = 0``). Full
  rank is exact.
* ``"kfac"``, ``"ekfac"``: the Kronecker-factored Gauss-Newton matrix of
  :func:`hvpopt.fit_kronecker_factors` (Martens & Grosse, 2015; George et al.,
  2018), fitted once in one or two passes over the data, then inverted exactly
  per vector by two small rotations per layer: no iterative solve, the choice
  of Grosse et al. (2023) for transformers. Needs ``curvature="ggn"``,
  ``model`` and ``damping > 0``.
* ``"identity"``: no curvature, ``v`` itself (TracIn-style gradient products).

References:
  Koh, Liang, "Understanding black-box predictions via influence functions", ICML 2017.
  Agarwal, Bullins, Hazan, "Second-order stochastic optimization for machine
  learning in linear time", JMLR 2017.
  Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling up influence functions", AAAI 2022.
  Grosse et al., "Studying large language model generalization with influence functions", 2023.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from hvpopt import _checks, sharding
from hvpopt.curvature.averaged import average_over_chunks
from hvpopt.curvature.ggn import ggn_vp
from hvpopt.curvature.hvp import hvp
from hvpopt.curvature.kronecker import KroneckerFactors, fit_kronecker_factors, kronecker_inverse
from hvpopt.influence.example_loss import check_example_loss, example_loss
from hvpopt.linalg.conjugate_gradient import cg
from hvpopt.linalg.dense import dense_matrix
from hvpopt.linalg.lanczos import eigsh
from hvpopt.linalg.neumann_series import lissa
from hvpopt.types import PyTree

METHODS = ("exact", "cg", "lissa", "arnoldi", "kfac", "ekfac", "identity")
CURVATURES = ("hessian", "ggn")
#: ``method="exact"`` refuses more parameters than this (the dense matrix has ``P^2`` entries).
MAX_EXACT_PARAMETERS = 5000
#: Labels drawn per example for ``kfac``/``ekfac``'s sampled Fisher. Measured against the closed form
#: (``benchmarks/bench_fisher_samples.py``): on a digits MLP the mean per-query Pearson of EK-FAC's
#: scores went from 0.913 with one label to 0.968 with 4 (0.976 with 16), for 0.45 s more fitting on
#: 1,000 examples; a 2-class transformer classifier was at 0.998 with one.
DEFAULT_MC_SAMPLES = 4


class InverseCurvature(NamedTuple):
    """A fitted ``(H + lambda I)^{-1}``.

    Attributes:
      apply: ``[m, P] -> ([m, P], diagnostics)``, the inverse applied to each
        row; diagnostics are per-row arrays (``cg``: ``iterations``,
        ``residual_norm``, ``converged``; ``lissa``: ``diverged``,
        ``step_norm``), empty for the factorised methods.
      method: the method's name.
      damping: ``lambda``.
      eigenvalues: ``[k]`` eigenvalues of ``H`` (``exact``, ``arnoldi``; else None).
      eigenvectors: ``[k, P]`` orthonormal eigenvectors (``exact``, ``arnoldi``; else None).
      diagnostics: about the fit (products used, eigenvalue residuals, LiSSA's scale).
      factors: the fitted :class:`~hvpopt.curvature.kronecker.KroneckerFactors` (``kfac``, ``ekfac``; else None).
      model: ``(model_fn, output_loss)`` the factors were fitted on (``kfac``, ``ekfac``): with it, queries
        are scored per layer (:mod:`hvpopt.influence.factored`) instead of as flat gradient rows.
    """

    apply: Callable[[jax.Array], tuple[jax.Array, dict]]
    method: str
    damping: float
    eigenvalues: jax.Array | None
    eigenvectors: jax.Array | None
    diagnostics: dict
    factors: KroneckerFactors | None = None
    model: tuple[Callable, Callable] | None = None


def curvature_operator(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    *,
    curvature: str = "hessian",
    model: tuple[Callable, Callable] | None = None,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
) -> Callable:
    """``v -> H v`` on pytrees like ``params``, ``H`` the curvature of the mean loss over ``data``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of one example.
      params: the trained parameters.
      data: examples, a pytree of arrays with a leading example axis.
      curvature: ``"hessian"``, or ``"ggn"`` for the Gauss-Newton matrix
        ``J^T H_L J`` (positive semi-definite for a convex output loss).
      model: for ``"ggn"``, ``(model_fn, output_loss)`` with
        ``model_fn(params, inputs) -> outputs`` and ``output_loss(outputs,
        targets) -> scalar`` the mean over a batch; every example is then
        ``(inputs, targets)``.
      chunk_size: examples per product (memory is one chunk's); with a
        ``mesh``, a chunk is split over its devices.
      mesh: a :class:`jax.sharding.Mesh` whose ``"data"`` axis the examples
        are split over, one all-reduce per product
        (:func:`hvpopt.average_over_chunks`); None: one device.
    """
    _checks.check_choice("curvature", curvature, CURVATURES)
    if curvature == "hessian":
        mean_loss = lambda p, batch: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch))
        batch_matvec = lambda v, batch: hvp(mean_loss, params, v, batch)
    else:
        if model is None:
            raise ValueError(
                "curvature='ggn' needs model=(model_fn, output_loss), with every example an (inputs, targets) pair."
            )
        model_fn, output_loss = model
        batch_matvec = lambda v, batch: ggn_vp(model_fn, output_loss, params, v, *batch)
    if mesh is not None:  # average_over_chunks counts a chunk per device
        chunk_size = -(-chunk_size // sharding.axis_size(mesh))
    return average_over_chunks(batch_matvec, data, chunk_size=chunk_size, mesh=mesh)


def fit_inverse_curvature(
    loss_fn: Callable | None,
    params: PyTree,
    data: PyTree,
    *,
    method: str = "cg",
    damping: float = 0.0,
    curvature: str = "hessian",
    model: tuple[Callable, Callable] | None = None,
    chunk_size: int = 64,
    rtol: float = 1e-4,
    maxiter: int = 100,
    rank: int | None = None,
    num_iters: int | None = None,
    depth: int = 1000,
    fisher: str = "sampled",
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    embeddings: bool = False,
    mc_samples: int | None = None,
) -> InverseCurvature:
    """Fits ``(H + damping I)^{-1}`` for the curvature ``H`` of the mean loss over ``data``.

    Args:
      loss_fn, params, data, curvature, model, chunk_size, mesh: as in
        :func:`curvature_operator`. ``loss_fn`` may be None where ``model`` is
        given: it is then derived from it (:func:`hvpopt.influence.example_loss`);
        where both are given they must be the same loss, checked on the first
        examples of ``data`` (:func:`hvpopt.influence.check_example_loss`). With a ``mesh`` the parameters are
        copied to every device and ``data`` is split over them once, if its
        size is a multiple of the devices (else at every call).
      method: one of :data:`METHODS`.
      damping: ``lambda >= 0``; a model trained with the L2 penalty
        ``(lam / 2) ||theta||^2`` on the mean loss is matched by ``damping=lam``.
      rtol, maxiter: ``cg``'s relative residual tolerance and iteration cap.
      rank: ``arnoldi``'s number of eigenpairs (default ``min(P, 50)``).
      num_iters: ``arnoldi``'s Lanczos steps, a fixed cost (default
        ``min(P, max(2 rank + 1, 20))``, the size of :func:`hvpopt.eigsh`'s
        basis). The diagnostics say how many of the ``rank`` eigenpairs met
        eigsh's default tolerance (``num_converged``, ``converged``) and the
        largest relative residual ``||H x - w x|| / ||H||_est``.
      depth: ``lissa``'s terms of the series.
      fisher: ``kfac``'s and ``ekfac``'s pseudo-targets, one of
        :data:`hvpopt.curvature.FISHER_TARGETS` (default labels sampled from the model).
      key: random key of the Lanczos start vectors and of ``kfac``'s sampled
        labels (default ``jax.random.key(0)``).
      embeddings: ``kfac``/``ekfac``: embedding tables are Kronecker-factored too
        (:func:`hvpopt.fit_kronecker_factors`).
      mc_samples: ``kfac``/``ekfac`` with ``fisher="sampled"``: labels drawn per example
        (:func:`hvpopt.fit_kronecker_factors`); default :data:`DEFAULT_MC_SAMPLES`, else 1.

    The compiled solvers are cached per ``loss_fn``, ``model``, ``curvature``,
    ``chunk_size`` and ``mesh`` (static arguments of ``jax.jit``): fitting the
    same functions again, at other parameters, data or damping, compiles
    nothing. As with any static argument, a function whose result depends on
    state it reads at call time (a mutable object's attribute) is traced once.
    """
    _checks.check_choice("method", method, METHODS)
    _checks.check_nonnegative("damping", damping, finite=True)
    _checks.check_choice("curvature", curvature, CURVATURES)
    loss_fn = _one_loss(loss_fn, model, params, data)
    key = jax.random.key(0) if key is None else key
    params, data = placed(params, data, mesh)
    num_params, damping = ravel_pytree(params)[0].size, float(damping)
    if method == "identity":
        return InverseCurvature(lambda rows: (rows, {}), method, damping, None, None, {})
    if method in ("kfac", "ekfac"):
        if curvature != "ggn" or model is None:
            raise ValueError(
                f"method={method!r} factors the Gauss-Newton matrix of the model's layers: pass curvature='ggn' "
                "and model=(model_fn, output_loss)."
            )
        if not damping > 0:
            raise ValueError(f"method={method!r} needs damping > 0 (a layer's eigenvalues may be 0); got {damping:g}.")
        factors = fit_kronecker_factors(
            *model,
            params,
            data,
            kind=method,
            fisher=fisher,
            key=key,
            chunk_size=chunk_size,
            mesh=mesh,
            embeddings=embeddings,
            mc_samples=(DEFAULT_MC_SAMPLES if fisher == "sampled" else 1) if mc_samples is None else mc_samples,
        )
        diagnostics = {"num_layers": len(factors.layers), "factor_bytes": factors.nbytes}
        return InverseCurvature(
            kronecker_inverse_rows(factors, damping), method, damping, None, None, diagnostics, factors, tuple(model)
        )
    operator = _FlatCurvature(loss_fn, curvature, None if model is None else tuple(model), chunk_size, mesh)
    try:
        hash(operator)
    except TypeError:
        raise TypeError(
            "loss_fn and model's two functions must be hashable, as functions are; wrap an "
            "unhashable callable f as `lambda *args: f(*args)`."
        ) from None
    if method == "cg":
        solve = lambda rows: _cg_rows(params, data, rows, damping, rtol, operator=operator, maxiter=maxiter)
        return InverseCurvature(solve, method, damping, None, None, {})
    if method == "lissa":
        top = float(
            _top_eigenpairs(params, data, key, operator=operator, k=1, num_iters=min(num_params, 20)).eigenvalues[-1]
        )
        scale = 1.1 * (top + damping)
        if not scale > 0:
            raise ValueError(
                f"method='lissa' needs H + damping I positive definite; its top eigenvalue is "
                f"{top + damping:.3g}. Raise damping{_ggn_advice(curvature)}."
            )
        solve = lambda rows: _lissa_rows(params, data, rows, damping, scale, key, operator=operator, depth=depth)
        return InverseCurvature(solve, method, damping, None, None, {"scale": scale, "top_eigenvalue": top})
    if method == "exact":
        if num_params > MAX_EXACT_PARAMETERS:
            raise ValueError(
                f"method='exact' builds the {num_params} x {num_params} curvature matrix; more than "
                f"{MAX_EXACT_PARAMETERS} parameters is too many: use method='cg' or 'arnoldi'."
            )
        matrix = _dense(params, data, operator=operator, batch_size=min(num_params, 256))
        eigenvalues, eigenvectors = jnp.linalg.eigh((matrix + matrix.T) / 2)
        return _eigen_inverse(method, curvature, eigenvalues, eigenvectors.T, damping, {"num_matvecs": num_params})
    rank = min(num_params, 50) if rank is None else _checks.check_positive_int("rank", rank)
    if rank > num_params:
        raise ValueError(f"rank must be at most the number of parameters, {num_params}; got {rank}.")
    if num_iters is None:
        num_iters = min(num_params, max(2 * rank + 1, 20))
    found = _top_eigenpairs(params, data, key, operator=operator, k=rank, num_iters=num_iters)
    return _eigen_inverse(
        method,
        curvature,
        found.eigenvalues,
        found.eigenvectors,
        damping,
        {
            "num_matvecs": int(found.num_matvecs),
            "residual_norms": found.residual_norms,
            "converged": found.converged,
            "num_converged": int(found.converged.sum()),
            "max_relative_residual": float(
                jnp.max(found.residual_norms)
                / jnp.maximum(found.norm_estimate, jnp.finfo(found.norm_estimate.dtype).tiny)
            ),
        },
    )


def placed(params: PyTree, data: PyTree, mesh: Mesh | None) -> tuple[PyTree, PyTree]:
    """``params`` copied to every device of ``mesh`` and ``data`` split over them (if its size is a multiple of
    the devices), as a fit computes on them; unchanged without a mesh."""
    if mesh is None:
        return params, data
    params = sharding.replicate(params, mesh)
    if _checks.leading_size("data", data) % sharding.axis_size(mesh) == 0:
        data = sharding.shard_batch(data, mesh)
    return params, data


class _FlatCurvature(NamedTuple):
    """What defines the curvature operator besides its arrays; hashable, so jitted fits share their compilation.

    Parameters, data, damping, tolerances and keys are arguments of the
    jitted programs below, never constants baked into them: fitting again (the
    same model at other parameters, another damping) reuses the program.
    """

    loss_fn: Callable
    curvature: str
    model: tuple[Callable, Callable] | None
    chunk_size: int
    mesh: Mesh | None

    def on(self, params: PyTree, data: PyTree) -> Callable[[jax.Array], jax.Array]:
        """``x -> ravel(H unravel(x))`` on flat vectors."""
        unravel = ravel_pytree(params)[1]
        operator = curvature_operator(
            self.loss_fn,
            params,
            data,
            curvature=self.curvature,
            model=self.model,
            chunk_size=self.chunk_size,
            mesh=self.mesh,
        )
        return lambda x: ravel_pytree(operator(unravel(x)))[0]


@jax.jit(static_argnames=("operator", "maxiter"))
def _cg_rows(params, data, rows, damping, rtol, *, operator: _FlatCurvature, maxiter: int):
    matvec = operator.on(params, data)
    result = jax.vmap(lambda b: cg(matvec, b, damping=damping, rtol=rtol, maxiter=maxiter))(rows)
    return result.x, {
        "iterations": result.iterations,
        "residual_norm": result.residual_norm,
        "converged": result.converged,
    }


@jax.jit(static_argnames=("operator", "depth"))
def _lissa_rows(params, data, rows, damping, scale, key, *, operator: _FlatCurvature, depth: int):
    matvec = operator.on(params, data)
    result = jax.vmap(lambda b: lissa(matvec, b, damping=damping, depth=depth, key=key, scale=scale))(rows)
    return result.x, {"diverged": result.diverged, "step_norm": result.step_norm}


@jax.jit(static_argnames=("operator", "k", "num_iters"))
def _top_eigenpairs(params, data, key, *, operator: _FlatCurvature, k: int, num_iters: int | None):
    return eigsh(operator.on(params, data), ravel_pytree(params)[0], k, key=key, which="LA", num_iters=num_iters)


@jax.jit(static_argnames=("operator", "batch_size"))
def _dense(params, data, *, operator: _FlatCurvature, batch_size: int):
    return dense_matrix(operator.on(params, data), ravel_pytree(params)[0], batch_size=batch_size)


def _one_loss(loss_fn: Callable | None, model, params: PyTree, data: PyTree) -> Callable:
    """``loss_fn``, derived from ``model`` where None, checked against it where both are given (outside ``jit``)."""
    if loss_fn is None:
        if model is None:
            raise ValueError("loss_fn is None: pass the loss of one example, or model=(model_fn, output_loss).")
        return example_loss(*model)
    if model is None or loss_fn is example_loss(*model):
        return loss_fn
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, data))):
        check_example_loss(loss_fn, model, params, data)
    return loss_fn


def kronecker_inverse_rows(factors: KroneckerFactors, damping: float) -> Callable:
    """``(C + damping I)^{-1}`` of fitted K-FAC / EK-FAC factors, applied to rows (flat parameter vectors).

    Columns follow ``jax.flatten_util.ravel_pytree(params)``; see
    :func:`hvpopt.kronecker_inverse`. Compiled once per model structure.
    """
    damping = _checks.check_number("damping", damping, "> 0 and finite", lambda x: x > 0)
    return lambda rows: (_kronecker_rows(factors, rows, damping), {})


@jax.jit
def _kronecker_rows(factors: KroneckerFactors, rows: jax.Array, damping) -> jax.Array:
    like = jax.tree.unflatten(factors.treedef, [jnp.zeros(shape, rows.dtype) for shape in factors.shapes])
    unravel = ravel_pytree(like)[1]
    inverse = kronecker_inverse(factors, damping=damping)
    return jax.vmap(lambda row: ravel_pytree(inverse(unravel(row)))[0])(rows)


def eigen_inverse(eigenvalues: jax.Array, eigenvectors: jax.Array, damping: float) -> Callable:
    """``(H + damping I)^{-1}`` from eigenpairs ``(w, V)`` of ``H`` (``V``'s rows orthonormal), applied to rows.

    .. math:: (H + \\lambda I)^{-1} v \\approx V^\\top \\mathrm{diag}\\big(\\tfrac{1}{w + \\lambda}\\big) V v
       + \\tfrac{1}{\\lambda} (v - V^\\top V v)

    Exact for all ``P`` eigenpairs, and for fewer when the eigenvalues left out
    are small against ``lambda``. With ``damping=0`` the second term is
    dropped: the projection onto the top subspace of Schioppa et al. (2022).
    """
    complement = bool(damping != 0)
    return lambda rows: _apply_eigenpairs(rows, eigenvalues, eigenvectors, damping, complement=complement)


@jax.jit(static_argnames="complement")
def _apply_eigenpairs(rows, eigenvalues, eigenvectors, damping, *, complement: bool):
    coordinates = rows @ eigenvectors.T
    top = (coordinates / (eigenvalues + damping)) @ eigenvectors
    if not complement:
        return top, {}
    return top + (rows - coordinates @ eigenvectors) / damping, {}


def _eigen_inverse(method, curvature, eigenvalues, eigenvectors, damping, diagnostics) -> InverseCurvature:
    smallest = float(jnp.min(eigenvalues))
    if not smallest + damping > 0:
        raise ValueError(
            f"method={method!r}: H + damping I is not positive definite (smallest eigenvalue "
            f"{smallest:.3g} + damping {damping:g} <= 0). Raise damping above {-smallest:.3g}"
            f"{_ggn_advice(curvature)}."
        )
    return InverseCurvature(
        eigen_inverse(eigenvalues, eigenvectors, damping), method, damping, eigenvalues, eigenvectors, diagnostics
    )


def _ggn_advice(curvature: str) -> str:
    """The second remedy for an indefinite curvature: the Gauss-Newton matrix, where it is not in use."""
    return " or use curvature='ggn'" if curvature != "ggn" else ""
