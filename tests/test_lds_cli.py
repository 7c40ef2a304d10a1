"""``hvpopt influence validate --metric lds`` on a tiny logistic regression: files, resume, bad input."""

import json
import os

import numpy as np
import pytest

from hvpopt import cli, influence
from hvpopt.testbed import checkpoint, tasks, training

BLOBS = {"data_options": {"num_examples": 60}}  # 48 training examples, 27 parameters


def save(folder, task, params, options):
    config = {"task": task.config} if options is None else checkpoint.training_config(task, options, [{"step": 0}])
    checkpoint.save_checkpoint(str(folder), params, config)
    return str(folder)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Logistic regression trained by 10 full-batch SGD steps, the recipe recorded as 'hvpopt train' does."""
    task = tasks.make_task("blobs", **BLOBS)
    options = training.TrainOptions(steps=10, batch_size=None, optimizer="sgd", learning_rate=0.05, eval_every=10)
    return save(tmp_path_factory.mktemp("blobs"), task, training.train(task, options).params, options)


def test_lds_of_several_methods_resumes_after_an_interrupt(blobs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["influence", "validate", "--metric", "lds", "--checkpoint", blobs, "--out", str(out), "--no-progress"]
    args += ["--method", "exact", "--method", "cg", "--subsets", "4", "--seeds", "2", "--json"]
    original, calls = training.train, []

    def interrupted(*a, **k):  # Ctrl-C during the third retraining
        calls.append(k["options"] if "options" in k else a[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(training, "train", interrupted)
    assert cli.main(args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len(os.listdir(out / ".partial" / "retrained")) == 2
    assert [options.seed for options in calls] == [0, 1, 0]  # the batch order of training seeds 0 and 1
    assert cli.main(args) == 0 and len(calls) == 3 + 6  # the two finished models are not trained again
    printed = capsys.readouterr()
    assert "resuming" in printed.err and not (out / ".partial").exists()
    summary = json.loads(printed.out)
    report = json.load(open(out / "lds.json"))
    assert list(report["methods"]) == ["exact", "cg", "identity"]
    assert (report["subsets"], report["seeds"], report["subset_size"], report["queries"]) == (4, 2, 24, 5)
    assert report["recipe"]["train"]["optimizer"] == "sgd" and report["recipe"]["train"]["steps"] == 10
    subsets, losses = np.load(out / "lds_subsets.npy"), np.load(out / "lds_losses.npy")
    np.testing.assert_array_equal(subsets, influence.datamodel_subsets(48, 4, seed=0))
    assert losses.shape == (4, 5) and np.all(np.isfinite(losses))
    for result in report["methods"].values():
        assert len(result["per_query"]) == 5 and result["num_excluded"] == 0
        np.testing.assert_allclose(result["mean"], np.mean(result["per_query"]))
        np.testing.assert_allclose(result["standard_error"], np.std(result["per_query"], ddof=1) / np.sqrt(5))
    assert report["methods"]["exact"]["per_query"] == report["methods"]["cg"]["per_query"]
    assert [row["method"] for row in summary["lds"]] == ["exact", "cg", "identity"]
    assert summary["lds"][0]["mean"] == report["methods"]["exact"]["mean"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """Checkpoints of the initial parameters: one without training options, one whose batch is 32 examples."""
    task = tasks.make_task("blobs", **BLOBS)
    folder = tmp_path_factory.mktemp("untrained")
    options = training.TrainOptions(steps=1, batch_size=32, eval_every=1)
    return save(folder / "bare", task, task.params, None), save(folder / "batched", task, task.params, options)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--subsets", "1"], "--subsets must be at least 2 (a Spearman correlation across subsets needs two)"),
        (["--seeds", "0"], "argument --seeds: must be a positive integer"),
        (["--fraction", "0.01"], "--fraction must leave at least one of the 48 training examples in each subset"),
        (["--fraction", "1"], "--fraction must be a number in (0, 1)"),
        (["bare"], "records no training options: train it with 'hvpopt train'"),
        (["batched"], "--fraction 0.5 leaves 24 training examples per subset, fewer than the recipe's batch size 32"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(blobs, untrained, tmp_path, capsys, extra, message):
    folder = dict(zip(("bare", "batched"), untrained)).get(extra[0], blobs)
    extra = [] if extra[0] in ("bare", "batched") else extra
    out = tmp_path / "out"
    args = ["influence", "validate", "--metric", "lds", "--checkpoint", folder, *extra, "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_several_methods_only_for_lds(blobs, tmp_path, capsys):
    args = ["influence", "--checkpoint", blobs, "--method", "cg", "--method", "exact", "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "--method is given once, except by 'validate --metric lds'" in capsys.readouterr().err
