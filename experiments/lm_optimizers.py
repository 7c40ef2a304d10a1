"""Second-order training on transformer language models, as ``hvpopt train`` trains them, against AdamW and Muon.

Every optimizer is trained by :func:`hvpopt.testbed.training.train` (the loop
behind ``hvpopt train``) on the shipped Shakespeare characters, mini-batch 64,
with the same warm-up and cosine schedule (decayed to a tenth; the
second-order Newton-CG and Hessian-free take a constant first step and a line
search instead). Each optimizer's learning rate (and, where it has one, its
main knob) is swept over the grid of :func:`sweep`; the best settings of the
optimizers in :data:`SEEDED`, by final validation loss and by seconds to
AdamW's best loss, are rerun over two more seeds (data order and
initialisation). Divergences (a non-finite training or validation loss) are
counted, never plotted.

The target, set before the runs: at least one hvpopt optimizer reaches AdamW's
best final validation loss in <= 0.7x AdamW's steps and <= 1.0x its wall-clock
seconds, on both models. Written: ``results/lm_optimizers.json`` and one PNG
per model of validation loss against steps (and tokens) and seconds, the mean
over seeds with their range shaded.

The time half of the target uses the step costs measured by
:func:`paired_seconds_per_step`: AdamW and each setting that reaches its loss,
compiled in one process and timed in alternating blocks (``--time-only``
redoes just that).

Run: ``python experiments/lm_optimizers.py`` (about 3 hours on one CPU core;
``--models`` and ``--optimizers`` split the grid over processes, each with its
own ``--out-dir``; ``--quick`` is a smoke run of a few minutes, written to the
temporary folder).
"""

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

import hvpopt
from hvpopt.testbed import tasks, training

MODELS = {
    "default": {},  # the 110k-parameter model of `hvpopt train`
    "large": {"d_model": 128, "num_layers": 5},  # about 1M parameters
}
TARGET_STEPS, TARGET_SECONDS = 0.7, 1.0
BATCH_SIZE = 64  # as `hvpopt train`'s default
HVPOPT = ("kfac", "sophia_g", "sophia_h", "hessian_free", "hessian_free_kfac", "newton_cg")  # what the target is of


def sweep(quick: bool) -> dict:
    """``model -> {optimizer: [options]}``: the grid of each model."""
    lrs = lambda *values, **knobs: [{"learning_rate": v, **knobs} for v in values]
    dampings = lambda *values: [{"damping": v, "cg_iterations": 10} for v in values]
    cheap_kfac = {"curvature_every": 1, "curvature_batch_size": 8}  # statistics of 8 of the 64 examples, every step
    default = {
        "adamw": lrs(1e-3, 3e-3, 1e-2, 3e-2),
        "muon": lrs(3e-3, 1e-2, 3e-2, 1e-1),
        "sophia_g": [
            *lrs(3e-4, 1e-3, 3e-3, 1e-2),
            *lrs(3e-3, gamma=0.05),  # a larger gamma clips fewer coordinates
            *lrs(3e-3, 1e-2, gamma=0.2),
            *lrs(1e-2, gamma=1.0),
        ],
        "sophia_h": lrs(3e-4, 1e-3, 3e-3, 1e-2),
        "kfac": [
            *lrs(0.5, 1.0, 2.0, 3.0, **cheap_kfac),
            {"learning_rate": 1.0, "curvature_every": 1, "curvature_batch_size": 16},
            {"learning_rate": 1.0, "curvature_every": 1},
            {"learning_rate": 1.0, "curvature_every": 10},
        ],
        "hessian_free": dampings(0.3, 1.0, 3.0, 10.0),
        "hessian_free_kfac": dampings(0.3, 1.0, 3.0, 10.0),
        "newton_cg": dampings(0.3, 1.0, 3.0, 10.0),
    }
    large = {
        "adamw": lrs(1e-3, 2e-3, 3e-3, 5e-3),
        "muon": lrs(3e-3, 1e-2, 3e-2, 1e-1),
        "sophia_g": lrs(3e-4, 1e-3, 3e-3, 1e-2),
        "sophia_h": lrs(3e-4, 1e-3, 3e-3, 1e-2),
        "kfac": [*lrs(0.5, 1.0, 2.0, 3.0, **cheap_kfac), {"learning_rate": 1.0, "curvature_every": 10}],
        "hessian_free": dampings(0.3, 1.0, 3.0, 10.0),
        "hessian_free_kfac": dampings(0.3, 1.0, 3.0, 10.0),
        "newton_cg": dampings(0.3, 1.0, 3.0, 10.0),
    }
    if quick:
        default = {name: grid[:1] for name, grid in default.items()}
        large = {}
    return {"default": default, "large": large}


