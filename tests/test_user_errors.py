"""A new user's mistakes on the command line: exit status 2, one line naming the flag or the file, nothing written.

The classes of the adversarial sweep of issue 13: numbers that are not finite or out of range (every
numeric flag of every command, read off the parser itself), files and functions that break, messages
that must name the culprit, and checks that must run before any work.
"""

import argparse
import json
import os
import re
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvpopt import cli
from hvpopt.cli import flags
from hvpopt.testbed import checkpoint, tasks, training


def fails(capsys, argv, *names, out=None):
    """Runs the CLI in-process: exit 2, exactly one line on stderr holding every one of ``names``, no ``out``."""
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    if out is not None:
        assert not os.path.exists(out), os.listdir(out)
    return err


# ---------------------------------------------------------------- 1. numbers: every numeric flag

BAD_TEXT = {  # the argparse types of cli.flags, and text each must refuse
    flags.positive_int: ["0", "-3", str(2**31), str(10**30), "1.5", "inf", "nan", "x"],
    flags.seed: ["-1", str(2**32), str(10**23), "1e23", "nan", "x"],
    flags.nonnegative_float: ["-1", "-inf", "inf", "nan", "1e999", "x"],
    flags.positive_float: ["0", "-1", "inf", "nan", "1e999"],
    flags.fraction: ["1", "-0.1", "inf", "nan"],
    flags.finite_float: ["inf", "-inf", "nan", "1e999", "x"],
    flags.device_count: ["0", str(10**6)],
    flags.batch_size_or_full: ["0", "-1", "inf", "fulll"],
    flags.task_name: ["shakespear", "no/such"],
    flags.byte_size: ["0", "-1GB", "4XB", "nan", "inf", "1e9", "x"],
}


