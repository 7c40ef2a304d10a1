"""``--task FILE.py:FUNCTION``: a model of the user's own on the command line, and the contract's checks."""

import csv
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import test_docs
import user_tasks
from jax.flatten_util import ravel_pytree
from user_models import NAMES

import hvpopt
from hvpopt import cli, influence
from hvpopt.cli import user_task

TASKS = str(pathlib.Path(__file__).with_name("user_tasks.py"))
DAMPING = 1e-3  # the command line's default without an l2


@pytest.mark.parametrize("name", [name for name in NAMES if name != "nnx_scan"])  # one per style: NNX, Linen, ...
def test_ekfac_influence_of_every_user_model_through_the_api_and_the_command_line(name, tmp_path, capsys):
    spec = f"{TASKS}:{name}"
    own = user_task.load(spec)  # as the command line loads it (which then finds the programs compiled here)
    mesh = hvpopt.data_mesh()
    params = hvpopt.replicate(own.params, mesh)
    train, queries = (own.train.inputs, own.train.targets), (own.queries.inputs, own.queries.targets)
    fitted = influence.fit_inverse_curvature(None, params, train, method="ekfac", damping=DAMPING, curvature="ggn",
                                             model=own.model, mesh=mesh)  # fmt: skip
    scores = influence.pairwise_scores(own.loss_fn, params, train, queries, inverse=fitted, mesh=mesh)
    if name in BY_HAND:
        check_by_hand(scores, own, params, fitted, train, queries)
    out = tmp_path / "out"
    assert cli.main(["influence", "--task", spec, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(np.load(out / "scores.npy"), scores, rtol=1e-6, atol=1e-12)
    rows = list(csv.DictReader(open(out / "top_k.csv")))
    assert {row["train_text"] for row in rows} <= set(own.train.texts.tolist())
    assert {row["query_index"] for row in rows} == {"0", "1", "2"}  # every query given, not the first five


BY_HAND = ("nnx", "pure")  # the scores' plumbing is the same for every model; two compile the check


def check_by_hand(scores, own, params, fitted, train, queries):
    """``scores`` against ``(1/n) g_q^T (C + damping I)^-1 g_j`` of per-example gradients and the factors' operator."""
    gradients = jax.vmap(jax.grad(own.loss_fn), in_axes=(None, 0))
    flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])
    inverse = jax.vmap(hvpopt.kronecker_inverse(fitted.factors, damping=DAMPING))
    by_hand = jax.jit(lambda p: flat(inverse(gradients(p, queries))) @ flat(gradients(p, train)).T)
    expected = np.asarray(by_hand(params)) / user_tasks.NUM_TRAIN
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-12)


SMALL = """
import jax.numpy as jnp
import numpy as np
import hvpopt

x = np.random.default_rng(0).normal(size=(14, 3))
y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
model_fn = lambda p, x: x @ p["w"] + p["b"]
loss = hvpopt.losses.softmax_cross_entropy
params = {"w": jnp.full((3, 2), 0.1) * jnp.array([1.0, -1.0]), "b": jnp.zeros(2)}

def good():
    return {"params": params, "model": (model_fn, loss), "train": (x[:10], y[:10]), "queries": (x[10:], y[10:])}

def with_encode():
    encode = lambda text: (np.array([float(v) for v in text.split()]), np.int32(0))
    return {**good(), "encode": encode}

def unknown():
    return {**good(), "query": (x, y)}

def missing():
    return {"train": (x, y)}

def scaled():  # the loss written twice, and once wrong
    return {**good(), "loss_fn": lambda p, ex: 5.0 * loss(model_fn(p, ex[0][None]), ex[1][None])}

def nan_query():
    q = x[10:].copy()
    q[1, 2] = np.nan
    return {**good(), "queries": (q, y[10:])}

def raises():
    raise RuntimeError("no data today")
"""


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small_task.py"
    path.write_text(SMALL)
    return str(path)


