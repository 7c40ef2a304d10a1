"""The ``hvpopt`` command line. It parses, calls the library and writes; no math here."""

import argparse
import json
import os
import sys

import jax

import hvpopt
from hvpopt import _io, demo
from hvpopt.models.builtin import BUILTIN_MODELS, builtin_problem


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
    _add_problem_arguments(tour)
    tour.add_argument("--repeats", type=_positive_int, default=5, help="timed calls per product")
    tour.add_argument("--json", action="store_true", help="print the report as JSON")

    spectrum = commands.add_parser(
        "spectrum",
        help="top eigenvalues, trace and eigenvalue density of the Hessian or Gauss-Newton matrix",
        description="Lanczos for the largest and the smallest eigenvalues, Hutch++ for the "
        "trace and stochastic Lanczos quadrature for the density of a built-in model's "
        "curvature. Writes spectrum.json and density.png to --out.",
    )
    _add_problem_arguments(spectrum)
    spectrum.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian")
    spectrum.add_argument("--k", type=_positive_int, default=5, help="largest eigenvalues to find")
    spectrum.add_argument("--lanczos-iters", type=_positive_int, default=40)
    spectrum.add_argument("--density-iters", type=_positive_int, default=40)
    spectrum.add_argument("--density-probes", type=_positive_int, default=4)
    spectrum.add_argument("--trace-samples", type=_positive_int, default=30)
    spectrum.add_argument("--out", default="spectrum-out", help="output folder (created)")
    spectrum.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError) as err:
        print(f"hvpopt {args.command}: error: {err}", file=sys.stderr)
        return 2


def run_demo(args) -> int:
    report = demo.curvature_tour(
        args.model, batch_size=args.batch_size, seed=args.seed, repeats=args.repeats
    )
    print(json.dumps(report, indent=2) if args.json else demo.format_report(report))
    return 0


def run_spectrum(args) -> int:
    from hvpopt import spectrum

    if not args.out:
        raise ValueError("--out must name a folder.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder.")
    problem = builtin_problem(args.model, batch_size=args.batch_size, seed=args.seed)
    size = int(sum(x.size for x in jax.tree.leaves(problem.params)))
    _check_spectrum_sizes(args, size)
    loss = hvpopt.losses.softmax_cross_entropy

    @jax.jit
    def report(params, key):
        if args.curvature == "hessian":
            objective = lambda p: loss(problem.model_fn(p, problem.inputs), problem.targets)
            matvec = hvpopt.hessian_operator(objective, params)
        else:
            matvec = hvpopt.ggn_operator(problem.model_fn, loss, params, problem.inputs, problem.targets)
        return spectrum.curvature_spectrum(
            matvec, params, key=key, k=args.k, num_iters=args.lanczos_iters,
            density_iters=args.density_iters, density_probes=args.density_probes,
            trace_samples=args.trace_samples,
        )

    result = report(problem.params, jax.random.key(args.seed))
    summary = {
        "model": problem.description,
        "curvature": args.curvature,
        "parameters": size,
        **spectrum.summarize(result),
        "hvpopt_version": hvpopt.__version__,
    }
    os.makedirs(args.out, exist_ok=True)
    title = f"{args.curvature} spectral density, {problem.description}"
    png_path, json_path = (os.path.join(args.out, name) for name in ("density.png", "spectrum.json"))
    with _io.atomic_path(png_path) as png_temporary, _io.atomic_path(json_path) as json_temporary:
        spectrum.save_density_plot(result.density, png_temporary, title)
        with open(json_temporary, "w") as file:
            json.dump(summary, file, indent=2)
    print(json.dumps(summary, indent=2) if args.json else _format_spectrum(summary, args.out))
    return 0


def _check_spectrum_sizes(args, size: int) -> None:
    """Names the flag at fault before any work (the library would name its own argument)."""
    if args.lanczos_iters > size:
        raise ValueError(f"--lanczos-iters must be at most the {size} parameters; got {args.lanczos_iters}.")
    if args.density_iters > size:
        raise ValueError(f"--density-iters must be at most the {size} parameters; got {args.density_iters}.")
    if args.k > args.lanczos_iters:
        raise ValueError(f"--k must be at most --lanczos-iters ({args.lanczos_iters}); got {args.k}.")
    if args.trace_samples < 4:
        raise ValueError(f"--trace-samples must be at least 4 for Hutch++; got {args.trace_samples}.")


def _format_spectrum(summary: dict, out: str) -> str:
    top = ", ".join(f"{value:.4g}" for value in summary["top_eigenvalues"])
    return "\n".join([
        f"model        {summary['model']}",
        f"curvature    {summary['curvature']}  ({summary['parameters']:,} parameters)",
        f"top eigenvalues     {top}",
        f"smallest eigenvalue {summary['smallest_eigenvalue']:.4g}",
        f"trace (Hutch++)     {summary['trace']:.4g} +- {summary['trace_std_error']:.2g}",
        f"products used       {summary['num_matvecs']}",
        f"wrote {os.path.join(out, 'spectrum.json')} and {os.path.join(out, 'density.png')}",
    ])


def _add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=BUILTIN_MODELS, default="transformer")
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


COMMANDS = {"demo": run_demo, "spectrum": run_spectrum}

if __name__ == "__main__":
    sys.exit(main())
