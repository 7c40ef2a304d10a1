"""Kronecker-factored curvature: K-FAC and EK-FAC, fitted on a dataset, applied as operators.

For a dense layer ``s = W^T a`` (inputs ``a``, with a trailing 1 when the layer
has a bias, outputs ``s``), the layer's block of the Gauss-Newton / Fisher
matrix of the mean loss is approximated by a Kronecker product (Martens &
Grosse, 2015)

.. math:: C_W \\approx A \\otimes G,\\qquad A = \\mathbb{E}[a a^\\top],\\quad
   G = \\mathbb{E}_n\\Big[\\sum_p \\hat g_{n,p} \\hat g_{n,p}^\\top\\Big],

with ``A`` the mean over every position (token) of every example,
``\\hat g_{n,p}`` the gradient of example ``n``'s loss with respect to the
layer's output at position ``p`` under a *pseudo-target* (below), and ``G`` its
sum over positions averaged over examples: the "expand" setting of
Eschenhagen et al. (2023). Positions whose loss weight is 0 (padding) are left
out of ``A`` when the layer's positions are the loss's. With ``A = Q_A
diag(a) Q_A^T`` and ``G = Q_G diag(g) Q_G^T``, K-FAC's eigenvalues are ``a_i
g_j``; EK-FAC (George et al., 2018) keeps the eigenbasis and refits them to
the per-example gradients projected onto it,

.. math:: \\Lambda_{ij} = \\mathbb{E}_n\\big[(Q_A^\\top \\nabla_W \\hat l_n\\, Q_G)_{ij}^2\\big],

the Frobenius-closest diagonal in that basis. Parameters in no dense layer get
the diagonal ``E_n[(\\nabla \\hat l_n)^2]``. A stack of layers (a scanned
weight, :func:`hvpopt.find_dense_layers`) has factors with leading layer axes,
one Kronecker product per layer of the stack. An embedding table
(``embeddings=True``) is a layer whose inputs are one-hot: ``A`` is the diagonal
of token frequencies, its eigenbasis the identity.

The pseudo-targets (``fisher``): ``"sampled"`` draws labels from the model
(the true Fisher, unbiased; needs ``key``); ``"closed_form"`` backpropagates the
``K`` columns of a square root of the output Hessian (exact, ``K`` passes per
example; one output position per example); ``"empirical"`` uses the observed
labels (the empirical Fisher, Kunstner et al., 2019). For the losses of
:mod:`hvpopt.losses` the true Fisher is the Gauss-Newton matrix.

References:
  Martens, Grosse, "Optimizing neural networks with Kronecker-factored
  approximate curvature", ICML 2015.
  George, Laurent, Bouthillier, Ballas, Vincent, "Fast approximate natural
  gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018.
  Grosse et al., "Studying large language model generalization with influence
  functions", 2023.
  Eschenhagen, Immer, Turner, Schneider, Hennig, "Kronecker-factored
  approximate curvature for modern neural network architectures", NeurIPS 2023.
"""

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hvpopt import _checks, sharding
from hvpopt.compiled_memory import ProgramMemory, program_memory
from hvpopt.curvature.averaged import average_over_chunks
from hvpopt.curvature.dense_layers import DenseLayer, scatter
from hvpopt.curvature.fisher import weighted_score
from hvpopt.curvature.tapped import TappedModel, tapped_model
from hvpopt.frameworks import plain_arrays
from hvpopt.losses import Loss
from hvpopt.sharding import DATA_AXIS
from hvpopt.types import MatVec, PyTree

__all__ = ["FISHER_TARGETS", "KRONECKER_KINDS", "KroneckerFactors", "KroneckerStatistics", "fit_kronecker_factors",
           "kronecker_factors", "kronecker_fit_memory", "kronecker_from_arrays", "kronecker_inverse",
           "kronecker_operator", "kronecker_statistics", "kronecker_to_arrays"]  # fmt: skip

