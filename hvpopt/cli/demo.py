"""``hvpopt demo``: a tour of the curvature products on a built-in model."""

import json

from hvpopt.cli import flags
from hvpopt.testbed import demo


def add_parser(commands) -> None:
    """Adds ``demo`` to the subcommands."""
    tour = commands.add_parser(
        "demo",
        help="tour the curvature products on a built-in model",
        description="Times every curvature-vector product next to a gradient on a built-in "
        "model, checks that the HVP modes agree, and reports the curvature along the gradient.",
    )
    flags.add_problem_arguments(tour)
    tour.add_argument("--repeats", type=flags.positive_int, default=5, help="timed calls per product")
    tour.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    task, params = flags.load_problem(args)
    report = demo.curvature_tour(task, params, batch_size=args.batch_size, seed=args.seed, repeats=args.repeats)
    print(json.dumps(report, indent=2) if args.json else demo.format_report(report))
    return 0
