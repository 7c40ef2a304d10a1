"""Times `hvpopt train`'s default run (or any task) and records it with the machine and versions.

The default language model on its default options: compile time of the first
step, steps per second after it (evaluations left out), wall time of the whole
run, and the final validation loss. Writes a JSON under benchmarks/results/.

    python scripts/bench_train.py                         # CPU, the default run
    python scripts/bench_train.py --out benchmarks/results/bench_train_gpu.json
"""

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_env import cpu_load, environment, write_results  # noqa: E402

import hvpopt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=hvpopt.testbed.tasks.DEFAULT_TASK, choices=hvpopt.testbed.tasks.TASKS)
    parser.add_argument("--steps", type=int, default=hvpopt.testbed.training.TrainOptions().steps)
    parser.add_argument("--out", default="benchmarks/results/bench_train_cpu.json")
    args = parser.parse_args()

    load_before = cpu_load()
    start = time.perf_counter()
    task = hvpopt.testbed.tasks.make_task(args.task)
    build_seconds = time.perf_counter() - start
    options = hvpopt.testbed.training.TrainOptions(steps=args.steps)
    result = hvpopt.testbed.training.train(task, options)
    wall_seconds = time.perf_counter() - start
    report = {
        "benchmark": "bench_train",
        "environment": environment(("jax", "jaxlib", "flax", "optax", "numpy", "hvpopt")),
        "cpu_load_before": load_before,
        "cpu_load_after": cpu_load(),
        "task": task.config,
        "train_options": options.__dict__,
        "parameters": int(sum(x.size for x in jax.tree.leaves(task.params))),
        "training_examples": task.train.num_examples,
        "task_build_seconds": build_seconds,
        "compile_seconds": result.compile_seconds,
        "steps_per_second": result.steps_per_second,
        "tokens_per_second": result.steps_per_second * options.batch_size * task.train.inputs.shape[1],
        "wall_seconds_total": wall_seconds,
        "final": result.history[-1],
        "history": result.history,
    }
    write_results(args.out, report)
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("parameters", "compile_seconds", "steps_per_second", "wall_seconds_total", "final")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