#: How the output gradients are drawn: labels sampled from the model, the output Hessian's columns, the data's labels.
FISHER_TARGETS = ("sampled", "closed_form", "empirical")
#: ``"kfac"``: eigenvalues ``a_i g_j``; ``"ekfac"``: eigenvalues refitted to the per-example gradients.
KRONECKER_KINDS = ("kfac", "ekfac")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KroneckerFactors:
    """A fitted Kronecker-factored curvature ``C`` (a pytree: it can be saved, sharded, passed to ``jit``).

    Attributes:
      layers: the dense layers (:func:`hvpopt.find_dense_layers`).
      input_bases: per layer, ``Q_A`` ``[*stack, in (+1), in (+1)]``, the eigenvectors of ``A`` (columns); None
        for an embedding, whose ``A`` is diagonal (``Q_A = I``).
      output_bases: per layer, ``Q_G`` ``[*stack, out, out]``.
      eigenvalues: per layer, ``[*stack, in (+1), out]``: ``C``'s eigenvalues in the basis ``Q_A (x) Q_G``.
      diagonal: per parameter leaf, the diagonal curvature of a leaf in no layer, else None.
      kind: ``"kfac"`` or ``"ekfac"``.
      treedef: the parameters' tree structure.
      shapes: the parameter leaves' shapes.
    """

    input_bases: tuple[jax.Array | None, ...]
    output_bases: tuple[jax.Array, ...]
    eigenvalues: tuple[jax.Array, ...]
    diagonal: tuple[jax.Array | None, ...]
    layers: tuple[DenseLayer, ...] = dataclasses.field(metadata={"static": True})
    kind: str = dataclasses.field(metadata={"static": True})
    treedef: Any = dataclasses.field(metadata={"static": True})
    shapes: tuple[tuple[int, ...], ...] = dataclasses.field(metadata={"static": True})

    @property
    def nbytes(self) -> int:
        """Bytes of the fitted arrays."""
        return sum(x.nbytes for x in jax.tree.leaves(self))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KroneckerStatistics:
    """The second moments K-FAC is made of, before their eigendecomposition (a pytree).

    Means over a dataset (:func:`kronecker_statistics`) that can be averaged
    further, e.g. as the exponential moving averages of :func:`hvpopt.kfac`;
    :func:`kronecker_factors` turns them into :class:`KroneckerFactors`.

    Attributes:
      layers: the dense layers (:func:`hvpopt.find_dense_layers`).
      input_moments: per layer, ``A = E[a a^T]`` ``[*stack, in (+1), in (+1)]``; for an embedding its
        diagonal, the token frequencies ``[*stack, vocabulary]``.
      output_moments: per layer, ``G = E_n[sum_p g g^T]`` ``[*stack, out, out]``.
      diagonal: per parameter leaf, ``E_n[(grad l_n)^2]`` of a leaf in no layer, else None.
      treedef: the parameters' tree structure.
      shapes: the parameter leaves' shapes.
    """

    input_moments: tuple[jax.Array, ...]
    output_moments: tuple[jax.Array, ...]
    diagonal: tuple[jax.Array | None, ...]
    layers: tuple[DenseLayer, ...] = dataclasses.field(metadata={"static": True})
    treedef: Any = dataclasses.field(metadata={"static": True})
    shapes: tuple[tuple[int, ...], ...] = dataclasses.field(metadata={"static": True})


def fit_kronecker_factors(
    model_fn: Callable,
    loss: Loss,
    params: PyTree,
    data: tuple[Any, Any],
    *,
    kind: str = "ekfac",
    fisher: str = "sampled",
    key: jax.Array | None = None,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
    embeddings: bool = False,
    mc_samples: int = 1,
) -> KroneckerFactors:
    """Fits K-FAC or EK-FAC to the Gauss-Newton / Fisher matrix of the mean loss over ``data``.

    Jittable (the layers are found while tracing; the check that the factors
    are finite runs only outside ``jit``). The dataset is read in chunks
    (:func:`hvpopt.average_over_chunks`: memory
    of one chunk, its per-example gradients included), every example with
    weight ``1/N`` and every position with its loss weight; with a ``mesh`` the
    chunks are split over its ``"data"`` axis, each device summing its share
    and one all-reduce adding the shares. Each example draws its pseudo-labels
    from its own key, split from ``key``, so the result does not depend on
    ``chunk_size`` or the mesh. EK-FAC reads the data twice: once for ``A`` and
    ``G``, once for the eigenvalues.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs [..., K]``; its dense
        layers are found automatically (:func:`hvpopt.layer_coverage`).
      loss: one of :mod:`hvpopt.losses`, the mean over a batch.
      params: any pytree of floating arrays.
      data: ``(inputs, targets)`` with a leading example axis.
      kind: one of :data:`KRONECKER_KINDS`.
      fisher: one of :data:`FISHER_TARGETS`.
      key: a PRNG key for ``fisher="sampled"`` (default ``jax.random.key(0)``).
      chunk_size: examples per chunk (per device with a ``mesh``); the chunks
        are evened out (100 examples in chunks of at most 64 are two chunks of 50).
      mesh: a :class:`jax.sharding.Mesh` to split the examples over.
      embeddings: embedding tables are Kronecker-factored layers too, their input factor the token
        frequencies (:func:`hvpopt.find_dense_layers`); else diagonal.
      mc_samples: ``fisher="sampled"``: labels drawn per example (and per position), their outer
        products averaged: the sampled Fisher's noise falls as ``1 / mc_samples``, its cost grows
        with it (one backward pass per sample).

    Returns:
      The :class:`KroneckerFactors`.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
      >>> model_fn = lambda p, x: x @ p["w"] + p["b"]
      >>> x = jax.random.normal(jax.random.key(0), (16, 3)); y = jnp.arange(16) % 2
      >>> factors = hvpopt.fit_kronecker_factors(
      ...     model_fn, hvpopt.losses.softmax_cross_entropy, params, (x, y), fisher="closed_form")
      >>> inverse = hvpopt.kronecker_inverse(factors, damping=1e-3)
      >>> jax.tree.map(jnp.shape, inverse(params))
      {'b': (2,), 'w': (3, 2)}
    """
    arguments, options = _fit_call(model_fn, loss, params, data, kind, fisher, key, chunk_size, mesh, embeddings,
                                   mc_samples)  # fmt: skip
    factors = _fit(*arguments, **options)
    _check_finite(factors)
    return factors


