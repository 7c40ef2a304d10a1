"""The command line: version, help, the demo, and bad input."""

import json
import subprocess
import sys

import pytest

import hvpopt
from hvpopt import cli


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "hvpopt.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_version_and_help():
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hvpopt {hvpopt.__version__}"
    help_text = run("--help")
    assert help_text.returncode == 0 and "demo" in help_text.stdout


def test_demo_reports_agreeing_modes(capsys):
    assert cli.main(["demo", "--model", "mlp", "--batch-size", "4", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 32 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    for name, row in report["products"].items():
        assert row["seconds"] > 0
        if name.startswith("hvp["):
            assert row["relative_difference_to_fwd_rev"] < 1e-4  # float32
    assert report["curvature_along_gradient"]["gauss_newton"] >= 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--model", "resnet"], "invalid choice"),
        (["demo", "--batch-size", "0"], "must be a positive integer"),
        (["demo", "--repeats", "x"], "invalid"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
