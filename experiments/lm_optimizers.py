"""Second-order training on transformer language models, as ``hvpopt train`` trains them, against AdamW and Muon.

Every optimizer is trained by :func:`hvpopt.testbed.training.train` (the loop
behind ``hvpopt train``) on the shipped Shakespeare characters, mini-batch 64,
with the same warm-up and cosine schedule (decayed to a tenth; the
second-order Newton-CG and Hessian-free take a constant first step and a line
search instead). Each optimizer's learning rate (and, where it has one, its
main knob) is swept over the grid of :func:`sweep` (cut to what 2 CPU cores
run in about 90 minutes: fewer settings on the ~1M-parameter model); the best
settings by final validation loss of the optimizers in :data:`SEEDED` are
rerun over two more seeds (data order and initialisation). Divergences (a
non-finite training or validation loss) are counted, never plotted.

The target, set before the runs: at least one hvpopt optimizer reaches AdamW's
best final validation loss in <= 0.7x AdamW's steps and <= 1.0x its wall-clock
seconds, on both models. Written: ``results/lm_optimizers.json`` and one PNG of
validation loss against steps and seconds per model.

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
        "sophia_h": lrs(1e-3, 3e-3),
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
        "muon": lrs(1e-2, 3e-2),
        "sophia_g": lrs(3e-4, 1e-3),
        "sophia_h": lrs(1e-3),
        "kfac": [*lrs(1.0, 2.0, **cheap_kfac), {"learning_rate": 1.0, "curvature_every": 10}],
        "hessian_free": dampings(1.0),
        "hessian_free_kfac": dampings(1.0),
        "newton_cg": dampings(1.0),
    }
    if quick:
        default = {name: grid[:1] for name, grid in default.items()}
        large = {}
    return {"default": default, "large": large}


#: Rerun at their best setting over two more seeds, per model.
SEEDED = {"default": ("adamw", "kfac", "sophia_g"), "large": ("adamw", "kfac")}


def run_one(model: str, optimizer: str, knobs: dict, *, steps: int, seed: int) -> dict:
    task = tasks.make_task("shakespeare", seed=seed, model_options=MODELS[model])
    is_second_order = optimizer in training.SECOND_ORDER
    second_order_steps = max(steps // 10, 10)  # a Hessian-free step costs tens of gradients
    options = training.TrainOptions(
        steps=second_order_steps if is_second_order else steps,
        batch_size=64,
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


def best(runs: list[dict], model: str, optimizer: str) -> dict | None:
    """The sweep's best setting (seed 0) by final validation loss; None if every setting diverged."""
    finished = [r for r in runs if r["model"] == model and r["optimizer"] == optimizer and not r["diverged"]
                and r["seed"] == 0]  # fmt: skip
    return min(finished, key=lambda r: r["final_validation_loss"]) if finished else None


def first_reaching(run: dict, level: float) -> tuple[float, float] | None:
    """``(steps, seconds)`` of the first evaluation at or below ``level``; seconds are steps x seconds per step."""
    for h in run["history"]:
        if h["validation_loss"] <= level:
            return h["step"], h["step"] * run["seconds_per_step"]
    return None