def kronecker_fit_memory(
    model_fn: Callable,
    loss: Loss,
    params: PyTree,
    data: tuple[Any, Any],
    *,
    kind: str = "ekfac",
    fisher: str = "sampled",
    key: jax.Array | None = None,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
    embeddings: bool = False,
    mc_samples: int = 1,
) -> ProgramMemory | None:
    """The memory :func:`fit_kronecker_factors` with these arguments will take, compiled and not run.

    Its outputs are the factors; its temporaries hold one chunk's activations and gradients. The fit
    that follows at the same arguments reuses the compilation.
    """
    arguments, options = _fit_call(model_fn, loss, params, data, kind, fisher, key, chunk_size, mesh, embeddings,
                                   mc_samples)  # fmt: skip
    return program_memory(_fit, *arguments, **options)


def _fit_call(model_fn, loss, params, data, kind, fisher, key, chunk_size, mesh, embeddings, mc_samples):
    """``_fit``'s arguments and static options, checked and with the data padded to whole chunks: one place,
    so that :func:`kronecker_fit_memory` compiles exactly the program :func:`fit_kronecker_factors` runs."""
    _checks.check_choice("kind", kind, KRONECKER_KINDS)
    data, chunk_size = _prepared(model_fn, loss, params, data, fisher, key, chunk_size, mesh, embeddings, mc_samples)
    options = dict(model_fn=model_fn, loss=loss, kind=kind, fisher=fisher, chunk_size=chunk_size, mesh=mesh,
                   embeddings=embeddings, mc_samples=mc_samples)  # fmt: skip
    return (params, data), options


def kronecker_statistics(
    model_fn: Callable,
    loss: Loss,
    params: PyTree,
    data: tuple[Any, Any],
    *,
    fisher: str = "sampled",
    key: jax.Array | None = None,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
    embeddings: bool = False,
    mc_samples: int = 1,
) -> KroneckerStatistics:
    """K-FAC's second moments ``A`` and ``G`` per layer (and the diagonal elsewhere) over ``data``.

    The first half of :func:`fit_kronecker_factors`, with the same arguments
    and math; jittable. Means of several batches are means again, so an
    optimizer can keep moving averages of them and decompose only every few
    steps (:func:`kronecker_factors`).

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
      >>> model_fn = lambda p, x: x @ p["w"] + p["b"]
      >>> x = jax.random.normal(jax.random.key(0), (16, 3)); y = jnp.arange(16) % 2
      >>> stats = hvpopt.kronecker_statistics(model_fn, hvpopt.losses.softmax_cross_entropy, params, (x, y))
      >>> [a.shape for a in stats.input_moments], [g.shape for g in stats.output_moments]
      ([(4, 4)], [(2, 2)])
    """
    data, chunk_size = _prepared(model_fn, loss, params, data, fisher, key, chunk_size, mesh, embeddings, mc_samples)
    return _statistics(params, data, model_fn=model_fn, loss=loss, fisher=fisher, chunk_size=chunk_size, mesh=mesh,
                       embeddings=embeddings, mc_samples=mc_samples)  # fmt: skip


def kronecker_factors(statistics: KroneckerStatistics) -> KroneckerFactors:
    """K-FAC from its second moments: ``A = Q_A diag(a) Q_A^T``, ``G = Q_G diag(g) Q_G^T``, eigenvalues ``a g^T``.

    Jittable; one ``eigh`` of each factor (eigenvalues clipped at 0), each layer of a stack in turn; an
    embedding's diagonal ``A`` needs none.
    """
    input_bases, output_bases, eigenvalues = [], [], []
    for layer, a, g in zip(statistics.layers, statistics.input_moments, statistics.output_moments):
        a_values, a_basis = (jnp.maximum(a, 0.0), None) if layer.lookup else _eigh(a)
        g_values, g_basis = _eigh(g)
        input_bases.append(a_basis)
        output_bases.append(g_basis)
        eigenvalues.append(a_values[..., :, None] * g_values[..., None, :])
    return KroneckerFactors(
        tuple(input_bases), tuple(output_bases), tuple(eigenvalues), statistics.diagonal, statistics.layers, "kfac",
        statistics.treedef, statistics.shapes,
    )  # fmt: skip


