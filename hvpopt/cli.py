"""The ``hvpopt`` command line. It parses, calls the library and writes; no math here."""

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
from collections.abc import Iterator

import jax

import hvpopt
from hvpopt import _interrupts, _io, demo, influence_command
from hvpopt._checks import device_count, fraction, nonnegative_float, positive_float, positive_int, seed, strict_json
from hvpopt.tasks import DEFAULT_TASK, TASKS


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
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
    spectrum.add_argument("--tol", type=positive_float, default=None,
                          help="relative residual (to the largest |eigenvalue|) the eigenvalues must reach "
                          "(default 1e-6, or sqrt(eps) of the parameters' dtype if larger)")
    spectrum.add_argument("--max-matvecs", type=positive_int, default=None,
                          help="most products per eigenvalue run (default 20 x the Lanczos basis of max(2k + 1, 20) "
                          "vectors, at most the parameters)")
    spectrum.add_argument("--lanczos-iters", type=positive_int, default=None,
                          help="exactly this many Lanczos steps per eigenvalue run instead of running to --tol")
    spectrum.add_argument("--density-iters", type=positive_int, default=None,
                          help="Lanczos steps per density probe (default 40, at most the parameters)")
    spectrum.add_argument("--density-probes", type=positive_int, default=4)
    spectrum.add_argument("--trace-samples", type=positive_int, default=30)
    spectrum.add_argument("--out", default="spectrum-out", help="output folder (created)")
    spectrum.add_argument("--json", action="store_true", help="print the summary as JSON")

    train = commands.add_parser(
        "train",
        help="train a built-in task and write a checkpoint",
        description="Trains a built-in task (the transformer language model of the shipped "
        "corpus by default, about a minute on 2 CPU cores) and writes a checkpoint "
        "(params-<hash>.msgpack, config.json) and metrics.jsonl to --out at every evaluation.",
    )
    defaults = hvpopt.training.TrainOptions()
    train.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder (created)")
    train.add_argument("--task", choices=TASKS, default=DEFAULT_TASK)
    train.add_argument("--steps", type=positive_int, default=defaults.steps)
    train.add_argument("--batch-size", type=_batch_size, default=defaults.batch_size,
                       help="examples per step, or 'full' for the whole training set")
    train.add_argument("--optimizer", choices=tuple(hvpopt.training.OPTIMIZERS), default=defaults.optimizer)
    train.add_argument("--learning-rate", type=positive_float, default=None,
                       help="peak learning rate of adamw, adam and sgd (default 3e-3); for newton_cg and "
                       "hessian_free the first step the line search tries, for natural_gradient the step (default 1)")
    train.add_argument("--weight-decay", type=nonnegative_float, default=defaults.weight_decay,
                       help="AdamW's weight decay")
    train.add_argument("--damping", type=nonnegative_float, default=None,
                       help="second-order optimizers: damping (hessian_free: the initial damping)")
    train.add_argument("--cg-iterations", type=positive_int, default=None,
                       help="second-order optimizers: most CG iterations per step")
    train.add_argument("--eval-every", type=positive_int, default=defaults.eval_every)
    train.add_argument("--seed", type=seed, default=0, help="seed of the data, the initialization and the batch order")
    train.add_argument("--devices", type=device_count, default=None, metavar="N",
                       help="devices each batch is split over (default: all of this machine's)")
    train.add_argument("--flip-fraction", type=fraction, default=0.0,
                       help="fraction of training labels to flip (classification and reverse tasks)")
    train.add_argument("--l2", type=nonnegative_float, default=None,
                       help="L2 penalty of the objective (default: the task's)")
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


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the flag (the usage is ``--help``'s)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Runs ``hvpopt`` on ``argv`` and returns the exit status.

    A user's mistake is one line on stderr and status 2: a usage error (the
    flag named by argparse and the types of :mod:`hvpopt._checks`), a
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
            matvec, params, key=key, k=args.k, tol=args.tol, max_matvecs=args.max_matvecs,
            num_iters=args.lanczos_iters, density_iters=args.density_iters,
            density_probes=args.density_probes, trace_samples=args.trace_samples,
        )

    result = report(params, jax.random.key(args.seed))
    summary = {
        "model": task.describe(),
        "curvature": args.curvature,
        "parameters": size,
        **spectrum.summarize(result),
        "hvpopt_version": hvpopt.__version__,
    }
    title = f"{args.curvature} spectral density, {task.name}"
    png_path, json_path = (os.path.join(args.out, name) for name in ("density.png", "spectrum.json"))
    with (_io.owned_folder(args.out, "--out"),  # removed again if it is created here and the writes fail
          _io.atomic_path(png_path) as png_temporary, _io.atomic_path(json_path) as json_temporary):
        spectrum.save_density_plot(result.density, png_temporary, title)
        with open(json_temporary, "w") as file:
            json.dump(summary, file, indent=2)
    print(json.dumps(summary, indent=2) if args.json else _format_spectrum(summary, args))
    return 0


def run_train(args) -> int:
    """``--out`` is this run's alone (a second run on it fails at once) and Ctrl-C stops between steps."""
    _check_out_folder(args.out)
    with _interrupts.deferred_interrupts(), _io.owned_folder(args.out, "--out"):
        return _train_into_out(args)


