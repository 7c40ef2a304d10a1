"""The ``hvpopt`` command line. It parses, calls the library and writes; no math here."""

import argparse
import json
import math
import os
import sys

import jax

import hvpopt
from hvpopt import _io, demo, influence_command
from hvpopt._checks import device_count, positive_int
from hvpopt.tasks import DEFAULT_TASK, TASKS


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
    tour.add_argument("--repeats", type=positive_int, default=5, help="timed calls per product")
    tour.add_argument("--json", action="store_true", help="print the report as JSON")

    spectrum = commands.add_parser(
        "spectrum",
        help="top eigenvalues, trace and eigenvalue density of the Hessian or Gauss-Newton matrix",
        description="Lanczos for the largest and the smallest eigenvalues, Hutch++ for the "
        "trace and stochastic Lanczos quadrature for the density of the curvature of a "
        "built-in task or a checkpoint. Writes spectrum.json and density.png to --out.",
    )
    _add_problem_arguments(spectrum)
    spectrum.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian")
    spectrum.add_argument("--k", type=positive_int, default=5, help="largest eigenvalues to find")
    spectrum.add_argument("--lanczos-iters", type=positive_int, default=40)
    spectrum.add_argument("--density-iters", type=positive_int, default=40)
    spectrum.add_argument("--density-probes", type=positive_int, default=4)
    spectrum.add_argument("--trace-samples", type=positive_int, default=30)
    spectrum.add_argument("--out", default="spectrum-out", help="output folder (created)")
    spectrum.add_argument("--json", action="store_true", help="print the summary as JSON")

    train = commands.add_parser(
        "train",
        help="train a built-in task and write a checkpoint",
        description="Trains a built-in task (the transformer language model of the shipped "
        "corpus by default, about a minute on 2 CPU cores) and writes a checkpoint "
        "(params.msgpack, config.json) and metrics.jsonl to --out at every evaluation.",
    )
    defaults = hvpopt.training.TrainOptions()
    train.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder (created)")
    train.add_argument("--task", choices=TASKS, default=DEFAULT_TASK)
    train.add_argument("--steps", type=positive_int, default=defaults.steps)
    train.add_argument("--batch-size", type=_batch_size, default=defaults.batch_size,
                       help="examples per step, or 'full' for the whole training set")
    train.add_argument("--optimizer", choices=tuple(hvpopt.training.OPTIMIZERS), default=defaults.optimizer)
    train.add_argument("--learning-rate", type=float, default=None,
                       help="peak learning rate of adamw, adam and sgd (default 3e-3); for newton_cg and "
                       "hessian_free the first step the line search tries, for natural_gradient the step (default 1)")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW's weight decay")
    train.add_argument("--damping", type=float, default=None,
                       help="second-order optimizers: damping (hessian_free: the initial damping)")
    train.add_argument("--cg-iterations", type=positive_int, default=None,
                       help="second-order optimizers: most CG iterations per step")
    train.add_argument("--eval-every", type=positive_int, default=defaults.eval_every)
    train.add_argument("--seed", type=int, default=0, help="seed of the data, the initialization and the batch order")
    train.add_argument("--devices", type=device_count, default=None, metavar="N",
                       help="devices each batch is split over (default: all of this machine's)")
    train.add_argument("--flip-fraction", type=float, default=0.0,
                       help="fraction of training labels to flip (classification and reverse tasks)")
    train.add_argument("--l2", type=float, default=None, help="L2 penalty of the objective (default: the task's)")
    train.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                       help="a data option of the task, e.g. modulus=7 (repeatable)")
    train.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                       help="a model option, e.g. d_model=32 or positions=rotary (repeatable)")
    train.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")

    evaluation = commands.add_parser(
        "eval", help="validation loss and accuracy of a checkpoint",
        description="Reports the mean loss, accuracy (and perplexity for language models) of a "
        "checkpoint on its validation or training split.",
    )
    evaluation.add_argument("--checkpoint", required=True, metavar="DIR")
    evaluation.add_argument("--split", choices=("validation", "train"), default="validation")
    evaluation.add_argument("--json", action="store_true", help="print the metrics as JSON")
    influence_command.add_parser(commands)
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
    task, params = _load_problem(args)
    report = demo.curvature_tour(
        task, params, batch_size=args.batch_size, seed=args.seed, repeats=args.repeats
    )
    print(json.dumps(report, indent=2) if args.json else demo.format_report(report))
    return 0


def run_spectrum(args) -> int:
    from hvpopt import spectrum

    if not args.out:
        raise ValueError("--out must name a folder.")
    _check_out_folder(args.out)
    task, params = _load_problem(args)
    inputs, targets = hvpopt.tasks.first_batch(task, args.batch_size)
    size = int(sum(x.size for x in jax.tree.leaves(params)))
    _check_spectrum_sizes(args, size)

    @jax.jit
    def report(params, key):
        if args.curvature == "hessian":
            matvec = hvpopt.hessian_operator(task.batch_loss, params, inputs, targets)
        else:
            matvec = hvpopt.ggn_operator(task.model_fn, task.loss, params, inputs, targets)
        return spectrum.curvature_spectrum(
            matvec, params, key=key, k=args.k, num_iters=args.lanczos_iters,
            density_iters=args.density_iters, density_probes=args.density_probes,
            trace_samples=args.trace_samples,
        )

    result = report(params, jax.random.key(args.seed))
    summary = {
        "model": task.describe(),
        "curvature": args.curvature,
        "parameters": size,
        **spectrum.summarize(result),
        "hvpopt_version": hvpopt.__version__,
    }
    os.makedirs(args.out, exist_ok=True)
    title = f"{args.curvature} spectral density, {task.name}"
    png_path, json_path = (os.path.join(args.out, name) for name in ("density.png", "spectrum.json"))
    with _io.atomic_path(png_path) as png_temporary, _io.atomic_path(json_path) as json_temporary:
        spectrum.save_density_plot(result.density, png_temporary, title)
        with open(json_temporary, "w") as file:
            json.dump(summary, file, indent=2)
    print(json.dumps(summary, indent=2) if args.json else _format_spectrum(summary, args.out))
    return 0