def _prepared(model_fn, loss, params, data, fisher, key, chunk_size, mesh, embeddings, mc_samples) -> tuple[tuple, int]:
    """Checks the arguments; ``(inputs, targets, keys, example weights)`` padded to whole chunks, and the chunk size.

    Chunks of equal size, as many as ``chunk_size`` asks for, padded with weight-0 copies of the
    first example: :func:`average_over_chunks` then traces its chunk once, with no remainder.
    """
    _checks.check_choice("fisher", fisher, FISHER_TARGETS)
    _checks.check_positive_int("chunk_size", chunk_size)
    _checks.check_positive_int("mc_samples", mc_samples)
    if mc_samples > 1 and fisher != "sampled":
        raise ValueError(f"mc_samples draws labels: it is for fisher='sampled', not {fisher!r}; leave it at 1.")
    _checks.check_floating("params", params)
    if not isinstance(loss, Loss):
        raise TypeError(
            "loss must be one of hvpopt.losses (softmax_cross_entropy, masked_softmax_cross_entropy, "
            f"squared_error), whose output Hessian is known; got {type(loss).__name__}."
        )
    if not (isinstance(data, tuple) and len(data) == 2):
        raise TypeError(
            f"data must be a pair (inputs, targets) with a leading example axis; got {type(data).__name__}."
        )
    num_examples = _checks.leading_size("data", data)
    if num_examples == 0:
        raise ValueError("data holds no examples; the factors are undefined.")
    one = jax.tree.map(lambda x: x[:1], data)
    _check_coverage(tapped_model(model_fn, params, one[0], embeddings=embeddings), params)
    if fisher == "closed_form":
        outputs = jax.eval_shape(model_fn, params, one[0])
        if math.prod(outputs.shape[:-1]) != 1:
            raise ValueError(
                f"fisher='closed_form' backpropagates one column per output class and position; outputs of shape "
                f"{outputs.shape[1:]} per example have more than one position: use fisher='sampled'."
            )
    key = jax.random.key(0) if key is None else key
    keys = jax.random.key_data(jax.random.split(key, num_examples))
    devices = 1 if mesh is None else sharding.axis_size(mesh, DATA_AXIS)
    per_device = -(-num_examples // devices)
    num_chunks = -(-per_device // chunk_size)
    chunk_size = -(-per_device // num_chunks)
    padding = devices * num_chunks * chunk_size - num_examples
    weights = jnp.concatenate([jnp.ones(num_examples), jnp.zeros(padding)]).astype(_dtype(params))
    pad = lambda x: jnp.concatenate([x, jnp.repeat(x[:1], padding, axis=0)]) if padding else x
    return (*jax.tree.map(pad, (*data, keys)), weights), chunk_size


def _check_coverage(tapped: TappedModel, params: PyTree) -> None:
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    sizes = [np.size(leaf) for leaf in jax.tree.leaves(params)]
    if not tapped.layers:
        raise ValueError(
            "model_fn has no dense layer (a product x @ W with W a parameter leaf) for K-FAC; use a "
            "diagonal or an iterative curvature instead."
        )
    covered = {leaf for layer in tapped.layers for leaf in (layer.weight, layer.bias) if leaf is not None}
    if sum(sizes[i] for i in covered) < 0.5 * sum(sizes):
        left = ", ".join(paths[i] for i in range(len(paths)) if i not in covered)
        warnings.warn(
            f"K-FAC's dense layers cover less than half of the parameters; left to the diagonal: {left}.",
            stacklevel=3,
        )


def _check_finite(factors: KroneckerFactors) -> None:
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(factors)):
        return  # fitted inside a traced function (an optimizer step): the caller's step checks its numbers
    arrays = [*factors.eigenvalues, *factors.input_bases, *factors.output_bases, *factors.diagonal]
    names = [layer.name for layer in factors.layers] * 3 + ["a diagonal leaf"] * len(factors.diagonal)
    finite = np.asarray(_all_finite([array for array in arrays if array is not None]))  # one program, one transfer
    named = [name for name, array in zip(names, arrays) if array is not None]
    for name, ok in zip(named, finite):
        if not ok:
            raise ValueError(
                f"the Kronecker factors of {name} are not finite: the activations or gradients hold NaN or "
                "inf at these parameters and data."
            )


@jax.jit
def _all_finite(arrays: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(array)) for array in arrays])


@jax.jit(static_argnames=("model_fn", "loss", "fisher", "chunk_size", "mesh", "embeddings", "mc_samples"))
def _statistics(
    params, data, *, model_fn, loss, fisher, chunk_size, mesh, embeddings, mc_samples
) -> KroneckerStatistics:
    stats_fn = lambda p, chunk: _factor_statistics(model_fn, loss, (fisher, mc_samples), embeddings, p, chunk)
    stats = _average(stats_fn, params, data, chunk_size, mesh)
    layers = _layers(model_fn, params, data, embeddings)
    covered = {leaf for layer in layers for leaf in (layer.weight, layer.bias) if leaf is not None}
    return KroneckerStatistics(
        tuple(a_sum / jnp.maximum(a_count, 1.0) for a_sum, a_count, _ in stats["layers"]),
        tuple(g for _, _, g in stats["layers"]),
        tuple(None if leaf in covered else d for leaf, d in enumerate(stats["diagonal"])),
        layers,
        jax.tree.structure(params),
        tuple(jnp.shape(leaf) for leaf in jax.tree.leaves(params)),
    )