#: Rerun at their best and fastest settings (:func:`reseeded`) over two more seeds, per model.
SEEDED = {"default": ("adamw", "kfac", "sophia_g"), "large": ("adamw", "kfac")}


def run_one(model: str, optimizer: str, knobs: dict, *, steps: int, seed: int) -> dict:
    task = tasks.make_task("shakespeare", seed=seed, model_options=MODELS[model])
    is_second_order = optimizer in training.SECOND_ORDER
    second_order_steps = max(steps // 10, 10)  # a Hessian-free step costs tens of gradients
    options = training.TrainOptions(
        steps=second_order_steps if is_second_order else steps,
        batch_size=BATCH_SIZE,
        optimizer=optimizer,
        eval_every=max((second_order_steps if is_second_order else steps) // 10, 1),
        seed=seed,
        **knobs,
    )
    start = time.perf_counter()
    record = {"model": model, "optimizer": optimizer, "knobs": knobs, "seed": seed, "steps": options.steps,
              "parameters": int(sum(np.size(x) for x in jax.tree.leaves(task.params)))}  # fmt: skip
    try:
        result = training.train(task, options)
    except training.TrainingDiverged as error:
        return {**record, "diverged": True, "diverged_at": error.step, "total_seconds": time.perf_counter() - start}
    history = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in result.history]
    return {
        **record,
        "diverged": False,
        "history": history,
        "final_validation_loss": history[-1]["validation_loss"],
        "compile_seconds": result.compile_seconds,
        "seconds_per_step": 1.0 / result.steps_per_second if result.steps_per_second else math.nan,
        "total_seconds": time.perf_counter() - start,
    }


def paired_seconds_per_step(
    model: str, settings: list[tuple[str, dict]], *, blocks: int = 7, steps: int = 10, warmup: int = 2
) -> list:
    """Each ``(optimizer, knobs)``'s median seconds per step, timed in one process: compiled first, then
    ``blocks`` rounds of each in turn on one batch, ``warmup`` untimed steps (the caches the previous
    optimizer left cold) and ``steps`` timed ones (a multiple of the refresh intervals, so every block
    holds the same refreshes and inversions). Separate processes at different times differ by 10-30%
    on a shared machine; alternating blocks cancel that drift."""
    task = tasks.make_task("shakespeare", model_options=MODELS[model])
    first = task.train.take(np.arange(BATCH_SIZE))
    batch = (first.inputs, first.targets)
    compiled = []
    for optimizer, knobs in settings:
        options = training.TrainOptions(steps=1000, batch_size=BATCH_SIZE, optimizer=optimizer, **knobs)
        tx = training.make_optimizer(task, options)
        step = training.make_step(task, tx, options.curvature_batch_size)
        carry = jax.block_until_ready(step(task.params, tx.init(task.params), *batch)[:2])  # compiles
        compiled.append([step, carry, []])
    for _ in range(blocks):
        for entry in compiled:
            step, (params, opt_state), times = entry
            for _ in range(warmup):
                params, opt_state, _ = step(params, opt_state, *batch)
            jax.block_until_ready((params, opt_state))
            start = time.perf_counter()
            for _ in range(steps):
                params, opt_state, _ = step(params, opt_state, *batch)
            jax.block_until_ready((params, opt_state))
            times.append((time.perf_counter() - start) / steps)
            entry[1] = (params, opt_state)
    return [{"optimizer": optimizer, "knobs": knobs, "seconds_per_step": float(np.median(times)), "blocks": blocks}
            for (optimizer, knobs), (_, _, times) in zip(settings, compiled)]  # fmt: skip


def timed_settings(runs: list[dict], model: str) -> list[tuple[str, dict]]:
    """AdamW's best setting and every other setting the verdict judges that reaches AdamW's loss (none
    without AdamW's runs)."""
    reference = best(runs, model, "adamw")
    if reference is None:
        return []
    settings = [("adamw", reference["knobs"])]
    for row in verdict(runs, model, [])["rows"]:
        for judged in (row, row.get("fastest", {})):
            if judged.get("reached") and row["optimizer"] not in training.SECOND_ORDER:
                settings.append((row["optimizer"], judged["knobs"]))
    return settings


def best(runs: list[dict], model: str, optimizer: str) -> dict | None:
    """The sweep's best setting (seed 0) by final validation loss; None if every setting diverged."""
    finished = [r for r in runs if r["model"] == model and r["optimizer"] == optimizer and not r["diverged"]
                and r["seed"] == 0]  # fmt: skip
    return min(finished, key=lambda r: r["final_validation_loss"]) if finished else None


def reseeded(runs: list[dict], model: str, optimizer: str) -> list[dict]:
    """The seed-0 runs whose settings are rerun over more seeds: the best by final loss and, if another,
    the fastest to AdamW's best final loss."""
    chosen, reference = best(runs, model, optimizer), best(runs, model, "adamw")
    if chosen is None or reference is None or optimizer == "adamw":
        return [chosen] if chosen is not None else []
    quickest = fastest(runs, model, optimizer, reference["final_validation_loss"])
    return [chosen] if quickest is None or quickest["knobs"] == chosen["knobs"] else [chosen, quickest]


def first_reaching(steps: list[int], losses, level: float) -> int | None:
    """The first evaluated step at or below ``level``."""
    return next((step for step, loss in zip(steps, losses) if loss <= level), None)


def reaching(steps: list[int], losses, level: float, adam_steps: int, cost_ratio: float) -> dict:
    """When the validation losses ``losses`` evaluated at ``steps`` first reach ``level``, against AdamW's
    steps and seconds (``cost_ratio``: seconds per step over AdamW's); ``holds``: still at or below it at
    the end (a reach followed by a blow-up is no win)."""
    step = first_reaching(steps, losses, level)
    if step is None:
        return {"reached": False, "met": False}
    ratio = step / adam_steps
    seconds_ratio = ratio * cost_ratio
    holds = bool(losses[-1] <= level)
    met = ratio <= TARGET_STEPS and seconds_ratio <= TARGET_SECONDS and holds
    return {"reached": True, "steps_ratio": ratio, "seconds_ratio": seconds_ratio, "holds": holds, "met": met}


def verdict(runs: list[dict], model: str, paired: list[dict]) -> dict:
    """Each optimizer against AdamW's best final validation loss, at two settings: its best by final loss,
    and its fastest to AdamW's loss in seconds (seed 0). Each is judged on seed 0 and, where both it and
    AdamW were reseeded, on the mean curve over seeds against AdamW's mean final loss (both must meet the
    target); seconds are steps x the setting's seconds per step from ``paired`` (one process's alternating
    blocks, :func:`paired_seconds_per_step`) where timed there, else the median over its seeds' runs."""
    reference = best(runs, model, "adamw")
    if reference is None:
        return {"model": model, "met": False, "why": "AdamW did not finish"}
    level = reference["final_validation_loss"]
    adam_seeds, adam_seconds_per_step = setting_curves(runs, reference)
    adam_steps = reference["steps"]
    paired_adamw = paired_time(paired, reference)

    def judged(run: dict) -> dict:
        losses, seconds_per_step = setting_curves(runs, run)
        cost, source = seconds_per_step / adam_seconds_per_step, "the runs' median"
        timed = paired_time(paired, run)
        if paired_adamw is not None and timed is not None:
            cost, source = timed / paired_adamw, "paired timing"
        steps = [h["step"] for h in run["history"]]
        row = {"knobs": run["knobs"], "final_validation_loss": run["final_validation_loss"],
               "seconds_per_step_ratio": cost, "seconds_per_step_ratio_from": source,
               "runs_seconds_per_step_ratio": seconds_per_step / adam_seconds_per_step,
               **reaching(steps, [h["validation_loss"] for h in run["history"]], level, adam_steps, cost)}  # fmt: skip
        if len(losses) > 1 and len(adam_seeds) > 1:
            mean_level = float(adam_seeds[:, -1].mean())
            row["over_seeds"] = {"seeds": len(losses), "adamw_mean_final": mean_level,
                                 **reaching(steps, losses.mean(axis=0), mean_level, adam_steps, cost)}  # fmt: skip
            row["met"] = row["met"] and row["over_seeds"]["met"]
        return row

    rows = []
    for optimizer in sorted({r["optimizer"] for r in runs if r["model"] == model} - {"adamw"}):
        chosen = best(runs, model, optimizer)
        if chosen is None:
            rows.append({"optimizer": optimizer, "reached": False, "met": False, "why": "every setting diverged"})
            continue
        row = {"optimizer": optimizer, **judged(chosen)}
        quickest = fastest(runs, model, optimizer, level)
        if quickest is not None and quickest["knobs"] != chosen["knobs"]:
            row["fastest"] = judged(quickest)
        rows.append(row)
    return {
        "model": model,
        "adamw_best": {
            "knobs": reference["knobs"],
            "final_validation_loss": level,
            "steps": adam_steps,
            "seconds": adam_steps * adam_seconds_per_step,
            "seeds": len(adam_seeds),
        },  # fmt: skip
        "rows": rows,
        # Muon is optax's: a reference, not an hvpopt optimizer.
        "met": any(
            row["met"] or row.get("fastest", {}).get("met", False) for row in rows if row["optimizer"] in HVPOPT
        ),
    }


def seed_spread(runs: list[dict], model: str, optimizer: str) -> dict | None:
    """The final validation losses of each reseeded setting (mean, std, seeds) and the divergences of all."""
    mine = [r for r in runs if r["model"] == model and r["optimizer"] == optimizer]
    settings = []
    for r in mine:
        if r.get("repeat") and r["seed"] == 0:
            finals = setting_curves(runs, r)[0][:, -1]
            settings.append({"knobs": r["knobs"], "mean": float(np.mean(finals)), "std": float(np.std(finals)),
                             "seeds": len(finals)})  # fmt: skip
    if not settings:
        return None
    return {"settings": settings, "diverged": sum(r["diverged"] for r in mine)}


def setting_curves(runs: list[dict], chosen: dict) -> tuple[np.ndarray, float]:
    """The validation losses of ``chosen``'s setting (one row per finished seed; one row if not reseeded)
    and the median of their seconds per step (one process per core: the machine's noise is 10-30%)."""
    same = [r for r in runs if (r["model"], r["optimizer"], r["knobs"]) == (chosen["model"], chosen["optimizer"],
            chosen["knobs"]) and not r["diverged"] and (r.get("repeat") or r is chosen)]  # fmt: skip
    losses = np.array([[h["validation_loss"] for h in r["history"]] for r in same])
    return losses, float(np.median([r["seconds_per_step"] for r in same]))


def fastest(runs: list[dict], model: str, optimizer: str, level: float) -> dict | None:
    """The setting (seed 0) that first reaches ``level`` in the fewest seconds; None if none reaches it."""
    reached = []
    for r in runs:
        if (r["model"], r["optimizer"], r["seed"]) == (model, optimizer, 0) and not r["diverged"]:
            step = first_reaching([h["step"] for h in r["history"]], [h["validation_loss"] for h in r["history"]],
                                  level)  # fmt: skip
            if step is not None:
                reached.append((step * setting_curves(runs, r)[1], r))
    return min(reached, key=lambda pair: pair[0])[1] if reached else None


def paired_time(paired: list[dict], run: dict) -> float | None:
    """``run``'s setting's seconds per step in the paired timing ``paired``; None if it was not timed there."""
    return next((t["seconds_per_step"] for t in paired if (t["optimizer"], t["knobs"]) == (run["optimizer"],
                 run["knobs"])), None)  # fmt: skip


def plot(runs: list[dict], model: str, path: Path, paired: list[dict]) -> None:
    """Validation loss against steps (tokens on the top axis) and seconds of each optimizer's best setting and,
    dashed, its fastest to AdamW's loss: the mean over seeds, their range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = tasks.make_task("shakespeare", model_options=MODELS[model])
    tokens_per_step = BATCH_SIZE * task.train.inputs.shape[1]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for optimizer in sorted({r["optimizer"] for r in runs if r["model"] == model}):
        color = None
        for run, style in zip(reseeded(runs, model, optimizer), ("-", "--")):  # best final, then fastest
            losses, seconds_per_step = setting_curves(runs, run)
            seconds_per_step = paired_time(paired, run) or seconds_per_step  # the verdict's step cost
            steps = np.array([h["step"] for h in run["history"]])
            label = f"{optimizer} {run['knobs']}" + (f", {len(losses)} seeds" if len(losses) > 1 else "")
            for ax, x in zip(axes, (steps, steps * seconds_per_step)):
                (line,) = ax.plot(x, losses.mean(axis=0), style, marker=".", label=label, color=color)
                color = line.get_color()
                if len(losses) > 1:
                    ax.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=color, alpha=0.2)
    millions = tokens_per_step / 1e6
    tokens = axes[0].secondary_xaxis("top", functions=(lambda s: s * millions, lambda t: t / millions))
    tokens.set_xlabel("training tokens (millions)")
    seconds = "seconds (one core; paired step timings where measured)"
    for ax, xlabel in zip(axes, (f"steps (batch {BATCH_SIZE})", seconds)):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    figure.suptitle(f"Shakespeare LM, {model} model: each optimizer's best setting (dashed: its fastest to AdamW's)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="one setting each, 60 steps, the default model only")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--models", nargs="+", choices=tuple(MODELS), default=tuple(MODELS),
        help="the models to run; the runs of the others already in the results file are kept",
    )  # fmt: skip
    parser.add_argument(
        "--optimizers", nargs="+", choices=("adamw", "muon", *HVPOPT), default=None,
        help="rerun only these optimizers of the chosen models; the results file keeps the others' runs",
    )  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="recompute the verdicts and plots of the results")
    parser.add_argument(
        "--time-only", action="store_true",
        help="only time the settings that reach AdamW's loss against AdamW, in one process, and report",
    )  # fmt: skip
    args = parser.parse_args(argv)
    steps = 60 if args.quick else args.steps
    if args.quick:  # a smoke run never writes over the committed results
        args.out_dir = Path(tempfile.gettempdir())
    out = args.out_dir / ("lm_optimizers_quick.json" if args.quick else "lm_optimizers.json")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() and not args.quick else {}
    kept, paired = previous.get("runs", []), previous.get("paired_timing", {})
    selected = lambda optimizer: args.optimizers is None or optimizer in args.optimizers
    keep_all = args.report_only or args.time_only
    runs = [r for r in kept if keep_all or r["model"] not in args.models or not selected(r["optimizer"])]

    def save():
        results = {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "device": str(jax.devices()[0]),
                "jax": jax.__version__,
                "optax": optax.__version__,
                "hvpopt": hvpopt.__version__,
            },  # fmt: skip
            "steps": steps,
            "target": {"steps_ratio": TARGET_STEPS, "seconds_ratio": TARGET_SECONDS},
            "runs": runs,
            "paired_timing": paired,
        }
        models = sorted({r["model"] for r in runs})
        results["verdicts"] = [verdict(runs, m, paired.get(m, [])) for m in models]
        results["seeds"] = {m: {o: seed_spread(runs, m, o) for o in sorted({r["optimizer"] for r in runs})}
                            for m in models}  # fmt: skip
        out.write_text(json.dumps(results, indent=1))
        return results

    def time_paired(model):
        if any(r["model"] == model for r in runs):
            paired[model] = paired_seconds_per_step(model, timed_settings(runs, model))
            save()

    for model, grid in sweep(args.quick).items():
        if args.time_only:
            time_paired(model)
            continue
        if args.report_only:
            if any(r["model"] == model for r in runs):
                plot(runs, model, args.out_dir / f"lm_optimizers_{model}.png", paired.get(model, []))
            continue
        if not grid or model not in args.models:
            continue
        for optimizer, settings in grid.items():
            if not selected(optimizer):
                continue
            for knobs in settings:
                runs.append(run_one(model, optimizer, knobs, steps=steps, seed=0))
                r = runs[-1]
                print(model, optimizer, knobs, "diverged" if r["diverged"] else f"{r['final_validation_loss']:.4f}",
                      f"{r['total_seconds']:.0f} s", flush=True)  # fmt: skip
                save()
        if not args.quick:
            for optimizer in filter(selected, SEEDED[model]):
                for chosen in reseeded(runs, model, optimizer):
                    chosen["repeat"] = True
                    for seed in (1, 2):
                        run = run_one(model, optimizer, chosen["knobs"], steps=steps, seed=seed)
                        runs.append({**run, "repeat": True})
                        save()
        time_paired(model)
        plot(runs, model, args.out_dir / f"lm_optimizers_{model}{'_quick' if args.quick else ''}.png",
             paired.get(model, []))  # fmt: skip
    results = save()
    for v in results["verdicts"]:
        print(json.dumps(v, indent=1))


if __name__ == "__main__":
    main()
