"""Runs tests/multi_device in its own process on 8 simulated CPU devices.

XLA fixes the number of host devices when JAX starts, so the sharded tests
cannot share this process's single CPU device. On a machine that already has
4 or more devices, tests/multi_device is collected directly instead.
"""

import os
import subprocess
import sys

import jax
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(jax.device_count() >= 4, reason="tests/multi_device runs in this process")
def test_the_sharded_suite_passes_on_8_simulated_cpu_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        os.path.join(HERE, "multi_device"),
    ]
    run = subprocess.run(command, env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]  # 8 devices took effect
