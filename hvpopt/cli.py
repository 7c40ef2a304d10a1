"""The ``hvpopt`` command line. It parses, calls the library and prints; no math here."""

import argparse
import json
import sys

import hvpopt
from hvpopt import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvpopt",
        description="Second-order optimization in JAX: curvature products, solvers, "
        "optimizers and influence functions.",
    )
    parser.add_argument("--version", action="version", version=f"hvpopt {hvpopt.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    tour = commands.add_parser(
        "demo",
        help="tour the curvature products on a built-in model",
        description="Times every curvature-vector product next to a gradient on a built-in "
        "model, checks that the HVP modes agree, and reports the curvature along the gradient.",
    )
    tour.add_argument("--model", choices=demo.MODELS, default="transformer")
    tour.add_argument("--batch-size", type=_positive_int, default=16)
    tour.add_argument("--seed", type=int, default=0)
    tour.add_argument("--repeats", type=_positive_int, default=5, help="timed calls per product")
    tour.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        report = demo.curvature_tour(
            args.model, batch_size=args.batch_size, seed=args.seed, repeats=args.repeats
        )
    except (ValueError, TypeError) as err:
        print(f"hvpopt: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else demo.format_report(report))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
