"""The ``hvpopt`` command line: ``demo``, ``spectrum``, ``train``, ``eval`` and ``influence``.

It parses flags, loads a checkpoint or a task, calls the library and writes
files: no math lives here. :func:`main` runs it on a list of arguments; one
module per command (:mod:`~hvpopt.cli.train`, :mod:`~hvpopt.cli.influence`, ...),
the shared flags in :mod:`~hvpopt.cli.flags` and the resumable chunks of
``hvpopt influence`` in :mod:`~hvpopt.cli.chunk_store`.
"""

from hvpopt.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
