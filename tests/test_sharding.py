"""The mesh helpers and ``mesh=`` arguments on this process's one device; several devices: tests/multi_device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mlp, random_like
from jax.sharding import PartitionSpec

import hvpopt
from hvpopt import cli

pytestmark = pytest.mark.skipif(jax.device_count() != 1, reason="written for one device")


def test_a_mesh_of_one_device_changes_no_number():
    problem, mesh = make_mlp(), hvpopt.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == 1
    batch_matvec = lambda v, batch: hvpopt.ggn_vp(problem.model_fn, problem.loss, problem.params, v, *batch)
    v = random_like(jax.random.key(0), problem.params)
    data = (problem.inputs, problem.targets)
    on_mesh = hvpopt.average_over_chunks(batch_matvec, hvpopt.shard_batch(data, mesh), chunk_size=3, mesh=mesh)(v)
    plain = hvpopt.average_over_chunks(batch_matvec, data, chunk_size=3)(v)
    for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert hvpopt.shard_batch(data, mesh)[0].sharding.spec == PartitionSpec("data")
    split = hvpopt.shard_params(problem.params, mesh, min_size=1)
    assert all(leaf.sharding.spec != PartitionSpec() for leaf in jax.tree.leaves(split))  # 1 divides every dimension


def test_mesh_mistakes_name_the_argument_and_the_fix(capsys):
    with pytest.raises(ValueError, match="num_devices is 2 but only 1 .* pass at most 1"):
        hvpopt.data_mesh(2)
    with pytest.raises(ValueError, match="axis 'model' is not an axis of the mesh"):
        hvpopt.shard_batch(jnp.ones((4, 2)), hvpopt.data_mesh(), axis="model")
    assert cli.main(["train", "--out", "unused", "--devices", "2"]) == 2
    assert "--devices: 2 devices asked but this machine has 1" in capsys.readouterr().err