def verdict(runs: list[dict], model: str) -> dict:
    reference = best(runs, model, "adamw")
    if reference is None:
        return {"model": model, "met": False, "why": "AdamW did not finish"}
    level = reference["final_validation_loss"]
    adam_steps, adam_seconds = reference["steps"], reference["steps"] * reference["seconds_per_step"]
    rows = []
    for optimizer in sorted({r["optimizer"] for r in runs if r["model"] == model} - {"adamw"}):
        run = best(runs, model, optimizer)
        if run is None:
            rows.append({"optimizer": optimizer, "reached": False, "why": "every setting diverged"})
            continue
        hit = first_reaching(run, level)
        row = {"optimizer": optimizer, "knobs": run["knobs"], "final_validation_loss": run["final_validation_loss"],
               "seconds_per_step_ratio": run["seconds_per_step"] / reference["seconds_per_step"]}  # fmt: skip
        if hit is None:
            rows.append({**row, "reached": False})
        else:
            steps_ratio, seconds_ratio = hit[0] / adam_steps, hit[1] / adam_seconds
            met = steps_ratio <= TARGET_STEPS and seconds_ratio <= TARGET_SECONDS
            rows.append(
                {**row, "reached": True, "steps_ratio": steps_ratio, "seconds_ratio": seconds_ratio, "met": met}
            )
    return {
        "model": model,
        "adamw_best": {
            "knobs": reference["knobs"],
            "final_validation_loss": level,
            "steps": adam_steps,
            "seconds": adam_seconds,
        },  # fmt: skip
        "rows": rows,
        "met": any(row.get("met") for row in rows if row["optimizer"] in HVPOPT),  # Muon is optax's: a reference
    }


def seed_spread(runs: list[dict], model: str, optimizer: str) -> dict | None:
    finals = [r["final_validation_loss"] for r in runs if r["model"] == model and r["optimizer"] == optimizer
              and r.get("repeat") and not r["diverged"]]  # fmt: skip
    diverged = sum(1 for r in runs if r["model"] == model and r["optimizer"] == optimizer and r["diverged"])
    if not finals:
        return None
    return {"mean": float(np.mean(finals)), "std": float(np.std(finals)), "seeds": len(finals), "diverged": diverged}


def plot(runs: list[dict], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for optimizer in sorted({r["optimizer"] for r in runs if r["model"] == model}):
        run = best(runs, model, optimizer)
        if run is None:
            continue
        steps = [h["step"] for h in run["history"]]
        losses = [h["validation_loss"] for h in run["history"]]
        label = f"{optimizer} {run['knobs']}"
        axes[0].plot(steps, losses, marker=".", label=label)
        axes[1].plot([s * run["seconds_per_step"] for s in steps], losses, marker=".", label=label)
    for ax, xlabel in zip(axes, ("steps (batch 64)", "seconds (one CPU core, compilation excluded)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    figure.suptitle(f"Shakespeare LM, {model} model: the best setting of each optimizer")
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
    args = parser.parse_args(argv)
    steps = 60 if args.quick else args.steps
    if args.quick:  # a smoke run never writes over the committed results
        args.out_dir = Path(tempfile.gettempdir())
    out = args.out_dir / ("lm_optimizers_quick.json" if args.quick else "lm_optimizers.json")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out.read_text())["runs"] if out.exists() and not args.quick else []
    selected = lambda optimizer: args.optimizers is None or optimizer in args.optimizers
    runs = [r for r in kept if args.report_only or r["model"] not in args.models or not selected(r["optimizer"])]

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
        }
        models = sorted({r["model"] for r in runs})
        results["verdicts"] = [verdict(runs, m) for m in models]
        results["seeds"] = {m: {o: seed_spread(runs, m, o) for o in sorted({r["optimizer"] for r in runs})}
                            for m in models}  # fmt: skip
        out.write_text(json.dumps(results, indent=1))
        return results

    for model, grid in sweep(args.quick).items():
        if args.report_only:
            if any(r["model"] == model for r in runs):
                plot(runs, model, args.out_dir / f"lm_optimizers_{model}.png")
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
                chosen = best(runs, model, optimizer)
                if chosen is None:
                    continue
                chosen["repeat"] = True
                for seed in (1, 2):
                    runs.append({**run_one(model, optimizer, chosen["knobs"], steps=steps, seed=seed), "repeat": True})
                    save()
        plot(runs, model, args.out_dir / f"lm_optimizers_{model}{'_quick' if args.quick else ''}.png")
    results = save()
    for v in results["verdicts"]:
        print(json.dumps(v, indent=1))


if __name__ == "__main__":
    main()
