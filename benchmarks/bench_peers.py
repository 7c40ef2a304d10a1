#!/usr/bin/env python
"""hvpopt against its PyTorch peers on identical weights: kronfluence's EK-FAC influence, curvlinops' products.

Models (``peer_models.py``): a 9,610-parameter MLP on scikit-learn's digits and a
70,963-parameter causal character LM (two pre-LayerNorm attention blocks, 64
tokens) on the Shakespeare text shipped with hvpopt, written in plain JAX and
mirrored in PyTorch. Each is trained briefly here (Adam, JAX, float32); its
weights are copied into the PyTorch model (``nn.Linear`` weights transposed) and
both models' logits must agree on a batch (float32: max difference <= 1e-5 of
the largest logit; float64: <= 1e-12) before anything is measured.

Influence (EK-FAC, the empirical Fisher on both sides, so nothing is random):
hvpopt ``fit_inverse_curvature(method="ekfac", curvature="ggn",
fisher="empirical")`` then ``pairwise_scores``, against kronfluence's
``Analyzer.fit_all_factors`` (``FactorArguments(strategy="ekfac",
use_empirical_fisher=True)``) then ``compute_pairwise_scores``, with N training
examples x Q queries (default 1,000 x 50), 64 examples a chunk / batch on
both sides, all queries in one batch. Influence is over the ``nn.Linear``
layers (weights and biases), the modules kronfluence tracks: hvpopt is handed
those layers as its parameters, with the embeddings and LayerNorms closed
over as constants (the MLP is all ``Linear``). The conventions differ and are
mapped, not fitted: hvpopt's score is ``(1/N) g_q^T (C + lam I)^{-1} g_j`` with
``g`` the gradient of one example's loss, the mean over its T positions, and
``C`` the EK-FAC of the mean training loss; kronfluence sums the losses (over
examples and, for the LM, tokens: its documented setting), so its gradients
are T x hvpopt's, and its damping is absolute. hvpopt's empirical Fisher
backpropagates ``sqrt(w_p) d ce_p / d logits_p`` at every position (weights
``w_p = 1/T``: the scale at which the sampled Fisher is the GGN), so an
example's pseudo-gradient is ``1/sqrt(T)`` of the summed loss's gradient and
its EK-FAC eigenvalues are 1/T of kronfluence's (not 1/T^2). Hence
kronfluence's ``damping_factor = T lam`` and then its scores are exactly
``N T`` x hvpopt's (T = 1 for the MLP). The JSON reports Pearson and
Spearman correlation over all pairs, the least-squares scale
kronfluence/hvpopt next to the expected ``N T``, and the difference after
scaling by ``N T`` (max |N T s_hvpopt - s_kron| over max |s_kron|, and the
99th percentile of the elementwise relative difference).

Products (float64 on both sides): ``hvpopt.ggn_vp`` and ``hvpopt.hvp`` against
curvlinops' ``GGNLinearOperator`` and ``HessianLinearOperator`` on the same
batch (mean cross-entropy, all parameters, the LM's logits flattened to
``[B T, V]`` for ``CrossEntropyLoss``) and the same random vector: relative
error ``||a - b|| / ||b||`` and the largest elementwise error over ``max |b|``.
The Hessian product is also compared with PyTorch's own reverse-over-reverse
product (``torch.autograd.grad`` twice): curvlinops differentiates forward
over reverse (``torch.func.jvp`` of ``jacrev``), which goes through the
forward-mode derivative of each backward formula, LayerNorm's included; a
one-layer check of that derivative is recorded too.

Time: each measured run is a fresh process pinned to one core (``taskset -c
0``), one thread per framework (``torch.set_num_threads(1)``, ``OMP/MKL/
OPENBLAS_NUM_THREADS=1``, ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1 --xla_force_host_platform_device_count=1``),
timed as a user runs it: from the launch of the interpreter to its exit
(``process_s``, measured by this script around ``subprocess.run``), with
in-process phases: interpreter start, imports, loading the weights and data,
setup (model, kronfluence's ``prepare_model`` and ``Analyzer``), ``fit``
(factors) and ``scores`` (the score matrix in NumPy). For hvpopt the
compilation inside each phase is measured as the union of JAX's
``jax.monitoring`` spans ``/jax/core/compile/*`` (trace, lowering, XLA
compile: ``harness.CompileSpans``), with their per-kind sums and the
persistent cache's hits and misses. Three kinds of run:

* ``hvpopt_cold``: the Python API, no persistent compilation cache
  (``HVPOPT_COMPILATION_CACHE=off``, no ``JAX_COMPILATION_CACHE_DIR``);
* ``hvpopt_warm``: the same with JAX's persistent cache (``jax_compilation_cache_dir``,
  minimum compile time and entry size 0) in a folder filled by one earlier
  identical run (``hvpopt_warm_fill``, recorded, not in the medians);
* ``kronfluence``: its Python API (factors and scores written to a temporary
  ``output_dir``, as it always does; progress bars off). PyTorch has no
  compile step here (eager), so it has no warm variant: its runs serve both ratios.

The three are interleaved in rounds (cold, kronfluence, warm; reversed every
other round) because the machine is shared; ``--repeats`` rounds (default 3).
Reported: every run, medians, and the ratios of medians hvpopt/kronfluence
(targets: cold <= 1.0, warm <= 0.5) with the per-round paired ratios. The
scores compared for agreement are those of the first timed round; the
largest difference of every other run's scores from them is recorded.

Install (the ``peers`` extra lists the packages): ``pip install torch==2.13.0``
(the CPU build on this machine's disk), then ``pip install --no-deps
kronfluence curvlinops-for-pytorch accelerate einops einconv opt-einsum
safetensors tqdm linear_operator``: kronfluence declares torchvision, which it
never imports, and resolving it would replace torch with a multi-GB CUDA build.

Usage (from the repository root):
  python benchmarks/bench_peers.py            # full run (~4 min on 2 shared cores): results/bench_peers_cpu.json
  python benchmarks/bench_peers.py --quick    # smoke run (< 2 min), written to the temporary folder
  python benchmarks/bench_peers.py --models lm --repeats 5
"""

