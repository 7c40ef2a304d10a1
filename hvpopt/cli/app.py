"""The ``hvpopt`` command: one module per subcommand, each with ``add_parser`` and ``run``.

The commands parse, load, call the library and write files; the math is in the
library. A user's mistake is one line on stderr and exit status 2.
"""

import signal
import sys

import hvpopt
from hvpopt.cli import compilation, demo, flags, influence, spectrum, train

COMMANDS = {
    "demo": demo.run,
    "spectrum": spectrum.run,
    "train": train.run,
    "eval": train.run_eval,
    "influence": influence.run,
}


def build_parser() -> flags.OneLineErrorParser:
    """The parser of ``hvpopt`` and its subcommands."""
    parser = flags.OneLineErrorParser(
        prog="hvpopt",
        description="Second-order optimization in JAX: curvature products, solvers, "
        "optimizers and influence functions.",
    )
    parser.add_argument("--version", action="version", version=f"hvpopt {hvpopt.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (demo.add_parser, spectrum.add_parser, train.add_parser, train.add_eval_parser, influence.add_parser):
        add(commands)
    for command in commands.choices.values():
        command.add_argument(
            "--no-compilation-cache",
            action="store_true",
            help=f"compile without the persistent cache (also: {compilation.ENVIRONMENT}=off; default folder "
            "~/.cache/hvpopt/xla)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``hvpopt`` on ``argv`` and returns the exit status.

    A user's mistake is one line on stderr and status 2: a usage error (the
    flag named by argparse and the types of :mod:`hvpopt.cli.flags`), a
    ``ValueError`` or ``TypeError`` (the checks name the argument, flag, file
    or line), or an ``OSError`` (naming its file). Ctrl-C is 130. Any other
    exception is a bug and keeps its traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error already printed as one line
        return stop.code
    if args.command is None:
        parser.print_help()
        return 0
    compilation.use_cache(compilation.cache_folder(args.no_compilation_cache))
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError) as err:
        print(f"hvpopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a command without safe points of its own (train and influence have them)
        print(f"hvpopt {args.command}: interrupted.", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the program ends with the command: a late Ctrl-C must not break JAX's exit handlers
            signal.signal(signal.SIGINT, signal.SIG_IGN)
