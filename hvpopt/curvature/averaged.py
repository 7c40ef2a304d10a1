"""Curvature products averaged over a dataset, one batch in memory at a time.

Given a product on one batch, ``batch_matvec(v, batch) = A_b v`` with ``A_b`` the
curvature of the batch's *mean* loss, the dataset's curvature is the
size-weighted mean

.. math:: A v = \\frac{1}{N} \\sum_b n_b\\, A_b v,\\qquad N = \\sum_b n_b,

which is exactly the curvature of the mean loss over all ``N`` examples, also
when the last batch is smaller than the others.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax.tree_utils as otu
from jax.sharding import Mesh, PartitionSpec

from hvpopt import _checks, sharding
from hvpopt.sharding import DATA_AXIS
from hvpopt.types import MatVec, PyTree

BatchMatVec = Callable[[PyTree, Any], PyTree]


def average_over_chunks(
    batch_matvec: BatchMatVec, data: Any, *, chunk_size: int, mesh: Mesh | None = None, axis: str = DATA_AXIS
) -> MatVec:
    """The dataset-averaged product over arrays cut into chunks of examples.

    The full chunks run in one ``lax.scan``, so memory is bounded by one chunk
    and the operator works inside ``jit``; a remainder chunk, if any, runs once
    more with its own (smaller) weight.

    With a ``mesh`` the examples are split over its axis ``axis``
    (``jax.shard_map``): each device sums ``n_b A_b v`` over the chunks of its
    own share, ``lax.psum`` adds the shares (one all-reduce per product), and
    the ``N mod devices`` examples left over, if any, are averaged on every
    device. Pass ``data`` already placed by :func:`hvpopt.shard_batch` to
    avoid moving it at every call.

    Args:
      batch_matvec: ``batch_matvec(v, batch) -> A_b v`` for the mean loss of
        ``batch``, a pytree shaped like ``data`` with ``chunk_size`` examples.
      data: a pytree of arrays sharing a leading example axis of size ``N``.
      chunk_size: examples per chunk (per device, with a ``mesh``).
      mesh: a :class:`jax.sharding.Mesh` to split the examples over (None:
        one device).
      axis: the mesh axis the examples are split over.

    Returns:
      ``v -> (1/N) sum_b n_b A_b v``.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> x = jnp.arange(10.0).reshape(5, 2)
      >>> gram = lambda v, xb: xb.T @ (xb @ v) / xb.shape[0]  # mean of x x^T
      >>> matvec = hvpopt.average_over_chunks(gram, x, chunk_size=2)
      >>> bool(jnp.allclose(matvec(jnp.ones(2)), x.T @ (x @ jnp.ones(2)) / 5))
      True
    """
    _checks.check_positive_int("chunk_size", chunk_size)
    num_examples = _checks.leading_size("data", data)
    if num_examples == 0:
        raise ValueError("data holds no examples; the average is undefined.")
    if mesh is None:
        return lambda v: otu.tree_scale(1.0 / num_examples, _chunked_sum(batch_matvec, v, data, chunk_size))
    devices = sharding.axis_size(mesh, axis)
    shared = num_examples - num_examples % devices
    head = jax.tree.map(lambda x: x[:shared], data)
    rest = jax.tree.map(lambda x: x[shared:], data)
    share_sum = lambda v, share: jax.lax.psum(_chunked_sum(batch_matvec, v, share, chunk_size), axis)
    over_mesh = jax.shard_map(
        share_sum,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(axis)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )

    def matvec(v: PyTree) -> PyTree:
        total = _add(over_mesh(v, head) if shared else None, _chunked_sum(batch_matvec, v, rest, chunk_size))
        return otu.tree_scale(1.0 / num_examples, total)

    return matvec


def _chunked_sum(batch_matvec: BatchMatVec, v: PyTree, data: Any, chunk_size: int) -> PyTree | None:
    """``sum_b n_b A_b v`` over ``data`` cut into chunks; None if ``data`` is empty."""
    num_examples = _checks.leading_size("data", data)
    if num_examples == 0:
        return None
    chunk_size = min(chunk_size, num_examples)
    num_full = num_examples // chunk_size
    cut = num_full * chunk_size
    total = None
    if num_full:
        full = jax.tree.map(lambda x: x[:cut].reshape(num_full, chunk_size, *x.shape[1:]), data)
        zeros = otu.tree_zeros_like(jax.eval_shape(batch_matvec, v, jax.tree.map(lambda x: x[0], full)))
        add = lambda acc, chunk: (otu.tree_add(acc, batch_matvec(v, chunk)), None)
        total = otu.tree_scale(chunk_size, jax.lax.scan(add, zeros, full)[0])
    if cut < num_examples:
        rest = jax.tree.map(lambda x: x[cut:], data)
        total = _add(total, otu.tree_scale(num_examples - cut, batch_matvec(v, rest)))
    return total


def _add(total: PyTree | None, part: PyTree | None) -> PyTree | None:
    """``total + part``, where None stands for nothing yet."""
    if total is None or part is None:
        return part if total is None else total
    return otu.tree_add(total, part)


def average_over_batches(batch_matvec: BatchMatVec, batches: Sequence[Any] | Callable[[], Any]) -> MatVec:
    """The dataset-averaged product over a collection of batches of any sizes.

    The batches are visited in a Python loop, each product compiled once per
    batch shape, so any number of batches (streamed from disk, say) fits in the
    memory of one. Inside ``jit`` the loop unrolls: for a jitted solver over
    many batches use :func:`average_over_chunks`.

    Args:
      batch_matvec: ``batch_matvec(v, batch) -> A_b v`` for the mean loss of
        ``batch``.
      batches: a list or tuple of batches (pytrees of arrays with a leading
        example axis), or a function with no arguments that returns a fresh
        iterable of them each time it is called (the operator is applied many
        times, so a one-shot generator would not do).

    Returns:
      ``v -> (1/N) sum_b n_b A_b v``.
    """
    if callable(batches):
        iterate = batches
    elif isinstance(batches, (list, tuple)):
        iterate = lambda: batches
    else:
        raise TypeError(
            "batches must be a list or tuple of batches, or a function returning a "
            f"fresh iterable of batches; got {type(batches).__name__}. A generator "
            "is used up after one product: wrap it as `lambda: make_batches()`."
        )
    product = jax.jit(batch_matvec)

    def matvec(v: PyTree) -> PyTree:
        total, count = None, 0
        for batch in iterate():
            size = _checks.leading_size("each batch", batch)
            if size == 0:
                continue  # adds nothing; its own mean would be 0/0
            total = _add(total, otu.tree_scale(size, product(v, batch)))
            count += size
        if count == 0:
            raise ValueError("batches yielded no examples; the average is undefined.")
        return otu.tree_scale(1.0 / count, total)

    return matvec
