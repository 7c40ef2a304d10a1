"""Influence scores of Kronecker-factored layers, without a per-example gradient the size of the model.

A dense layer ``s_p = W^T a_p`` applied at positions ``p`` has the per-example
gradient ``grad_W l_j = sum_p a_p g_p^T``, with ``a_p`` its input (a trailing 1
for a bias) and ``g_p = d l_j / d s_p``. Against a query's preconditioned
gradient ``D_q = [(H + lambda I)^{-1} grad L_q]_W`` the layer's share of the score is

.. math:: \\langle D_q, \\nabla_W l_j \\rangle = \\sum_p a_p^\\top D_q\\, g_p ,

and with ``D_q ~ L_q R_q^T`` kept at rank ``r`` (``query_rank``) either
``sum_p (a_p^T L_q)(R_q^T g_p)`` or ``L_q R_q^T`` rebuilt for the chunk, a
group of queries at a time, whichever takes fewer multiplications.
Self-influence is, per layer, ``sum (Q_A^T G_j Q_G)^2 / (Lambda + lambda)`` with
``G_j`` the same per-example gradient. The activations and output gradients come
from one backward pass of the tapped model (:func:`hvpopt.curvature.tapped.tapped_model`),
so a chunk of training examples never holds the ``[examples, P]`` gradient rows
of :func:`hvpopt.influence.score_blocks`' flat path: its largest array is one
layer's ``[examples, in, out]`` block (a stack of layers is scored one layer at
a time). The leaves in no such layer (diagonal leaves, a tied embedding) are
scored flat, as before.

Reference:
  Grosse et al., "Studying large language model generalization with influence
  functions", 2023 (section 3.2: per-layer scoring and low-rank query gradients).
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hvpopt import _checks, sharding
from hvpopt.compiled_memory import ProgramMemory, program_memory
from hvpopt.curvature.dense_layers import DenseLayer
from hvpopt.curvature.kronecker import KroneckerFactors, kronecker_inverse
from hvpopt.curvature.tapped import tapped_model
from hvpopt.influence.example_loss import example_loss
from hvpopt.influence.gradients import padded_chunks
from hvpopt.types import PyTree

__all__ = ["SCORE_DTYPES", "FactoredDirections", "factored_directions_like", "factored_query_directions",
           "factored_score_blocks", "factored_scoring_memory", "factored_self_score_blocks"]  # fmt: skip

#: The dtypes scores may be contracted in (``score_dtype``); the products accumulate in float32 or wider.
SCORE_DTYPES = ("float64", "float32", "bfloat16", "float16")
_OVERSAMPLING, _POWER_ITERATIONS = 8, 2
#: Numbers in the low-rank query blocks rebuilt at once while scoring a chunk (128 MB in float32).
_REBUILT_ELEMENTS = 2**25


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactoredDirections:
    """Queries' preconditioned gradients ``(H + lambda I)^{-1} grad L_q``, kept per Kronecker-factored layer.

    Attributes:
      blocks: per layer of ``layers``, ``[q, *stack, in (+1), out]``; with a query rank ``r`` below the
        block's smaller side, the pair ``(left [q, *stack, in (+1), r], right [q, *stack, out, r])``,
        ``left @ right^T`` the block's best rank-``r`` approximation.
      rest: ``[q, R]``: the leaves no such layer holds, flattened and concatenated in leaf order.
      layers: the layers scored factored (the fitted layers but a tied embedding).
      rest_leaves: the indices of the leaves in ``rest``.
      model: ``(model_fn, output_loss)``, whose taps give the training examples' layer inputs and
        output gradients.
      embeddings: the layers hold embedding tables (:func:`hvpopt.find_dense_layers`).
    """

    blocks: tuple[jax.Array | tuple[jax.Array, jax.Array], ...]
    rest: jax.Array
    layers: tuple[DenseLayer, ...] = dataclasses.field(metadata={"static": True})
    rest_leaves: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    model: tuple[Callable, Callable] = dataclasses.field(metadata={"static": True})
    embeddings: bool = dataclasses.field(metadata={"static": True})

    @property
    def num_queries(self) -> int:
        """The number of queries (the leading axis of every array)."""
        return self.rest.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored directions."""
        return sum(x.nbytes for x in jax.tree.leaves(self))