import time

_PROCESS_START = time.perf_counter()
_PROCESS_START_WALL = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import peer_models  # noqa: E402 (NumPy only; the frameworks are imported where used)

BENCHMARK = "bench_peers"
MODELS = ("mlp", "lm")
KINDS = ("hvpopt_cold", "kronfluence", "hvpopt_warm")
TARGETS = {"cold": 1.0, "warm": 0.5}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "scikit-learn", "torch", "kronfluence",
            "curvlinops-for-pytorch", "accelerate", "hvpopt")  # fmt: skip
XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 --xla_force_host_platform_device_count=1"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "XLA_FLAGS": XLA_FLAGS}
FULL = {
    "num_train": 1000,
    "num_queries": 50,
    "repeats": 3,
    "train_steps": {"mlp": 200, "lm": 300},
    "product_batch": {"mlp": 128, "lm": 16},
}
QUICK = {
    "num_train": 128,
    "num_queries": 8,
    "repeats": 1,
    "train_steps": {"mlp": 20, "lm": 20},
    "product_batch": {"mlp": 32, "lm": 4},
}
TRAINING = {
    "mlp": {"batch_size": 1000, "learning_rate": 5e-3},
    "lm": {"batch_size": 64, "learning_rate": 3e-3},
}


# --------------------------------------------------------------------------
# Workers: each runs in its own process
# --------------------------------------------------------------------------


def _load(path: str) -> tuple[str, dict, dict]:
    """``(model, flat weights, data)`` from the npz the driver wrote."""
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    model = str(arrays.pop("model"))
    weights = {k[len("w/") :]: v for k, v in arrays.items() if k.startswith("w/")}
    data = {k[len("d/") :]: v for k, v in arrays.items() if k.startswith("d/")}
    return model, weights, data


def _positions(model: str, data: dict) -> int:
    """Loss terms per example: T for the LM, 1 for the MLP."""
    return int(data["y_train"].shape[1]) if model == "lm" else 1


def _finish(spec: dict, record: dict, scores: np.ndarray) -> None:
    record["in_script_s"] = time.perf_counter() - _PROCESS_START
    np.save(spec["scores"], scores)
    with open(spec["result"], "w") as file:
        json.dump(record, file, indent=1)


