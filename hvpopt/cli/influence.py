"""``hvpopt influence``: which training examples are responsible for a prediction.

Parses and loads (a checkpoint, a user task or the built-in default; training
texts; queries), calls :mod:`hvpopt.influence`, writes files. Long work is cut
into chunks kept in ``OUT/.partial`` (with a fingerprint of every input and
setting), so an interrupted run started again with the same arguments picks up
where it stopped; the results are written atomically and ``metadata.json``
last, after which the partial folder is removed.
"""

import csv
import dataclasses
import io
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import hvpopt
from hvpopt import _checks, influence
from hvpopt.cli import chunk_store, compilation, flags, user_task
from hvpopt.influence import MAX_EXACT_PARAMETERS
from hvpopt.testbed import checkpoint, files, interrupts, tasks, training
from hvpopt.testbed.data import Dataset
from hvpopt.testbed.progress import Progress

ACTIONS = ("score", "self", "validate")
DEFAULT_QUERIES = 5  # a checkpoint's validation examples scored when no query is given
FACTORS, FACTORS_FINGERPRINT = "factors.npz", "factors.json"
#: The default method, chosen by the linear datamodeling score per second (experiments/influence.py): on a tiny
#: LM, EK-FAC 0.146 +- 0.021 in 0.13 s, CG (25 iterations) 0.153 +- 0.029 in 8.0 s, identity 0.089.
DEFAULT_METHOD = "ekfac"
METRICS = ("leave-one-out", "lds")  # validate --metric
SIGN_CONVENTION = (
    "scores[q, j] ~ L_q(theta without j) - L_q(theta) = (1/n) grad L_q^T (H + damping I)^-1 "
    "grad l_j; positive: training example j helped query q (removing it would raise q's loss)"
)
METADATA = "metadata.json"


