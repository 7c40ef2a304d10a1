"""Per-example gradients, flattened, one chunk of examples in memory at a time."""

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hvpopt import _checks, sharding

PyTree = Any


def flat_example_gradients(loss_fn: Callable, params: PyTree, examples: PyTree) -> jax.Array:
    """``[n, P]``: row ``i`` is ``ravel(grad loss_fn(params, examples[i]))``.

    Columns follow ``jax.flatten_util.ravel_pytree(params)``. Vectorized by
    ``jax.vmap``: memory grows with ``n``, so callers cut a large set into
    chunks (:func:`gradient_chunks`).
    """
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, examples)
    leaves = jax.tree.leaves(grads)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def gradient_chunks(loss_fn: Callable, params: PyTree, examples: PyTree, *, chunk_size: int,
                    start: int = 0, mesh: Mesh | None = None) -> Iterator[tuple[int, jax.Array]]:
    """Yields ``(first_index, gradients [c, P])`` for consecutive chunks of ``examples``.

    Every chunk has ``chunk_size`` rows when computed (the last is padded with
    copies of the first example and cut back), so the gradient compiles once.
    With a ``mesh`` each chunk (padded to a multiple of the devices) is split
    over its ``"data"`` axis: every device computes the gradients of its rows,
    and the rows of the result stay where they were computed.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of one example.
      params: any pytree of floating arrays.
      examples: a pytree of arrays with a leading example axis.
      chunk_size: examples per chunk.
      start: the first example (a multiple of ``chunk_size`` when resuming).
      mesh: a :class:`jax.sharding.Mesh` to split each chunk over (None: one device).
    """
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    num_examples = _checks.leading_size("examples", examples)
    devices = 1
    if mesh is not None:
        devices, params = sharding.axis_size(mesh), sharding.replicate(params, mesh)
    padded = -(-chunk_size // devices) * devices
    for first in range(start, num_examples, chunk_size):
        count = min(chunk_size, num_examples - first)
        rows = first + np.arange(padded)
        chunk = jax.tree.map(lambda x: x[np.where(rows < first + count, rows, first)], examples)
        if mesh is not None:
            chunk = sharding.shard_batch(chunk, mesh)
        yield first, _flat_example_gradients(loss_fn, params, chunk)[:count]


_flat_example_gradients = jax.jit(flat_example_gradients, static_argnums=0)