def typed_flags():
    """``(command, flag, type)`` of every flag of every command that converts its text."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (name, action.option_strings[-1], action.type)
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.type is not None
    ]


def test_every_numeric_flag_has_a_checked_type():
    flags = typed_flags()
    assert {command for command, _, _ in flags} >= {"demo", "spectrum", "train", "influence"}
    unchecked = [(command, flag, kind) for command, flag, kind in flags if kind not in BAD_TEXT]
    assert not unchecked, f"give these flags a type of hvpopt.cli.flags: {unchecked}"


@pytest.mark.parametrize(
    "command, flag, text",
    [(command, flag, text) for command, flag, kind in typed_flags() for text in BAD_TEXT.get(kind, [])],
)
def test_a_bad_number_is_refused_naming_its_flag(tmp_path, capsys, command, flag, text):
    out = tmp_path / "out"
    fails(
        capsys,
        [command, f"{flag}={text}", "--out", str(out)] if command != "demo" else [command, f"{flag}={text}"],
        f"argument {flag}: ",
        text,
        out=out,
    )


@pytest.mark.parametrize(
    "kind, text, value",
    [
        (flags.positive_int, "1", 1),
        (flags.positive_int, str(2**31 - 1), 2**31 - 1),
        (flags.seed, "0", 0),
        (flags.seed, str(2**32 - 1), 2**32 - 1),
        (flags.nonnegative_float, "0", 0.0),
        (flags.nonnegative_float, "1e300", 1e300),
        (flags.positive_float, "1e-300", 1e-300),
        (flags.fraction, "0", 0.0),
        (flags.fraction, "0.999", 0.999),
        (flags.byte_size, "1", 1),
        (flags.byte_size, "4GB", 4 * 2**30),
        (flags.byte_size, "1.5 MiB", 3 * 2**19),
    ],
)
def test_the_edges_of_each_range_are_taken(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize(
    "task, flag, item, named",
    [
        ("blobs", "--data", "separation=Infinity", "--data separation: Infinity is not a finite number"),
        ("blobs", "--data", "separation=NaN", "--data separation: NaN is not a finite number"),
        ("blobs", "--data", "separation=-1e999", "--data separation: -1e999 is not a finite number"),
        ("blobs", "--data", "separation=[" + "[" * 100_000, "--data separation: nested too deeply"),
        ("blobs", "--data", "separation=far", "data option 'separation' of task 'blobs' must be a finite number"),
        ("blobs", "--data", "num_examples=1.5", "data option 'num_examples' of task 'blobs' must be an integer"),
        ("blobs", "--data", "num_examples=true", "data option 'num_examples' of task 'blobs' must be an integer"),
        ("blobs", "--data", "bogus=1", "no data option 'bogus'; its data options are num_classes, num_examples"),
        ("blobs", "--data", "num_examples=1000000000000", "num_examples must be at most 1,000,000"),
        ("blobs", "--data", "num_features=1000000", "num_features must be at most 166,666"),
        ("modular", "--data", "modulus=100000", "modulus must be at most 1,000 (modulus**2 examples"),
        ("reverse", "--data", "length=10000000", "length must be at most 25,000"),
        ("dyck", "--data", "num_examples=10000000", "num_examples must be at most 1,000,000"),
        ("shakespeare", "--data", "context_length=1000000", "context_length must be at most"),
        (
            "blobs",
            "--model",
            "hidden_sizes=5",
            "model option 'hidden_sizes' of task 'blobs' must be a list of positive",
        ),
        (
            "blobs",
            "--model",
            "hidden_sizes=[0]",
            "model option 'hidden_sizes' of task 'blobs' must be a list of positive",
        ),
        ("blobs", "--model", "hidden_sizes=[1000000, 1000000]", "give about 1e+12 parameters; at most 1e+08 fit"),
        ("modular", "--model", "d_model=100000", "parameters; at most 1e+08 fit"),
        (
            "modular",
            "--model",
            "tie_embeddings=1",
            "model option 'tie_embeddings' of task 'modular' must be true or false",
        ),
        ("modular", "--model", "positions=7", "model option 'positions' of task 'modular' must be a string"),
    ],
)
def test_a_bad_task_option_is_refused_before_any_data_is_built(tmp_path, capsys, task, flag, item, named):
    out = tmp_path / "out"
    fails(capsys, ["train", "--task", task, flag, item, "--out", str(out), "--no-progress"], named, out=out)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"l2": float("inf")}, "l2 must be >= 0 and finite"),
        ({"l2": "0.1"}, "l2 must be >= 0 and finite"),
        ({"flip_fraction": float("nan")}, "flip_fraction must be a number in [0, 1)"),
        ({"seed": 2**32}, "seed must be an integer in [0, 2**32)"),
        ({"seed": 1.0}, "seed must be an integer in [0, 2**32)"),
        ({"data_options": {"separation": float("inf")}}, "data option 'separation' of task 'blobs' must be a finite"),
        ({"model_options": []}, "the model options of task 'blobs' must be a dict"),
    ],
)
def test_make_task_refuses_values_a_json_config_could_not_hold(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        tasks.make_task("blobs", **options)


def test_options_are_stored_as_their_type():
    task = tasks.make_task("blobs", seed=np.int64(3), data_options={"separation": 2, "num_examples": np.int32(40)})
    assert task.config["seed"] == 3 and type(task.config["seed"]) is int
    assert task.config["data_options"]["separation"] == 2.0 and type(task.config["data_options"]["separation"]) is float
    json.dumps(task.config, allow_nan=False)


# ---------------------------------------------------------------- 2. broken files and functions


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """An untrained logistic regression on blobs (27 parameters), saved as a checkpoint."""
    task, folder = tasks.make_task("blobs"), tmp_path_factory.mktemp("blobs")
    checkpoint.save_checkpoint(str(folder), task.params, {"task": task.config})
    return str(folder)


def copy_of(folder, tmp_path):
    copy = tmp_path / "checkpoint"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    return copy


def edited(change):
    def damage(config_path):
        config = json.loads(config_path.read_text())
        change(config)
        config_path.write_text(json.dumps(config))  # json writes NaN and Infinity tokens: the sweep's input

    return damage


def written(data):
    return lambda config_path: config_path.write_bytes(data)


def folder_instead(config_path):
    config_path.unlink()
    config_path.mkdir()


@pytest.mark.parametrize(
    "damage, named",
    [
        (edited(lambda c: c.update(params="x")), "config.json lacks the 'task' and 'params' objects"),
        (edited(lambda c: c.update(task=[1])), "config.json lacks the 'task' and 'params' objects"),
        (
            edited(lambda c: c["task"].update(data_options=[1])),
            "config.json: the task config does not build: the data options of task 'blobs' must be a dict",
        ),
        (edited(lambda c: c["task"].update(model_options=3)), "the model options of task 'blobs' must be a dict"),
        (edited(lambda c: c["task"].update(seed="x")), "config.json: the task config does not build: seed must be"),
        (edited(lambda c: c["task"].update(flip_fraction="a")), "flip_fraction must be a number in [0, 1)"),
        (edited(lambda c: c["task"].update(name=[1])), "config.json: the task config does not build: task must be"),
        (edited(lambda c: c["task"].update(l2=-float("inf"))), "config.json: -Infinity is not a finite number"),
        (
            edited(lambda c: c["task"]["data_options"].update(separation=float("nan"))),
            "config.json: NaN is not a finite",
        ),
        (edited(lambda c: c["task"]["data_options"].update(num_examples=10**12)), "num_examples must be at most"),
        (edited(lambda c: c["task"]["model_options"].update(hidden_sizes="wide")), "model option 'hidden_sizes'"),
        (written(b"[" * 200_000), "config.json: nested too deeply to read"),
        (written(b'{"task": "\xff"}'), "config.json is not valid JSON"),
        (folder_instead, "config.json' is a folder; a file is expected there"),
    ],
)
def test_a_broken_config_is_one_line_naming_the_file(blobs, tmp_path, capsys, damage, named):
    folder = copy_of(blobs, tmp_path)
    damage(folder / checkpoint.CONFIG_FILE)
    fails(capsys, ["eval", "--checkpoint", str(folder)], named)


def test_a_checkpoint_that_is_a_file_is_called_a_file(tmp_path, capsys):
    (tmp_path / "model.msgpack").write_bytes(b"")
    fails(capsys, ["eval", "--checkpoint", str(tmp_path / "model.msgpack")], "model.msgpack' is a file; a folder")


def test_non_finite_parameters_are_named_on_load_not_blamed_on_the_damping(tmp_path, capsys):
    task = tasks.make_task("blobs")
    nan = jax.tree.map(lambda p: p.at[0].set(jnp.nan), task.params)
    checkpoint.save_checkpoint(str(tmp_path / "nan"), nan, {"task": task.config})
    out = tmp_path / "out"
    err = fails(
        capsys,
        ["influence", "--checkpoint", str(tmp_path / "nan"), "--out", str(out), "--no-progress"],
        ".msgpack: params[",
        "holds NaN or infinite values",
        out=out,
    )
    assert "damping" not in err
    fails(capsys, ["eval", "--checkpoint", str(tmp_path / "nan")], "holds NaN or infinite values")


HEADER = (
    "import jax.numpy as jnp\n"
    "x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([1.0, 2.0, 3.0])\n"
    "loss = lambda w, ex: 0.5 * (ex[0] @ w - ex[1]) ** 2\n"
)


def returning(given):
    return HEADER + f"def problem():\n    return {given}\n"


@pytest.mark.parametrize(
    "source, named",
    [
        (
            HEADER + "def problem():\n    raise RuntimeError('no data here')\n",
            "raised RuntimeError: no data here ({path} line 5)",
        ),
        (
            HEADER + "1 / 0\ndef problem():\n    pass\n",
            "cannot be loaded: ZeroDivisionError: division by zero ({path} line 4)",
        ),
        ("def problem(:\n", "cannot be loaded: SyntaxError: invalid syntax ({path} line 1)"),
        ("problem = 3\n", "problem is not a function; got int"),
        (
            HEADER + "def other():\n    pass\n",
            "cannot be loaded: AttributeError: module '{module}' has no attribute 'problem'",
        ),
        (returning("[loss]"), "must return a dict with params, train, and loss_fn or model; got a list"),
        (returning("{'loss_fn': 3, 'params': jnp.zeros(2), 'train': (x, y)}"), "loss_fn must be a function"),
        (
            returning("{'loss_fn': loss, 'params': jnp.zeros(2), 'train': (x, y), 'model': (1, 2)}"),
            "model must be a pair (model_fn, output_loss)",
        ),
        (
            returning("{'loss_fn': loss, 'params': jnp.zeros(2), 'train': (x, y), 'l2': 'x'}"),
            ": l2 must be a finite number >= 0; got 'x'",
        ),
        (
            returning("{'loss_fn': loss, 'params': jnp.zeros(2), 'train': (x, y), 'l2': float('nan')}"),
            ": l2 must be a finite number >= 0; got nan",
        ),
        (
            returning("{'loss_fn': loss, 'params': jnp.zeros(2), 'train': (x, y), 'l2': -1}"),
            ": l2 must be a finite number >= 0; got -1",
        ),
        (
            returning("{'loss_fn': loss, 'params': jnp.zeros(2, jnp.bfloat16), 'train': (x, y)}"),
            ": params must be a float32 or float64 array; got bfloat16",
        ),
        (
            returning("{'loss_fn': loss, 'params': {'w': jnp.zeros(2, jnp.int32)}, 'train': (x, y)}"),
            ": params['w'] must be a float32 or float64 array; got int32",
        ),
        (returning("{'loss_fn': loss, 'params': {}, 'train': (x, y)}"), ": the parameters hold no arrays"),
        (
            returning("{'loss_fn': loss, 'params': jnp.array([1.0, jnp.inf]), 'train': (x, y)}"),
            ": params holds NaN or infinite values",
        ),
        (
            returning("{'loss_fn': loss, 'params': jnp.zeros(2), 'train': 'abc'}"),
            ": train must be (inputs, targets) or a dict with inputs and targets; got a str",
        ),
        (
            returning("{'loss_fn': loss, 'params': jnp.zeros(2), 'train': (x, y), 'queries': (x[:2], y)}"),
            ": queries must have the same leading (example) axis",
        ),
    ],
)
def test_a_broken_task_function_is_one_line_naming_it(tmp_path, monkeypatch, capsys, request, source, named):
    module = f"user_task_{request.node.callspec.indices['source']}"  # a module name per case: imports are cached
    path = tmp_path / f"{module}.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    fails(
        capsys,
        ["influence", "--task", f"{module}:problem", "--out", str(out), "--no-progress"],
        f"--task '{module}:problem'",
        named.format(path=path, module=module),
        out=out,
    )


# ---------------------------------------------------------------- 3. files named, with the line at fault


def jsonl(tmp_path, data, name="examples.jsonl"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


BLOB = "x=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] -> 1"


@pytest.mark.parametrize("flag", ["--queries", "--train"])
@pytest.mark.parametrize(
    "data, named",
    [
        ((json.dumps({"text": BLOB}) + "\n").encode() + b'{"text": "\xff"}\n', "examples.jsonl line 2: not UTF-8 text"),
        ("[" * 200_000 + "\n", "examples.jsonl line 1: nested too deeply to read"),
        ('{"text": "' + BLOB + '", "weight": NaN}\n', "examples.jsonl line 1: NaN is not a finite number"),
        (
            json.dumps({"text": BLOB, "id": "a"}) + "\n\n" + json.dumps({"text": BLOB, "id": "a"}) + "\n",
            "examples.jsonl line 3: id 'a' is already that of {flag} {path} line 1; ids must be unique",
        ),
    ],
)
def test_a_bad_jsonl_file_is_named_with_its_line(blobs, tmp_path, capsys, flag, data, named):
    path, out = jsonl(tmp_path, data), tmp_path / "out"
    fails(
        capsys,
        ["influence", "--checkpoint", blobs, flag, path, "--out", str(out), "--no-progress"],
        f"{flag} {path}",
        named.format(flag=flag, path=path),
        out=out,
    )


@pytest.mark.parametrize("flag", ["--queries", "--train"])
def test_a_folder_given_for_a_file_is_called_a_folder(blobs, tmp_path, capsys, flag):
    out = tmp_path / "out"
    fails(
        capsys,
        ["influence", "--checkpoint", blobs, flag, str(tmp_path), "--out", str(out), "--no-progress"],
        f"{flag} '{tmp_path}' is a folder; a file is expected there",
        out=out,
    )


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--damping", "0.1"], "error: --damping is for the optimizers"),
        (["--cg-iterations", "3"], "error: --cg-iterations is for the optimizers"),
        (["--batch-size", "5000"], "error: --batch-size (5000) exceeds the 480 training examples"),
        (["--task", "shakespeare", "--flip-fraction", "0.1"], "error: --flip-fraction applies to the classification"),
        (["--data", "num_examples=2"], "error: num_examples must be an integer of at least 4"),  # not a flag: as it is
    ],
)
def test_a_check_of_the_library_names_the_flag_the_user_typed(tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    fails(capsys, ["train", "--task", "blobs", *extra, "--out", str(out), "--no-progress"], named, out=out)


def test_validate_asks_only_for_what_is_missing(tmp_path, capsys):
    task, folder = tasks.make_task("blobs", model_options={"hidden_sizes": [4]}), str(tmp_path / "mlp")
    checkpoint.save_checkpoint(folder, task.params, {"task": task.config})
    out = tmp_path / "out"
    base = ["influence", "validate", "--checkpoint", folder, "--out", str(out), "--no-progress"]
    err = fails(capsys, [*base, "--curvature", "ggn", "--damping", "0"], "use --damping > 0.", out=out)
    assert "--curvature" not in err
    err = fails(capsys, [*base, "--curvature", "hessian"], "use --curvature ggn.", out=out)
    assert "--damping" not in err


def test_an_oserror_names_its_file(blobs, tmp_path, capsys):
    """A disk that fills up ([Errno 27] File too large, here by a file size limit) is reported with the file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    out = tmp_path / "out"
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        status = cli.main(
            ["train", "--task", "blobs", "--steps", "2", "--eval-every", "2", "--no-progress", "--out", str(out)]
        )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err.splitlines()[-1]
    assert status == 2 and "File too large" in err and str(out) in err, err


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_diverging_run_stops_with_one_line_and_writes_no_non_finite_checkpoint(tmp_path, capsys, optimizer):
    """A finite learning rate that is far too large: the run says so at the first evaluation that sees it."""
    out = tmp_path / "out"
    status = cli.main(
        [
            "train",
            "--task",
            "blobs",
            "--optimizer",
            optimizer,
            "--learning-rate",
            "1e30",
            "--steps",
            "40",
            "--eval-every",
            "10",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    started, error = capsys.readouterr().err.splitlines()  # what it trains, then the error
    assert status == 2 and started.startswith("training blobs"), error
    assert re.fullmatch(
        r"hvpopt train: error: training diverged: the train loss is (nan|inf) at step 10; lower "
        r"--learning-rate; nothing was written\.",
        error,
    ), error
    assert not out.exists()


def test_a_run_that_diverges_after_a_checkpoint_keeps_it_and_says_so(tmp_path, capsys, monkeypatch):
    """The evaluation at step 10 is finite, the one at step 20 is not: the checkpoint of step 10 stays."""
    real = training._record
    monkeypatch.setattr(
        training,
        "_record",
        lambda *args: {**real(*args), **({"validation_loss": float("nan")} if args[4] == 20 else {})},
    )
    out = tmp_path / "out"
    status = cli.main(
        ["train", "--task", "blobs", "--steps", "30", "--eval-every", "10", "--no-progress", "--out", str(out)]
    )
    err = capsys.readouterr().err.splitlines()[-1]
    assert status == 2 and "the validation loss is nan at step 20" in err and "holds step 10" in err, err
    loaded = checkpoint.load_checkpoint(str(out))
    assert loaded.config["step"] == 10 and not loaded.config["completed"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [10]


def test_a_single_step_trains(tmp_path, capsys):
    assert cli.main(["train", "--task", "blobs", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert checkpoint.load_checkpoint(str(tmp_path / "o")).config["step"] == 1


# ---------------------------------------------------------------- 4. defaults that fit, checks before work


def test_arnoldi_at_its_default_rank_fits_a_model_smaller_than_fifty_parameters(blobs, tmp_path, capsys):
    common = [
        "influence",
        "--checkpoint",
        blobs,
        "--train-examples",
        "40",
        "--curvature-examples",
        "40",
        "--num-queries",
        "2",
        "--chunk-size",
        "40",
        "--no-progress",
    ]
    assert cli.main([*common, "--method", "arnoldi", "--out", str(tmp_path / "arnoldi")]) == 0
    assert cli.main([*common, "--method", "exact", "--out", str(tmp_path / "exact")]) == 0
    capsys.readouterr()
    assert json.load(open(tmp_path / "arnoldi" / "metadata.json"))["rank"] == 27  # every eigenpair: exact
    arnoldi, exact = (np.load(tmp_path / name / "scores.npy") for name in ("arnoldi", "exact"))
    np.testing.assert_allclose(arnoldi, exact, rtol=1e-3, atol=1e-3 * np.abs(exact).max())


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--method", "arnoldi", "--rank", "28"], "--rank must be at most the model's 27 parameters; got 28"),
        (["--method", "arnoldi", "--rank", "1000"], "--rank must be at most the model's 27 parameters; got 1000"),
    ],
)
def test_a_size_the_model_cannot_hold_is_refused_before_any_work(blobs, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    fails(capsys, ["influence", "--checkpoint", blobs, *extra, "--out", str(out), "--no-progress"], named, out=out)


def test_exact_on_a_model_too_large_for_a_dense_matrix_is_refused_before_any_work(tmp_path, capsys):
    task, folder = tasks.make_task("blobs", model_options={"hidden_sizes": [1000]}), str(tmp_path / "wide")
    checkpoint.save_checkpoint(folder, task.params, {"task": task.config})
    out = tmp_path / "out"
    fails(
        capsys,
        ["influence", "--checkpoint", folder, "--method", "exact", "--out", str(out), "--no-progress"],
        "--method exact builds the 12003 x 12003 curvature matrix",
        "use --method cg or --method arnoldi",
        out=out,
    )
