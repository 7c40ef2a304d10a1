"""``hvpopt train`` and ``hvpopt eval``: train a built-in task into a checkpoint, and evaluate one."""

import json
import math
import os
import sys

import jax

import hvpopt
from hvpopt.cli import flags
from hvpopt.testbed import checkpoint, files, interrupts, tasks, training


def add_parser(commands) -> None:
    """Adds ``train`` to the subcommands."""
    train = commands.add_parser(
        "train",
        help="train a built-in task and write a checkpoint",
        description="Trains a built-in task (the transformer language model of the shipped "
        "corpus by default, about a minute on 2 CPU cores) and writes a checkpoint "
        "(params-<hash>.msgpack, config.json) and metrics.jsonl to --out at every evaluation.",
    )
    defaults = training.TrainOptions()
    train.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder (created)")
    train.add_argument("--task", choices=tasks.TASKS, default=tasks.DEFAULT_TASK)
    train.add_argument("--steps", type=flags.positive_int, default=defaults.steps)
    train.add_argument(
        "--batch-size",
        type=flags.batch_size_or_full,
        default=defaults.batch_size,
        help="examples per step, or 'full' for the whole training set",
    )
    train.add_argument("--optimizer", choices=tuple(training.OPTIMIZERS), default=defaults.optimizer)
    train.add_argument(
        "--learning-rate",
        type=flags.positive_float,
        default=None,
        help="peak learning rate of adamw, adam, sgd, muon, sophia_g and sophia_h (default 3e-3) and of kfac "
        "(a multiplier of its step, default 1); for newton_cg and hessian_free the first step the line search "
        "tries, for natural_gradient the step (default 1)",
    )
    train.add_argument(
        "--weight-decay", type=flags.nonnegative_float, default=defaults.weight_decay, help="AdamW's weight decay"
    )
    train.add_argument(
        "--damping",
        type=flags.nonnegative_float,
        default=None,
        help="second-order optimizers and kfac: damping (hessian_free and kfac: the initial damping)",
    )
    train.add_argument(
        "--cg-iterations",
        type=flags.positive_int,
        default=None,
        help="second-order optimizers: most CG iterations per step",
    )
    train.add_argument(
        "--curvature-every",
        type=flags.positive_int,
        default=None,
        help="kfac: steps between refreshes of its factors (default 1); sophia_g, sophia_h: steps between "
        "curvature-diagonal estimates (default 10)",
    )
    train.add_argument(
        "--inverse-every",
        type=flags.positive_int,
        default=None,
        help="kfac: steps between eigendecompositions of its factors (default 10)",
    )
    train.add_argument(
        "--step-rule",
        choices=hvpopt.KFAC_STEP_RULES,
        default=None,
        help="kfac: its step length: the quadratic model's (default) or the KL-clipped learning rate",
    )
    train.add_argument(
        "--kl-clip",
        type=flags.positive_float,
        default=None,
        help="kfac --step-rule kl_clip: the KL trust region of each step (default 1e-3)",
    )
    train.add_argument(
        "--curvature-batch-size",
        type=flags.positive_int,
        default=None,
        help="kfac, sophia_g, hessian_free, hessian_free_kfac, natural_gradient: the first this many examples "
        "of each batch estimate the curvature (default: the whole batch)",
    )
    train.add_argument(
        "--gamma", type=flags.positive_float, default=None, help="sophia_g, sophia_h: Sophia's gamma (default 0.01)"
    )
    train.add_argument("--eval-every", type=flags.positive_int, default=defaults.eval_every)
    train.add_argument(
        "--seed", type=flags.seed, default=0, help="seed of the data, the initialization and the batch order"
    )
    train.add_argument(
        "--devices",
        type=flags.device_count,
        default=None,
        metavar="N",
        help="devices each batch is split over (default: all of this machine's)",
    )
    train.add_argument(
        "--flip-fraction",
        type=flags.fraction,
        default=0.0,
        help="fraction of training labels to flip (classification and reverse tasks)",
    )
    train.add_argument(
        "--l2", type=flags.nonnegative_float, default=None, help="L2 penalty of the objective (default: the task's)"
    )
    train.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a data option of the task, e.g. modulus=7 (repeatable)",
    )
    train.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option, e.g. d_model=32 or positions=rotary (repeatable)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_eval_parser(commands) -> None:
    """Adds ``eval`` to the subcommands."""
    evaluation = commands.add_parser(
        "eval",
        help="validation loss and accuracy of a checkpoint",
        description="Reports the mean loss, accuracy (and perplexity for language models) of a "
        "checkpoint on its validation or training split.",
    )
    evaluation.add_argument("--checkpoint", required=True, metavar="DIR")
    evaluation.add_argument("--split", choices=("validation", "train"), default="validation")
    evaluation.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args) -> int:
    """``--out`` is this run's alone (a second run on it fails at once) and Ctrl-C stops between steps."""
    flags.check_out_folder(args.out)
    with interrupts.deferred_interrupts(), files.owned_folder(args.out, "--out"):
        return _train_into_out(args)