@dataclasses.dataclass(frozen=True)
class Problem:
    """What influence runs on: a per-example loss at trained parameters, a training set and queries."""

    description: str
    loss_fn: Callable
    params: Any
    train: Dataset
    queries: Dataset
    model: tuple[Callable, Callable] | None
    l2: float
    task: tasks.Task | None
    source: dict
    mesh: Mesh | None = None  # the devices the work is split over
    train_options: dict | None = None  # the checkpoint's training.TrainOptions, as recorded (the recipe)
    own_task: user_task.UserTask | None = None  # a --task's: its encode turns --query/--queries/--train into examples


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "influence",
        help="influence of training examples on queries (the main job)",
        description="Scores every training example's influence on each query (score), on its own loss "
        "(self), or checks the scores (validate): against leave-one-out retraining, or with --metric lds by "
        "the linear datamodeling score of models retrained on random subsets. With no --checkpoint "
        "or --task it trains the default language model once (cached) and scores five validation "
        "windows. " + SIGN_CONVENTION + ".",
    )
    parser.add_argument("action", nargs="?", choices=ACTIONS, default="score")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR", help="a checkpoint written by 'hvpopt train'")
    source.add_argument(
        "--task",
        metavar="FILE.py:FUNCTION",
        help="your own model: a function (in FILE.py, or MODULE:FUNCTION) returning {'params', 'train', 'loss_fn' "
        "or 'model'[, 'queries', 'encode', 'l2']} (docs/tasks.rst)",
    )
    parser.add_argument(
        "--train",
        metavar="FILE.jsonl",
        help='training examples, one {"text": ...} per line (default: the checkpoint\'s training split)',
    )
    parser.add_argument(
        "--train-examples", type=flags.positive_int, metavar="N", help="use the first N training examples"
    )
    parser.add_argument("--query", action="append", default=[], metavar="TEXT", help="a query (repeatable)")
    parser.add_argument("--queries", metavar="FILE.jsonl", help='queries, one {"text": ...} per line')
    parser.add_argument(
        "--num-queries",
        type=flags.positive_int,
        default=None,
        help=f"score the first N queries (default: every query given, or the first {DEFAULT_QUERIES} validation "
        "examples of a checkpoint)",
    )
    parser.add_argument("--out", default="influence-out", metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--method",
        choices=influence.METHODS,
        action="append",
        default=None,
        help=f"how the inverse curvature is applied (default {DEFAULT_METHOD} with the Gauss-Newton matrix and "
        "damping > 0, else cg); validate --metric lds takes it several times to compare methods (identity is "
        "always reported beside them)",
    )
    parser.add_argument(
        "--damping",
        type=flags.nonnegative_float,
        default=None,
        help="lambda >= 0 (default: the task's L2 penalty, or 1e-3 without one)",
    )
    parser.add_argument(
        "--curvature",
        choices=influence.CURVATURES,
        default=None,
        help="default: ggn where the model is known, else hessian",
    )
    parser.add_argument(
        "--curvature-examples",
        type=flags.positive_int,
        default=256,
        metavar="N",
        help="random training examples whose mean loss gives the curvature (default 256)",
    )
    parser.add_argument(
        "--fisher",
        choices=hvpopt.curvature.FISHER_TARGETS,
        default="sampled",
        help="kfac/ekfac: the Fisher's labels, sampled from the model (default), the closed form "
        "(classifiers), or the data's (empirical)",
    )
    parser.add_argument(
        "--mc-samples",
        type=flags.positive_int,
        default=None,
        metavar="S",
        help=f"kfac/ekfac with --fisher sampled: labels drawn per example (default {influence.DEFAULT_MC_SAMPLES})",
    )
    parser.add_argument(
        "--factors",
        metavar="DIR",
        help="kfac/ekfac: reuse the factors a finished run on the same checkpoint wrote to DIR (its --out)",
    )
    parser.add_argument(
        "--query-rank",
        type=flags.positive_int,
        default=None,
        metavar="R",
        help="kfac/ekfac: keep each layer's query direction at rank R (less memory for many queries; default: full)",
    )
    parser.add_argument(
        "--score-dtype",
        choices=influence.SCORE_DTYPES,
        default=None,
        help="kfac/ekfac: the dtype query directions are stored and scores contracted in (default: the model's)",
    )
    parser.add_argument(
        "--max-memory",
        type=flags.byte_size,
        default=None,
        metavar="SIZE",
        help="kfac/ekfac scores: refuse to start a run whose estimated peak memory (printed before the work) is "
        "above SIZE, e.g. 4GB",
    )
    parser.add_argument("--cg-iterations", type=flags.positive_int, default=50)
    parser.add_argument(
        "--rank",
        type=flags.positive_int,
        default=None,
        help="arnoldi's eigenpairs (default: 50, or every parameter of a smaller model)",
    )
    parser.add_argument("--lissa-depth", type=flags.positive_int, default=1000)
    parser.add_argument("--chunk-size", type=flags.positive_int, default=64, help="examples per gradient chunk")
    parser.add_argument("--top-k", type=flags.positive_int, default=10)
    parser.add_argument(
        "--validate-examples",
        type=flags.positive_int,
        default=20,
        help="validate --metric leave-one-out: training examples left out and retrained",
    )
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="leave-one-out",
        help="validate: leave-one-out (the default: exact retraining without one example on a convex task, the "
        "proximal Bregman response otherwise) or lds (the linear datamodeling score: the checkpoint's own "
        "training run repeated on random subsets of the training examples; writes lds.json)",
    )
    parser.add_argument(
        "--subsets",
        type=flags.positive_int,
        default=20,
        metavar="M",
        help="validate --metric lds: random training subsets retrained on, at least 2 (default 20)",
    )
    parser.add_argument(
        "--seeds",
        type=flags.positive_int,
        default=1,
        metavar="S",
        help="validate --metric lds: trainings per subset (new initialisation and batch order), their query "
        "losses averaged (default 1)",
    )
    parser.add_argument(
        "--fraction",
        type=flags.finite_float,
        default=0.5,
        help="validate --metric lds: the share of the training examples each subset keeps (default 0.5)",
    )
    parser.add_argument("--seed", type=flags.seed, default=0)
    parser.add_argument(
        "--devices",
        type=flags.device_count,
        default=None,
        metavar="N",
        help="devices the training and curvature examples are split over (default: all of this machine's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace finished results in --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    """The command: ``--out`` is this run's alone, Ctrl-C stops between chunks, and a run that fails
    leaves only finished work behind (in ``OUT/.partial``, for the same command to resume)."""
    flags.check_out_folder(args.out)
    args.clock = compilation.CompileClock()  # compile seconds apart from work seconds, in metadata.json
    work = os.path.join(args.out, chunk_store.PARTIAL)
    try:
        with interrupts.deferred_interrupts(), files.owned_folder(args.out, "--out"):
            summary = _run(args)
    except KeyboardInterrupt:
        kept = (
            f"finished chunks are kept in {work}: run the same command again to resume"
            if os.path.isdir(work)
            else "nothing had finished, so nothing is kept"
        )
        print(f"hvpopt influence: interrupted; {kept}.", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2) if args.json else _format(summary))
    warning = _convergence_warning(summary)
    if warning:
        print(f"hvpopt influence: warning: {warning}", file=sys.stderr)
    return 0


def _convergence_warning(summary: dict) -> str | None:
    """A line saying that the scores come from a solve that did not converge, and what to change; else None."""
    if summary.get("all_converged") is False:
        return (
            f"the CG solves did not converge (largest residual {summary['max_residual_norm']:.3g} after "
            f"{summary['max_iterations']:.0f} iterations), so the scores are approximate; raise --cg-iterations "
            "or --damping."
        )
    if summary.get("any_diverged"):
        return "the LiSSA series diverged for some queries, so the scores are approximate; raise --damping."
    if "rank" in summary and summary.get("num_converged", summary["rank"]) < summary["rank"]:
        return (
            f"{summary['num_converged']} of the {summary['rank']} eigenpairs converged to 1e-6; the low-rank "
            "inverse uses the Ritz approximations of the others."
        )
    return None


def _run(args) -> dict:
    mesh = hvpopt.data_mesh(args.devices)
    problem = load_problem(args, mesh)
    problem = dataclasses.replace(problem, params=hvpopt.replicate(problem.params, mesh), mesh=mesh)
    settings = _settings(args, problem)
    if os.path.exists(os.path.join(args.out, METADATA)) and not args.overwrite:
        raise ValueError(
            f"--out {args.out!r} already holds finished results; pass --overwrite or choose another folder."
        )
    if args.action == "validate":
        _check_validate(problem, settings)
    args.memory = _memory(args, problem, settings)  # checked against --max-memory before any work
    print(
        f"influence ({args.action}, {settings['method']}, {settings['curvature']}, damping "
        f"{settings['damping']:g}) on {problem.description}",
        file=sys.stderr,
    )
    if args.memory:
        said = ", ".join(f"{stage} {_size(size)}" for stage, size in args.memory["stages_bytes"].items())
        held, peak = args.memory["held_before_bytes"], args.memory["estimated_peak_bytes"]
        print(f"memory, estimated: {said}; peak about {_size(peak)} with the {_size(held)} held now", file=sys.stderr)
    with chunk_store.work_folder(args.out, settings) as work:
        validate = _lds if settings["metric"] == "lds" else _validate
        return {"score": _score, "self": _self, "validate": validate}[args.action](args, problem, settings, work)


# ---------------------------------------------------------------- loading


def load_problem(args, mesh: Mesh | None = None) -> Problem:
    """The loss, parameters, training set and queries named by the arguments.

    Nothing is written, except the default model's checkpoint the first time
    it is needed (trained over ``mesh``'s devices when they share its batch).
    """
    if args.task:
        problem = _user_task(args.task)
    else:
        folder = args.checkpoint or _default_checkpoint(not args.no_progress, mesh)
        loaded = checkpoint.load_checkpoint(folder)
        task = loaded.task
        problem = Problem(
            task.describe(),
            influence.example_loss(task.model_fn, task.loss),  # task.example_loss, derived: nothing to check
            loaded.params,
            task.train,
            task.validation,
            (task.model_fn, task.loss),
            task.l2,
            task,
            {
                "checkpoint": os.path.abspath(folder),
                "task": task.config,
                "params_sha256": loaded.config["params"]["sha256"],
            },
            train_options=loaded.config.get("train"),
        )  # checked by the load
    train = problem.train
    if args.train:
        train = _texts_dataset(problem, "--train", _read_jsonl("--train", args.train), "train")
    if args.train_examples:
        train = train.take(range(min(args.train_examples, train.num_examples)))
    queries = problem.queries
    given = [{"text": text} for text in args.query] + (_read_jsonl("--queries", args.queries) if args.queries else [])
    if given:
        queries = _texts_dataset(problem, "--query" if args.query else "--queries", given, "queries")
    elif args.action == "score" and (queries is None or queries.num_examples == 0):
        raise ValueError("no queries: pass --query TEXT or --queries FILE.jsonl.")
    # Every query given is used; of a checkpoint's validation split, the first five.
    count = args.num_queries or (DEFAULT_QUERIES if problem.task is not None and not given else None)
    if queries is not None and count is not None:
        queries = queries.take(range(min(count, queries.num_examples)))
    return dataclasses.replace(problem, train=train, queries=queries)


def _default_checkpoint(progress: bool, mesh: Mesh | None) -> str:
    """The default language model, trained once and cached under $HVPOPT_CACHE (default ~/.cache/hvpopt)."""
    folder = os.path.join(os.environ.get("HVPOPT_CACHE", os.path.expanduser("~/.cache/hvpopt")), "shakespeare")
    if os.path.exists(os.path.join(folder, checkpoint.CONFIG_FILE)):
        return folder
    name = "the default model's cache"
    try:
        with files.owned_folder(folder, name):
            return _train_default_model(folder, progress, mesh)
    except files.FolderInUse:
        print(f"waiting for the hvpopt run that is training the default model in {folder}", file=sys.stderr)
    with files.owned_folder(folder, name, wait=True):
        return _train_default_model(folder, progress, mesh)


def _train_default_model(folder: str, progress: bool, mesh: Mesh | None) -> str:
    """Trains and saves the default model into ``folder`` (held by this process) unless it is there already."""
    if os.path.exists(os.path.join(folder, checkpoint.CONFIG_FILE)):
        return folder  # another run trained it while this one waited
    print(
        f"no --checkpoint: training the default language model once (about a minute on 2 CPU cores); "
        f"cached in {folder}",
        file=sys.stderr,
    )
    task, options = tasks.make_task(), training.TrainOptions()
    if mesh is not None and options.batch_size % mesh.size:
        mesh = None  # only a matter of speed: the model is the same
    result = training.train(task, options, progress=progress, mesh=mesh)
    if result.interrupted:
        raise KeyboardInterrupt  # half a default model is not cached
    checkpoint.save_checkpoint(
        folder, result.params, checkpoint.training_config(task, options, result.history, completed=True)
    )
    return folder


def _user_task(spec: str) -> Problem:
    """The problem a ``--task FILE.py:FUNCTION`` (or ``MODULE:FUNCTION``) returns, checked field by field."""
    task = user_task.load(spec)
    return Problem(
        spec, task.loss_fn, task.params, task.train, task.queries, task.model, task.l2, None, {"task": spec},
        own_task=task,
    )  # fmt: skip


def _read_jsonl(flag: str, path: str) -> list[dict]:
    """The records of a JSONL file of ``{"text": ...}`` objects; an error names the file and line."""
    _checks.check_file(flag, path)
    records = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{flag} {path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text (byte {error.start + 1} of the line).") from None
            if not line.strip():
                continue
            try:
                record = _checks.strict_json(line, where)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{where}: expected an object with a "text" string.')
            records.append({**record, "flag": flag, "file": path, "line": number})
    if not records:
        raise ValueError(f"{flag} {path} holds no examples.")
    return records


def _texts_dataset(problem: Problem, flag: str, records: list[dict], prefix: str) -> Dataset:
    """Examples of ``records``' texts (ids ``PREFIX-1``, ... unless given); a refusal names ``flag``."""
    if problem.task is None and problem.own_task is None:
        raise ValueError(f"{flag} needs texts turned into examples: give a checkpoint, or a --task with encode.")
    ids = [str(r.get("id", f"{prefix}-{i + 1}")) for i, r in enumerate(records)]
    names = [f"{r['flag']} {r['file']} line {r['line']}" if "line" in r else f"--query {i + 1}" for i, r in
             enumerate(records)]  # fmt: skip
    first = {}
    for name, example_id in zip(names, ids):
        if first.setdefault(example_id, name) != name:
            raise ValueError(f"{name}: id {example_id!r} is already that of {first[example_id]}; ids must be unique.")
    texts = [r["text"] for r in records]
    if problem.task is None:
        return user_task.encode_texts(problem.own_task, texts, ids, names, flag)
    return tasks.examples_from_texts(problem.task, texts, ids=ids, names=names)


def _settings(args, problem: Problem) -> dict:
    curvature = args.curvature or ("ggn" if problem.model else "hessian")
    if curvature == "ggn" and problem.model is None:
        raise ValueError("--curvature ggn needs the model: the --task function's dict has no 'model'.")
    damping = args.damping if args.damping is not None else (problem.l2 or 1e-3)
    size = sum(np.size(leaf) for leaf in jax.tree.leaves(problem.params))
    rank = min(50, size) if args.rank is None else args.rank
    lds = args.action == "validate" and args.metric == "lds"
    methods = list(dict.fromkeys(args.method or [DEFAULT_METHOD if curvature == "ggn" and damping > 0 else "cg"]))
    if len(methods) > 1 and not lds:
        raise ValueError("--method is given once, except by 'validate --metric lds', which compares several methods.")
    if "arnoldi" in methods and rank > size:  # checked before any work, and named as the user typed it
        raise ValueError(f"--rank must be at most the model's {size} parameters; got {rank}.")
    factored = [m for m in methods if m in ("kfac", "ekfac")]
    if factored and curvature != "ggn":
        raise ValueError(f"--method {factored[0]} factors the Gauss-Newton matrix: use --curvature ggn.")
    if factored and not damping > 0:
        raise ValueError(f"--damping must be > 0 for --method {factored[0]} (a layer's eigenvalues may be 0).")
    if args.mc_samples is not None and args.fisher != "sampled":
        raise ValueError(f"--mc-samples draws labels: it is for --fisher sampled, not --fisher {args.fisher}.")
    if (args.query_rank or args.score_dtype) and not factored:
        flag = "--query-rank" if args.query_rank else "--score-dtype"
        raise ValueError(f"{flag} keeps Kronecker-factored layers' directions: use it with --method kfac or ekfac.")
    if args.factors and (len(methods) > 1 or not factored):
        raise ValueError("--factors is for one --method kfac or --method ekfac.")
    if "exact" in methods and size > MAX_EXACT_PARAMETERS:
        raise ValueError(
            f"--method exact builds the {size} x {size} curvature matrix; at most {MAX_EXACT_PARAMETERS} "
            "parameters fit: use --method cg or --method arnoldi."
        )
    settings = {
        "action": args.action,
        "method": ",".join(methods),
        "curvature": curvature,
        "damping": float(damping),
        "curvature_examples": min(args.curvature_examples, problem.train.num_examples),
        "cg_iterations": args.cg_iterations,
        "rank": rank,
        "lissa_depth": args.lissa_depth,
        "chunk_size": args.chunk_size,
        "seed": args.seed,
        "source": problem.source,
        "params_sha256": chunk_store.content_sha256(problem.params),
        "num_train": problem.train.num_examples,
        "train_sha256": chunk_store.content_sha256(problem.train),
        "queries_sha256": chunk_store.content_sha256(problem.queries),
        "metric": args.metric if args.action == "validate" else None,
        "validate_examples": args.validate_examples if args.action == "validate" and not lds else None,
        "lds": _lds_settings(args, problem, methods) if lds else None,
        "fisher": args.fisher if factored else None,
        "mc_samples": (args.mc_samples or influence.DEFAULT_MC_SAMPLES)
        if factored and args.fisher == "sampled"
        else None,
        "query_rank": args.query_rank,
        "score_dtype": args.score_dtype,
    }
    if args.factors:
        settings["factors"] = _check_factors_folder(args.factors, settings)
    return settings


def _factors_fingerprint(settings: dict) -> dict:
    """What K-FAC factors depend on: the model and its parameters, the curvature examples, the labels' draw."""
    keys = ("method", "fisher", "mc_samples", "curvature_examples", "seed", "source", "params_sha256", "train_sha256")
    return {key: settings[key] for key in keys}


def _check_factors_folder(folder: str, settings: dict) -> str:
    """``folder``'s factors file, if fitted with this run's fingerprint; else ValueError naming ``--factors``."""
    saved = chunk_store.read_json(os.path.join(folder, FACTORS_FINGERPRINT))
    if saved is None or not os.path.isfile(os.path.join(folder, FACTORS)):
        raise ValueError(f"--factors {folder!r} holds no {FACTORS} and {FACTORS_FINGERPRINT} of a finished run.")
    expected = json.loads(json.dumps(_factors_fingerprint(settings)))
    differ = sorted(key for key in expected if saved.get(key) != expected[key])
    if differ:
        raise ValueError(
            f"--factors {folder!r} were fitted with other inputs ({', '.join(differ)} "
            f"{'differs' if len(differ) == 1 else 'differ'}): fit them again "
            "without --factors."
        )
    return os.path.abspath(os.path.join(folder, FACTORS))


def _lds_settings(args, problem: Problem, methods: list[str]) -> dict:
    """What ``validate --metric lds`` does beyond the scores: the subsets, the seeds and the training recipe."""
    with flags.named_as_flags(args, {"num_subsets": "subsets"}):  # checked here, before any work
        subsets = influence.datamodel_subsets(
            problem.train.num_examples, args.subsets, fraction=args.fraction, seed=args.seed
        )
    return {
        "methods": methods,
        "subsets": args.subsets,
        "seeds": args.seeds,
        "fraction": args.fraction,
        "subset_size": int(subsets[0].sum()),
        "recipe": problem.train_options,
    }


# ---------------------------------------------------------------- work


def _fit(problem: Problem, settings: dict, work: str) -> tuple[influence.InverseCurvature, dict]:
    """The inverse curvature; exact and arnoldi keep their eigenpairs in the work folder, kfac and ekfac
    their factors."""
    if settings["method"] in ("kfac", "ekfac"):
        return _fit_factors(problem, settings, work)
    cached, cached_diagnostics = os.path.join(work, "eigenpairs.npz"), os.path.join(work, "fit.json")
    if os.path.exists(cached):
        with np.load(cached, allow_pickle=False) as saved:
            values, vectors = jnp.asarray(saved["eigenvalues"]), jnp.asarray(saved["eigenvectors"])
        with open(cached_diagnostics) as file:
            diagnostics = json.load(file)
        apply = influence.eigen_inverse(values, vectors, settings["damping"])
        return influence.InverseCurvature(
            apply, settings["method"], settings["damping"], values, vectors, {}
        ), diagnostics
    subset = _curvature_subset(problem, settings)
    start = time.perf_counter()
    print(
        f"fitting {settings['method']} on the {settings['curvature']} of {subset.num_examples} training examples",
        file=sys.stderr,
    )
    inverse = influence.fit_inverse_curvature(
        problem.loss_fn,
        problem.params,
        (subset.inputs, subset.targets),
        method=settings["method"],
        damping=settings["damping"],
        curvature=settings["curvature"],
        model=problem.model,
        chunk_size=settings["chunk_size"],
        maxiter=settings["cg_iterations"],
        rank=settings["rank"],
        depth=settings["lissa_depth"],
        key=jax.random.key(settings["seed"]),
        mesh=problem.mesh,
    )
    diagnostics = {
        "fit_seconds": time.perf_counter() - start,
        **{name: _jsonable(value) for name, value in inverse.diagnostics.items()},
    }
    if inverse.eigenvalues is not None:  # diagnostics first: the eigenpairs mark the fit as done
        diagnostics["top_eigenvalues"] = _jsonable(inverse.eigenvalues[::-1][:10])
        chunk_store.write_json(cached_diagnostics, diagnostics)
        files.write_atomically(
            cached,
            lambda file: np.savez(
                file, eigenvalues=np.asarray(inverse.eigenvalues), eigenvectors=np.asarray(inverse.eigenvectors)
            ),
        )
    interrupts.check_interrupt()  # a safe point: the fit is saved
    return inverse, diagnostics


def _fit_factors(problem: Problem, settings: dict, work: str) -> tuple[influence.InverseCurvature, dict]:
    """K-FAC / EK-FAC factors: read from ``--factors``, or from the work folder, or fitted and saved there."""
    cached = settings.get("factors") or os.path.join(work, FACTORS)
    one = jax.tree.map(lambda x: x[:1], problem.train.inputs)
    if os.path.exists(cached):
        with np.load(cached, allow_pickle=False) as saved:
            factors = hvpopt.kronecker_from_arrays(dict(saved), problem.model[0], problem.params, one)
        diagnostics = chunk_store.read_json(os.path.join(os.path.dirname(cached), FACTORS_FINGERPRINT))["fit"]
        if settings.get("factors"):
            diagnostics = {**diagnostics, "factors_from": settings["factors"]}
    else:
        subset = _curvature_subset(problem, settings)
        print(f"fitting {settings['method']} factors on {subset.num_examples} training examples", file=sys.stderr)
        start = time.perf_counter()
        factors = influence.fit_inverse_curvature(
            problem.loss_fn,
            problem.params,
            (subset.inputs, subset.targets),
            method=settings["method"],
            damping=settings["damping"],
            curvature="ggn",
            model=problem.model,
            chunk_size=settings["chunk_size"],
            fisher=settings["fisher"],
            mc_samples=settings["mc_samples"] or 1,
            key=jax.random.key(settings["seed"]),
            mesh=problem.mesh,
        ).factors
        jax.block_until_ready(factors)
        diagnostics = {
            "fit_seconds": time.perf_counter() - start,
            "num_layers": len(factors.layers),
            "factor_megabytes": factors.nbytes / 2**20,
        }
        fingerprint = {**_factors_fingerprint(settings), "fit": diagnostics}
        chunk_store.write_json(os.path.join(work, FACTORS_FINGERPRINT), fingerprint)  # first: the factors mark it done
        arrays = hvpopt.kronecker_to_arrays(factors)
        files.write_atomically(os.path.join(work, FACTORS), lambda file: np.savez(file, **arrays))
    interrupts.check_interrupt()  # a safe point: the fit is saved
    apply = influence.kronecker_inverse_rows(factors, settings["damping"])
    inverse = influence.InverseCurvature(
        apply, settings["method"], settings["damping"], None, None, {}, factors, problem.model
    )
    return inverse, dict(diagnostics)


def _memory(args, problem: Problem, settings: dict) -> dict | None:
    """K-FAC / EK-FAC scores: each stage's estimated bytes beyond what this process holds now, refused
    above ``--max-memory``; None for the other runs (not estimated)."""
    if args.action != "score" or settings["method"] not in ("kfac", "ekfac"):
        if args.max_memory:
            raise ValueError("--max-memory is estimated for 'score' with --method kfac or ekfac only.")
        return None
    cached = settings.get("factors") or os.path.join(args.out, chunk_store.PARTIAL, FACTORS)
    fitted = None
    if os.path.exists(cached):
        with np.load(cached, allow_pickle=False) as saved:
            fitted = sum(saved[name].nbytes for name in saved.files)
    subset = _curvature_subset(problem, settings)
    stages = influence.kronecker_memory(
        problem.model,
        problem.params,
        (subset.inputs, subset.targets),
        _examples(problem.train),
        problem.queries.num_examples,
        factors_bytes=fitted,
        kind=settings["method"],
        fisher=settings["fisher"],
        mc_samples=settings["mc_samples"] or 1,
        chunk_size=settings["chunk_size"],
        mesh=problem.mesh,
        query_rank=settings["query_rank"],
        score_dtype=settings["score_dtype"],
    )
    if not stages:
        return None
    held = _resident_bytes()
    peak = held + max(stages.values())
    if args.max_memory and peak > args.max_memory:
        largest = max(stages, key=stages.get)
        unset = {"--query-rank 32": settings["query_rank"], "--score-dtype bfloat16": settings["score_dtype"]}
        smaller = [flag for flag, value in unset.items() if value is None]
        remedy = {
            "fit": ["a lower --chunk-size (a chunk of curvature examples is held at once)"],
            "query directions": [*smaller, "fewer queries"],
            "scoring": ["a lower --chunk-size", *smaller],
        }[largest]
        raise ValueError(
            f"--max-memory {_size(args.max_memory)}: this run would need about {_size(peak)} at its peak "
            f"({largest}: {_size(stages[largest])} beyond the {_size(held)} held now); try {' or '.join(remedy)}."
        )
    return {"stages_bytes": stages, "held_before_bytes": held, "estimated_peak_bytes": peak}


def _resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_resident_bytes()


def _peak_resident_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _size(size: int) -> str:
    return f"{size / 2**30:.2f} GB" if size >= 2**30 else f"{size / 2**20:.0f} MB"


def _factor_outputs(work: str) -> dict:
    """The fitted factors, copied from the work folder into ``--out`` for a later ``--factors``."""
    names = [name for name in (FACTORS_FINGERPRINT, FACTORS) if os.path.exists(os.path.join(work, name))]

    def copy(name):
        with open(os.path.join(work, name), "rb") as source:
            content = source.read()
        return lambda file: file.write(content)

    return {name: copy(name) for name in names} if len(names) == 2 else {}


def _curvature_subset(problem: Problem, settings: dict) -> Dataset:
    """The training examples whose mean loss gives the curvature: a seeded random subset."""
    rng = np.random.default_rng(settings["seed"])
    return problem.train.take(
        np.sort(rng.choice(problem.train.num_examples, settings["curvature_examples"], replace=False))
    )


def _score(args, problem: Problem, settings: dict, work: str) -> dict:
    inverse, fit = _fit(problem, settings, work)
    saved = os.path.join(work, "directions.npz")  # a solve's directions; factored ones take a gradient per query
    if os.path.exists(saved):
        with np.load(saved, allow_pickle=False) as file:
            directions, solver = jnp.asarray(file["directions"]), {k: file[k] for k in file.files if k != "directions"}
    else:
        print(f"solving for {problem.queries.num_examples} queries", file=sys.stderr)
        start = time.perf_counter()
        directions, solver = influence.query_directions(
            problem.loss_fn,
            problem.params,
            _examples(problem.queries),
            inverse,
            chunk_size=settings["chunk_size"],
            query_rank=settings["query_rank"],
            score_dtype=settings["score_dtype"],
        )
        fit["query_solve_seconds"] = time.perf_counter() - start
        if not isinstance(directions, influence.FactoredDirections):
            files.write_atomically(saved, lambda file: np.savez(file, directions=np.asarray(directions), **solver))
    train = _examples(problem.train)
    scores = chunk_store.saved_chunks(
        lambda start: influence.score_blocks(
            problem.loss_fn,
            problem.params,
            train,
            directions,
            chunk_size=settings["chunk_size"],
            start=start,
            mesh=problem.mesh,
        ),
        work,
        "scores",
        problem.train.num_examples,
        settings["chunk_size"],
        not args.no_progress,
    )
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad.size:
        names = ", ".join(repr(str(problem.queries.ids[q])) for q in bad[:3]) + (" ..." if bad.size > 3 else "")
        raise ValueError(
            f"the scores of {bad.size} of the {scores.shape[0]} queries ({names}) are not finite: the curvature "
            "solve failed for them; raise --damping."
        )
    rows = _top_rows(scores, problem, args.top_k)
    outputs = {"scores.npy": lambda f: np.save(f, scores), **_factor_outputs(work)}
    summary = _finish(args, problem, settings, {**fit, **_solver_summary(solver)}, rows, outputs)
    summary["top"] = [
        {"query": r["query_text"], "kind": r["kind"], "train_text": r["train_text"], "score": r["score"]}
        for r in rows
        if r["rank"] == 1
    ]
    return summary


def _self(args, problem: Problem, settings: dict, work: str) -> dict:
    inverse, fit = _fit(problem, settings, work)
    train = _examples(problem.train)
    scores = chunk_store.saved_chunks(
        lambda start: influence.self_score_blocks(
            problem.loss_fn,
            problem.params,
            train,
            inverse,
            chunk_size=settings["chunk_size"],
            start=start,
            mesh=problem.mesh,
        ),
        work,
        "self",
        problem.train.num_examples,
        settings["chunk_size"],
        not args.no_progress,
    )
    order = np.argsort(-scores)[: args.top_k]
    rows = [
        {
            "rank": rank + 1,
            "train_index": int(j),
            "train_id": str(problem.train.ids[j]),
            "train_text": str(problem.train.texts[j]),
            "flipped": bool(problem.train.flipped[j]),
            "score": float(scores[j]),
        }
        for rank, j in enumerate(order)
    ]
    flipped = problem.train.flipped
    extra = {}
    if flipped.any():  # how many flipped labels the top 10% by self-influence holds
        extra["flipped_recall_at_10_percent"] = influence.flipped_label_recall(scores, flipped, fraction=0.1)
    outputs = {"self_scores.npy": lambda f: np.save(f, scores), **_factor_outputs(work)}
    return _finish(args, problem, settings, {**fit, **extra}, rows, outputs)


def _validate(args, problem: Problem, settings: dict, work: str) -> dict:
    """Predicted against actual changes of the query losses (Pearson, Spearman), the identity baseline beside.

    Convex task: exact leave-one-out retraining (:func:`hvpopt.influence.leave_one_out_changes`)
    from the exact optimum. Otherwise: the proximal Bregman response of each removed example on
    the curvature examples (:func:`hvpopt.influence.proximal_bregman_changes`). One removed
    example per call, so that Ctrl-C stops between them.
    """
    task, n = problem.task, problem.train.num_examples
    train = _examples(problem.train)
    convex = task.convex
    if convex:  # the exact optimum, not the checkpoint's, and the curvature of the whole training set
        optimum = influence.retrain(problem.loss_fn, problem.params, train, l2=task.l2).params
        problem = dataclasses.replace(problem, params=optimum)
        settings = {**settings, "curvature_examples": n}
    params = problem.params
    queries = problem.queries
    inverse, fit = _fit(problem, settings, work)
    scores = lambda **method: np.asarray(
        influence.pairwise_scores(
            problem.loss_fn,
            params,
            train,
            _examples(queries),
            chunk_size=settings["chunk_size"],
            mesh=problem.mesh,
            **method,
        )
    )
    predicted, identity = scores(inverse=inverse), scores(method="identity")
    removed = np.sort(np.random.default_rng(settings["seed"]).choice(n, min(args.validate_examples, n), replace=False))
    if convex:
        changes = lambda j: influence.leave_one_out_changes(
            problem.loss_fn, params, train, _examples(queries), [j], l2=task.l2
        )
    else:
        subset = _examples(_curvature_subset(problem, settings))
        changes = lambda j: influence.proximal_bregman_changes(
            problem.loss_fn,
            problem.model,
            params,
            subset,
            train,
            _examples(queries),
            [j],
            damping=settings["damping"],
            maxiter=settings["cg_iterations"],
        )
    bar = Progress(len(removed), "retrain" if convex else "response", unit="examples") if not args.no_progress else None
    actual = []
    for j in removed:
        interrupts.check_interrupt()  # a safe point: between retrainings
        actual.append(np.asarray(changes(j))[:, 0])
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    actual = np.stack(actual, axis=1)
    identity_agreement = influence.agreement(identity[:, removed], actual)
    report = {
        "reference": "leave-one-out retraining" if convex else "proximal Bregman response",
        "examples_removed": len(removed),
        "queries": queries.num_examples,
        **influence.agreement(predicted[:, removed], actual),
        **{f"identity_{name}": value for name, value in identity_agreement.items()},
    }
    pairs = [
        {
            "query_id": str(queries.ids[q]),
            "train_id": str(problem.train.ids[j]),
            "predicted": float(predicted[q, j]),
            "actual": float(actual[q, k]),
        }
        for q in range(queries.num_examples)
        for k, j in enumerate(removed)
    ]
    outputs = {
        "validation.json": lambda f: f.write(json.dumps({**report, "pairs": pairs}, indent=2).encode()),
        **_factor_outputs(work),
    }
    return _finish(args, problem, settings, {**fit, **report}, None, outputs)


def _lds(args, problem: Problem, settings: dict, work: str) -> dict:
    """The linear datamodeling score of each ``--method`` and of identity (Park et al. 2023).

    The scores are those of the checkpoint's parameters; the subset models are
    the checkpoint's own training run (:func:`_recipe`) on each subset's examples
    (:func:`hvpopt.influence.datamodel_losses`), each kept in the work folder as
    it finishes, so that Ctrl-C stops between retrainings and the same command resumes.
    """
    lds, n = settings["lds"], problem.train.num_examples
    queries = problem.queries
    scores, fits = {}, {}
    for method in dict.fromkeys([*lds["methods"], "identity"]):
        scores[method], fits[method] = _lds_scores(problem, {**settings, "method": method}, queries, work)
    subsets = influence.datamodel_subsets(n, lds["subsets"], fraction=lds["fraction"], seed=settings["seed"])
    bar = Progress(subsets.shape[0] * lds["seeds"], "retrain", unit="models") if not args.no_progress else None
    query_losses = jax.jit(jax.vmap(problem.loss_fn, in_axes=(None, 0)))
    start = time.perf_counter()
    losses = influence.datamodel_losses(
        _subset_training(problem, settings, work, bar),
        lambda params: query_losses(params, _examples(queries)),
        subsets,
        seeds=lds["seeds"],
    )
    if bar:
        bar.close()
    results = {method: influence.linear_datamodeling_score(s, subsets, losses) for method, s in scores.items()}
    report = {
        "metric": "lds",
        "subsets": lds["subsets"],
        "seeds": lds["seeds"],
        "fraction": lds["fraction"],
        "subset_size": lds["subset_size"],
        "queries": queries.num_examples,
        "query_ids": queries.ids.tolist(),
        "recipe": {
            "train": dataclasses.asdict(_recipe(problem, settings)),
            "retraining": "from the task's initialisation, on the subset's examples only; training seed s "
            "(0 to seeds - 1) adds s to the task's seed (the initialisation) and to the batch-order seed",
        },
        "methods": {
            method: {
                "mean": result.mean,
                "standard_error": _finite_or_none(result.standard_error),
                "per_query": [_finite_or_none(value) for value in result.per_query],
                "num_excluded": result.num_excluded,
                "fit": fits[method],
            }
            for method, result in results.items()
        },
    }
    outputs = {
        "lds.json": lambda f: f.write(json.dumps(report, indent=2).encode()),
        "lds_subsets.npy": lambda f: np.save(f, subsets),
        "lds_losses.npy": lambda f: np.save(f, losses),
    }
    diagnostics = {key: report[key] for key in ("subsets", "seeds", "subset_size", "queries")}
    summary = _finish(
        args, problem, settings, {**diagnostics, "retrain_seconds": time.perf_counter() - start}, None, outputs
    )
    summary["lds"] = [
        {"method": method, "mean": result.mean, "standard_error": _finite_or_none(result.standard_error)}
        for method, result in results.items()
    ]
    return summary


def _lds_scores(problem: Problem, settings: dict, queries: Dataset, work: str) -> tuple[np.ndarray, dict]:
    """One method's scores of every training example on the queries, kept in ``work/<method>``."""
    folder = os.path.join(work, settings["method"])
    saved, saved_fit = os.path.join(folder, "scores.npy"), os.path.join(folder, "scores-fit.json")
    if os.path.exists(saved):
        return np.load(saved, allow_pickle=False), chunk_store.read_json(saved_fit)
    os.makedirs(folder, exist_ok=True)
    inverse, fit = _fit(problem, settings, folder)
    scores = np.asarray(
        influence.pairwise_scores(
            problem.loss_fn,
            problem.params,
            _examples(problem.train),
            _examples(queries),
            inverse=inverse,
            chunk_size=settings["chunk_size"],
            mesh=problem.mesh,
        )
    )
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            f"the {settings['method']} scores are not finite (the curvature solve failed); raise --damping."
        )
    chunk_store.write_json(saved_fit, fit)  # first: the scores mark the method as done
    files.write_atomically(saved, lambda file: np.save(file, scores))
    interrupts.check_interrupt()  # a safe point: the scores are saved
    return scores, fit


def _subset_training(problem: Problem, settings: dict, work: str, bar: Progress | None) -> Callable:
    """``retrain(indices, seed) -> params``: the recipe's training on those examples, kept in ``work/retrained``.

    A model already in the folder (an earlier run's, interrupted) is loaded, not trained again.
    """
    task, options = problem.task, _recipe(problem, settings)
    options = dataclasses.replace(options, eval_every=options.steps)  # one evaluation, at the end: the same run
    folder = os.path.join(work, "retrained")
    os.makedirs(folder, exist_ok=True)
    treedef = jax.tree.structure(task.params)
    initial = {}  # training seed -> the initial parameters

    def retrain(indices: np.ndarray, seed: int):
        path = os.path.join(folder, f"subset-{chunk_store.content_sha256(indices)[:16]}-seed-{seed}.npz")
        if not os.path.exists(path):
            interrupts.check_interrupt()  # a safe point: between retrainings
            if seed not in initial:
                initial[seed] = _initial_params(task, seed)
            subset = dataclasses.replace(task, train=problem.train.take(indices))
            batch = options.batch_size or subset.train.num_examples
            mesh = problem.mesh if problem.mesh is not None and batch % problem.mesh.size == 0 else None
            shifted = dataclasses.replace(options, seed=(options.seed + seed) % _checks.SEED_LIMIT)
            try:
                result = training.train(subset, shifted, params=initial[seed], mesh=mesh)
            except training.TrainingDiverged as error:
                raise ValueError(f"retraining on a subset of {len(indices)} examples (seed {seed}): {error}") from None
            if result.interrupted:
                raise KeyboardInterrupt  # half a model is not kept
            leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(result.params)]
            files.write_atomically(path, lambda file: np.savez(file, *leaves))
        if bar:
            bar.update(1)
        with np.load(path, allow_pickle=False) as saved:
            return jax.tree.unflatten(treedef, [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(saved.files))])

    return retrain