def run_train(args) -> int:
    from hvpopt import checkpoint, tasks, training

    config_path = os.path.join(args.out, checkpoint.CONFIG_FILE)
    _check_out_folder(args.out)
    if os.path.exists(config_path) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already holds a checkpoint; pass --overwrite or choose another folder.")
    task = tasks.make_task(
        args.task, seed=args.seed, flip_fraction=args.flip_fraction, l2=args.l2,
        data_options=_key_values("--data", args.data), model_options=_key_values("--model", args.model),
    )
    options = training.TrainOptions(
        steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, damping=args.damping,
        cg_iterations=args.cg_iterations, eval_every=args.eval_every, seed=args.seed,
    )
    batch_size = tasks.check_batch_size(task, options.batch_size or task.train.num_examples)
    mesh = hvpopt.data_mesh(args.devices)
    if batch_size % mesh.size:
        given = f"--batch-size {batch_size}" if args.batch_size else f"--batch-size full ({batch_size} examples)"
        raise ValueError(f"{given} cannot be split evenly over {mesh.size} devices; pass a --batch-size that is "
                         f"a multiple of {mesh.size} or --devices {math.gcd(batch_size, mesh.size)}.")
    if os.path.exists(config_path):
        os.remove(config_path)  # --overwrite: the folder stops being a checkpoint until the first save

    def save(params, history, step=None, completed=False):
        config = checkpoint.training_config(task, options, history, step=step, completed=completed)
        checkpoint.save_checkpoint(args.out, params, config)
        _io.write_atomically(os.path.join(args.out, "metrics.jsonl"),
                             lambda file: file.writelines(json.dumps(record) + "\n" for record in history), "w")

    print(f"training {task.describe()} on {mesh.size} {jax.default_backend()} device(s)", file=sys.stderr)
    result = training.train(task, options, on_evaluation=save, progress=not args.no_progress, mesh=mesh)
    if result.interrupted:
        if result.steps_done:  # also repairs a save that the interrupt cut short
            save(result.params, result.history, step=result.steps_done)
        print(f"hvpopt train: interrupted after {result.steps_done} steps; "
              f"{'the checkpoint in ' + args.out + ' holds them' if result.steps_done else 'nothing was written'}.",
              file=sys.stderr)
        return 130
    save(result.params, result.history, completed=True)
    summary = {
        "out": args.out, "task": task.name, "parameters": int(sum(x.size for x in jax.tree.leaves(task.params))),
        "steps": result.steps_done, "devices": mesh.size, "steps_per_second": result.steps_per_second,
        "compile_seconds": result.compile_seconds, **result.history[-1],
    }
    print(json.dumps(summary, indent=2) if args.json else _format_metrics(summary))
    return 0


def run_eval(args) -> int:
    from hvpopt import checkpoint, training

    loaded = checkpoint.load_checkpoint(args.checkpoint)
    dataset = getattr(loaded.task, args.split)
    metrics = training.evaluate(loaded.task, loaded.params, dataset)
    summary = {"checkpoint": args.checkpoint, "task": loaded.task.name, "step": loaded.config.get("step"),
               "split": args.split, "examples": dataset.num_examples, **metrics}
    print(json.dumps(summary, indent=2) if args.json else _format_metrics(summary))
    return 0


def _format_metrics(summary: dict) -> str:
    width = max(map(len, summary)) + 2
    return "\n".join(f"{name:<{width}}{value:.4g}" if isinstance(value, float) else f"{name:<{width}}{value}"
                      for name, value in summary.items())


def _key_values(flag: str, items: list[str]) -> dict:
    """``["modulus=7", "alphabet=abc"]`` -> ``{"modulus": 7, "alphabet": "abc"}`` (values read as JSON if they parse)."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE; got {item!r}.")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def _check_out_folder(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} exists and is not a folder.")


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
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", choices=TASKS, default=DEFAULT_TASK,
                        help="a built-in task at its initial parameters (default: %(default)s)")
    source.add_argument("--checkpoint", metavar="DIR", help="a checkpoint written by 'hvpopt train'")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="the first N training examples form the batch")
    parser.add_argument("--seed", type=int, default=0)


def _load_problem(args):
    """``(task, params)`` of ``--checkpoint``, or of ``--task`` at its initial parameters."""
    if args.checkpoint:
        loaded = hvpopt.checkpoint.load_checkpoint(args.checkpoint)
        return loaded.task, loaded.params
    task = hvpopt.tasks.make_task(args.task, seed=args.seed)
    return task, task.params


def _batch_size(text: str) -> int | None:
    return None if text == "full" else positive_int(text)


COMMANDS = {"demo": run_demo, "spectrum": run_spectrum, "train": run_train, "eval": run_eval,
            "influence": influence_command.run}

if __name__ == "__main__":
    sys.exit(main())