def hvpopt_worker(spec: dict) -> None:
    record = {"startup_s": _PROCESS_START_WALL - spec["launched_at"]}
    t = time.perf_counter()
    import jax
    from harness import COMPILE_EVENTS, CompileSpans

    import hvpopt

    record["import_s"] = time.perf_counter() - t
    if spec["cache_dir"]:  # the persistent compilation cache, as a user turns it on for the API
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    spans = CompileSpans()
    by_kind = {event.rsplit("/", 1)[1]: [0.0, 0] for event in COMPILE_EVENTS}
    cache = {"cache_hits": 0, "cache_misses": 0, "compile_time_saved_s": 0.0}

    by_function = {}  # fun_name -> [trace + lower + compile seconds, programs compiled]

    def on_duration(event, seconds, fun_name=None, **_):
        name = event.rsplit("/", 1)[1]
        if event in COMPILE_EVENTS:
            by_kind[name][0] += seconds
            by_kind[name][1] += 1
            entry = by_function.setdefault(str(fun_name), [0.0, 0])
            entry[0] += seconds
            entry[1] += event == COMPILE_EVENTS[-1]
        elif event == "/jax/compilation_cache/compile_time_saved_sec":
            cache["compile_time_saved_s"] += seconds

    def on_event(event, **_):
        name = event.rsplit("/", 1)[1]
        if name in cache:
            cache[name] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)

    def phase(name, call):
        wall0, t0 = time.time(), time.perf_counter()
        out = call()
        record[f"{name}_s"] = time.perf_counter() - t0
        record[f"{name}_compile_s"] = spans.within(wall0, time.time())
        return out

    def load():
        model, weights, data = _load(spec["data"])
        params = jax.tree.map(jax.numpy.asarray, peer_models.unflat(model, weights))
        dense, rest = peer_models.split_dense(model, params)
        model_fn = peer_models.dense_model_fn(model, rest)
        train = (jax.numpy.asarray(data["x_train"]), jax.numpy.asarray(data["y_train"]))
        queries = (jax.numpy.asarray(data["x_query"]), jax.numpy.asarray(data["y_query"]))
        return model, dense, model_fn, train, queries

    model, dense, model_fn, train, queries = phase("load", load)
    loss = hvpopt.losses.softmax_cross_entropy
    loss_fn = hvpopt.influence.example_loss(model_fn, loss)  # the loss fit_inverse_curvature derives from `model`

    def fit():
        inverse = hvpopt.influence.fit_inverse_curvature(
            loss_fn,
            dense,
            train,
            method="ekfac",
            damping=spec["damping"],
            curvature="ggn",
            model=(model_fn, loss),
            fisher="empirical",
            chunk_size=spec["chunk_size"],
        )
        jax.block_until_ready(inverse.factors)
        return inverse

    inverse = phase("fit", fit)
    scores = phase(
        "scores",
        lambda: np.asarray(
            hvpopt.influence.pairwise_scores(
                loss_fn, dense, train, queries, inverse=inverse, chunk_size=spec["chunk_size"]
            )
        ),
    )
    record["compile_s"] = record["load_compile_s"] + record["fit_compile_s"] + record["scores_compile_s"]
    record["compile_by_kind"] = {k: {"seconds": s, "events": n} for k, (s, n) in by_kind.items()}
    record["persistent_cache"] = cache
    top = sorted(by_function.items(), key=lambda item: -item[1][0])
    record["compile_by_function_top15"] = [{"function": f, "seconds": v[0], "programs": v[1]} for f, v in top[:15]]
    record["compiled_functions"] = len(by_function)
    record["work_s"] = record["fit_s"] + record["scores_s"]
    record["work_steady_s"] = record["work_s"] - record["fit_compile_s"] - record["scores_compile_s"]
    record["num_params"] = int(sum(np.size(x) for x in jax.tree.leaves(dense)))
    record["xla_flags"] = os.environ.get("XLA_FLAGS")
    _finish(spec, record, scores)


def kronfluence_worker(spec: dict) -> None:
    record = {"startup_s": _PROCESS_START_WALL - spec["launched_at"]}
    t = time.perf_counter()
    import logging

    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    record["import_s"] = time.perf_counter() - t
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    record["torch_num_threads"] = torch.get_num_threads()
    record["torch_num_interop_threads"] = torch.get_num_interop_threads()

    def phase(name, call):
        t0 = time.perf_counter()
        out = call()
        record[f"{name}_s"] = time.perf_counter() - t0
        return out

    class CrossEntropyTask(Task):
        """Softmax cross-entropy summed over examples and positions; the query measurement is the query's loss."""

        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            if sample:  # the true Fisher (not used: use_empirical_fisher=True)
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

    def load():
        model, weights, data = _load(spec["data"])
        x_dtype = torch.long if model == "lm" else torch.float32
        as_set = lambda x, y: TensorDataset(torch.as_tensor(x, dtype=x_dtype), torch.as_tensor(y, dtype=torch.long))
        return model, weights, data, as_set(data["x_train"], data["y_train"]), as_set(data["x_query"], data["y_query"])

    model, weights, data, train, queries = phase("load", load)
    output_dir = tempfile.mkdtemp(prefix="bench_peers_kronfluence_")

    def setup():
        module = peer_models.torch_model(model, int(data["vocab_size"]) if model == "lm" else None)
        peer_models.to_torch(module, weights)
        task = CrossEntropyTask()
        return Analyzer(
            analysis_name="peers",
            model=prepare_model(module, task),
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=output_dir,
            log_level=logging.WARNING,
        )

    analyzer = phase("setup", setup)
    try:
        phase(
            "fit",
            lambda: analyzer.fit_all_factors(
                factors_name="ekfac",
                dataset=train,
                per_device_batch_size=spec["chunk_size"],
                factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
                overwrite_output_dir=True,
            ),
        )

        def scores():
            analyzer.compute_pairwise_scores(
                scores_name="scores",
                factors_name="ekfac",
                query_dataset=queries,
                train_dataset=train,
                per_device_query_batch_size=len(queries),
                per_device_train_batch_size=spec["chunk_size"],
                score_args=ScoreArguments(damping_factor=spec["kronfluence_damping"]),
                overwrite_output_dir=True,
            )
            return analyzer.load_pairwise_scores("scores")["all_modules"].numpy()

        matrix = phase("scores", scores)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    record["work_s"] = record["fit_s"] + record["scores_s"]
    _finish(spec, record, matrix)