def _initial_params(task: tasks.Task, seed: int):
    """Training seed ``seed``'s initialisation: the task's own for 0, else that of the task's seed plus ``seed``."""
    if seed == 0:
        return task.params
    config = {**task.config, "seed": (task.config["seed"] + seed) % _checks.SEED_LIMIT}
    params = tasks.make_task(**config).params
    _checks.check_like("the re-seeded initial parameters", params, "the task's", task.params)
    return params


def _recipe(problem: Problem, settings: dict) -> training.TrainOptions:
    """The training options the checkpoint records: how each subset model of ``--metric lds`` is trained."""
    where = problem.source.get("checkpoint", "the checkpoint")
    if settings["lds"]["recipe"] is None:
        raise ValueError(
            f"validate --metric lds repeats the checkpoint's own training on each subset, and {where} records no "
            "training options: train it with 'hvpopt train'."
        )
    try:
        return training.TrainOptions(**settings["lds"]["recipe"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: the training options it records do not build: {error}") from None


def _check_validate(problem: Problem, settings: dict) -> None:
    if problem.task is None:
        raise ValueError("validate needs a checkpoint or the built-in default (it retrains or re-solves the task).")
    if settings["metric"] == "lds":
        options = _recipe(problem, settings)
        lds = settings["lds"]
        if options.batch_size is not None and options.batch_size > lds["subset_size"]:
            raise ValueError(
                f"--fraction {lds['fraction']:g} leaves {lds['subset_size']} training examples per subset, fewer "
                f"than the recipe's batch size {options.batch_size}: raise --fraction or --train-examples."
            )
    elif problem.task.convex:
        if abs(settings["damping"] - problem.task.l2) > 1e-12:  # (Gauss-Newton = Hessian here)
            raise ValueError(
                f"validate compares with retraining the L2-penalised objective: use --damping "
                f"{problem.task.l2:g}, the task's L2 penalty."
            )
    else:
        needed = [
            fix
            for fix, wrong in (
                ("--curvature ggn", settings["curvature"] != "ggn"),
                ("--damping > 0", not settings["damping"] > 0),
            )
            if wrong
        ]
        if needed:
            raise ValueError(
                "validate on a non-convex task compares with the proximal Bregman response, which "
                f"Gauss-Newton influence estimates: use {' and '.join(needed)}."
            )


# ---------------------------------------------------------------- writing


def _top_rows(scores: np.ndarray, problem: Problem, k: int) -> list[dict]:
    rows = []
    for q in range(scores.shape[0]):
        order = np.argsort(-scores[q])
        for kind, picked in (("proponent", order[:k]), ("opponent", order[::-1][:k])):
            for rank, j in enumerate(picked, start=1):
                rows.append(
                    {
                        "query_index": q,
                        "query_id": str(problem.queries.ids[q]),
                        "query_text": str(problem.queries.texts[q]),
                        "kind": kind,
                        "rank": rank,
                        "train_index": int(j),
                        "train_id": str(problem.train.ids[j]),
                        "train_text": str(problem.train.texts[j]),
                        "score": float(scores[q, j]),
                    }
                )
    return rows


def _finish(args, problem: Problem, settings: dict, diagnostics: dict, rows, outputs: dict) -> dict:
    os.makedirs(args.out, exist_ok=True)
    if rows:
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        outputs = {
            **outputs,
            "top_k.csv": lambda f: f.write(table.getvalue().encode()),
            "top_k.jsonl": lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()),
        }
    for name, write in outputs.items():
        files.write_atomically(os.path.join(args.out, name), write)
    metadata = {
        **{k: v for k, v in settings.items() if not k.endswith("sha256")},
        "sign_convention": SIGN_CONVENTION,
        "problem": problem.description,
        "num_queries": None if problem.queries is None else problem.queries.num_examples,
        "query_ids": None if problem.queries is None else problem.queries.ids.tolist(),
        "diagnostics": diagnostics,
        "files": sorted(outputs),
        "devices": problem.mesh.size,
        "versions": {"hvpopt": hvpopt.__version__, "jax": jax.__version__},
        "seconds": {**args.clock.seconds(), "compilation_cache": jax.config.jax_compilation_cache_dir},
        "memory": {**(args.memory or {}), "measured_peak_bytes": _peak_resident_bytes()},
    }
    chunk_store.write_json(os.path.join(args.out, METADATA), metadata)
    return {
        "out": args.out,
        "action": args.action,
        "method": settings["method"],
        "curvature": settings["curvature"],
        "damping": settings["damping"],
        **({"rank": settings["rank"]} if settings["method"] == "arnoldi" else {}),
        "train_examples": problem.train.num_examples,
        **{k: v for k, v in diagnostics.items() if isinstance(v, (int, float, str))},
    }


def _format(summary: dict) -> str:
    lines = []
    for name, value in summary.items():
        if name == "lds":
            for row in value:
                error = "n/a" if row["standard_error"] is None else f"{row['standard_error']:.3f}"
                lines.append(f"{'lds ' + row['method']:<30}{row['mean']:+.3f} +/- {error}")
        elif name == "top":
            for row in value:
                lines.append(
                    f"top {row['kind']:<10} {row['score']:+.3e}  {row['train_text']!r}  for query {row['query']!r}"
                )
        else:
            lines.append(f"{name:<30}{value:.4g}" if isinstance(value, float) else f"{name:<30}{value}")
    return "\n".join(lines)


def _solver_summary(solver: dict) -> dict:
    summary = {}
    for name, values in solver.items():
        values = np.asarray(values)
        if values.dtype != bool:
            summary[f"max_{name}"] = float(values.max())
        elif name == "converged":
            summary["all_converged"] = bool(values.all())
        else:  # a failure flag: one query is enough
            summary[f"any_{name}"] = bool(values.any())
    return summary


def _examples(dataset: Dataset):
    return dataset.inputs, dataset.targets


def _finite_or_none(value: float) -> float | None:
    """``value``, or None (JSON's null) where it is NaN or infinite."""
    return float(value) if np.isfinite(value) else None


def _jsonable(value):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