def _average(stats_fn: Callable, operand: PyTree, data: tuple, chunk_size: int, mesh: Mesh | None) -> PyTree:
    """The mean of ``stats_fn(operand, chunk)`` over the real examples of the padded ``data``."""
    total = average_over_chunks(stats_fn, data, chunk_size=chunk_size, mesh=mesh, axis=DATA_AXIS)(operand)
    weights = data[-1]
    return jax.tree.map(lambda x: x * (weights.shape[0] / jnp.sum(weights)), total)


@jax.jit(static_argnames=("model_fn", "loss", "kind", "fisher", "chunk_size", "mesh", "embeddings", "mc_samples"))
def _fit(params, data, *, model_fn, loss, kind, fisher, chunk_size, mesh, embeddings, mc_samples) -> KroneckerFactors:
    factors = kronecker_factors(
        _statistics(
            params,
            data,
            model_fn=model_fn,
            loss=loss,
            fisher=fisher,
            chunk_size=chunk_size,
            mesh=mesh,
            embeddings=embeddings,
            mc_samples=mc_samples,
        )  # fmt: skip
    )
    if kind == "kfac":
        return factors
    bases = (factors.input_bases, factors.output_bases)
    pseudo = (fisher, mc_samples)
    correct_fn = lambda operand, chunk: _eigenvalue_statistics(model_fn, loss, pseudo, embeddings, *operand, chunk)
    eigenvalues = _average(correct_fn, (params, bases), data, chunk_size, mesh)
    return dataclasses.replace(factors, eigenvalues=tuple(eigenvalues), kind="ekfac")


def _layers(model_fn, params, data, embeddings) -> tuple[DenseLayer, ...]:
    return tapped_model(model_fn, params, jax.tree.map(lambda x: x[:1], data[0]), embeddings=embeddings).layers


