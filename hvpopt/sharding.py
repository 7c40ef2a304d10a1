"""Data parallelism on a ``jax.sharding`` mesh: a batch's example axis split over devices.

hvpopt runs on several devices through JAX's own machinery, nothing home-made:

1. ``mesh = data_mesh()`` makes a one-axis mesh (axis ``"data"``) over the
   local devices (every process's devices on several hosts).
2. ``replicate(params, mesh)`` puts a copy of the parameters on every device;
   ``shard_batch(batch, mesh)`` splits each array's leading (example) axis
   into equal, contiguous shares, one per device.
3. Any jitted function of the two (:func:`hvpopt.hvp`, :func:`hvpopt.ggn_vp`,
   an optimizer's step, ...) then runs data-parallel: XLA's SPMD partitioner
   (Shardy since jax 0.7, GSPMD before) computes each device's share locally
   and sums a mean over the batch with an all-reduce. Solvers (CG, Lanczos, LiSSA) run unchanged on top.

Functions that cut a dataset into chunks themselves take ``mesh=``.
:func:`hvpopt.average_over_chunks` makes the collective explicit with
``jax.shard_map``: each device averages its own share chunk by chunk and one
``lax.psum`` adds the shares (the influence functions' curvature is built on
it); :func:`hvpopt.influence.pairwise_scores` also splits each chunk of
training examples and gathers only the scores. Results agree with one device
up to the order of floating-point sums.

Parameters too large to copy to every device can be split as well
(:func:`shard_params`, the ZeRO-3 / FSDP layout): XLA then gathers each one
where it is used, and the solvers' inner products become all-reduces.

On several hosts, call ``jax.distributed.initialize()`` first in every process,
let each process load only its own share of the data, and pass that share to
:func:`shard_batch`, which assembles the global array with
``jax.make_array_from_process_local_data``.

The meshes made here have ``AxisType.Auto`` axes, so a user's loss needs no
sharding annotations.

References:
  Xu et al., "GSPMD: general and scalable parallelization for ML computation
  graphs", 2021. Rajbhandari et al., "ZeRO: memory optimizations toward
  training trillion parameter models", SC 2020.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hvpopt import _checks
from hvpopt.types import PyTree

__all__ = ["DATA_AXIS", "axis_size", "data_mesh", "replicate", "shard_batch", "shard_params"]

#: The mesh axis a batch's examples are split over.
DATA_AXIS = "data"


def data_mesh(num_devices: int | None = None, *, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (all of them by default).

    Example:
      >>> import hvpopt
      >>> mesh = hvpopt.data_mesh()
      >>> mesh.axis_names
      ('data',)
    """
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    _checks.check_positive_int("num_devices", num_devices)
    if num_devices > len(devices):
        raise ValueError(
            f"num_devices is {num_devices} but only {len(devices)} "
            f"{jax.default_backend()} device(s) exist; pass at most {len(devices)}."
        )
    if jax.process_count() > 1 and num_devices != len(devices):
        raise ValueError(
            "num_devices must be every device when several processes run "
            f"(jax.process_count() = {jax.process_count()}); leave it None."
        )
    return jax.make_mesh((num_devices,), (axis_name,), (AxisType.Auto,), devices=devices[:num_devices])


def axis_size(mesh: Mesh, axis: str = DATA_AXIS) -> int:
    """The number of devices along ``axis`` of ``mesh``."""
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh; its axes are {tuple(mesh.axis_names)}.")
    return mesh.shape[axis]


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` with every array copied to every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: str = DATA_AXIS) -> PyTree:
    """``batch`` with each array's leading (example) axis split evenly over ``axis`` of ``mesh``.

    With one process the batch is the whole batch; with several, each process
    passes its own share (its local rows), and the result is the global array.

    Raises:
      ValueError: the number of examples is not a multiple of the devices.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> batch = hvpopt.shard_batch(jnp.ones((4, 3)), hvpopt.data_mesh(1))
      >>> batch.sharding.spec == jax.sharding.PartitionSpec("data")
      True
    """
    devices = axis_size(mesh, axis)
    local_devices = devices // jax.process_count()
    size = _checks.leading_size("batch", batch)
    if size % local_devices:
        raise ValueError(
            f"batch has {size} examples, which the {local_devices} devices of mesh axis {axis!r} "
            f"cannot share evenly; use a multiple of {local_devices} examples or fewer devices."
        )
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    if jax.process_count() > 1:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
    return jax.device_put(batch, sharding)


def shard_params(params: PyTree, mesh: Mesh, *, axis: str = DATA_AXIS, min_size: int = 2**16) -> PyTree:
    """``params`` with every array of at least ``min_size`` entries split over ``axis`` (FSDP).

    Each large array is split along its largest dimension that the devices
    divide evenly; smaller arrays, and those with no such dimension, are copied
    to every device. Jitted products gather a split array where they use it.
    """
    devices = axis_size(mesh, axis)
    _checks.check_positive_int("min_size", min_size)

    def place(leaf):
        shape = np.shape(leaf)
        splittable = [d for d in range(len(shape)) if shape[d] % devices == 0]
        spec = PartitionSpec()
        if np.size(leaf) >= min_size and splittable:
            dim = max(splittable, key=lambda d: shape[d])
            spec = PartitionSpec(*([None] * dim), axis)
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree.map(place, params)
