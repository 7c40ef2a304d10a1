"""Writing files so that a failure leaves no partial output, and one writer per folder.

A file is written under a temporary name (``.tmp-*``) beside it and renamed
into place (:func:`atomic_path`). A folder that several files make up is held
by one process at a time (:func:`owned_folder`, an ``fcntl.flock`` on
``FOLDER/.lock``); the holder removes the temporaries a killed writer left
there, and a folder the holder created and left empty is removed on exit.
"""

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator

from hvpopt.testbed import interrupts

TEMPORARY_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # real path -> nesting depth of the folders this process holds


class FolderInUse(ValueError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path``, renamed onto ``path`` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:  # a full disk says "[Errno 28] No space left on device" and no file
        if error.filename is None and error.errno is not None:
            error.filename = path  # then str(error) ends with the path
        raise
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_atomically(path: str, write: Callable, mode: str = "wb") -> None:
    """``write(file)`` into a file opened with ``mode`` at a temporary path, then renamed onto ``path``."""
    with atomic_path(path) as temporary:
        with open(temporary, mode) as file:
            write(file)


@contextlib.contextmanager
def owned_folder(path: str, name: str, *, wait: bool = False) -> Iterator[str]:
    """``path``, created if missing and locked against other processes for the block.

    Nested blocks on one folder in one process share the outer lock. On
    entry the ``.tmp-*`` files a killed writer left in ``path`` are removed;
    on exit the lock file is, and ``path`` itself if this block created it
    and it is empty.

    Args:
      path: the folder.
      name: what the user called it (``"--out"``), for the message.
      wait: wait for another process to release the folder (Ctrl-C still
        stops the wait) rather than fail.

    Raises:
      FolderInUse: (a ``ValueError``) another process holds it and ``wait`` is False.
    """
    key = os.path.realpath(path)
    if _held.get(key):
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    try:
        handle = _lock(path, name, wait)
    except BaseException:
        _remove_if_empty(path, created)
        raise
    _held[key] = 1
    try:
        remove_temporaries(path)
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, LOCK_FILE))  # while still locked: see _lock
        os.close(handle)
        _remove_if_empty(path, created)


def remove_temporaries(folder: str) -> None:
    """Removes the ``.tmp-*`` files left in ``folder`` by a writer that was killed (call while holding it)."""
    for entry in os.listdir(folder):
        if entry.startswith(TEMPORARY_PREFIX) and os.path.isfile(os.path.join(folder, entry)):
            os.remove(os.path.join(folder, entry))


def _lock(folder: str, name: str, wait: bool) -> int:
    """An open, exclusively flock-ed ``folder/.lock``.

    The holder deletes the lock file before it releases it, so a lock taken
    on a file that is no longer at the path is stale and is taken again.
    """
    path = os.path.join(folder, LOCK_FILE)
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode(errors="replace").strip()
            os.close(handle)
            if not wait:
                by = f" (process {holder})" if holder else ""
                raise FolderInUse(
                    f"{name} {folder!r} is in use by another hvpopt run{by}; wait for it to "
                    f"finish or choose another folder."
                ) from None
            interrupts.check_interrupt()
            time.sleep(0.1)
            continue
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(handle)):
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())
            return handle
        os.close(handle)


def _remove_if_empty(path: str, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):  # not empty (or already gone): it stays
            os.rmdir(path)