def _eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0: the factors are positive semi-definite) and eigenvectors, one matrix at a time.

    A stack of factors is decomposed by ``lax.map``, not by one batched ``eigh``:
    on the CPU (jaxlib 0.10.2), a program holding a batched ``eigh`` beside the
    statistics of a scanned stack hung on its second or third call, measured,
    with or without ``--xla_cpu_multi_thread_eigen=false``; mapped, it ran 24
    calls out of 24.
    """
    one = lambda m: jnp.linalg.eigh((m + m.T) / 2)
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    values, vectors = one(flat[0]) if matrix.ndim == 2 else jax.lax.map(one, flat)
    return jnp.maximum(values, 0.0).reshape(matrix.shape[:-1]), vectors.reshape(matrix.shape)


def _example_gradients(model_fn, loss, pseudo, params, chunk, *, tapped: TappedModel | None):
    """Per example of ``chunk``, vmapped: ``(activations, cotangents, weights)``.

    ``pseudo`` is ``(fisher, mc_samples)``. ``cotangents`` is ``(parameter cotangents, output
    cotangents)`` with ``tapped``, else ``(parameter cotangents,)``; each has a leading axis of
    pseudo-target columns (``mc_samples``, or ``K`` for the closed form).
    """
    inputs, targets, keys = chunk

    def one(x, t, key_data):
        x, t = jax.tree.map(lambda a: a[None], (x, t))
        key = jax.random.wrap_key_data(key_data)
        if tapped is None:
            outputs, pullback = jax.vjp(lambda p: model_fn(p, x), params)
            activations = ()
        else:
            zeros = tuple(jnp.zeros(shape, _dtype(params)) for shape in tapped.perturbation_shapes)
            outputs, pullback, activations = jax.vjp(lambda p, e: tapped.run(p, x, e), params, zeros, has_aux=True)
        weights = loss.weights(outputs, t)
        columns = _pseudo_target_columns(loss, pseudo, outputs, t, weights, key)
        cotangents = jax.vmap(pullback)(columns)
        return activations, cotangents, weights

    return jax.vmap(one)(inputs, targets, keys)


def _dtype(params) -> Any:
    """The factors' dtype: the parameters', at least float32 (a half-precision model's are accumulated and
    decomposed in float32)."""
    return jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)


def _pseudo_target_columns(loss: Loss, pseudo: tuple[str, int], outputs, targets, weights, key) -> jax.Array:
    """``[S, *outputs.shape]``: the output vectors whose backpropagation gives the pseudo-gradients.

    ``pseudo`` is ``(fisher, mc_samples)``. ``E[sum_s c_s c_s^T] = diag(w) H_L`` per position,
    ``H_L`` the unweighted output Hessian; ``S`` sampled labels are each scaled by ``1 / sqrt(S)``.
    """
    fisher, samples = pseudo
    if fisher == "closed_form":
        root = jnp.sqrt(weights)[..., None, None]
        return jnp.moveaxis(loss.output_hessian_factor(outputs) * root, -1, 0)
    if fisher == "empirical":
        return weighted_score(loss, outputs, targets, targets)[None]
    draw = lambda k: weighted_score(loss, outputs, targets, loss.sample_targets(k, outputs, targets))
    keys = key[None] if samples == 1 else jax.random.split(key, samples)  # one sample: the labels of before
    return jax.vmap(draw)(keys) / jnp.sqrt(jnp.asarray(samples, outputs.dtype))


def _factor_statistics(model_fn, loss, pseudo, embeddings, params, chunk) -> dict:
    """The chunk's mean per example of ``(sum_p m_p a a^T, sum_p m_p, sum_p g g^T)`` per layer, and of
    the squared parameter gradients of the leaves in no layer (the diagonal; None for the others, whose
    per-example gradients are then never formed); a padding example (weight 0) adds nothing."""
    *chunk, example_weights = chunk
    tapped = tapped_model(model_fn, params, jax.tree.map(lambda x: x[:1], chunk[0]), embeddings=embeddings)
    activations, (param_cot, output_cot), weights = _example_gradients(
        model_fn, loss, pseudo, params, chunk, tapped=tapped
    )
    size, dtype = example_weights.shape[0], _dtype(params)
    layers = []
    for layer, a, g, positions in zip(tapped.layers, activations, output_cot, tapped.position_shapes):
        # a: [c, *stack, p, in] (an embedding's token ids: [c, *stack, p]); g: [c, S, *stack, p, out]
        mask = jnp.ones((size, g.shape[-2]), dtype)
        if positions == weights.shape[1:]:  # the layer's positions are the loss's: padding is left out
            mask = (weights > 0).reshape(size, -1).astype(dtype)
        mask = mask * example_weights[:, None].astype(dtype)
        if layer.lookup:
            a_sum = _token_counts(a, mask, layer.in_features)
        else:
            a = layer.with_bias_input(a.astype(dtype))
            a_sum = jnp.einsum("c...pi,cp,c...pj->...ij", a, mask, a)
        g_sum = jnp.einsum("c,cs...pi,cs...pj->...ij", example_weights.astype(g.dtype), g, g)
        layers.append((a_sum / size, jnp.sum(mask) / size, g_sum / size))
    covered = {leaf for layer in tapped.layers for leaf in (layer.weight, layer.bias) if leaf is not None}
    diagonal = tuple(
        None if leaf in covered else _weighted_mean(example_weights, x.astype(dtype) ** 2, (0, 1))
        for leaf, x in enumerate(jax.tree.leaves(param_cot))
    )
    return {"layers": tuple(layers), "diagonal": diagonal}


def _token_counts(tokens: jax.Array, mask: jax.Array, vocabulary: int) -> jax.Array:
    """``[*stack, vocabulary]``: ``sum_{c,p} m_cp [token_cp = v]``, the diagonal of ``sum a a^T`` for one-hot ``a``."""
    size, *stack, positions = tokens.shape
    per_layer = jnp.moveaxis(tokens.reshape(size, -1, positions), 1, 0)
    count = lambda t: jnp.zeros(vocabulary, mask.dtype).at[t.reshape(-1)].add(mask.reshape(-1))
    return jax.vmap(count)(per_layer).reshape(*stack, vocabulary)


def _weighted_mean(example_weights: jax.Array, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``sum_c w_c x_c / C``, summed over ``axes`` (the first is the example axis)."""
    weighted = x * example_weights.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
    return jnp.sum(weighted, axis=axes) / example_weights.shape[0]


def _rotate(q_a: jax.Array | None, matrix: jax.Array, q_g: jax.Array) -> jax.Array:
    """``Q_A^T V Q_G``, batched (``Q_A = I`` where None)."""
    return (matrix if q_a is None else jnp.swapaxes(q_a, -1, -2) @ matrix) @ q_g


def _rotate_back(q_a: jax.Array | None, coordinates: jax.Array, q_g: jax.Array) -> jax.Array:
    """``Q_A X Q_G^T``, the inverse of :func:`_rotate`."""
    back = coordinates @ jnp.swapaxes(q_g, -1, -2)
    return back if q_a is None else q_a @ back