def factored_query_directions(
    model: tuple[Callable, Callable],
    params: PyTree,
    queries: PyTree,
    factors: KroneckerFactors,
    damping: float,
    *,
    query_rank: int | None = None,
    score_dtype: str | None = None,
    chunk_size: int = 64,
) -> FactoredDirections:
    """The queries' gradients, preconditioned by fitted K-FAC / EK-FAC factors, kept per layer.

    Args:
      model: ``(model_fn, output_loss)``, the model the factors were fitted on.
      params: the trained parameters.
      queries: ``(inputs, targets)`` with a leading query axis.
      factors: from :func:`hvpopt.fit_kronecker_factors`.
      damping: ``lambda > 0``.
      query_rank: keep each layer's block at this rank (a randomized SVD: Halko, Martinsson & Tropp,
        2011), where it is below the block's smaller side; None: full rank. The stored directions then
        shrink from ``in * out`` to ``r (in + out)`` numbers per layer and query.
      score_dtype: one of :data:`SCORE_DTYPES`, the dtype the directions are stored in and the scores
        contracted in (accumulated in float32 or wider); None: the parameters' dtype.
      chunk_size: queries per compiled chunk (each query's whole gradient is formed in turn).

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
      >>> model = (lambda p, x: x @ p["w"] + p["b"], hvpopt.losses.softmax_cross_entropy)
      >>> x = jax.random.normal(jax.random.key(0), (16, 3)); y = jnp.arange(16) % 2
      >>> factors = hvpopt.fit_kronecker_factors(*model, params, (x, y))
      >>> directions = hvpopt.influence.factored_query_directions(model, params, (x[:2], y[:2]), factors, 1e-3)
      >>> [block.shape for block in directions.blocks], directions.rest.shape
      ([(2, 4, 2)], (2, 0))
    """
    model = tuple(model)
    damping = _checks.check_number("damping", damping, "> 0 and finite", lambda x: x > 0)
    if query_rank is not None:
        query_rank = _checks.check_positive_int("query_rank", query_rank)
    dtype = _score_dtype(score_dtype, params)
    layers = tuple(layer for layer in factors.layers if not layer.tied)
    covered = {leaf for layer in layers for leaf in (layer.weight, layer.bias) if leaf is not None}
    rest = tuple(leaf for leaf in range(len(factors.shapes)) if leaf not in covered)
    parts = []
    for _, count, chunk in padded_chunks(tuple(queries), chunk_size=chunk_size):
        blocks, flat = _precondition(params, chunk, factors, damping, model=model, layers=layers, rest=rest,
                                     rank=query_rank, dtype=dtype)  # fmt: skip
        parts.append(jax.tree.map(lambda x: x[:count], (blocks, flat)))
    blocks, flat = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    embeddings = any(layer.lookup for layer in factors.layers)
    return FactoredDirections(tuple(blocks), flat, layers, rest, model, embeddings)


def factored_score_blocks(
    params: PyTree,
    train: PyTree,
    directions: FactoredDirections,
    *,
    chunk_size: int = 64,
    start: int = 0,
    mesh: Mesh | None = None,
) -> Iterator[tuple[int, jax.Array]]:
    """Yields ``(first_index, scores [n_queries, c])`` for consecutive chunks of ``train``, scored per layer.

    The scores of :func:`hvpopt.influence.score_blocks` (``(1/n) D_q^T grad l_j``) for
    :class:`FactoredDirections`; arguments as there.
    """
    num_train = _checks.leading_size("train", train)
    params, directions, gathered = _placed(params, directions, mesh)
    for first, count, chunk in padded_chunks(tuple(train), chunk_size=chunk_size, start=start, mesh=mesh):
        yield first, _chunk_scores(params, chunk, directions, num_train, gathered)[:, :count]


