"""The spectrum report against dense eigenvalues, and the `hvpopt spectrum` command."""

import argparse
import json
import os

import jax
import numpy as np
import pytest
from conftest import make_mlp, problem_hessian

import hvpopt
from hvpopt import cli, spectrum
from hvpopt.cli import spectrum as spectrum_command


def test_report_matches_the_dense_spectrum():
    problem = make_mlp()
    hessian = problem_hessian(problem)
    eigenvalues = np.linalg.eigvalsh(hessian)
    size = len(eigenvalues)

    @jax.jit
    def report(params, key):
        matvec = hvpopt.hessian_operator(problem.objective, params)
        return spectrum.curvature_spectrum(
            matvec,
            params,
            key=key,
            k=3,
            num_iters=size,
            density_iters=size,
            density_probes=2,
            trace_samples=3 * size,
        )

    summary = spectrum.summarize(report(problem.params, jax.random.key(0)))
    assert summary["eigenvalues_converged"] and summary["top_converged"] == [True] * 3
    assert summary["eigenvalue_matvecs"] == 2 * size
    np.testing.assert_allclose(summary["top_eigenvalues"], eigenvalues[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(summary["smallest_eigenvalue"], eigenvalues[0], rtol=1e-8)
    # Hutch++ with 3P products: the sketch spans the whole space, so the trace is exact.
    np.testing.assert_allclose(summary["trace"], eigenvalues.sum(), rtol=1e-8, atol=1e-10)


def test_cli_at_its_defaults_writes_the_report_and_the_plot_and_says_converged(tmp_path, capsys):
    """The defaults adapt to a 27-parameter task (they once asked for 40 Lanczos steps there)."""
    out = tmp_path / "spectrum"
    assert cli.main(["spectrum", "--task", "blobs", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eigenvalues converged" in printed and "NOT" not in printed
    saved = json.loads((out / "spectrum.json").read_text())
    assert saved["eigenvalues_converged"] and saved["top_converged"] == [True] * 5
    assert saved["smallest_converged"] and len(saved["top_residual_norms"]) == 5
    assert sorted(saved["top_eigenvalues"], reverse=True) == saved["top_eigenvalues"]
    assert saved["top_eigenvalues"][-1] >= saved["smallest_eigenvalue"]
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["density.png", "spectrum.json"]


@pytest.mark.parametrize("lanczos_iters, fix", [(3, "raise --lanczos-iters"), (None, "raise --max-matvecs")])
def test_an_unconverged_spectrum_says_so_and_names_the_flag_to_raise(lanczos_iters, fix):
    summary = {
        "top_converged": [True, False, False],
        "smallest_converged": False,
        "eigenvalues_converged": False,
        "eigenvalue_matvecs": 6,
    }
    line = spectrum_command._format_convergence(summary, argparse.Namespace(lanczos_iters=lanczos_iters))
    assert line.startswith("eigenvalues NOT converged: 1 of 4 within --tol after 6 products") and fix in line


def test_a_failure_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    def broken_plot(*args):
        raise OSError("disk full")

    monkeypatch.setattr(spectrum_command, "save_density_plot", broken_plot)
    out = tmp_path / "spectrum"
    args = [
        "spectrum",
        "--task",
        "blobs",
        "--batch-size",
        "2",
        "--k",
        "1",
        "--lanczos-iters",
        "4",
        "--density-iters",
        "4",
        "--density-probes",
        "1",
        "--trace-samples",
        "4",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 2
    assert "disk full" in capsys.readouterr().err
    assert not out.exists()  # the folder it created is gone again


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("keep me")
    assert cli.main(["spectrum", "--task", "blobs", "--out", str(not_a_folder)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not_a_folder.read_text() == "keep me"


@pytest.mark.parametrize(
    "args",
    [
        ["spectrum", "--curvature", "fisher"],
        ["spectrum", "--k", "0"],
        ["spectrum", "--tol", "0"],
        ["spectrum", "--tol", "nan"],
        ["spectrum", "--max-matvecs", "0"],
    ],
)
def test_bad_arguments_exit_2(args):
    assert cli.main(args) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lanczos-iters", "9000"], "--lanczos-iters must be at most the 27 parameters"),
        (["--density-iters", "9000"], "--density-iters must be at most the 27 parameters"),
        (["--k", "12"], "--k must be at most --lanczos-iters (10)"),
        (["--k", "28"], "--k must be at most the 27 parameters"),
        (["--max-matvecs", "30"], "--lanczos-iters (a fixed number of steps) and --max-matvecs"),
        (["--trace-samples", "2"], "--trace-samples must be at least 4"),
        (["--out="], "--out must name a folder"),
    ],
)
def test_sizes_are_checked_against_the_flags(tmp_path, capsys, flags, message):
    out = tmp_path / "spectrum"
    base = ["spectrum", "--task", "blobs", "--lanczos-iters", "10", "--density-iters", "10"]
    assert cli.main([*base, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_budget_below_k_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "spectrum"
    assert cli.main(["spectrum", "--task", "blobs", "--k", "5", "--max-matvecs", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--max-matvecs must be at least --k (5); got 2" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