def test_a_task_file_needs_no_pythonpath_and_a_module_is_found_from_the_current_folder(small, tmp_path, monkeypatch,
                                                                                        capsys):  # fmt: skip
    out = tmp_path / "file"
    args = ["--method", "exact", "--no-progress", "--json"]
    assert cli.main(["influence", "--task", f"{small}:with_encode", "--out", str(out), *args]) == 0
    assert json.loads(capsys.readouterr().out)["train_examples"] == 10
    assert np.load(out / "scores.npy").shape == (4, 10)  # the four queries given, all scored
    rows = list(csv.DictReader(open(out / "top_k.csv")))
    assert all(row["train_text"].startswith("[") for row in rows)  # arrays without texts: their first values
    monkeypatch.chdir(tmp_path)
    module = tmp_path / "module"
    assert cli.main(["influence", "--task", "small_task:good", "--out", str(module), "--num-queries", "2", *args]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(np.load(module / "scores.npy"), np.load(out / "scores.npy")[:2])
    typed = tmp_path / "typed"  # --query TEXT through the task's encode
    assert (
        cli.main(["influence", "--task", f"{small}:with_encode", "--query", "1 0 0", "--out", str(typed), *args]) == 0
    )
    capsys.readouterr()
    assert np.load(typed / "scores.npy").shape == (1, 10)


@pytest.mark.parametrize(
    "function, extra, message",
    [
        ("unknown", [], "returned unknown keys 'query'; the dict takes params, train, loss_fn"),
        ("missing", [], "returned no params, loss_fn or model"),
        ("scaled", [], "not the same loss: on example 0 loss_fn gives"),
        ("nan_query", [], "queries example 1 (id 'query-00001') has a NaN or infinite value in its inputs"),
        ("good", ["--query", "1 2 3"], "--query needs the task's 'encode'"),
        ("with_encode", ["--query", "1 nan 3"], "--query 1 (id 'queries-1') has a NaN or infinite value in its inputs"),
        ("raises", [], "raised RuntimeError: no data today ("),
        ("nowhere", [], "cannot be loaded: AttributeError"),
    ],
)
def test_a_task_that_breaks_the_contract_is_refused_in_one_line_naming_the_field(
    small, tmp_path, capsys, function, extra, message
):
    out = tmp_path / "out"
    assert cli.main(["influence", "--task", f"{small}:{function}", *extra, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing written, no .partial either


def test_spectrum_takes_the_same_task_and_finds_the_dense_gauss_newton_spectrum(small, tmp_path, capsys):
    out = tmp_path / "spectrum"
    args = ["spectrum", "--task", f"{small}:good", "--curvature", "ggn", "--batch-size", "10", "--k", "2"]
    assert cli.main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    report = json.load(open(out / "spectrum.json"))
    namespace = {}
    exec(SMALL, namespace)
    given = namespace["good"]()
    x, y = given["train"]
    flat, unravel = ravel_pytree(given["params"])
    ggn = jax.jacfwd(lambda v: ravel_pytree(hvpopt.ggn_vp(namespace["model_fn"], namespace["loss"], unravel(flat),
                                                             unravel(v), x, y))[0])(flat)  # fmt: skip
    np.testing.assert_allclose(report["top_eigenvalues"], np.linalg.eigvalsh(np.asarray(ggn))[::-1][:2], rtol=1e-5)
    assert os.path.exists(out / "density.png")
    assert cli.main(["spectrum", "--task", f"{small}:missing", "--out", str(tmp_path / "no")]) == 2
    assert "returned no params" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_the_example_of_the_tasks_page_runs_on_the_command_line(tmp_path, capsys):
    page = (pathlib.Path(__file__).parents[1] / "docs" / "tasks.rst").read_text()
    code = test_docs.python_blocks(page)[0][1]
    (tmp_path / "my_model.py").write_text(code)
    out = tmp_path / "why"
    spec = f"{tmp_path / 'my_model.py'}:problem"
    assert cli.main(["influence", "--task", spec, "--query", "abcdefh", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(open(out / "top_k.csv")))
    assert np.load(out / "scores.npy").shape == (1, 6) and rows[0]["query_text"] == "abcdefh"
    assert {row["train_text"] for row in rows} <= {"abcdefg", "bcdefgh", "cdefghi", "acegiac", "bdfhjbd", "jihgfed"}
