"""``hvpopt influence`` end to end on tiny checkpoints: files, agreement with the library, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hvpopt import cli, influence
from hvpopt.testbed import checkpoint, tasks, training

TINY_LM = {"data_options": {"context_length": 8}, "model_options": {"d_model": 8, "num_layers": 1, "num_heads": 2}}
FAST = [
    "--train-examples",
    "40",
    "--curvature-examples",
    "16",
    "--cg-iterations",
    "5",
    "--chunk-size",
    "16",
    "--no-progress",
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny language model after 100 steps (at initialisation, a single example's Hessian is
    so large that the proximal Bregman objective is not convex even at the trained point)."""
    task, folder = tasks.make_task("shakespeare", **TINY_LM), tmp_path_factory.mktemp("lm")
    options = training.TrainOptions(steps=100, batch_size=32, learning_rate=1e-2, eval_every=100)
    checkpoint.save_checkpoint(str(folder), training.train(task, options).params, {"task": task.config})
    return str(folder)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Logistic regression on blobs with 10% flipped labels, trained by Newton-CG."""
    task = tasks.make_task("blobs", flip_fraction=0.1, data_options={"num_examples": 200})
    options = training.TrainOptions(steps=20, batch_size=None, optimizer="newton_cg", eval_every=20)
    folder = tmp_path_factory.mktemp("blobs")
    checkpoint.save_checkpoint(str(folder), training.train(task, options).params, {"task": task.config})
    return str(folder)


def test_scores_files_and_numbers_match_the_library(lm, tmp_path, capsys):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"text": "ROMEO:\nI", "id": "romeo"}) + "\n\n")
    out = str(tmp_path / "out")
    args = ["influence", "--checkpoint", lm, "--query", "First Ci", "--queries", str(queries), "--out", out]
    args += ["--method", "cg", *FAST]
    assert cli.main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    # 5 CG iterations do not converge here, and the run says so on its own line, with what to change.
    assert summary["all_converged"] is False
    assert "warning: the CG solves did not converge" in captured.err and "--cg-iterations" in captured.err
    assert sorted(os.listdir(out)) == ["metadata.json", "scores.npy", "top_k.csv", "top_k.jsonl"]
    scores = np.load(os.path.join(out, "scores.npy"), allow_pickle=False)
    assert scores.shape == (2, 40) and summary["train_examples"] == 40

    loaded = checkpoint.load_checkpoint(lm)
    task = loaded.task
    train = task.train.take(range(40))
    query_set = tasks.examples_from_texts(task, ["First Ci", "ROMEO:\nI"])
    chosen = np.sort(np.random.default_rng(0).choice(40, 16, replace=False))
    curvature = task.train.take(chosen)
    expected = influence.pairwise_scores(
        task.example_loss,
        loaded.params,
        (train.inputs, train.targets),
        (query_set.inputs, query_set.targets),
        method="cg",
        damping=1e-3,
        curvature="ggn",
        model=(task.model_fn, task.loss),
        maxiter=5,
        chunk_size=16,
        curvature_data=(curvature.inputs, curvature.targets),
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-7)

    metadata = json.load(open(os.path.join(out, "metadata.json")))
    assert (
        metadata["query_ids"] == ["queries-1", "romeo"]
        and "positive: training example j helped" in metadata["sign_convention"]
    )
    assert metadata["diagnostics"]["max_iterations"] <= 5 and metadata["method"] == "cg"
    seconds = metadata["seconds"]  # compiling apart from working, and where the compiled programs are kept
    assert seconds["compile_seconds"] > 0 and seconds["work_seconds"] > 0
    assert seconds["compilation_cache"] == os.environ["HVPOPT_COMPILATION_CACHE"]
    rows = [json.loads(line) for line in open(os.path.join(out, "top_k.jsonl"))]
    best = [r for r in rows if r["query_id"] == "romeo" and r["kind"] == "proponent" and r["rank"] == 1][0]
    assert best["score"] == pytest.approx(scores[1].max()) and best["train_text"] == train.texts[best["train_index"]]
    assert cli.main(args) == 2 and "already holds finished results" in capsys.readouterr().err


def test_an_interrupted_run_resumes_to_the_same_scores(blobs, tmp_path, monkeypatch, capsys):
    """The fitted eigenpairs, the query directions and the finished chunks are kept and reused.

    (tests/test_interrupts.py sends a real SIGINT to a subprocess; here the interrupt is injected.)
    """
    args = ["influence", "--checkpoint", blobs, "--method", "arnoldi", "--rank", "4", *FAST]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    original, calls = influence.score_blocks, []

    def interrupted(*a, **k):
        for first, block in original(*a, **k):
            calls.append(first)
            if len(calls) == 2:
                raise KeyboardInterrupt
            yield first, block

    monkeypatch.setattr(influence, "score_blocks", interrupted)
    out = tmp_path / "cut"
    assert cli.main([*args, "--out", str(out)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    kept = sorted(os.listdir(out / ".partial"))
    assert kept == ["directions.npz", "eigenpairs.npz", "fingerprint.json", "fit.json", "scores-000000000.npy"]
    monkeypatch.setattr(influence, "score_blocks", original)
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().err and not (out / ".partial").exists()
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(tmp_path / "whole" / "scores.npy"))
    metadata = [json.load(open(folder / "metadata.json")) for folder in (out, tmp_path / "whole")]
    assert metadata[0]["diagnostics"]["top_eigenvalues"] == metadata[1]["diagnostics"]["top_eigenvalues"]


def test_validate_agrees_with_leave_one_out_retraining_and_self_finds_flipped_labels(blobs, tmp_path, capsys):
    common = ["--checkpoint", blobs, "--method", "exact", "--no-progress", "--json"]
    assert cli.main(["influence", "validate", *common, "--validate-examples", "8", "--out", str(tmp_path / "v")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pearson"] >= 0.95 and report["examples_removed"] == 8 and report["queries"] == 5
    pairs = json.load(open(tmp_path / "v" / "validation.json"))["pairs"]
    assert len(pairs) == 40 and np.corrcoef([p["predicted"] for p in pairs], [p["actual"] for p in pairs])[0, 1] >= 0.95
    assert cli.main(["influence", "self", *common, "--out", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out)["flipped_recall_at_10_percent"] >= 0.8
    top = [json.loads(line) for line in open(tmp_path / "s" / "top_k.jsonl")]
    assert len(top) == 10 and top[0]["score"] >= top[-1]["score"]


def test_validate_on_a_transformer_compares_with_the_proximal_bregman_response(lm, tmp_path, capsys):
    args = [
        "influence",
        "validate",
        "--checkpoint",
        lm,
        "--method",
        "cg",
        "--train-examples",
        "250",
        "--damping",
        "0.1",
        "--curvature-examples",
        "16",
        "--validate-examples",
        "4",
        "--num-queries",
        "3",
        "--cg-iterations",
        "10",
        "--chunk-size",
        "125",
        "--no-progress",
        "--json",
        "--out",
        str(tmp_path / "v"),
    ]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"] == "proximal Bregman response" and report["examples_removed"] == 4
    assert report["pearson"] >= 0.9 and report["pearson"] > report["identity_pearson"]


def test_a_user_task_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_task.py").write_text(
        "import jax.numpy as jnp\n"
        "def problem():\n"
        "    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]); y = jnp.array([1.0, 2.0, 3.0, 4.0])\n"
        "    loss = lambda w, ex: 0.5 * (ex[0] @ w - ex[1]) ** 2\n"
        "    return {'loss_fn': loss, 'params': jnp.linalg.lstsq(x, y)[0], 'train': (x, y),\n"
        "            'queries': (x[:1], y[:1])}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "influence",
                "--task",
                "my_task:problem",
                "--method",
                "exact",
                "--damping",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert np.load(out / "scores.npy").shape == (1, 4)
    assert json.load(open(out / "metadata.json"))["curvature"] == "hessian"


def test_ekfac_writes_its_factors_and_a_later_run_reuses_them(blobs, tmp_path, capsys):
    args = ["influence", "--checkpoint", blobs, "--method", "ekfac", "--num-queries", "2", "--query-rank", "1", *FAST]
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert cli.main([*args, "--out", first]) == 0
    assert {"factors.npz", "factors.json"} <= set(os.listdir(first))
    memory = json.load(open(os.path.join(first, "metadata.json")))["memory"]  # estimated before, measured after
    assert set(memory["stages_bytes"]) == {"fit", "query directions", "scoring"}
    assert memory["held_before_bytes"] < memory["estimated_peak_bytes"] and memory["measured_peak_bytes"] > 0
    capsys.readouterr()
    assert cli.main([*args, "--factors", first, "--out", second, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["factors_from"] == os.path.join(first, "factors.npz") and "fitting" not in captured.err
    assert "memory, estimated: query directions" in captured.err  # no fit stage: the factors are read
    scores = [np.load(os.path.join(out, "scores.npy")) for out in (first, second)]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-8)
    third = tmp_path / "third"  # factors of another fit: refused before any work
    assert cli.main([*args, "--seed", "1", "--factors", first, "--out", str(third)]) == 2
    err = capsys.readouterr().err
    assert "--factors" in err and "seed differs" in err and err.count("\n") == 1 and not third.exists()


def bad_file(tmp_path, text):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda lm, tmp: ["--checkpoint", str(tmp / "nowhere")], "does not exist"),
        (
            lambda lm, tmp: ["--checkpoint", lm, "--queries", bad_file(tmp, '{"text": "ab"}\n{"text": \n')],
            "q.jsonl line 2: not valid JSON",
        ),
        (
            lambda lm, tmp: ["--checkpoint", lm, "--queries", bad_file(tmp, '{"txt": "ab"}\n')],
            "line 1: expected an object",
        ),
        (lambda lm, tmp: ["--checkpoint", lm, "--query", "far too long for the context"], "--query 1 ('far too"),
        (lambda lm, tmp: ["--checkpoint", lm, "--damping", "-1"], "argument --damping: must be a finite number >= 0"),
        (lambda lm, tmp: ["--task", "no_such_module:f"], "cannot be loaded"),
        (lambda lm, tmp: ["--task", "collections:OrderedDict"], "returned no params, train, loss_fn or model"),
        (lambda lm, tmp: ["--checkpoint", lm, "--method", "ekfac", "--damping", "0"], "--damping must be > 0"),
        (lambda lm, tmp: ["--checkpoint", lm, "--method", "kfac", "--curvature", "hessian"], "use --curvature ggn"),
        (lambda lm, tmp: ["--checkpoint", lm, "--method", "ekfac", "--factors", str(tmp)], "holds no factors.npz"),
        (lambda lm, tmp: ["--checkpoint", lm, "--method", "cg", "--query-rank", "4"], "--query-rank keeps Kronecker"),
        (lambda lm, tmp: ["--checkpoint", lm, "--max-memory", "1MB"], "--max-memory 1 MB: this run would need about"),
        (lambda lm, tmp: ["--checkpoint", lm, "--max-memory", "4 bytes"], "expected a size such as 4GB"),
        (
            lambda lm, tmp: ["validate", "--checkpoint", lm, "--curvature", "hessian"],
            "Bregman response, which Gauss-Newton influence estimates: use --curvature ggn.",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(lm, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert cli.main(["influence", *extra(lm, tmp_path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_corrupted_checkpoint_is_named(lm, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in os.listdir(lm):
        (folder / name).write_bytes(open(os.path.join(lm, name), "rb").read()[:-3])
    assert cli.main(["influence", "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_usage_errors_print_no_traceback(tmp_path):
    for args, message in (
        (["--method", "newton"], "invalid choice: 'newton'"),
        (["--checkpoint", "a", "--task", "x:y"], "not allowed with argument"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "hvpopt.cli", "influence", *args, "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "o").exists()
