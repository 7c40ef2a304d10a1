"""The command line: version, help, demo, train, eval, and bad input."""

import json
import os
import subprocess
import sys

import jax
import pytest

import hvpopt
from hvpopt import cli
from hvpopt.cli import flags


def run(*args):
    return subprocess.run([sys.executable, "-m", "hvpopt.cli", *args], capture_output=True, text=True, timeout=600)


def test_version_and_help(capsys):
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hvpopt {hvpopt.__version__}"
    assert cli.main(["--help"]) == 0  # every command's --help: below


@pytest.mark.parametrize("command", sorted(cli.app.COMMANDS))
def test_every_command_has_help(capsys, command):
    assert cli.main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: hvpopt {command}")


def test_demo_reports_agreeing_modes(capsys):
    assert cli.main(["demo", "--task", "blobs", "--batch-size", "4", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 8 * 3 + 3  # logistic regression on 8 features, 3 classes
    for name, row in report["products"].items():
        assert row["seconds"] > 0
        if name.startswith("hvp["):
            assert row["relative_difference_to_fwd_rev"] < 1e-4  # float32
    assert report["curvature_along_gradient"]["gauss_newton"] >= 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--task", "resnet"], "invalid choice"),
        (["demo", "--batch-size", "0"], "must be a positive integer"),
        (["demo", "--repeats", "x"], "argument --repeats: must be a positive integer"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


TINY_TRAIN = [
    "--task",
    "modular",
    "--data",
    "modulus=7",
    "--model",
    "d_model=8",
    "--model",
    "num_heads=2",
    "--steps",
    "6",
    "--eval-every",
    "3",
    "--batch-size",
    "8",
    "--no-progress",
]


def test_train_writes_a_checkpoint_that_eval_reads(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "--out", out, *TINY_TRAIN, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    params_file = json.load(open(os.path.join(out, "config.json")))["params"]["file"]
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", params_file]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [3, 6] and summary["validation_loss"] == records[-1]["validation_loss"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["completed"] and config["task"]["data_options"]["modulus"] == 7 and config["train"]["steps"] == 6
    assert cli.main(["eval", "--checkpoint", out, "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["step"] == 6 and evaluation["loss"] == pytest.approx(summary["validation_loss"])
    task, params = flags.load_problem(cli.build_parser().parse_args(["demo", "--checkpoint", out]))
    assert task.config == config["task"] and jax.tree.structure(params) == jax.tree.structure(task.params)

    assert cli.main(["train", "--out", out, *TINY_TRAIN]) == 2  # would replace finished work
    assert "already holds a checkpoint; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["train", "--out", out, *TINY_TRAIN, "--overwrite", "--seed", "1"]) == 0


def test_train_with_a_second_order_optimizer_records_its_diagnostics(tmp_path, capsys):
    out = str(tmp_path / "newton")
    args = [
        "train",
        "--out",
        out,
        "--task",
        "blobs",
        "--optimizer",
        "newton_cg",
        "--batch-size",
        "full",
        "--damping",
        "0.01",
        "--cg-iterations",
        "10",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    config = json.load(open(os.path.join(out, "config.json")))["train"]
    assert (config["learning_rate"], config["damping"], config["cg_iterations"]) == (1.0, 0.01, 10)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[0]["train_loss"] > records[1]["train_loss"]
    assert 0 < records[0]["optimizer_num_hvps"] < records[1]["optimizer_num_hvps"] <= 4 * 10


@pytest.mark.parametrize(
    "optimizer, knobs, diagnostics",
    [
        (
            "kfac",
            "--damping 0.05 --inverse-every 3 --step-rule kl_clip --kl-clip 0.01 --curvature-batch-size 16".split(),
            ("optimizer_damping", "optimizer_num_inversions", "optimizer_kl_scale"),
        ),
        ("sophia_g", ["--gamma", "0.05", "--curvature-every", "2"], ("optimizer_win_rate", "optimizer_num_estimates")),
        ("sophia_h", ["--curvature-every", "2"], ("optimizer_win_rate", "optimizer_num_estimates")),
    ],
)
def test_train_with_kfac_or_sophia_records_their_diagnostics(tmp_path, capsys, optimizer, knobs, diagnostics):
    out = str(tmp_path / optimizer)
    args = ["train", "--out", out, "--task", "blobs", "--optimizer", optimizer, "--batch-size", "64", *knobs,
            "--learning-rate", "0.3" if optimizer == "kfac" else "0.03", "--steps", "6", "--eval-every", "3",
            "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[-1]["validation_loss"] < records[0]["validation_loss"]
    for name in diagnostics:
        assert name in records[-1], records[-1]
    if optimizer == "kfac":
        assert records[-1]["optimizer_num_inversions"] == 2 and records[-1]["optimizer_skipped_steps"] == 0
        config = json.load(open(os.path.join(out, "config.json")))["train"]
        assert config["step_rule"] == "kl_clip" and config["kl_clip"] == 0.01 and config["curvature_batch_size"] == 16
        assert 0 < records[-1]["optimizer_kl_scale"] <= 1
    else:
        assert records[-1]["optimizer_num_estimates"] == 3 and 0 <= records[-1]["optimizer_win_rate"] <= 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer", "kfac", "--gamma", "0.1"], "--gamma is for the optimizers sophia_g, sophia_h"),
        (["--optimizer", "sophia_g", "--inverse-every", "2"], "--inverse-every is for the optimizers kfac"),
        (["--optimizer", "adamw", "--step-rule", "kl_clip"], "--step-rule is for the optimizers kfac"),
        (["--optimizer", "kfac", "--kl-clip", "0.01"], "--kl-clip is for K-FAC's KL-clipped step"),
        (["--optimizer", "kfac", "--curvature-every", "0"], "argument --curvature-every: must be a positive"),
        (["--data", "modulos=7"], "no data option 'modulos'"),
        (["--model", "d_model"], "--model takes KEY=VALUE"),
        (["--batch-size", "500"], "--batch-size (500) exceeds the 25 training examples"),
        (["--flip-fraction", "1.5"], "argument --flip-fraction: must be a number in [0, 1)"),
        (["--learning-rate", "-1"], "argument --learning-rate: must be a finite number > 0"),
        (["--damping", "0.1"], "--damping is for the optimizers"),
        (["--cg-iterations", "3"], "--cg-iterations is for the optimizers"),
        (
            ["--optimizer", "kfac", "--batch-size", "8", "--curvature-batch-size", "9"],
            "--curvature-batch-size (9) exceeds the batch size (8)",
        ),
    ],
)
def test_train_refuses_bad_options_before_writing_anything(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY_TRAIN, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_eval_of_a_broken_checkpoint_exits_2_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{")
    result = run("eval", "--checkpoint", str(tmp_path))
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_ctrl_c_during_a_save_still_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    from hvpopt.testbed import checkpoint

    original, calls = checkpoint.save_checkpoint, []

    def interrupted_save(directory, params, config):
        calls.append(config["step"])
        if len(calls) == 2:  # cut short after the parameters, before the config
            (tmp_path / "run" / "params-cut-short.msgpack").write_bytes(b"half")
            raise KeyboardInterrupt
        original(directory, params, config)

    monkeypatch.setattr(checkpoint, "save_checkpoint", interrupted_save)
    out = str(tmp_path / "run")
    args = ["train", "--out", out, *TINY_TRAIN, "--steps", "9"]
    assert cli.main(args) == 130
    assert "interrupted after 6 steps" in capsys.readouterr().err
    loaded = checkpoint.load_checkpoint(out)
    assert calls == [3, 6, 6] and loaded.config["step"] == 6 and not loaded.config["completed"]


def test_the_compilation_cache_is_on_by_default_off_on_request_and_skipped_where_unwritable(
    tmp_path, monkeypatch, capsys
):
    from hvpopt.cli import compilation

    monkeypatch.delenv(compilation.ENVIRONMENT, raising=False)
    monkeypatch.setenv("HVPOPT_CACHE", str(tmp_path))
    assert compilation.cache_folder(False) == str(tmp_path / "xla") and compilation.cache_folder(True) is None
    monkeypatch.setenv(compilation.ENVIRONMENT, "off")
    assert compilation.cache_folder(False) is None
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    before = jax.config.jax_compilation_cache_dir
    assert compilation.use_cache(str(blocked / "xla")) is None  # a warning, not an error, and the cache unchanged
    err = capsys.readouterr().err
    assert "is not writable" in err and "compiling without it" in err and err.count("\n") == 1
    assert jax.config.jax_compilation_cache_dir == before