def _eigenvalue_statistics(model_fn, loss, pseudo, embeddings, params, bases, chunk) -> tuple:
    """EK-FAC: the chunk's mean of ``sum_s (Q_A^T grad_W Q_G)^2`` per layer.

    A layer's per-example gradient ``sum_p a_p g_p^T`` is formed in its eigenbasis from its inputs and
    output gradients, one example at a time; a tied embedding's (whose lookups add to it) from the
    parameter gradient of its leaf. No other per-example parameter gradient is formed.
    """
    tapped = tapped_model(model_fn, params, jax.tree.map(lambda x: x[:1], chunk[0]), embeddings=embeddings)
    inputs, targets, keys, example_weights = chunk
    fresh = jax.vmap(lambda k: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), 1)))(keys)
    activations, (param_cot, output_cot), _ = _example_gradients(
        model_fn, loss, pseudo, params, (inputs, targets, fresh), tapped=tapped
    )
    leaves = jax.tree.leaves(param_cot)  # each [c, S, *leaf]; only a tied layer's is computed
    out = []
    for layer, a, g, q_a, q_g in zip(tapped.layers, activations, output_cot, *bases):
        if layer.tied:
            matrices = jax.vmap(jax.vmap(lambda *ls, layer=layer: layer.block(list(ls))))(*leaves)
            out.append(_weighted_mean(example_weights, _rotate(q_a, matrices, q_g) ** 2, (0, 1)))
        else:
            out.append(_rotated_squares(layer, a, g, q_a, q_g, example_weights))
    return tuple(out)


def _rotated_squares(layer: DenseLayer, a, g, q_a, q_g, example_weights) -> jax.Array:
    """``sum_{c,s} w_c (Q_A^T (sum_p a_p g_p^T) Q_G)^2 / C`` ``[*stack, in (+1), out]``, one example at a time.

    ``a``: ``[c, *stack, p, in]`` (an embedding's token ids ``[c, *stack, p]``); ``g``: ``[c, S, *stack, p, out]``.
    """
    g = g.astype(q_g.dtype) @ q_g
    if not layer.lookup:
        a = layer.with_bias_input(a.astype(q_a.dtype)) @ q_a
    rows, depth = layer.in_features + (layer.bias is not None), len(layer.stack)

    def gradients(a, g):  # one example's [S, *stack, rows, out], each layer of the stack in turn
        flat = lambda x: x.reshape(-1, *x.shape[depth:])
        per_sample = lambda g: jax.vmap(layer.gradient)(flat(a), flat(g))
        return jax.vmap(per_sample)(g).reshape(g.shape[0], *layer.stack, rows, g.shape[-1])

    def add(total, example):
        a, g, weight = example
        return total + weight.astype(g.dtype) * jnp.sum(gradients(a, g) ** 2, axis=0), None

    zero = jnp.zeros((*layer.stack, rows, layer.out_features), g.dtype)
    total, _ = jax.lax.scan(add, zero, (a, g, example_weights))
    return total / example_weights.shape[0]


def _apply(factors: KroneckerFactors, v: PyTree, scale: Callable, scale_diagonal: Callable) -> PyTree:
    """``v`` transformed per layer in its eigenbasis by ``scale(eigenvalues, coordinates)`` and per
    diagonal leaf by ``scale_diagonal(diagonal, leaf)``."""
    leaves = jax.tree.leaves(v)
    if _plain_structure(jax.tree.structure(v)) != _plain_structure(factors.treedef):
        raise ValueError(
            f"v must have the structure of the fitted parameters, {factors.treedef}; got {jax.tree.structure(v)}."
        )
    out = [
        None if d is None else scale_diagonal(d, leaf).astype(leaf.dtype) for d, leaf in zip(factors.diagonal, leaves)
    ]
    for layer, q_a, q_g, values in zip(factors.layers, factors.input_bases, factors.output_bases, factors.eigenvalues):
        matrix = layer.block(leaves).astype(q_g.dtype)
        turned = _rotate_back(q_a, scale(values, _rotate(q_a, matrix, q_g)), q_g)
        shape, dtype = factors.shapes[layer.weight], leaves[layer.weight].dtype
        rows = turned[..., : layer.in_features, :]
        out[layer.weight] = scatter(out[layer.weight], layer.weight_index, rows.astype(dtype), shape)
        if layer.bias is not None:
            shape, dtype = factors.shapes[layer.bias], leaves[layer.bias].dtype
            bias = turned[..., layer.in_features, :]
            out[layer.bias] = scatter(out[layer.bias], layer.bias_index, bias.astype(dtype), shape)
    return jax.tree.unflatten(jax.tree.structure(v), out)


def _plain_structure(treedef) -> Any:
    """A tree structure with Flax NNX's ``Variable`` wrappers left out: factors fitted on either apply to both."""
    return jax.tree.structure(plain_arrays(jax.tree.unflatten(treedef, [0] * treedef.num_leaves)))


