"""The resumable work of ``hvpopt influence``: ``OUT/.partial``, its fingerprint and saved chunks.

Long work is cut into chunks, each saved atomically to ``OUT/.partial`` beside
a fingerprint of every input and setting (:func:`content_sha256` of the
arrays). A run started again with the same fingerprint picks up after the last
saved chunk; one with another starts afresh. Ctrl-C stops between chunks.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator

import jax
import numpy as np

from hvpopt.testbed import files, interrupts
from hvpopt.testbed.progress import Progress

PARTIAL = ".partial"
FINGERPRINT = "fingerprint.json"


@contextlib.contextmanager
def work_folder(out: str, settings: dict) -> Iterator[str]:
    """``OUT/.partial`` for the block: resumed if its fingerprint is ``settings``, else started afresh.

    Removed when the block ends, unless it fails (any exception, Ctrl-C) with
    finished work in it: that is kept for the same command to resume.
    """
    work = os.path.join(out, PARTIAL)
    fingerprint = os.path.join(work, FINGERPRINT)
    if read_json(fingerprint) == json.loads(json.dumps(settings)):
        print(f"resuming the unfinished run in {work}", file=sys.stderr)
        files.remove_temporaries(work)
    else:
        if os.path.exists(work):
            print(f"{work} was started with other inputs or settings; starting over", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        write_json(fingerprint, settings)
    try:
        yield work
    except BaseException:
        files.remove_temporaries(work)
        if set(os.listdir(work)) <= {FINGERPRINT}:  # nothing finished: leave nothing behind
            shutil.rmtree(work)
        raise
    shutil.rmtree(work)


def read_json(path: str):
    """The JSON value in ``path``; None if there is none or it does not parse."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def saved_chunks(blocks, work: str, prefix: str, total: int, chunk_size: int, progress: bool) -> np.ndarray:
    """Runs ``blocks(start)`` from the first chunk not yet in ``work``, saving each; returns them joined."""
    done = sorted(name for name in os.listdir(work) if name.startswith(prefix))
    start = len(done) * chunk_size
    bar = Progress(total, prefix, unit="examples") if progress else None
    if bar:
        bar.update(min(start, total))
    interrupts.check_interrupt()  # the safe points: before the first chunk and after each
    for first, block in blocks(start):
        files.write_atomically(
            os.path.join(work, f"{prefix}-{first:09d}.npy"), lambda file: np.save(file, np.asarray(block))
        )
        if bar:
            bar.update(np.shape(block)[-1])
        interrupts.check_interrupt()
    if bar:
        bar.close()
    names = sorted(name for name in os.listdir(work) if name.startswith(prefix))
    return np.concatenate([np.load(os.path.join(work, name), allow_pickle=False) for name in names], axis=-1)


def write_json(path: str, value) -> None:
    files.write_atomically(path, lambda file: json.dump(value, file, indent=2), "w")


def content_sha256(tree) -> str | None:
    """SHA-256 of a pytree's content: every leaf's path, dtype, shape and bytes (None for None).

    What resuming trusts: two inputs with the same digest hold the same
    arrays, so chunks of one are never mixed with chunks of the other.
    """
    if tree is None:
        return None
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(jax.device_get(leaf))
        if array.dtype == object:
            array = array.astype(str)
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype.str} {array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