def check_worker(spec: dict) -> None:
    """Not timed: the two models' outputs agree (float32, float64); hvpopt's products against curvlinops' (float64)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import torch
    from curvlinops import GGNLinearOperator, HessianLinearOperator
    from torch import nn

    import hvpopt

    model, weights, data = _load(spec["data"])
    vocab = int(data["vocab_size"]) if model == "lm" else None
    apply = peer_models.APPLY[model]
    x = np.concatenate([data["x_query"], data["x_train"]])[: spec["output_batch"]]
    to_torch_input = lambda a: torch.as_tensor(a, dtype=torch.long if model == "lm" else None)
    record = {"model": model, "output_batch": int(x.shape[0])}

    for dtype, torch_dtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
        params = peer_models.unflat(model, {k: v.astype(dtype) for k, v in weights.items()})
        module = peer_models.torch_model(model, vocab).to(torch_dtype)
        peer_models.to_torch(module, peer_models.flat(params))
        xin = x if model == "lm" else x.astype(dtype)
        ours = np.asarray(jax.jit(apply)(jax.tree.map(jnp.asarray, params), jnp.asarray(xin)))
        with torch.no_grad():
            theirs = module(to_torch_input(xin)).numpy()
        assert ours.dtype == theirs.dtype == dtype, (ours.dtype, theirs.dtype)
        diff = float(np.max(np.abs(ours - theirs)))
        scale = float(np.max(np.abs(theirs)))
        name = np.dtype(dtype).name
        record[f"outputs_{name}"] = {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale}
        bound = 1e-5 if dtype == np.float32 else 1e-12
        assert diff <= bound * max(scale, 1.0), f"{model} {name}: the two models' outputs differ by {diff:.3g}"

    # Products, float64 (the loop above left params and module in float64): all parameters, mean cross-entropy.
    batch = spec["product_batch"]
    xb, yb = data["x_train"][:batch], data["y_train"][:batch]
    xb = xb if model == "lm" else xb.astype(np.float64)
    rng = np.random.default_rng(0)
    vector = {k: rng.standard_normal(v.shape) for k, v in peer_models.flat(params).items()}
    jparams = jax.tree.map(jnp.asarray, params)
    jv = jax.tree.map(jnp.asarray, peer_models.unflat(model, vector))
    ce = hvpopt.losses.softmax_cross_entropy
    jx, jy = jnp.asarray(xb), jnp.asarray(yb)
    ours = {
        "ggn": peer_models.flat(jax.jit(lambda p, v: hvpopt.ggn_vp(apply, ce, p, v, jx, jy))(jparams, jv)),
        "hessian": peer_models.flat(
            jax.jit(lambda p, v: hvpopt.hvp(lambda q: ce(apply(q, jx), jy), p, v))(jparams, jv)
        ),
    }

    class FlatLogits(nn.Module):  # CrossEntropyLoss takes [rows, classes]
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            out = self.inner(inputs)
            return out.reshape(-1, out.shape[-1])

    wrapped = FlatLogits(module)
    names = [name for name, _ in module.named_parameters()]
    tparams = [p for _, p in module.named_parameters()]
    linear = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    tv = [torch.as_tensor(vector[n].T.copy() if n in linear else vector[n]) for n in names]
    batches = [(to_torch_input(xb), torch.as_tensor(yb, dtype=torch.long).reshape(-1))]
    loss = nn.CrossEntropyLoss(reduction="mean")
    theirs = {}
    for key, operator in (("ggn", GGNLinearOperator), ("hessian", HessianLinearOperator)):
        op = operator(wrapped, loss, tparams, batches)
        theirs[key] = peer_models.from_torch(module, dict(zip(names, op @ tv)))
    # A second PyTorch Hessian product, reverse-over-reverse (autograd's double backward): curvlinops' is
    # forward-over-reverse (torch.func.jvp of jacrev), which goes through LayerNorm's backward formula.
    ((xt, yt),) = batches
    gradient = torch.autograd.grad(loss(wrapped(xt), yt), tparams, create_graph=True)
    autograd_hv = torch.autograd.grad(gradient, tparams, grad_outputs=tv)
    theirs["hessian_autograd"] = peer_models.from_torch(module, dict(zip(names, autograd_hv)))
    ours["hessian_autograd"] = ours["hessian"]
    stack = lambda products: np.concatenate([products[n].ravel() for n in names])
    for key in ("ggn", "hessian", "hessian_autograd"):
        a, b = stack(ours[key]), stack(theirs[key])
        record[f"{key}_vp"] = {
            "dtype": "float64",
            "batch": int(batch),
            "num_params": int(a.size),
            "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
            "max_abs_error_over_max_abs": float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
            "norm": float(np.linalg.norm(b)),
        }
    record["ggn_vp"]["peer"] = "curvlinops.GGNLinearOperator"
    record["hessian_vp"]["peer"] = "curvlinops.HessianLinearOperator (torch.func forward-over-reverse)"
    record["hessian_autograd_vp"]["peer"] = "torch.autograd.grad twice (reverse-over-reverse), no curvlinops"
    a, b = stack(theirs["hessian"]), stack(theirs["hessian_autograd"])
    record["curvlinops_hessian_vs_torch_autograd_relative_error"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    record["torch_layer_norm_forward_over_reverse_error"] = _layer_norm_check(torch)
    with open(spec["result"], "w") as file:
        json.dump(record, file, indent=1)


def _layer_norm_check(torch) -> float:
    """Relative error of PyTorch's forward-over-reverse Hessian product of a loss through ``F.layer_norm`` (affine,
    float64) against its reverse-over-reverse one: 0 up to rounding where both are right (see the JSON's note)."""
    from torch.func import jacrev, jvp

    generator = torch.Generator().manual_seed(0)
    args = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in ((4, 8), (8,), (8,))]
    tangents = [torch.randn(a.shape, dtype=torch.float64, generator=generator) for a in args]
    f = lambda x, w, b: torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5).pow(3).sum()
    _, forward = jvp(jacrev(f, argnums=(0, 1, 2)), tuple(args), tuple(tangents))
    leaves = [a.clone().requires_grad_() for a in args]
    gradient = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
    reverse = torch.autograd.grad(gradient, leaves, grad_outputs=tangents)
    a, b = torch.cat([t.ravel() for t in forward]), torch.cat([t.ravel() for t in reverse])
    return float((a - b).norm() / b.norm())


