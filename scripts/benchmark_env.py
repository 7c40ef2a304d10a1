"""What every benchmark records beside its numbers: machine, versions, load, source."""

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax

import hvpopt
from hvpopt.testbed.files import atomic_path


def cpu_load() -> dict:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    try:
        return dict(zip(("1min", "5min", "15min"), os.getloadavg()))
    except OSError:
        return {}


def git_state() -> dict:
    """Commit and local modifications (tracked and untracked) of the hvpopt sources."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(hvpopt.__file__)))

    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "hvpopt").strip()
    digest = hashlib.sha1(git("diff", "HEAD", "--", "hvpopt").encode())
    for line in status.splitlines():
        if line.startswith("??"):
            path = os.path.join(root, line[3:].strip())
            for dirpath, _, files in os.walk(path) if os.path.isdir(path) else [("", None, [path])]:
                for f in sorted(files):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        digest.update(fh.read())
    return {
        "path": root,
        "commit": git("rev-parse", "HEAD").strip() or None,
        "modified_files": status.splitlines(),
        "diff_and_untracked_sha1": digest.hexdigest() if status else None,
    }


def environment(packages: tuple[str, ...]) -> dict:
    """Machine, devices, library versions and the measured hvpopt source, for a results JSON."""

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(),
        "hvpopt_source": git_state(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_model": cpu_model,
            "uname": platform.uname()._asdict(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity_count": affinity,
            "python": sys.version,
        },
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        "versions": {p: version(p) for p in packages},
    }


def write_results(path: str, report: dict) -> None:
    """Writes a results JSON atomically (a crash leaves the previous results whole)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "w") as file:
        json.dump(report, file, indent=2, default=str)