def factored_directions_like(
    model: tuple[Callable, Callable],
    params: PyTree,
    inputs: Any,
    num_queries: int,
    *,
    query_rank: int | None = None,
    score_dtype: str | None = None,
    embeddings: bool = False,
) -> FactoredDirections:
    """The shapes and dtypes (:class:`jax.ShapeDtypeStruct`) of :func:`factored_query_directions`' result,
    without computing it; ``inputs`` are one example's, with a leading axis of 1."""
    layers = tapped_model(model[0], params, inputs, embeddings=embeddings).layers
    dtype = _score_dtype(score_dtype, params)
    kept = tuple(layer for layer in layers if not layer.tied)
    covered = {leaf for layer in kept for leaf in (layer.weight, layer.bias) if leaf is not None}
    leaves = jax.tree.leaves(params)
    rest = tuple(leaf for leaf in range(len(leaves)) if leaf not in covered)
    like = lambda *shape: jax.ShapeDtypeStruct((num_queries, *shape), dtype)
    blocks = []
    for layer in kept:
        rows = layer.in_features + (layer.bias is not None)
        if query_rank is None or query_rank >= min(rows, layer.out_features):
            blocks.append(like(*layer.stack, rows, layer.out_features))
        else:
            blocks.append((like(*layer.stack, rows, query_rank), like(*layer.stack, layer.out_features, query_rank)))
    rest_size = sum(leaves[leaf].size for leaf in rest)
    return FactoredDirections(tuple(blocks), like(rest_size), kept, rest, tuple(model), embeddings)


def factored_scoring_memory(
    params: PyTree, train: PyTree, directions: FactoredDirections, *, chunk_size: int = 64, mesh: Mesh | None = None
) -> ProgramMemory | None:
    """The memory of one chunk of :func:`factored_score_blocks` (compiled, not run; its arguments include
    the parameters and the directions, which may be :func:`factored_directions_like`'s)."""
    num_train = _checks.leading_size("train", train)
    params, directions, gathered = _placed(params, directions, mesh)
    _, _, chunk = next(padded_chunks(tuple(train), chunk_size=chunk_size, mesh=mesh))
    return program_memory(_chunk_scores, params, chunk, directions, num_train, gathered)


def _placed(params: PyTree, directions: FactoredDirections, mesh: Mesh | None) -> tuple:
    """The parameters and directions on every device of ``mesh`` (shapes given for arrays, too), and the
    sharding the scores are gathered to; as they were without a mesh."""
    if mesh is None:
        return params, directions, None
    everywhere = NamedSharding(mesh, PartitionSpec())
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere) if isinstance(
        x, jax.ShapeDtypeStruct) else jax.device_put(x, everywhere)  # fmt: skip
    return sharding.replicate(params, mesh), jax.tree.map(place, directions), everywhere


def _score_dtype(score_dtype: str | None, params: PyTree) -> Any:
    if score_dtype is None:
        return jnp.result_type(*jax.tree.leaves(params))
    _checks.check_choice("score_dtype", score_dtype, SCORE_DTYPES)
    return jnp.dtype(score_dtype)


@jax.jit(static_argnames=("model", "layers", "rest", "rank", "dtype"))
def _precondition(params, chunk, factors, damping, *, model, layers, rest, rank, dtype):
    """Per query of ``chunk``, one at a time: the preconditioned gradient's layer blocks and its other leaves."""
    inverse = kronecker_inverse(factors, damping=damping)
    loss_fn = example_loss(*model)

    def one(example):
        leaves = jax.tree.leaves(inverse(jax.grad(loss_fn)(params, example)))
        blocks = tuple(_compressed(layer.block(leaves), rank) for layer in layers)
        flat = jnp.concatenate([jnp.ravel(leaves[leaf]) for leaf in rest] or [jnp.zeros(0, dtype)])
        return jax.tree.map(lambda x: x.astype(dtype), (blocks, flat))

    return jax.lax.map(one, chunk)


