"""Per-example gradients, flattened, one chunk of examples in memory at a time."""

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hvpopt import _checks, sharding
from hvpopt.types import PyTree


def flat_example_gradients(loss_fn: Callable, params: PyTree, examples: PyTree) -> jax.Array:
    """``[n, P]``: row ``i`` is ``ravel(grad loss_fn(params, examples[i]))``.

    Columns follow ``jax.flatten_util.ravel_pytree(params)``. Vectorized by
    ``jax.vmap``: memory grows with ``n``, so callers cut a large set into
    chunks (:func:`gradient_chunks`).
    """
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, examples)
    leaves = jax.tree.leaves(grads)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def gradient_chunks(
    loss_fn: Callable, params: PyTree, examples: PyTree, *, chunk_size: int, start: int = 0, mesh: Mesh | None = None
) -> Iterator[tuple[int, jax.Array]]:
    """Yields ``(first_index, gradients [c, P])`` for consecutive chunks of ``examples``.

    Every chunk is computed with the same number of rows (the last is padded
    with copies of its first example and cut back), so the gradient compiles
    once. With a ``mesh`` each chunk, padded to a multiple of the devices, is
    split over its ``"data"`` axis: every device computes the gradients of its
    rows. Cutting a chunk back to a size the devices do not divide gathers it;
    :func:`hvpopt.influence.score_blocks` avoids that by scoring the padded
    rows and cutting the scores.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of one example.
      params: any pytree of floating arrays.
      examples: a pytree of arrays with a leading example axis.
      chunk_size: examples per chunk.
      start: the first example (a multiple of ``chunk_size`` when resuming).
      mesh: a :class:`jax.sharding.Mesh` to split each chunk over (None: one device).
    """
    for first, count, gradients in padded_gradient_chunks(
        loss_fn, params, examples, chunk_size=chunk_size, start=start, mesh=mesh
    ):
        yield first, gradients[:count]


def padded_gradient_chunks(
    loss_fn: Callable, params: PyTree, examples: PyTree, *, chunk_size: int, start: int = 0, mesh: Mesh | None = None
) -> Iterator[tuple[int, int, jax.Array]]:
    """:func:`gradient_chunks` before the cut: ``(first_index, count, gradients [rows, P])``.

    ``rows`` is ``min(chunk_size, n)`` rounded up to a multiple of the mesh's
    devices, the same for every chunk; rows from ``count`` on repeat the
    chunk's first example.
    """
    params = params if mesh is None else sharding.replicate(params, mesh)
    for first, count, chunk in padded_chunks(examples, chunk_size=chunk_size, start=start, mesh=mesh):
        yield first, count, _flat_example_gradients(loss_fn, params, chunk)


def padded_chunks(
    examples: PyTree, *, chunk_size: int, start: int = 0, mesh: Mesh | None = None
) -> Iterator[tuple[int, int, PyTree]]:
    """``(first_index, count, chunk)``: consecutive chunks of ``examples``, each of the same number of rows.

    ``rows`` is ``min(chunk_size, n)`` rounded up to a multiple of the mesh's
    devices; rows from ``count`` on repeat the chunk's first example, so that
    whatever is computed per chunk compiles once. With a ``mesh`` each chunk is
    split over its ``"data"`` axis.
    """
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    num_examples = _checks.leading_size("examples", examples)
    devices = 1 if mesh is None else sharding.axis_size(mesh)
    padded = -(-min(chunk_size, num_examples) // devices) * devices
    for first in range(start, num_examples, chunk_size):
        count = min(chunk_size, num_examples - first)
        rows = first + np.arange(padded)
        chunk = jax.tree.map(lambda x: x[np.where(rows < first + count, rows, first)], examples)
        yield first, count, chunk if mesh is None else sharding.shard_batch(chunk, mesh)


_flat_example_gradients = jax.jit(flat_example_gradients, static_argnums=0)
