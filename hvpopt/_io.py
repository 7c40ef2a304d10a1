"""Writing files so that a failure leaves no partial output."""

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path``, renamed onto ``path`` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_atomically(path: str, write: Callable, mode: str = "wb") -> None:
    """``write(file)`` into a file opened with ``mode`` at a temporary path, then renamed onto ``path``."""
    with atomic_path(path) as temporary:
        with open(temporary, mode) as file:
            write(file)

