"""Times `hvpopt train`'s default run (or any task) and records it with the machine and versions.

What it measures: the default language model on its default options: compile
time of the first step, steps per second after it (evaluations left out), wall
time of the whole run, and the final validation loss. No baseline: the number
to compare with is the same script's earlier results (CPU and GPU) in
benchmarks/results/.

    python benchmarks/bench_train.py                      # CPU, the default run
    python benchmarks/bench_train.py --out benchmarks/results/bench_train_gpu.json
    python benchmarks/bench_train.py --quick              # 20 steps, writes to the temporary folder
"""

import argparse
import json
import time

import harness

import hvpopt

DEFAULT_OUT = harness.results_path("bench_train_cpu.json")
QUICK_OUT = harness.quick_path("bench_train")
QUICK_STEPS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=hvpopt.testbed.tasks.DEFAULT_TASK, choices=hvpopt.testbed.tasks.TASKS)
    parser.add_argument("--steps", type=int, default=None, help="default: the training default (--quick: 20)")
    parser.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; --quick: {QUICK_OUT})")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps, evaluated every 10")
    args = parser.parse_args()
    out_path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    steps = args.steps or (QUICK_STEPS if args.quick else hvpopt.testbed.training.TrainOptions().steps)

    load_before = harness.cpu_load()
    start = time.perf_counter()
    task = hvpopt.testbed.tasks.make_task(args.task)
    build_seconds = time.perf_counter() - start
    options = hvpopt.testbed.training.TrainOptions(steps=steps, **({"eval_every": 10} if args.quick else {}))
    result = hvpopt.testbed.training.train(task, options)
    wall_seconds = time.perf_counter() - start
    report = {
        "benchmark": "bench_train",
        "environment": harness.environment(("jax", "jaxlib", "flax", "optax", "numpy", "hvpopt")),
        "cpu_load_before": load_before,
        "cpu_load_after": harness.cpu_load(),
        "task": task.config,
        "train_options": options.__dict__,
        "parameters": harness.num_params(task.params),
        "training_examples": task.train.num_examples,
        "task_build_seconds": build_seconds,
        "compile_seconds": result.compile_seconds,
        "steps_per_second": result.steps_per_second,
        "tokens_per_second": result.steps_per_second * options.batch_size * task.train.inputs.shape[1],
        "wall_seconds_total": wall_seconds,
        "final": result.history[-1],
        "history": result.history,
    }
    harness.write_results(out_path, report)
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("parameters", "compile_seconds", "steps_per_second", "wall_seconds_total", "final")
            },
            indent=2,
        )
    )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
