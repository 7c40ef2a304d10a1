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

from hvpopt import _checks

PyTree = Any
MatVec = Callable[[PyTree], PyTree]
BatchMatVec = Callable[[PyTree, Any], PyTree]


def average_over_chunks(batch_matvec: BatchMatVec, data: Any, *, chunk_size: int) -> MatVec:
    """The dataset-averaged product over arrays cut into chunks of examples.

    The full chunks run in one ``lax.scan``, so memory is bounded by one chunk
    and the operator works inside ``jit``; a remainder chunk, if any, runs once
    more with its own (smaller) weight.

    Args:
      batch_matvec: ``batch_matvec(v, batch) -> A_b v`` for the mean loss of
        ``batch``, a pytree shaped like ``data`` with ``chunk_size`` examples.
      data: a pytree of arrays sharing a leading example axis of size ``N``.
      chunk_size: examples per chunk.

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
    num_full = num_examples // chunk_size
    cut = num_full * chunk_size
    full = jax.tree.map(lambda x: x[:cut].reshape(num_full, chunk_size, *x.shape[1:]), data)
    rest = jax.tree.map(lambda x: x[cut:], data)

    def matvec(v: PyTree) -> PyTree:
        total = None
        if num_full:
            chunk = jax.tree.map(lambda x: x[0], full)
            zeros = otu.tree_zeros_like(jax.eval_shape(batch_matvec, v, chunk))
            add = lambda acc, chunk: (otu.tree_add(acc, batch_matvec(v, chunk)), None)
            total = otu.tree_scale(chunk_size, jax.lax.scan(add, zeros, full)[0])
        if cut < num_examples:
            part = otu.tree_scale(num_examples - cut, batch_matvec(v, rest))
            total = part if total is None else otu.tree_add(total, part)
        return otu.tree_scale(1.0 / num_examples, total)

    return matvec


def average_over_batches(
    batch_matvec: BatchMatVec, batches: Sequence[Any] | Callable[[], Any]
) -> MatVec:
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
            part = otu.tree_scale(size, product(v, batch))
            total = part if total is None else otu.tree_add(total, part)
            count += size
        if count == 0:
            raise ValueError("batches yielded no examples; the average is undefined.")
        return otu.tree_scale(1.0 / count, total)

    return matvec
