"""``hvpopt spectrum``: top eigenvalues, trace and eigenvalue density of a curvature matrix.

Draws the density with matplotlib (a dependency of hvpopt) and writes
``spectrum.json`` and ``density.png`` to ``--out`` together, or neither.
"""

import json
import os

import jax
import numpy as np

import hvpopt
from hvpopt import influence, spectrum
from hvpopt.cli import flags, user_task
from hvpopt.linalg import SpectralDensity
from hvpopt.testbed import files, tasks


def add_parser(commands) -> None:
    """Adds ``spectrum`` to the subcommands."""
    parser = commands.add_parser(
        "spectrum",
        help="top eigenvalues, trace and eigenvalue density of the Hessian or Gauss-Newton matrix",
        description="Lanczos for the largest and the smallest eigenvalues, Hutch++ for the "
        "trace and stochastic Lanczos quadrature for the density of the curvature of a "
        "built-in task, a checkpoint or a model of your own (--task FILE.py:FUNCTION). Writes spectrum.json and "
        "density.png to --out.",
    )
    flags.add_problem_arguments(parser, own_tasks=True)
    parser.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian")
    parser.add_argument("--k", type=flags.positive_int, default=5, help="largest eigenvalues to find")
    parser.add_argument(
        "--tol",
        type=flags.positive_float,
        default=None,
        help="relative residual (to the largest |eigenvalue|) the eigenvalues must reach "
        "(default 1e-6, or sqrt(eps) of the parameters' dtype if larger)",
    )
    parser.add_argument(
        "--max-matvecs",
        type=flags.positive_int,
        default=None,
        help="most products per eigenvalue run (default 20 x the Lanczos basis of max(2k + 1, 20) "
        "vectors, at most the parameters)",
    )
    parser.add_argument(
        "--lanczos-iters",
        type=flags.positive_int,
        default=None,
        help="exactly this many Lanczos steps per eigenvalue run instead of running to --tol",
    )
    parser.add_argument(
        "--density-iters",
        type=flags.positive_int,
        default=None,
        help="Lanczos steps per density probe (default 40, at most the parameters)",
    )
    parser.add_argument("--density-probes", type=flags.positive_int, default=4)
    parser.add_argument("--trace-samples", type=flags.positive_int, default=30)
    parser.add_argument("--out", default="spectrum-out", help="output folder (created)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    if not args.out:
        raise ValueError("--out must name a folder.")
    flags.check_out_folder(args.out)
    description, label, loss_fn, params, batch, model = _problem(args)
    size = int(sum(x.size for x in jax.tree.leaves(params)))
    _check_spectrum_sizes(args, size)
    if args.curvature == "ggn" and model is None:
        raise ValueError(f"--curvature ggn needs the model: --task {args.task!r} returned no 'model'.")

    @jax.jit
    def report(params, key):
        matvec = influence.curvature_operator(
            loss_fn, params, batch, curvature=args.curvature, model=model, chunk_size=args.batch_size
        )
        return spectrum.curvature_spectrum(
            matvec,
            params,
            key=key,
            k=args.k,
            tol=args.tol,
            max_matvecs=args.max_matvecs,
            num_iters=args.lanczos_iters,
            density_iters=args.density_iters,
            density_probes=args.density_probes,
            trace_samples=args.trace_samples,
        )

    result = report(params, jax.random.key(args.seed))
    summary = {
        "model": description,
        "curvature": args.curvature,
        "parameters": size,
        **spectrum.summarize(result),
        "hvpopt_version": hvpopt.__version__,
    }
    title = f"{args.curvature} spectral density, {label}"
    png_path, json_path = (os.path.join(args.out, name) for name in ("density.png", "spectrum.json"))
    with (
        files.owned_folder(args.out, "--out"),  # removed again if it is created here and the writes fail
        files.atomic_path(png_path) as png_temporary,
        files.atomic_path(json_path) as json_temporary,
    ):
        save_density_plot(result.density, png_temporary, title)
        with open(json_temporary, "w") as file:
            json.dump(summary, file, indent=2)
    print(json.dumps(summary, indent=2) if args.json else _format_spectrum(summary, args))
    return 0


def _problem(args) -> tuple:
    """``(description, label, loss_fn, params, batch, model)`` of ``--checkpoint``, a built-in task or your own."""
    if args.checkpoint or ":" not in args.task:
        task, params = flags.load_problem(args)
        batch = tasks.first_batch(task, args.batch_size)
        return task.describe(), task.name, task.example_loss, params, batch, (task.model_fn, task.loss)
    own = user_task.load(args.task)
    if args.batch_size > own.train.num_examples:
        raise ValueError(f"--batch-size must be at most the {own.train.num_examples} training examples of --task "
                         f"{args.task!r}; got {args.batch_size}.")  # fmt: skip
    batch = jax.tree.map(lambda x: x[: args.batch_size], (own.train.inputs, own.train.targets))
    return own.spec, os.path.basename(own.spec), own.loss_fn, own.params, batch, own.model


def _check_spectrum_sizes(args, size: int) -> None:
    """Names the flag at fault before any work (the library would name its own argument)."""
    if args.k > size:
        raise ValueError(f"--k must be at most the {size} parameters; got {args.k}.")
    if args.lanczos_iters is not None:
        if args.max_matvecs is not None:
            raise ValueError(
                "--lanczos-iters (a fixed number of steps) and --max-matvecs (a budget to reach --tol) "
                "exclude each other; pass one."
            )
        if args.lanczos_iters > size:
            raise ValueError(f"--lanczos-iters must be at most the {size} parameters; got {args.lanczos_iters}.")
        if args.k > args.lanczos_iters:
            raise ValueError(f"--k must be at most --lanczos-iters ({args.lanczos_iters}); got {args.k}.")
    if args.max_matvecs is not None and args.max_matvecs < args.k:
        raise ValueError(f"--max-matvecs must be at least --k ({args.k}); got {args.max_matvecs}.")
    if args.density_iters is not None and args.density_iters > size:
        raise ValueError(f"--density-iters must be at most the {size} parameters; got {args.density_iters}.")
    if args.trace_samples < 4:
        raise ValueError(f"--trace-samples must be at least 4 for Hutch++; got {args.trace_samples}.")


def _format_spectrum(summary: dict, args) -> str:
    top = ", ".join(f"{value:.4g}" for value in summary["top_eigenvalues"])
    out = args.out
    return "\n".join(
        [
            f"model        {summary['model']}",
            f"curvature    {summary['curvature']}  ({summary['parameters']:,} parameters)",
            f"top eigenvalues     {top}",
            f"smallest eigenvalue {summary['smallest_eigenvalue']:.4g}",
            _format_convergence(summary, args),
            f"trace (Hutch++)     {summary['trace']:.4g} +- {summary['trace_std_error']:.2g}",
            f"products used       {summary['num_matvecs']}",
            f"wrote {os.path.join(out, 'spectrum.json')} and {os.path.join(out, 'density.png')}",
        ]
    )


def _format_convergence(summary: dict, args) -> str:
    flags = [*summary["top_converged"], summary["smallest_converged"]]
    used = f"{summary['eigenvalue_matvecs']} products"
    if summary["eigenvalues_converged"]:
        return f"eigenvalues converged ({used}; residuals within --tol of the largest |eigenvalue|)"
    fix = (
        "raise --lanczos-iters or drop it to run to --tol"
        if args.lanczos_iters is not None
        else "raise --max-matvecs or --tol"
    )
    return f"eigenvalues NOT converged: {sum(flags)} of {len(flags)} within --tol after {used}; {fix}"


def save_density_plot(density: SpectralDensity, path: str, title: str) -> None:
    """Writes the density as a PNG (log scale, as PyHessian draws it) to ``path``."""
    import matplotlib  # here, not at the top: the other commands start 0.4 s sooner

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    grid, values = np.asarray(density.grid), np.asarray(density.density)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.semilogy(grid, np.maximum(values, 1e-12))
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density (log scale)")
    axes.set_ylim(bottom=max(1e-8, values.max() * 1e-8))
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=120)
    finally:
        plt.close(figure)
