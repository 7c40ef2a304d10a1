"""Ctrl-C, SIGKILL and concurrent runs, through real processes: exit 130 with one line and the work kept,
checkpoints that always load, one run per folder, resume only onto the same inputs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from hvpopt import cli
from hvpopt.cli import chunk_store
from hvpopt.cli import influence as influence_command
from hvpopt.testbed import checkpoint, files, tasks

HVPOPT = [sys.executable, "-m", "hvpopt.cli"]
BLOBS_TRAIN = ["train", "--task", "blobs", "--batch-size", "8", "--no-progress"]


def start(*args):
    """The command in a child that takes Ctrl-C (a shell's background job would start it ignoring SIGINT)."""
    return subprocess.Popen(
        [*HVPOPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def wait_for_line(process, text, timeout=120):
    """Reads stderr until a line holding ``text``; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        if text in line or not line:
            return lines
    raise AssertionError(f"no {text!r} on stderr: {lines}")


def finish(process, lines):
    out, err = process.communicate(timeout=300)
    return process.returncode, "".join(lines) + err


KILL_AND_SAVE = textwrap.dedent("""
    import json, os, signal, sys, time
    import numpy as np
    from hvpopt import checkpoint  # no JAX backend starts here, so forking is safe

    spec = json.load(open(sys.argv[1]))
    versions = [dict(np.load(path)) for path in spec["arrays"]]
    for folder, delay in zip(spec["folders"], spec["delays"]):
        child = os.fork()
        if child == 0:  # overwrite the checkpoint with the two versions in turn, until killed
            for k in range(10**9):
                checkpoint.save_checkpoint(folder, versions[k % 2], {"task": spec["task"], "step": k % 2})
        time.sleep(delay)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
""")


def test_a_checkpoint_killed_while_being_overwritten_always_loads(tmp_path):
    task = tasks.make_task("blobs")
    versions = [jax.tree.map(lambda x: np.asarray(x) + k, task.params) for k in range(2)]
    arrays = []
    for k, params in enumerate(versions):
        arrays.append(str(tmp_path / f"v{k}.npz"))
        np.savez(arrays[-1], **checkpoint._flatten(params))
    delays = list(np.linspace(0.005, 0.05, 12))
    folders = [str(tmp_path / f"run{i}") for i in range(len(delays))]
    for folder in folders:
        checkpoint.save_checkpoint(folder, versions[0], {"task": task.config, "step": 0})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"arrays": arrays, "folders": folders, "delays": delays, "task": task.config}))
    subprocess.run([sys.executable, "-c", KILL_AND_SAVE, str(spec)], check=True, timeout=300)
    for folder in folders:
        loaded = checkpoint.load_checkpoint(folder)  # the old checkpoint or the new one, never a mix
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(versions[loaded.config["step"]])):
            np.testing.assert_array_equal(a, b)
        checkpoint.save_checkpoint(folder, versions[1], {"task": task.config, "step": 1})  # cleans up the kill
        assert sorted(os.listdir(folder)) == [
            "config.json",
            checkpoint.load_checkpoint(folder).config["params"]["file"],
        ]


def test_format_1_checkpoints_still_load(tmp_path):
    task = tasks.make_task("blobs")
    checkpoint.save_checkpoint(str(tmp_path), task.params, {"task": task.config})
    config = json.loads((tmp_path / "config.json").read_text())
    os.rename(tmp_path / config["params"]["file"], tmp_path / "params.msgpack")
    config.update(format_version=1, params={**config["params"], "file": "params.msgpack"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = checkpoint.load_checkpoint(str(tmp_path))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(task.params)))
    checkpoint.save_checkpoint(str(tmp_path), task.params, {"task": task.config})  # rewritten as format 2
    assert "params.msgpack" not in os.listdir(tmp_path) and checkpoint.load_checkpoint(str(tmp_path))


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds."""
    folder = tmp_path / "busy"
    folder.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import fcntl, os, time
        handle = os.open({str(folder / files.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(handle, fcntl.LOCK_EX)
        os.write(handle, str(os.getpid()).encode())
        print("locked", flush=True)
        time.sleep(120)"""),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    yield folder, holder.pid
    holder.kill()
    holder.wait()


@pytest.mark.parametrize(
    "command",
    [
        [*BLOBS_TRAIN, "--steps", "2", "--overwrite"],
        ["influence", "--task", "tests.test_interrupts:never_called"],
    ],
)
def test_a_second_run_on_a_busy_out_fails_at_once_with_one_line(held, capsys, command):
    folder, pid = held
    (folder / "config.json").write_text("{}")  # what the other run is writing is left alone
    assert cli.main([*command, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {str(folder)!r} is in use by another hvpopt run (process {pid})" in err
    assert sorted(os.listdir(folder)) == [".lock", "config.json"]


def test_waiting_for_a_busy_folder_takes_it_once_the_holder_is_gone(held):
    folder, pid = held
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()  # a holder killed: the kernel frees its lock
    with files.owned_folder(str(folder), "the default model's cache", wait=True):
        assert (folder / files.LOCK_FILE).read_text().strip() == str(os.getpid())
    assert os.listdir(folder) == []  # the lock file goes with the lock; the folder was not made here, so it stays


def never_called():
    raise AssertionError("the --out lock is taken before anything is loaded")


def test_ctrl_c_in_training_exits_130_with_the_last_completed_step(tmp_path):
    """Ctrl-C during the first compile (over an old checkpoint with --overwrite), and twice 20 ms apart later."""
    out = str(tmp_path / "run")
    assert cli.main([*BLOBS_TRAIN, "--steps", "3", "--eval-every", "3", "--out", out]) == 0
    old = checkpoint.load_checkpoint(out).params
    first = start(*BLOBS_TRAIN, "--steps", "100000", "--eval-every", "1000", "--out", out, "--overwrite")
    lines = wait_for_line(first, "training")
    first.send_signal(signal.SIGINT)  # while the first step compiles
    rc, err = finish(first, lines)
    assert rc == 130 and "Traceback" not in err, err
    steps = int(err.split("interrupted after ")[1].split()[0])
    loaded = checkpoint.load_checkpoint(out)
    if steps == 0:  # the old checkpoint is untouched, as the message says
        assert "nothing was written; the previous checkpoint in" in err
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(old)))
    else:
        assert loaded.config["step"] == steps and not loaded.config["completed"]

    second = start(*BLOBS_TRAIN, "--steps", "100000", "--eval-every", "1000", "--out", out, "--overwrite")
    lines = wait_for_line(second, "training")
    time.sleep(3.0)  # well into the steps
    second.send_signal(signal.SIGINT)
    time.sleep(0.02)
    second.send_signal(signal.SIGINT)
    rc, err = finish(second, lines)
    assert rc == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("hvpopt train: interrupted after ")
    steps = int(err.split("interrupted after ")[1].split()[0])
    loaded = checkpoint.load_checkpoint(out)
    assert steps > 1 and loaded.config["step"] == steps and not loaded.config["completed"]
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", loaded.config["params"]["file"]]


@pytest.fixture(scope="module")
def blobs_checkpoint(tmp_path_factory):
    task = tasks.make_task("blobs", data_options={"num_examples": 800})
    folder = str(tmp_path_factory.mktemp("blobs"))
    checkpoint.save_checkpoint(folder, task.params, {"task": task.config})
    return folder


def test_ctrl_c_in_influence_exits_130_and_the_rerun_resumes_to_the_same_scores(blobs_checkpoint, tmp_path, capsys):
    """Ctrl-C as soon as OUT/.partial appears, then during the chunks; the finished chunks resume."""
    args = ["influence", "--checkpoint", blobs_checkpoint, "--chunk-size", "4", "--num-queries", "2", "--no-progress"]
    out = tmp_path / "cut"
    for wait_for in ("fingerprint.json", "scores-000000040.npy"):
        process = start(*args, "--out", str(out))
        while not (out / ".partial" / wait_for).exists() and process.poll() is None:
            time.sleep(0.001)
        process.send_signal(signal.SIGINT)
        rc, err = finish(process, [])
        assert (
            rc == 130
            and "Traceback" not in err
            and err.strip().splitlines()[-1].startswith("hvpopt influence: interrupted; ")
        ), err
    kept = set(os.listdir(out / ".partial"))  # the default method, ekfac: its factors (its directions, a gradient
    assert {"factors.npz", "factors.json", "fingerprint.json"} <= kept and len(kept) > 13  # per query, are not kept)
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().err and "metadata.json" in os.listdir(out)
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(tmp_path / "whole" / "scores.npy"))


def test_a_failed_influence_run_leaves_nothing_it_created(blobs_checkpoint, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("a bug deep in the solve")

    monkeypatch.setattr(influence_command.influence, "query_directions", fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):  # not a user's mistake: a traceback, but nothing left behind
        cli.main(["influence", "--checkpoint", blobs_checkpoint, "--method", "cg", "--out", str(out), "--no-progress"])
    assert not out.exists()  # (with ekfac, the fitted factors would be finished work, kept to resume)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(
        influence_command.influence, "query_directions", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    args = ["influence", "--checkpoint", blobs_checkpoint, "--method", "cg", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 130
    assert "nothing had finished, so nothing is kept" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]  # a folder the user made stays, with what was there


def test_resume_refuses_other_training_texts_targets_or_params(tmp_path, monkeypatch, capsys):
    """The fingerprint is a digest of the arrays: changing any input starts over instead of mixing chunks."""
    task = tasks.make_task("blobs", data_options={"num_examples": 40, "num_features": 2})
    folder = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(folder, task.params, {"task": task.config})
    train = tmp_path / "train.jsonl"
    args = [
        "influence",
        "--checkpoint",
        folder,
        "--train",
        str(train),
        "--chunk-size",
        "2",
        "--num-queries",
        "1",
        "--no-progress",
    ]
    original, out = influence_command.influence.score_blocks, tmp_path / "out"

    def first_chunk_only(*a, **k):
        for first, block in original(*a, **k):
            yield first, block
            raise KeyboardInterrupt

    def interrupted_run(texts):
        train.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        monkeypatch.setattr(influence_command.influence, "score_blocks", first_chunk_only)
        assert cli.main([*args, "--out", str(out)]) == 130
        monkeypatch.setattr(influence_command.influence, "score_blocks", original)

    texts = ["x=[0.5, 1.0] -> 1", "x=[-1.0, 2.0] -> 0", "x=[2.0, 0.0] -> 2", "x=[0.0, 0.0] -> 1"]
    interrupted_run(texts)
    capsys.readouterr()
    interrupted_run([*texts[:2], "x=[2.0, 0.0] -> 1", texts[3]])  # one target changed, the ids the same
    assert "started with other inputs or settings; starting over" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().err  # onto its own first chunk
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(tmp_path / "whole" / "scores.npy"))


def test_the_fingerprint_digest_covers_every_array():
    task = tasks.make_task("blobs")
    digest = chunk_store.content_sha256
    assert digest(task.params) == digest(jax.tree.map(np.array, task.params))
    assert digest(task.params) != digest(jax.tree.map(lambda p: p.at[(0,) * p.ndim].add(1e-7), task.params))
    assert digest(task.train) != digest(task.train._replace(targets=task.train.targets[::-1]))
    assert digest(task.train) != digest(task.train._replace(inputs=task.train.inputs.astype(np.float16)))
    assert digest(task.train.take(range(3))) != digest(task.train.take(range(4)))