def _compressed(block: jax.Array, rank: int | None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``block`` ``[*stack, m, n]``, or ``(left [*stack, m, r], right [*stack, n, r])`` with ``left right^T``
    its rank-``r`` truncated SVD, found by a randomized range finder with power iterations."""
    m, n = block.shape[-2:]
    if rank is None or rank >= min(m, n):
        return block
    sketch = min(rank + _OVERSAMPLING, m, n)
    flat = block.reshape(-1, m, n)
    test = jax.random.normal(jax.random.key(0), (n, sketch), block.dtype)

    def one(matrix):
        basis = jnp.linalg.qr(matrix @ test)[0]
        for _ in range(_POWER_ITERATIONS):
            basis = jnp.linalg.qr(matrix @ jnp.linalg.qr(matrix.T @ basis)[0])[0]
        u, s, vt = jnp.linalg.svd(basis.T @ matrix, full_matrices=False)
        return (basis @ u[:, :rank]) * s[:rank], vt[:rank].T

    left, right = jax.lax.map(one, flat)
    return left.reshape(*block.shape[:-2], m, rank), right.reshape(*block.shape[:-2], n, rank)


@jax.jit(static_argnums=(3, 4))
def _chunk_scores(params, chunk, directions: FactoredDirections, num_train: int, sharding_of_scores):
    _, grads, activations, output_grads = _example_taps(
        directions.model, params, chunk, directions.embeddings, directions.rest_leaves
    )
    dtype = directions.rest.dtype
    accumulate = _accumulation_dtype(params)
    contract = lambda spec, *xs: jnp.einsum(spec, *xs, preferred_element_type=accumulate)
    size = jax.tree.leaves(chunk)[0].shape[0]
    flat = jnp.concatenate([g.reshape(size, -1) for g in grads] or [jnp.zeros((size, 0))], axis=1)
    scores = contract("qr,cr->qc", directions.rest, flat.astype(dtype))
    for layer, block, a, g in zip(directions.layers, directions.blocks, activations, output_grads):
        scores = scores + _layer_scores(layer, block, a, g, dtype, contract)
    return _gathered(scores / num_train, sharding_of_scores)


def _example_taps(model, params, chunk, embeddings: bool, leaves_wanted: tuple[int, ...]) -> tuple:
    """Per example of ``chunk``, vmapped: ``(layers, gradients, activations, output gradients)``.

    ``layers`` are the model's layers but a tied embedding, ``activations`` and ``output gradients``
    their inputs ``[c, *stack, p, in]`` and the loss's gradients with respect to their outputs
    ``[c, *stack, p, out]``, and ``gradients`` those of the parameter leaves ``leaves_wanted``
    (the other leaves' per-example gradients are never formed).
    """
    model_fn, output_loss = model
    inputs, targets = chunk
    tapped = tapped_model(model_fn, params, jax.tree.map(lambda x: x[:1], inputs), embeddings=embeddings)
    taps = [k for k, layer in enumerate(tapped.layers) if not layer.tied]
    accumulate = _accumulation_dtype(params)

    def one(x, t):
        x, t = jax.tree.map(lambda a: a[None], (x, t))
        zeros = tuple(jnp.zeros(shape, accumulate) for shape in tapped.perturbation_shapes)

        def loss(p, perturbations):
            outputs, activations = tapped.run(p, x, perturbations)
            return output_loss(outputs, t), activations

        (param_grads, output_grads), activations = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, zeros)
        leaves = jax.tree.leaves(param_grads)
        return (
            tuple(leaves[leaf] for leaf in leaves_wanted),
            tuple(activations[k] for k in taps),
            tuple(output_grads[k] for k in taps),
        )

    grads, activations, output_grads = jax.vmap(one)(inputs, targets)
    return tuple(tapped.layers[k] for k in taps), grads, activations, output_grads


def _accumulation_dtype(params: PyTree) -> Any:
    return jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)


def _gathered(scores: jax.Array, sharding_of_scores) -> jax.Array:
    return scores if sharding_of_scores is None else jax.lax.with_sharding_constraint(scores, sharding_of_scores)


def factored_self_score_blocks(
    model: tuple[Callable, Callable],
    params: PyTree,
    train: PyTree,
    factors: KroneckerFactors,
    damping: float,
    *,
    chunk_size: int = 64,
    start: int = 0,
    mesh: Mesh | None = None,
) -> Iterator[tuple[int, jax.Array]]:
    """Yields ``(first_index, self-influence [c])``, ``(1/n) grad l_j^T (C + damping I)^{-1} grad l_j``, per layer.

    Each layer's share is ``sum (Q_A^T G_j Q_G)^2 / (Lambda + damping)`` with ``G_j = sum_p a_p g_p^T``
    formed from the tapped inputs and output gradients, one layer at a time; arguments as in
    :func:`factored_query_directions` and :func:`factored_score_blocks`.
    """
    model, damping = tuple(model), _checks.check_number("damping", damping, "> 0 and finite", lambda x: x > 0)
    num_train = _checks.leading_size("train", train)
    params = params if mesh is None else sharding.replicate(params, mesh)
    gathered = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    for first, count, chunk in padded_chunks(tuple(train), chunk_size=chunk_size, start=start, mesh=mesh):
        yield first, _chunk_self_scores(params, chunk, factors, damping, model, num_train, gathered)[:count]


@jax.jit(static_argnums=(4, 5, 6))
def _chunk_self_scores(params, chunk, factors: KroneckerFactors, damping, model, num_train: int, sharding_of_scores):
    kept = [k for k, layer in enumerate(factors.layers) if not layer.tied]
    covered = {leaf for k in kept for leaf in (factors.layers[k].weight, factors.layers[k].bias) if leaf is not None}
    rest = tuple(leaf for leaf in range(len(factors.shapes)) if leaf not in covered)
    embeddings = any(layer.lookup for layer in factors.layers)
    _, grads, activations, output_grads = _example_taps(model, params, chunk, embeddings, rest)
    dtype = _accumulation_dtype(params)
    leaves = dict(zip(rest, (g.astype(dtype) for g in grads)))
    size = jax.tree.leaves(chunk)[0].shape[0]
    total = jnp.zeros(size, dtype)
    for k, a, g in zip(kept, activations, output_grads):
        layer = factors.layers[k]
        gradients = lambda a, g, layer=layer: jax.vmap(layer.gradient)(layer.with_bias_input(a), g)  # noqa: E731
        total = total + _layer_self_scores(factors, k, gradients, (a, g), damping)
    for k, layer in enumerate(factors.layers):
        if layer.tied:  # its leaf's whole gradient: the lookups add to it
            listed = [leaves.get(leaf) for leaf in range(len(factors.shapes))]
            gradients = lambda listed, layer=layer: jax.vmap(lambda *ls: layer.block(list(ls)))(*listed)  # noqa: E731
            total = total + _layer_self_scores(factors, k, gradients, (listed,), damping, stacked=False)
    for leaf, diagonal in enumerate(factors.diagonal):
        if diagonal is not None:
            squares = leaves[leaf] ** 2 / (diagonal + damping)
            total = total + jnp.sum(squares.reshape(size, -1), axis=1)
    return _gathered(total / num_train, sharding_of_scores)


def _layer_self_scores(factors, k: int, gradients: Callable, operands: tuple, damping, *, stacked=True):
    """``[c]``: ``sum (Q_A^T G Q_G)^2 / (Lambda + damping)`` of layer ``k``'s per-example gradients ``G``,
    ``gradients(*operands)``; with ``stacked``, the operands ``[c, *stack, ...]`` are taken one layer of
    the stack at a time, else ``G`` holds every layer of it."""
    layer = factors.layers[k]
    bases = (factors.input_bases[k], factors.output_bases[k], factors.eigenvalues[k])

    def one(args):
        operands, (q_a, q_g, values) = args
        g = gradients(*operands).astype(q_g.dtype)
        rotated = (g if q_a is None else jnp.swapaxes(q_a, -1, -2) @ g) @ q_g
        squares = rotated**2 / (values + damping)
        return jnp.sum(squares.reshape(squares.shape[0], -1), axis=1)

    depth = len(layer.stack)
    if not stacked or depth == 0:
        return one((operands, bases))
    flat_bases = jax.tree.map(lambda x: x.reshape(-1, *x.shape[depth:]), bases)
    moved = jax.tree.map(lambda x: _stack_first(x, depth), operands)
    return jnp.sum(jax.lax.map(one, (moved, flat_bases)), axis=0)


def _layer_scores(layer: DenseLayer, block, a: jax.Array, g: jax.Array, dtype, contract) -> jax.Array:
    """``[q, c]``: ``sum_p a_p^T D_q g_p`` for one layer, one layer of a stack at a time.

    ``a``: ``[c, *stack, p, in]`` (an embedding's token ids ``[c, *stack, p]``); ``g``: ``[c, *stack, p, out]``.
    """
    stack_first = lambda x: _stack_first(x, len(layer.stack))
    a, g, block = layer.with_bias_input(stack_first(a)), stack_first(g), jax.tree.map(stack_first, block)

    def one(operands):
        a, g, block = operands
        if isinstance(block, tuple) and not layer.lookup and _per_position_is_cheaper(a.shape, g.shape, block):
            inputs = contract("cpi,qir->qcpr", a.astype(dtype), block[0])
            return jnp.sum(inputs * contract("cpo,qor->qcpr", g.astype(dtype), block[1]), axis=(2, 3))
        gradient = jax.vmap(layer.gradient)(a, g).astype(dtype)
        if not isinstance(block, tuple):
            return contract("cio,qio->qc", gradient, block)
        return _rebuilt_scores(gradient, *block, dtype, contract)

    return jnp.sum(jax.lax.map(one, (a, g, block)), axis=0)


def _rebuilt_scores(gradient: jax.Array, left: jax.Array, right: jax.Array, dtype, contract) -> jax.Array:
    """``[q, c]``: ``<L_q R_q^T, G_c>``, each block ``L_q R_q^T`` rebuilt in turn for a group of queries of at
    most :data:`_REBUILT_ELEMENTS` numbers, so that a chunk never holds every query's whole block."""
    q, i, o = left.shape[0], left.shape[1], right.shape[1]
    group = max(1, min(q, _REBUILT_ELEMENTS // (i * o)))
    padding = -q % group
    pad = lambda x: jnp.concatenate([x, jnp.zeros((padding, *x.shape[1:]), x.dtype)]) if padding else x
    groups = lambda x: pad(x).reshape(-1, group, *x.shape[1:])
    one = lambda lr: contract("cio,qio->qc", gradient, contract("qir,qor->qio", *lr).astype(dtype))
    return jax.lax.map(one, (groups(left), groups(right))).reshape(-1, gradient.shape[0])[:q]


def _per_position_is_cheaper(a_shape, g_shape, block: tuple) -> bool:
    """Whether ``sum_p (a_p^T L)(R^T g_p)`` takes fewer multiplications than rebuilding ``L R^T`` for the chunk
    and contracting it with the examples' gradients ``sum_p a_p g_p^T``."""
    (c, p, i), o, (q, _, r) = a_shape, g_shape[-1], block[0].shape
    per_position = c * q * p * r * (i + o)
    rebuilt = q * i * o * r + c * p * i * o + c * q * i * o
    return per_position < rebuilt


def _stack_first(x: jax.Array, depth: int) -> jax.Array:
    """``x [c or q, *stack, ...]`` as ``[layers, c or q, ...]``: the stack axes merged in front (1 if none)."""
    moved = jnp.moveaxis(x, tuple(range(1, 1 + depth)), tuple(range(depth)))
    return moved.reshape(-1, *moved.shape[depth:])