def kronecker_operator(factors: KroneckerFactors) -> MatVec:
    """``v -> C v``, the fitted K-FAC / EK-FAC curvature as an operator on parameter pytrees.

    Per layer ``C_W vec(V) = (Q_A (x) Q_G) diag(Lambda) (Q_A (x) Q_G)^T vec(V)``, computed as
    ``Q_A (Lambda * (Q_A^T V Q_G)) Q_G^T``; per diagonal leaf ``d * v``. Jittable;
    usable wherever an operator is (:func:`hvpopt.eigsh`, :func:`hvpopt.trace`).
    """
    return lambda v: _apply(factors, v, lambda values, x: values * x, lambda d, x: d * x)


def kronecker_inverse(factors: KroneckerFactors, *, damping: float) -> MatVec:
    """``v -> (C + damping I)^{-1} v``: two small rotations and a division per layer.

    .. math:: (C_W + \\lambda I)^{-1} \\mathrm{vec}(V) = \\mathrm{vec}\\big(Q_A \\big[(Q_A^\\top V Q_G)
       \\oslash (\\Lambda + \\lambda)\\big] Q_G^\\top\\big)

    Exact for the fitted ``C`` (not the factored damping of Martens & Grosse).
    Usable as a preconditioner (``hvpopt.cg(..., precond=kronecker_inverse(factors,
    damping=...))``) and in influence (``method="ekfac"``).

    Args:
      factors: from :func:`fit_kronecker_factors`.
      damping: ``> 0`` and finite (a layer's eigenvalues may be 0: unused inputs, padding).
    """
    if not isinstance(damping, jax.core.Tracer):  # a traced damping (an optimizer's schedule) is the caller's
        _checks.check_number("damping", damping, "> 0 and finite", lambda x: x > 0)
    return lambda v: _apply(factors, v, lambda values, x: x / (values + damping), lambda d, x: x / (d + damping))


def kronecker_to_arrays(factors: KroneckerFactors) -> dict[str, np.ndarray]:
    """The fitted arrays by name, for ``numpy.savez`` (no pickle); :func:`kronecker_from_arrays` reads them back."""
    arrays = {"kind": np.array(factors.kind), "embeddings": np.array(any(layer.lookup for layer in factors.layers))}
    for i, (q_a, q_g, values) in enumerate(zip(factors.input_bases, factors.output_bases, factors.eigenvalues)):
        arrays |= {f"output_basis_{i}": q_g, f"eigenvalues_{i}": values}
        arrays |= {} if q_a is None else {f"input_basis_{i}": q_a}
    arrays |= {f"diagonal_{leaf}": d for leaf, d in enumerate(factors.diagonal) if d is not None}
    return {name: np.asarray(value) for name, value in arrays.items()}


def kronecker_from_arrays(arrays: Any, model_fn: Callable, params: PyTree, inputs: Any) -> KroneckerFactors:
    """:class:`KroneckerFactors` from :func:`kronecker_to_arrays`' arrays, for this model and parameter structure.

    The layers are found again in ``model_fn`` (at ``inputs``' shapes); ValueError if the arrays were
    fitted on a model whose layers or shapes differ.
    """
    embeddings = bool(arrays["embeddings"]) if "embeddings" in arrays else False
    layers = tapped_model(model_fn, params, inputs, embeddings=embeddings).layers
    leaves = jax.tree.leaves(params)
    covered = {leaf for layer in layers for leaf in (layer.weight, layer.bias) if leaf is not None}
    expected = {"kind"} | ({"embeddings"} & set(arrays))
    for i, layer in enumerate(layers):
        size = layer.in_features + (layer.bias is not None)
        shapes = {f"output_basis_{i}": (*layer.stack, layer.out_features, layer.out_features)}
        shapes[f"eigenvalues_{i}"] = (*layer.stack, size, layer.out_features)
        if not layer.lookup:
            shapes[f"input_basis_{i}"] = (*layer.stack, size, size)
        expected |= set(shapes)
        for name, shape in shapes.items():
            if name not in arrays or tuple(np.shape(arrays[name])) != shape:
                raise ValueError(f"the saved factors do not fit this model: {name} should have shape {shape}.")
    expected |= {f"diagonal_{leaf}" for leaf in range(len(leaves)) if leaf not in covered}
    if set(arrays) != expected:
        raise ValueError("the saved factors do not fit this model: they hold other layers or leaves.")
    kind = str(arrays["kind"])
    _checks.check_choice("kind", kind, KRONECKER_KINDS)
    dtype = _dtype(params)
    get = lambda name: jnp.asarray(arrays[name], dtype) if name in arrays else None
    return KroneckerFactors(
        tuple(get(f"input_basis_{i}") for i in range(len(layers))),
        tuple(get(f"output_basis_{i}") for i in range(len(layers))),
        tuple(get(f"eigenvalues_{i}") for i in range(len(layers))),
        tuple(None if leaf in covered else get(f"diagonal_{leaf}") for leaf in range(len(leaves))),
        layers,
        kind,
        jax.tree.structure(params),
        tuple(jnp.shape(leaf) for leaf in leaves),
    )