def _train_into_out(args) -> int:
    from hvpopt import checkpoint, tasks, training

    config_path = os.path.join(args.out, checkpoint.CONFIG_FILE)
    if os.path.exists(config_path) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already holds a checkpoint; pass --overwrite or choose another folder.")
    with _named_as_flags(args):
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
    replacing = os.path.exists(config_path)  # --overwrite: the old checkpoint stays until the first save replaces it

    saved = []  # the steps of the checkpoints written

    def save(params, history, step=None, completed=False):
        config = checkpoint.training_config(task, options, history, step=step, completed=completed)
        checkpoint.save_checkpoint(args.out, params, config)
        _io.write_atomically(os.path.join(args.out, "metrics.jsonl"), lambda file: file.writelines(
            json.dumps(record, allow_nan=False) + "\n" for record in history), "w")
        saved.append(config["step"])

    print(f"training {task.describe()} on {mesh.size} {jax.default_backend()} device(s)", file=sys.stderr)
    try:
        result = training.train(task, options, on_evaluation=save, progress=not args.no_progress, mesh=mesh)
    except training.TrainingDiverged as error:
        verb, name = error.remedy.split()
        kept = (f"the checkpoint in {args.out} holds step {saved[-1]}" if saved else
                f"nothing was written{'; the previous checkpoint in ' + args.out + ' is unchanged' if replacing else ''}")
        raise ValueError(f"training diverged: the {error.quantity} is {error.value} at step {error.step}; {verb} "
                         f"--{name.replace('_', '-')}; {kept}.") from None
    if result.interrupted:
        if result.steps_done:  # also repairs a save that the interrupt cut short
            save(result.params, result.history, step=result.steps_done)
        kept = (f"the checkpoint in {args.out} holds them" if result.steps_done else
                f"nothing was written{'; the previous checkpoint in ' + args.out + ' is unchanged' if replacing else ''}")
        print(f"hvpopt train: interrupted after {result.steps_done} steps; {kept}.", file=sys.stderr)
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


@contextlib.contextmanager
def _named_as_flags(args: argparse.Namespace) -> Iterator[None]:
    """Says ``--batch-size`` where a check of the library says ``batch_size``.

    A check's message begins with the name of its argument and what is wrong
    with it (``"batch_size must be ..."``, :mod:`hvpopt._checks`); where that
    name is the destination of one of the command's flags, the user typed the
    flag, so the message names the flag instead.
    """
    try:
        yield
    except (ValueError, TypeError) as error:
        name = re.match(r"(\w+) (?:must|is|are|applies|\()", str(error))  # "batch_size must ...", "damping is for"
        if type(error) not in (ValueError, TypeError) or not name or name.group(1) not in vars(args):
            raise
        flag = "--" + name.group(1).replace("_", "-")
        raise type(error)(flag + str(error)[len(name.group(1)):]) from None


def _key_values(flag: str, items: list[str]) -> dict:
    """``["modulus=7", "alphabet=abc"]`` -> ``{"modulus": 7, "alphabet": "abc"}``.

    Values are read as JSON if they parse, else taken as strings; NaN,
    Infinity and JSON nested too deep are refused naming the flag. The task
    checks each value's type against the option's.
    """
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE; got {item!r}.")
        try:
            options[key] = strict_json(text, f"{flag} {key}")
        except json.JSONDecodeError:
            options[key] = text
    return options


def _check_out_folder(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} exists and is not a folder.")


def _check_spectrum_sizes(args, size: int) -> None:
    """Names the flag at fault before any work (the library would name its own argument)."""
    if args.k > size:
        raise ValueError(f"--k must be at most the {size} parameters; got {args.k}.")
    if args.lanczos_iters is not None:
        if args.max_matvecs is not None:
            raise ValueError("--lanczos-iters (a fixed number of steps) and --max-matvecs (a budget to reach --tol) "
                             "exclude each other; pass one.")
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
    return "\n".join([
        f"model        {summary['model']}",
        f"curvature    {summary['curvature']}  ({summary['parameters']:,} parameters)",
        f"top eigenvalues     {top}",
        f"smallest eigenvalue {summary['smallest_eigenvalue']:.4g}",
        _format_convergence(summary, args),
        f"trace (Hutch++)     {summary['trace']:.4g} +- {summary['trace_std_error']:.2g}",
        f"products used       {summary['num_matvecs']}",
        f"wrote {os.path.join(out, 'spectrum.json')} and {os.path.join(out, 'density.png')}",
    ])


def _format_convergence(summary: dict, args) -> str:
    flags = [*summary["top_converged"], summary["smallest_converged"]]
    used = f"{summary['eigenvalue_matvecs']} products"
    if summary["eigenvalues_converged"]:
        return f"eigenvalues converged ({used}; residuals within --tol of the largest |eigenvalue|)"
    fix = ("raise --lanczos-iters or drop it to run to --tol" if args.lanczos_iters is not None
           else "raise --max-matvecs or --tol")
    return f"eigenvalues NOT converged: {sum(flags)} of {len(flags)} within --tol after {used}; {fix}"


def _add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", choices=TASKS, default=DEFAULT_TASK,
                        help="a built-in task at its initial parameters (default: %(default)s)")
    source.add_argument("--checkpoint", metavar="DIR", help="a checkpoint written by 'hvpopt train'")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="the first N training examples form the batch")
    parser.add_argument("--seed", type=seed, default=0)


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