def _train_into_out(args) -> int:
    config_path = os.path.join(args.out, checkpoint.CONFIG_FILE)
    if os.path.exists(config_path) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already holds a checkpoint; pass --overwrite or choose another folder.")
    with flags.named_as_flags(args):
        task = tasks.make_task(
            args.task,
            seed=args.seed,
            flip_fraction=args.flip_fraction,
            l2=args.l2,
            data_options=flags.key_values("--data", args.data),
            model_options=flags.key_values("--model", args.model),
        )
        options = training.TrainOptions(
            steps=args.steps,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            damping=args.damping,
            cg_iterations=args.cg_iterations,
            curvature_every=args.curvature_every,
            inverse_every=args.inverse_every,
            gamma=args.gamma,
            step_rule=args.step_rule,
            kl_clip=args.kl_clip,
            curvature_batch_size=args.curvature_batch_size,
            eval_every=args.eval_every,
            seed=args.seed,
        )
        batch_size = training.batch_size_of(task, options)
    mesh = hvpopt.data_mesh(args.devices)
    if batch_size % mesh.size:
        given = f"--batch-size {batch_size}" if args.batch_size else f"--batch-size full ({batch_size} examples)"
        raise ValueError(
            f"{given} cannot be split evenly over {mesh.size} devices; pass a --batch-size that is "
            f"a multiple of {mesh.size} or --devices {math.gcd(batch_size, mesh.size)}."
        )
    replacing = os.path.exists(config_path)  # --overwrite: the old checkpoint stays until the first save replaces it

    saved = []  # the steps of the checkpoints written

    def save(params, history, step=None, completed=False):
        config = checkpoint.training_config(task, options, history, step=step, completed=completed)
        checkpoint.save_checkpoint(args.out, params, config)
        files.write_atomically(
            os.path.join(args.out, "metrics.jsonl"),
            lambda file: file.writelines(json.dumps(record, allow_nan=False) + "\n" for record in history),
            "w",
        )
        saved.append(config["step"])

    nothing_written = "nothing was written" + (
        f"; the previous checkpoint in {args.out} is unchanged" if replacing else ""
    )
    print(f"training {task.describe()} on {mesh.size} {jax.default_backend()} device(s)", file=sys.stderr)
    try:
        result = training.train(task, options, on_evaluation=save, progress=not args.no_progress, mesh=mesh)
    except training.TrainingDiverged as error:
        verb, name = error.remedy.split()
        kept = f"the checkpoint in {args.out} holds step {saved[-1]}" if saved else nothing_written
        raise ValueError(
            f"training diverged: the {error.quantity} is {error.value} at step {error.step}; {verb} "
            f"--{name.replace('_', '-')}; {kept}."
        ) from None
    if result.interrupted:
        if result.steps_done:  # also repairs a save that the interrupt cut short
            save(result.params, result.history, step=result.steps_done)
        kept = f"the checkpoint in {args.out} holds them" if result.steps_done else nothing_written
        print(f"hvpopt train: interrupted after {result.steps_done} steps; {kept}.", file=sys.stderr)
        return 130
    save(result.params, result.history, completed=True)
    summary = {
        "out": args.out,
        "task": task.name,
        "parameters": int(sum(x.size for x in jax.tree.leaves(task.params))),
        "steps": result.steps_done,
        "devices": mesh.size,
        "steps_per_second": result.steps_per_second,
        "compile_seconds": result.compile_seconds,
        **result.history[-1],
    }
    print(json.dumps(summary, indent=2) if args.json else _format_metrics(summary))
    return 0


def run_eval(args) -> int:
    loaded = checkpoint.load_checkpoint(args.checkpoint)
    dataset = getattr(loaded.task, args.split)
    metrics = training.evaluate(loaded.task, loaded.params, dataset)
    summary = {
        "checkpoint": args.checkpoint,
        "task": loaded.task.name,
        "step": loaded.config.get("step"),
        "split": args.split,
        "examples": dataset.num_examples,
        **metrics,
    }
    print(json.dumps(summary, indent=2) if args.json else _format_metrics(summary))
    return 0


def _format_metrics(summary: dict) -> str:
    width = max(map(len, summary)) + 2
    return "\n".join(
        f"{name:<{width}}{value:.4g}" if isinstance(value, float) else f"{name:<{width}}{value}"
        for name, value in summary.items()
    )