WORKERS = {"hvpopt": hvpopt_worker, "kronfluence": kronfluence_worker, "check": check_worker}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def _run(spec: dict, folder: str, name: str, pin: str | None, env: dict) -> tuple[dict, np.ndarray | None]:
    """One worker in a fresh process; ``(record with process_s, scores or None)``."""
    spec = {**spec, "result": os.path.join(folder, f"{name}.json"), "scores": os.path.join(folder, f"{name}.npy")}
    prefix = [] if pin is None else ["taskset", "-c", pin]
    t0, spec["launched_at"] = time.perf_counter(), time.time()
    command = [*prefix, sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"worker {name} failed (exit {done.returncode})")
    with open(spec["result"]) as file:
        record = json.load(file)
    record["process_s"] = seconds
    record["teardown_and_launch_s"] = seconds - record.get("startup_s", 0.0) - record.get("in_script_s", 0.0)
    scores = np.load(spec["scores"]) if os.path.exists(spec["scores"]) else None
    return record, scores


def _environment() -> dict:
    """The measured processes' environment: one thread each, no persistent compilation cache unless set in-process."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(THREAD_ENV)
    env["HVPOPT_COMPILATION_CACHE"] = "off"  # the CLI's cache (if any) never applies; the warm run sets JAX's own
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _agreement(hv: np.ndarray, kron: np.ndarray, expected_scale: float) -> dict:
    from scipy.stats import spearmanr

    h, k = hv.ravel().astype(np.float64), kron.ravel().astype(np.float64)
    fitted = float(h @ k / (h @ h))
    scaled = expected_scale * h
    diff = np.abs(scaled - k)
    elementwise = diff / np.maximum(np.abs(k), 1e-30)
    top = lambda a, b, n=10: float(
        np.mean([len(set(np.argsort(-r)[:n]) & set(np.argsort(-s)[:n])) / n for r, s in zip(a, b)])
    )
    return {
        "pearson": float(np.corrcoef(h, k)[0, 1]),
        "spearman": float(spearmanr(h, k).statistic),
        "expected_scale": expected_scale,
        "fitted_scale": fitted,
        "fitted_over_expected": fitted / expected_scale,
        "max_abs_diff_over_max_abs_after_scaling": float(diff.max() / np.abs(k).max()),
        "p99_elementwise_relative_diff_after_scaling": float(np.percentile(elementwise, 99)),
        "median_elementwise_relative_diff_after_scaling": float(np.median(elementwise)),
        "top10_proponent_overlap": top(hv, kron),
        "sign_agreement": float(np.mean(np.sign(scaled) == np.sign(k))),
        "max_abs_kronfluence_score": float(np.abs(k).max()),
    }


def _summary(runs: list[dict]) -> dict:
    fields = [k for k in runs[0] if k.endswith("_s") and isinstance(runs[0][k], float) and k != "process_s"]
    return {f"median_{k}": float(np.median([r[k] for r in runs])) for k in ["process_s", *fields] if k in runs[0]}


def prepare(model: str, settings: dict, folder: str, seed: int) -> dict:
    """Trains the model (JAX) and writes its weights and data for the workers; returns what was done."""
    t0 = time.perf_counter()
    if model == "mlp":
        data = peer_models.digits(settings["num_train"], settings["num_queries"], seed=seed)
        params = peer_models.init_mlp(seed)
    else:
        data = peer_models.shakespeare(settings["num_train"], settings["num_queries"])
        params = peer_models.init_lm(int(data["vocab_size"]), seed)
    params, first, last = peer_models.train(
        model, params, data, steps=settings["train_steps"][model], seed=seed, **TRAINING[model]
    )
    path = os.path.join(folder, f"{model}.npz")
    np.savez(
        path,
        model=np.array(model),
        **{f"w/{k}": v for k, v in peer_models.flat(params).items()},
        **{f"d/{k}": v for k, v in data.items()},
    )
    return {
        "path": path,
        "num_params": int(sum(v.size for v in peer_models.flat(params).values())),
        "num_dense_params": int(
            sum(v.size for v in peer_models.flat(peer_models.split_dense(model, params)[0]).values())
        ),
        "positions_per_example": _positions(model, data),
        "training": {
            "steps": settings["train_steps"][model],
            **TRAINING[model],
            "optimizer": "optax.adam",
            "first_loss": first,
            "last_loss": last,
            "seconds": time.perf_counter() - t0,
        },
        "data": {
            "train": list(data["x_train"].shape),
            "queries": list(data["x_query"].shape),
            "source": "sklearn.datasets.load_digits (random split, seed)"
            if model == "mlp"
            else "hvpopt.testbed.data.corpus_text: non-overlapping 65-character windows, first 90% train, "
            "last 10% queries",
        },
    }


def bench_model(model: str, settings: dict, args, folder: str) -> dict:
    print(f"\n== {model}: training (JAX) and writing weights", flush=True)
    prepared = prepare(model, settings, folder, args.seed)
    tr = prepared["training"]
    print(
        f"   {prepared['num_params']:,} parameters ({prepared['num_dense_params']:,} in Linear layers); "
        f"{tr['steps']} steps, loss {tr['first_loss']:.3f} -> {tr['last_loss']:.3f} ({tr['seconds']:.1f} s)",
        flush=True,
    )
    base = {"data": prepared["path"], "chunk_size": args.chunk_size}
    check, _ = _run(
        {
            **base,
            "kind": "check",
            "output_batch": 32,
            "product_batch": settings["product_batch"][model],
        },
        folder,
        f"{model}_check",
        None,
        _environment(),
    )
    print(
        f"   outputs agree: float32 max |diff| {check['outputs_float32']['max_abs_diff']:.2e} "
        f"(largest logit {check['outputs_float32']['max_abs_logit']:.2f}), float64 "
        f"{check['outputs_float64']['max_abs_diff']:.2e}; products (float64): GGN vs curvlinops "
        f"{check['ggn_vp']['relative_error']:.2e}, Hessian vs curvlinops {check['hessian_vp']['relative_error']:.2e}, "
        f"vs torch.autograd {check['hessian_autograd_vp']['relative_error']:.2e}",
        flush=True,
    )

    positions, n = prepared["positions_per_example"], settings["num_train"]
    kron_damping = args.damping * positions  # see the module docstring: kronfluence's C is T x hvpopt's
    hv_spec = {**base, "kind": "hvpopt", "damping": args.damping}
    kron_spec = {**base, "kind": "kronfluence", "kronfluence_damping": kron_damping}
    cache_dir = os.path.join(folder, f"{model}_jax_cache")
    os.makedirs(cache_dir)
    specs = {
        "hvpopt_cold": {**hv_spec, "cache_dir": None},
        "kronfluence": kron_spec,
        "hvpopt_warm": {**hv_spec, "cache_dir": cache_dir},
    }
    pin = None if args.no_pin else str(args.cpu)
    env = _environment()
    fill, _ = _run(specs["hvpopt_warm"], folder, f"{model}_hvpopt_warm_fill", pin, env)
    print(f"   filled the persistent cache: {fill['process_s']:.1f} s", flush=True)
    runs = {kind: [] for kind in KINDS}
    scores = {kind: [] for kind in KINDS}
    for r in range(settings["repeats"]):
        order = KINDS if r % 2 == 0 else KINDS[::-1]
        for kind in order:
            record, matrix = _run(specs[kind], folder, f"{model}_{kind}_{r}", pin, env)
            record["round"] = r
            runs[kind].append(record)
            scores[kind].append(matrix)
            print(
                f"   round {r} {kind:<12} process {record['process_s']:6.2f} s  (import {record['import_s']:.2f}, "
                f"fit {record['fit_s']:.2f}, scores {record['scores_s']:.2f}"
                + (f", compile {record['compile_s']:.2f}" if "compile_s" in record else "")
                + ")",
                flush=True,
            )

    agreement = _agreement(scores["hvpopt_cold"][0], scores["kronfluence"][0], float(n * positions))
    agreement["repeat_max_abs_diff"] = {
        kind: float(max(np.max(np.abs(s - scores[kind][0])) for s in scores[kind])) for kind in KINDS
    }
    agreement["hvpopt_warm_vs_cold_max_abs_diff"] = float(
        np.max(np.abs(scores["hvpopt_warm"][0] - scores["hvpopt_cold"][0]))
    )
    medians = {kind: _summary(runs[kind]) for kind in KINDS}
    kron = medians["kronfluence"]["median_process_s"]
    ratios = {}
    for label, kind in (("cold", "hvpopt_cold"), ("warm", "hvpopt_warm")):
        paired = [a["process_s"] / b["process_s"] for a, b in zip(runs[kind], runs["kronfluence"])]
        ratios[label] = {
            "hvpopt_over_kronfluence_process": medians[kind]["median_process_s"] / kron,
            "paired_per_round": paired,
            "paired_median": float(np.median(paired)),
            "hvpopt_over_kronfluence_fit_plus_scores": medians[kind]["median_work_s"]
            / medians["kronfluence"]["median_work_s"],
            "target": TARGETS[label],
            "pass": medians[kind]["median_process_s"] / kron <= TARGETS[label],
        }
    return {
        **{k: v for k, v in prepared.items() if k != "path"},
        "damping": {
            "hvpopt": args.damping,
            "kronfluence": kron_damping,
            "mapping": "kronfluence damping_factor = T x hvpopt damping, T the positions per example (kronfluence "
            "sums the loss over positions: its gradients are T x hvpopt's, its EK-FAC eigenvalues T x hvpopt's, "
            "whose empirical Fisher weights each position's score by sqrt(1/T)); kronfluence scores = N T x hvpopt's",
        },
        "check": check,
        "agreement": agreement,
        "runs": {"hvpopt_warm_fill": fill, **runs},
        "medians": medians,
        "ratios": ratios,
    }


def _table(results: dict) -> str:
    lines = []
    for model, res in results.items():
        a, c, m = res["agreement"], res["check"], res["medians"]
        lines.append(
            f"\n{model} ({res['num_params']:,} params, influence over {res['num_dense_params']:,}; "
            f"{res['data']['train'][0]} train x {res['data']['queries'][0]} queries)"
        )
        lines.append(
            f"  scores vs kronfluence: Pearson {a['pearson']:.7f}  Spearman {a['spearman']:.7f}  fitted scale "
            f"{a['fitted_scale']:.6g} (expected N T = {a['expected_scale']:g}, ratio {a['fitted_over_expected']:.7f})  "
            f"max|diff|/max {a['max_abs_diff_over_max_abs_after_scaling']:.2e}  "
            f"p99 rel {a['p99_elementwise_relative_diff_after_scaling']:.2e}"
        )
        lines.append(
            f"  products (float64): GGN vs curvlinops rel err {c['ggn_vp']['relative_error']:.2e}; Hessian vs "
            f"curvlinops {c['hessian_vp']['relative_error']:.2e}, vs torch.autograd double backward "
            f"{c['hessian_autograd_vp']['relative_error']:.2e} (curvlinops vs autograd "
            f"{c['curvlinops_hessian_vs_torch_autograd_relative_error']:.2e})"
        )
        header = f"  {'run':<12} {'process s':>9} {'startup':>7} {'import':>7} {'load':>6} {'setup':>6} {'fit':>6} "
        lines.append(header + f"{'scores':>6} {'compile':>7} {'fit+scores-compile':>18}")
        for kind in KINDS:
            s = m[kind]
            optional = lambda key, width: f"{s[key]:{width}.2f}" if key in s else f"{'-':>{width}}"
            lines.append(
                f"  {kind:<12} {s['median_process_s']:9.2f} {s['median_startup_s']:7.2f} {s['median_import_s']:7.2f} "
                f"{s['median_load_s']:6.2f} {optional('median_setup_s', 6)} {s['median_fit_s']:6.2f} "
                f"{s['median_scores_s']:6.2f} {optional('median_compile_s', 7)} "
                f"{optional('median_work_steady_s', 18)}"
            )
        for label, r in res["ratios"].items():
            lines.append(
                f"  {label} ratio hvpopt/kronfluence (process medians) {r['hvpopt_over_kronfluence_process']:.3f} "
                f"(paired median {r['paired_median']:.3f}; fit+scores only "
                f"{r['hvpopt_over_kronfluence_fit_plus_scores']:.3f}) target <= {r['target']}: "
                f"{'PASS' if r['pass'] else 'FAIL'}"
            )
    return "\n".join(lines)


def _notes(results: dict) -> list[str]:
    """What a reader of the numbers should know, from what was measured."""
    notes = [
        "Influence is over the nn.Linear layers (kronfluence tracks no other module): hvpopt gets those layers as "
        "its parameters, the embeddings and LayerNorms closed over as constants.",
        "kronfluence runs eagerly (no compilation), so it has one kind of run; its median is the denominator of "
        "both the cold and the warm ratio.",
    ]
    for model, res in results.items():
        c = res["check"]
        if c["curvlinops_hessian_vs_torch_autograd_relative_error"] > 1e-8:
            notes.append(
                f"{model}: curvlinops' HessianLinearOperator differs from PyTorch's own reverse-over-reverse Hessian "
                f"product by {c['curvlinops_hessian_vs_torch_autograd_relative_error']:.2e} (relative), while hvpopt "
                f"agrees with the latter to {c['hessian_autograd_vp']['relative_error']:.2e}. curvlinops takes "
                "torch.func.jvp of jacrev (forward-over-reverse); in this torch, the forward-mode derivative of "
                "F.layer_norm's backward is wrong (an affine layer_norm alone: relative error "
                f"{c['torch_layer_norm_forward_over_reverse_error']:.2e} against reverse-over-reverse); the GGN "
                "product differentiates no backward pass."
            )
    for model, res in results.items():
        m = res["medians"]
        if "median_work_steady_s" in m["hvpopt_warm"]:
            steady = m["hvpopt_warm"]["median_work_steady_s"]
            notes.append(
                f"{model}: hvpopt's fit + scores without compilation take {steady:.2f} s (warm) against "
                f"kronfluence's {m['kronfluence']['median_work_s']:.2f} s; compilation is "
                f"{m['hvpopt_cold']['median_compile_s']:.2f} s cold and {m['hvpopt_warm']['median_compile_s']:.2f} s "
                "warm (the persistent cache skips XLA's compilation, not tracing and lowering)."
            )
    return notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of mlp, lm")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 1)")
    parser.add_argument("--damping", type=float, default=1e-3, help="hvpopt's damping (kronfluence's is mapped)")
    parser.add_argument("--chunk-size", type=int, default=64, help="examples per chunk (hvpopt) / batch (kronfluence)")
    parser.add_argument("--cpu", type=int, default=0, help="the core every measured process is pinned to")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the measured processes (no taskset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON output (default results/bench_peers_cpu.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one round (< 2 minutes)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        WORKERS[spec["kind"]](spec)
        return 0

    import harness  # imports JAX: the driver only

    start = time.perf_counter()
    settings = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        settings["repeats"] = args.repeats
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    out_path = args.out or (
        harness.quick_path(BENCHMARK) if args.quick else harness.results_path(f"{BENCHMARK}_cpu.json")
    )
    if not args.no_pin and shutil.which("taskset") is None:
        raise SystemExit("taskset not found: install util-linux, or pass --no-pin (the runs then use every core)")
    load_before = harness.cpu_load()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as folder:
        for model in models:
            results[model] = bench_model(model, settings, args, folder)
    environment = harness.environment(PACKAGES)
    report = {
        "benchmark": BENCHMARK,
        "environment": environment,
        "quick": args.quick,
        "settings": {
            **settings,
            "damping": args.damping,
            "chunk_size": args.chunk_size,
            "seed": args.seed,
            "influence": "EK-FAC, empirical Fisher, curvature ggn (hvpopt) / ekfac strategy (kronfluence), "
            "over the Linear layers' weights and biases",
        },
        "threads": {
            "pinned_to_cpu": None if args.no_pin else args.cpu,
            "pinning": None if args.no_pin else "taskset -c CPU (every measured process)",
            "env": THREAD_ENV,
            "torch": "torch.set_num_threads(1), torch.set_num_interop_threads(1)",
            "jax_persistent_cache_warm": "jax_compilation_cache_dir=<folder filled by hvpopt_warm_fill>, "
            "jax_persistent_cache_min_compile_time_secs=0, jax_persistent_cache_min_entry_size_bytes=0",
            "jax_persistent_cache_cold": "none (HVPOPT_COMPILATION_CACHE=off, JAX_COMPILATION_CACHE_DIR unset)",
        },
        "timing_method": "process_s: subprocess.run wall time (interpreter launch to exit) of a fresh process per "
        "run; phases by perf_counter inside it; startup_s: launch to the script's first line; compile_s: union of "
        "JAX's /jax/core/compile/* event spans; rounds interleave hvpopt_cold, kronfluence, hvpopt_warm, the "
        "order reversed every other round; medians over rounds",
        "cpu_load_before": load_before,
        "cpu_load_after": harness.cpu_load(),
        "results": results,
        "notes": _notes(results),
        "targets": {
            "items": [
                {
                    "target": f"{label} hvpopt/kronfluence",
                    "case": model,
                    "measured": res["ratios"][label]["hvpopt_over_kronfluence_process"],
                    "threshold": TARGETS[label],
                    "pass": res["ratios"][label]["pass"],
                }
                for model, res in results.items()
                for label in TARGETS
            ]
        },
        "wall_seconds_total": time.perf_counter() - start,
    }
    items = report["targets"]["items"]
    report["targets"].update(num_pass=sum(i["pass"] for i in items), num_targets=len(items))
    harness.write_results(out_path, report)
    print(_table(results))
    harness.print_targets(report["targets"], target_width=30, case_width=6)
    print(f"\nwrote {out_path} ({report['wall_seconds_total']:.0f} s; load before {load_before}, after "
          f"{report['cpu_load_after']})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
