"""Autodiff modes: Jacobian cost of forward vs reverse mode, and HVP modes vs the dense Hessian.

Two claims of the library's docstrings are measured on this machine:

1. ``hvpopt.jacobians.py``: for ``f: R^n -> R^m`` forward mode (``jax.jacfwd``)
   costs about ``n`` passes and reverse mode (``jax.jacrev``) about ``m``, so
   forward should win for ``n < m`` and reverse for ``n > m``; ``hvpopt.jacobian``
   (``mode="auto"``) picks forward exactly when ``n < m``. We time both on
   ``f(x) = tanh(W2 @ tanh(W1 @ x))`` (``W1: [h, n]``, ``W2: [m, h]``), sweeping
   ``n`` with ``m`` fixed and ``m`` with ``n`` fixed, find where the faster side
   changes, and count how often the automatic choice was the faster one.

   Flop count of this family (per Jacobian, matmuls only): forward pushes ``n``
   tangents through both layers, ``h*n*n + m*h*n``; reverse pulls ``m``
   cotangents back, ``h*m*m + n*h*m``. Their difference is ``h*(n-m)*(n+m)``,
   so in flops the crossover is exactly ``n == m``.

2. ``hvpopt/curvature/hvp.py``: a Hessian-vector product costs a small
   constant times one gradient, in each of the three orderings, while the dense
   Hessian costs ``P`` products (time ~ ``P^2`` on a fixed batch). We time
   ``hvpopt.hvp`` in modes ``fwd_rev``, ``rev_rev``, ``rev_fwd``, the gradient and
   ``jax.hessian`` of the raveled parameters on an MLP
   ``(d_in, w, w, d_out)`` whose width grows so the parameter count ``P``
   spans about 1e2..1e5, and fit log-log slopes of time against ``P``.

Timing: every function is ``jax.jit``-ed and compiled ahead of time
(``lower().compile()``, reported separately as ``compile_s``); each sample runs
the compiled executable ``number`` times, blocking on every result
(``jax.block_until_ready``), after one warm-up call; the reported time is the
median over ``repeats`` samples (min and max are kept too). The candidates at
one size are sampled round robin, so load from other processes (the machine
may be shared) hits them alike; the load average is recorded in the JSON, and
crossover and pick counts are also computed from the per-candidate minimum
(``*_by_min``), the estimate least sensitive to such load.

Usage::

    python experiments/autodiff_modes.py                # full run, ~2-3.5 min on 2 CPU cores
    python experiments/autodiff_modes.py --quick --out-dir /tmp/am   # smoke run, < 1 min

Writes ``autodiff_modes.json`` and ``autodiff_modes.png`` to ``--out-dir``
(default ``experiments/results``).
"""

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt.jacobians import jacobian_mode_prefers_forward

# Relative tolerance under which two timings count as a tie for "correct pick".
TIE_TOLERANCE = 0.05


# --------------------------------------------------------------------------- timing


def compile_and_time_all(fns, *, repeats, target_sample_s, max_number=1000):
    """Compiles each ``jax.jit(fn)`` and times the executables, interleaved.

    ``fns`` maps a name to ``(fn, args)``. Each function is compiled ahead of
    time (``compile_s``), called once to warm up and once more to choose
    ``number``, the calls per sample (about ``target_sample_s`` of work). Then
    ``repeats`` rounds each take one sample of every function in turn (round
    robin, each sample of a cheap function after one untimed call), so slow
    drifts and load from other processes hit all candidates alike. Returns, per name, compile_s, median_s, min_s, max_s,
    repeats,
    number, and the output of one call (for correctness checks).
    """
    prepared = {}
    for name, (fn, args) in fns.items():
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(*args))  # warm-up
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))  # calibration
        one_s = time.perf_counter() - t0
        number = int(min(max_number, max(1, math.ceil(target_sample_s / max(one_s, 1e-7)))))
        prepared[name] = (compiled, args, compile_s, number, out)

    reps = repeats if isinstance(repeats, dict) else {name: repeats for name in fns}
    samples = {name: [] for name in fns}
    for r in range(max(reps.values())):
        for name, (compiled, args, _, number, _) in prepared.items():
            if r >= reps[name]:
                continue
            if number > 1:  # one untimed call: recover from the previous candidate's sample
                jax.block_until_ready(compiled(*args))
            t0 = time.perf_counter()
            for _ in range(number):
                jax.block_until_ready(compiled(*args))
            samples[name].append((time.perf_counter() - t0) / number)
    return {
        name: {
            "compile_s": compile_s,
            "median_s": float(np.median(samples[name])),
            "min_s": float(np.min(samples[name])),
            "max_s": float(np.max(samples[name])),
            "repeats": reps[name],
            "number": number,
            "out": out,
        }
        for name, (_, _, compile_s, number, out) in prepared.items()
    }


def dispatch_floor(repeats, target_sample_s):
    """Time of a jitted call that does almost nothing: the per-call overhead floor."""
    rec = compile_and_time_all(
        {"floor": (lambda x: x + 1.0, (jnp.zeros((), jnp.float32),))}, repeats=repeats, target_sample_s=target_sample_s
    )
    return _strip(rec["floor"])


def _strip(record):
    return {k: v for k, v in record.items() if k != "out"}


# --------------------------------------------------------------------- claim 1: Jacobians


def two_layer(x, w1, w2):
    """f(x) = tanh(W2 @ tanh(W1 @ x)), R^n -> R^m."""
    return jnp.tanh(w2 @ jnp.tanh(w1 @ x))


def jacobian_point(n, m, h, *, repeats, target_sample_s, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 1000 * n + m), 3)
    x = jax.random.normal(k1, (n,), jnp.float32)
    w1 = jax.random.normal(k2, (h, n), jnp.float32) / math.sqrt(n)
    w2 = jax.random.normal(k3, (m, h), jnp.float32) / math.sqrt(h)
    args = (x, w1, w2)

    fns = {
        "fwd": (lambda x, w1, w2: jax.jacfwd(two_layer)(x, w1, w2), args),
        "rev": (lambda x, w1, w2: jax.jacrev(two_layer)(x, w1, w2), args),
        "auto": (lambda x, w1, w2: hvpopt.jacobian(two_layer, x, w1, w2, mode="auto"), args),
    }
    timings = compile_and_time_all(fns, repeats=repeats, target_sample_s=target_sample_s)
    ref = np.asarray(timings["rev"]["out"])
    max_abs_diff = {name: float(np.max(np.abs(np.asarray(t["out"]) - ref))) for name, t in timings.items()}
    assert ref.shape == (m, n), ref.shape

    prefers_forward = bool(jacobian_mode_prefers_forward(two_layer, x, w1, w2))
    chosen = "fwd" if prefers_forward else "rev"
    return {
        "n": n,
        "m": m,
        "h": h,
        "flops_fwd": 2 * (h * n * n + m * h * n),
        "flops_rev": 2 * (h * m * m + n * h * m),
        **{f"{k}": _strip(v) for k, v in timings.items()},
        "max_abs_diff_vs_rev": max_abs_diff,
        "auto_prefers_forward": prefers_forward,
        "auto_choice": chosen,
        **_comparison(timings, chosen, "median_s"),
        "by_min": _comparison(timings, chosen, "min_s"),
    }


def _comparison(timings, chosen, stat):
    """Which of fwd/rev was faster by ``stat``, and what the automatic choice cost."""
    other = "rev" if chosen == "fwd" else "fwd"
    t_fwd, t_rev = timings["fwd"][stat], timings["rev"][stat]
    best = "fwd" if t_fwd < t_rev else "rev"
    t_best = min(t_fwd, t_rev)
    t_chosen = timings[chosen][stat]
    return {
        "faster": best,
        "fwd_over_rev": t_fwd / t_rev,
        "pick_correct_strict": chosen == best,
        "pick_correct_within_tol": t_chosen <= (1 + TIE_TOLERANCE) * t_best,
        "time_lost_s": t_chosen - t_best,
        "time_lost_rel": t_chosen / t_best - 1.0,
        "other_choice_time_s": timings[other][stat],
        "auto_over_chosen": timings["auto"][stat] / t_chosen,
    }


def crossover(points, size_key, fixed, *, rev_wins_when_large, view=lambda p: p):
    """Where the faster mode changes along a sweep of ``size_key``.

    For the n-sweep reverse should win for large n (``rev_wins_when_large``); for
    the m-sweep forward should win for large m. Returns the first size where the
    large-size winner wins, the first size from which it wins at every larger
    size (robust to one noisy point), and a log-linear interpolation of
    ``fwd/rev = 1`` between the two points that bracket the stable crossover.
    """
    sizes = np.array([p[size_key] for p in points], float)
    ratio = np.array([view(p)["fwd_over_rev"] for p in points])  # > 1: reverse faster
    large_wins = ratio > 1 if rev_wins_when_large else ratio < 1
    first = next((int(s) for s, w in zip(sizes, large_wins) if w), None)
    stable_idx = None
    for i in range(len(sizes)):
        if large_wins[i:].all():
            stable_idx = i
            break
    stable = int(sizes[stable_idx]) if stable_idx is not None else None
    interp = None
    if stable_idx is not None and stable_idx > 0:
        la, lb = math.log(sizes[stable_idx - 1]), math.log(sizes[stable_idx])
        ra, rb = math.log(ratio[stable_idx - 1]), math.log(ratio[stable_idx])
        if ra != rb:
            interp = float(math.exp(la + (0 - ra) * (lb - la) / (rb - ra)))
    winner = "rev" if rev_wins_when_large else "fwd"
    return {
        "swept": size_key,
        "fixed": fixed,
        "large_size_winner": winner,
        "first_size_where_large_winner_wins": first,
        "stable_crossover_size": stable,
        "interpolated_crossover_size": interp,
        "stable_crossover_over_fixed": stable / fixed if stable else None,
        "interpolated_crossover_over_fixed": interp / fixed if interp else None,
    }


def pick_summary(points, view=lambda p: p):
    """How often the automatic choice was the faster side, and the time lost when not."""
    views = [dict(view(p), n=p["n"], m=p["m"], auto_choice=p["auto_choice"]) for p in points]
    points = views
    wrong = [p for p in points if not p["pick_correct_strict"]]
    wrong_tol = [p for p in points if not p["pick_correct_within_tol"]]
    return {
        "points": len(points),
        "correct_strict": sum(p["pick_correct_strict"] for p in points),
        "correct_within_tol": sum(p["pick_correct_within_tol"] for p in points),
        "tie_tolerance_rel": TIE_TOLERANCE,
        "wrong_picks": [
            {
                "n": p["n"],
                "m": p["m"],
                "chose": p["auto_choice"],
                "time_lost_s": p["time_lost_s"],
                "time_lost_rel": p["time_lost_rel"],
                "fwd_over_rev": p["fwd_over_rev"],
            }
            for p in wrong
        ],
        "total_time_lost_s": float(sum(p["time_lost_s"] for p in wrong)),
        "max_time_lost_rel": float(max((p["time_lost_rel"] for p in wrong), default=0.0)),
        "wrong_beyond_tol": len(wrong_tol),
        "median_auto_over_chosen": float(np.median([p["auto_over_chosen"] for p in points])),
    }


def by_min(point):
    return point["by_min"]


def run_jacobians(cfg, log):
    h, m_fixed, n_fixed = cfg["h"], cfg["m_fixed"], cfg["n_fixed"]
    n_sweep, m_sweep = [], []
    for n in cfg["sizes"]:
        p = jacobian_point(n, m_fixed, h, repeats=cfg["jac_repeats"], target_sample_s=cfg["target_sample_s"])
        n_sweep.append(p)
        log(
            f"  n={n:5d} m={m_fixed}: fwd {p['fwd']['median_s'] * 1e3:8.3f} ms  "
            f"rev {p['rev']['median_s'] * 1e3:8.3f} ms"
            f"  auto {p['auto']['median_s'] * 1e3:8.3f} ms  (auto={p['auto_choice']}, faster={p['faster']})"
        )
    for m in cfg["sizes"]:
        p = jacobian_point(n_fixed, m, h, repeats=cfg["jac_repeats"], target_sample_s=cfg["target_sample_s"])
        m_sweep.append(p)
        log(
            f"  n={n_fixed} m={m:5d}: fwd {p['fwd']['median_s'] * 1e3:8.3f} ms  "
            f"rev {p['rev']['median_s'] * 1e3:8.3f} ms"
            f"  auto {p['auto']['median_s'] * 1e3:8.3f} ms  (auto={p['auto_choice']}, faster={p['faster']})"
        )
    return {
        "function": "f(x) = tanh(W2 @ tanh(W1 @ x)), W1 [h, n], W2 [m, h], float32",
        "h": h,
        "vary_n": {
            "m": m_fixed,
            "points": n_sweep,
            "crossover": crossover(n_sweep, "n", m_fixed, rev_wins_when_large=True),
            "picks": pick_summary(n_sweep),
            "crossover_by_min": crossover(n_sweep, "n", m_fixed, rev_wins_when_large=True, view=by_min),
            "picks_by_min": pick_summary(n_sweep, by_min),
        },
        "vary_m": {
            "n": n_fixed,
            "points": m_sweep,
            "crossover": crossover(m_sweep, "m", n_fixed, rev_wins_when_large=False),
            "picks": pick_summary(m_sweep),
            "crossover_by_min": crossover(m_sweep, "m", n_fixed, rev_wins_when_large=False, view=by_min),
            "picks_by_min": pick_summary(m_sweep, by_min),
        },
        "picks_all": pick_summary(n_sweep + m_sweep),
        "picks_all_by_min": pick_summary(n_sweep + m_sweep, by_min),
    }


# ----------------------------------------------------------------------- claim 2: HVPs


def mlp_param_count(d_in, w, d_out):
    return d_in * w + w + w * w + w + w * d_out + d_out


def hvp_point(width, cfg, *, dense):
    d_in, d_out, batch = cfg["d_in"], cfg["d_out"], cfg["batch"]
    model_fn, params = hvpopt.testbed.models.mlp((d_in, width, width, d_out), seed=0)
    kx, ky, kv = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (batch, d_in), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, d_out)
    flat, unravel = ravel_pytree(params)
    P = int(flat.size)
    v = unravel(jax.random.normal(kv, (P,), jnp.float32))

    def loss(p, x, y):
        return hvpopt.losses.softmax_cross_entropy(model_fn(p, x), y)

    fns = {
        "grad": (lambda p, v, x, y: jax.grad(loss)(p, x, y), (params, v, x, y)),
        **{
            f"hvp_{mode}": (
                (lambda mode: lambda p, v, x, y: hvpopt.hvp(loss, p, v, x, y, mode=mode))(mode),
                (params, v, x, y),
            )
            for mode in ("fwd_rev", "rev_rev", "rev_fwd")
        },
    }
    timings = compile_and_time_all(fns, repeats=cfg["hvp_repeats"], target_sample_s=cfg["target_sample_s"])
    if dense:  # timed on its own: its large buffers would disturb the cheap calls after it
        loss_flat = lambda theta, x, y: loss(unravel(theta), x, y)
        timings |= compile_and_time_all(
            {"dense_hessian": (lambda theta, x, y: jax.hessian(loss_flat)(theta, x, y), (flat, x, y))},
            repeats=cfg["dense_repeats"],
            target_sample_s=cfg["target_sample_s"],
        )

    # Correctness: the three HVP modes agree with each other (and with H @ v when dense).
    ref = ravel_pytree(timings["hvp_fwd_rev"]["out"])[0]
    scale = float(jnp.max(jnp.abs(ref))) or 1.0
    rel_diff = {
        name: float(jnp.max(jnp.abs(ravel_pytree(timings[name]["out"])[0] - ref)) / scale)
        for name in ("hvp_rev_rev", "hvp_rev_fwd")
    }
    if dense:
        hv = timings["dense_hessian"]["out"] @ ravel_pytree(v)[0]
        rel_diff["dense_hessian_times_v"] = float(jnp.max(jnp.abs(hv - ref)) / scale)

    t_grad = timings["grad"]["median_s"]
    # Rough matmul flops of one gradient: forward 2*B*W, backward about twice that
    # (W = weights, biases ignored); shows how matmul throughput grows with width.
    weights = d_in * width + width * width + width * d_out
    grad_flops = 6 * batch * weights
    return {
        "width": width,
        "P": P,
        "grad_matmul_flops_est": grad_flops,
        "grad_gflops_per_s_est": grad_flops / t_grad / 1e9,
        **{name: _strip(t) for name, t in timings.items()},
        "ratio_to_grad": {name: t["median_s"] / t_grad for name, t in timings.items() if name != "grad"},
        # dense Hessian time per column, in units of one fwd_rev HVP
        **(
            {
                "dense_over_P_times_hvp_fwd_rev": timings["dense_hessian"]["median_s"]
                / (P * timings["hvp_fwd_rev"]["median_s"])
            }
            if dense
            else {}
        ),
        "max_rel_diff_vs_fwd_rev": rel_diff,
    }


def loglog_slope(points, key, p_min=0, stat="median_s"):
    """Least-squares slope of log(time) against log(P), over points with P >= p_min."""
    pts = [(p["P"], p[key][stat]) for p in points if key in p and p["P"] >= p_min]
    if len(pts) < 2:
        return None
    P, t = np.log(np.array(pts, float)).T
    slope, intercept = np.polyfit(P, t, 1)
    return {
        "slope": float(slope),
        "intercept_log_s": float(intercept),
        "n_points": len(pts),
        "P_min": int(min(p for p, _ in pts)),
        "P_max": int(max(p for p, _ in pts)),
    }


def run_hvps(cfg, log):
    points = []
    for width in cfg["widths"]:
        P = mlp_param_count(cfg["d_in"], width, cfg["d_out"])
        p = hvp_point(width, cfg, dense=P <= cfg["dense_max_P"])
        assert p["P"] == P, (p["P"], P)
        points.append(p)
        msg = "  ".join(
            f"{k} {p[k]['median_s'] * 1e3:8.3f}ms"
            for k in ("grad", "hvp_fwd_rev", "hvp_rev_rev", "hvp_rev_fwd", "dense_hessian")
            if k in p
        )
        log(f"  w={width:4d} P={P:7d}: {msg}  (grad ~{p['grad_gflops_per_s_est']:.1f} GFLOP/s)")

    keys = ("grad", "hvp_fwd_rev", "hvp_rev_rev", "hvp_rev_fwd", "dense_hessian")
    p_fit = cfg["fit_P_min"]
    slopes = {k: loglog_slope(points, k) for k in keys}
    slopes_large = {k: loglog_slope(points, k, p_min=p_fit[k]) for k in keys}
    slopes_by_min = {k: loglog_slope(points, k, stat="min_s") for k in keys}
    slopes_large_by_min = {k: loglog_slope(points, k, p_min=p_fit[k], stat="min_s") for k in keys}
    ratios = {}
    for k in ("hvp_fwd_rev", "hvp_rev_rev", "hvp_rev_fwd"):
        r = [p["ratio_to_grad"][k] for p in points]
        r_large = [p["ratio_to_grad"][k] for p in points if p["P"] >= p_fit[k]]
        ratios[k] = {
            "median_all": float(np.median(r)),
            "min_all": float(np.min(r)),
            "max_all": float(np.max(r)),
            "median_large_P": float(np.median(r_large)) if r_large else None,
            "at_largest_P": float(r[-1]),
            "median_all_by_min": float(np.median([p[k]["min_s"] / p["grad"]["min_s"] for p in points])),
        }
    dense_pts = [p for p in points if "dense_hessian" in p]
    return {
        "model": f"hvpopt.testbed.models.mlp(({cfg['d_in']}, w, w, {cfg['d_out']})), tanh",
        "loss": "hvpopt.losses.softmax_cross_entropy (mean over batch)",
        "batch": cfg["batch"],
        "dense_hessian": "jax.hessian (jacfwd of jacrev) of the loss of ravel_pytree(params)",
        "dense_max_P": cfg["dense_max_P"],
        "points": points,
        "slopes_all": slopes,
        "slopes_large_P": slopes_large,
        "slopes_all_by_min": slopes_by_min,
        "slopes_large_P_by_min": slopes_large_by_min,
        "fit_P_min_large": p_fit,
        "ratio_to_grad": ratios,
        "dense_over_hvp_fwd_rev_at_largest_dense_P": (
            dense_pts[-1]["dense_hessian"]["median_s"] / dense_pts[-1]["hvp_fwd_rev"]["median_s"] if dense_pts else None
        ),
    }


# ------------------------------------------------------------------------------ plot


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jac = results["jacobian"]
    floor_ms = results["dispatch_floor"]["median_s"] * 1e3
    fig, axes = plt.subplots(1, 3, figsize=(19, 8.2))
    styles = {"fwd": ("C0", "o", "-"), "rev": ("C3", "s", "-"), "auto": ("k", "x", ":")}
    labels = {"fwd": "jax.jacfwd", "rev": "jax.jacrev", "auto": 'hvpopt.jacobian (mode="auto")'}
    for ax, sweep, key, fixed_name in (
        (axes[0], jac["vary_n"], "n", "m"),
        (axes[1], jac["vary_m"], "m", "n"),
    ):
        pts = sweep["points"]
        xs = [p[key] for p in pts]
        for name in ("fwd", "rev", "auto"):
            c, mk, ls = styles[name]
            ax.plot(
                xs,
                [p[name]["median_s"] * 1e3 for p in pts],
                color=c,
                marker=mk,
                ls=ls,
                ms=7 if name == "auto" else 5,
                label=labels[name],
            )
        fixed = sweep[fixed_name]
        ax.axvline(fixed, color="gray", ls="--", lw=1, label=f"{key} = {fixed_name} = {fixed}")
        cross = sweep["crossover"]["interpolated_crossover_size"]
        cross_min = sweep["crossover_by_min"]["interpolated_crossover_size"]
        if cross:
            by_min = f"; by min time ~ {cross_min:.0f}" if cross_min else ""
            ax.axvline(cross, color="C2", ls="-.", lw=1, label=f"measured crossover ~ {cross:.0f} (median{by_min})")
        picks = sweep["picks"]
        ax.axhline(floor_ms, color="gray", ls=":", lw=1, label=f"per-call floor ({floor_ms * 1e3:.0f} us)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"{'input' if key == 'n' else 'output'} size {key}  ({fixed_name} = {fixed}, h = {jac['h']})")
        ax.set_ylabel("Jacobian time per call [ms]")
        panel = "(a)" if key == "n" else "(b)"
        ax.set_title(
            f"{panel} Jacobian of tanh(W2 tanh(W1 x)), vary {key}\n"
            f"auto picked faster side {picks['correct_strict']}/{picks['points']} "
            f"({picks['correct_within_tol']}/{picks['points']} within {int(TIE_TOLERANCE * 100)}%)"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)

    hv = results["hvp"]
    ax = axes[2]
    names = {
        "grad": ("gradient", "C7", "o"),
        "hvp_fwd_rev": ("HVP fwd_rev", "C0", "s"),
        "hvp_rev_rev": ("HVP rev_rev", "C1", "^"),
        "hvp_rev_fwd": ("HVP rev_fwd", "C2", "v"),
        "dense_hessian": ("dense Hessian (jax.hessian)", "C3", "D"),
    }
    for k, (label, c, mk) in names.items():
        pts = [p for p in hv["points"] if k in p]
        s_all, s_large = hv["slopes_all"][k], hv["slopes_large_P"][k]
        slope_txt = f"slope {s_all['slope']:.2f} all P" if s_all else ""
        if s_large:
            slope_txt += f", {s_large['slope']:.2f} P>={s_large['P_min']}"
        ax.plot(
            [p["P"] for p in pts],
            [p[k]["median_s"] * 1e3 for p in pts],
            color=c,
            marker=mk,
            label=f"{label} ({slope_txt})",
        )
    ax.axhline(floor_ms, color="gray", ls=":", lw=1, label=f"per-call floor ({floor_ms * 1e3:.0f} us)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"parameter count P  (MLP (d_in, w, w, d_out), batch {hv['batch']})")
    ax.set_ylabel("time per call [ms]")
    ax.set_title("(c) HVP modes, gradient and dense Hessian vs P\n(log-log slopes of time vs P in legend)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)

    fig.suptitle(
        f"hvpopt autodiff modes on {results['machine']['jax_devices'][0]} "
        f"({results['machine']['cpu_count']} CPU cores), float32, median of repeats, compile excluded",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def machine_info():
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {
            "jax": jax.__version__,
            "jaxlib": version("jaxlib"),
            "flax": version("flax"),
            "numpy": np.__version__,
            "optax": version("optax"),
            "matplotlib": version("matplotlib"),
            "hvpopt": getattr(hvpopt, "__version__", None),
        },
    }


def config(quick):
    if quick:
        return {
            "h": 128,
            "m_fixed": 128,
            "n_fixed": 128,
            "sizes": [16, 64, 128, 256, 1024],
            "jac_repeats": 3,
            "target_sample_s": 0.005,
            "d_in": 16,
            "d_out": 10,
            "batch": 128,
            "widths": [4, 16, 32, 128],
            "dense_max_P": 2000,
            "hvp_repeats": 3,
            "dense_repeats": 2,
            "fit_P_min": {
                "grad": 1000,
                "hvp_fwd_rev": 1000,
                "hvp_rev_rev": 1000,
                "hvp_rev_fwd": 1000,
                "dense_hessian": 300,
            },
        }
    return {
        "h": 256,
        "m_fixed": 256,
        "n_fixed": 256,
        # geometric 16..4096, denser around the expected crossover at 256
        "sizes": [16, 32, 64, 128, 181, 224, 256, 292, 362, 512, 1024, 2048, 4096],
        "jac_repeats": 9,
        "target_sample_s": 0.02,
        "d_in": 16,
        "d_out": 10,
        "batch": 512,
        # P = 16w + w^2 + 10w + 2w + 10: w=4 -> 138, w=40 -> 2730, w=300 -> 98410
        "widths": [4, 6, 9, 13, 19, 27, 40, 57, 80, 113, 160, 226, 300],
        "dense_max_P": 3000,
        "hvp_repeats": 9,
        "dense_repeats": 3,
        # the large-P fits start where compute, not per-op overhead, dominates
        "fit_P_min": {
            "grad": 10000,
            "hvp_fwd_rev": 10000,
            "hvp_rev_rev": 10000,
            "hvp_rev_fwd": 10000,
            "dense_hessian": 300,
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="small sweeps, few repeats (< 1 min)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config(args.quick)
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:6.1f}s] {s}", flush=True)

    results = {
        "experiment": "autodiff_modes",
        "quick": args.quick,
        "config": cfg,
        "machine": machine_info(),
        "timing_method": "jax.jit + lower().compile() (compile_s reported separately); one warm-up "
        "call; median over `repeats` samples, each the mean of `number` calls "
        "blocked with jax.block_until_ready",
    }
    log(f"devices {results['machine']['jax_devices']}, {results['machine']['cpu_count']} CPUs")
    results["dispatch_floor"] = dispatch_floor(cfg["hvp_repeats"], cfg["target_sample_s"])
    log(f"dispatch floor (jitted x + 1 on a scalar): {results['dispatch_floor']['median_s'] * 1e6:.1f} us")
    loadavg = {"start": os.getloadavg()}
    log(f"load average {loadavg['start']}")
    log("claim 1: Jacobian, forward vs reverse mode")
    results["jacobian"] = run_jacobians(cfg, log)
    loadavg["after_jacobian"] = os.getloadavg()
    log("claim 2: HVP modes vs dense Hessian")
    results["hvp"] = run_hvps(cfg, log)
    loadavg["end"] = os.getloadavg()
    log(f"load average {loadavg['end']}")
    results["load_average_1_5_15min"] = loadavg
    results["total_wall_s"] = time.perf_counter() - t_start

    json_path = args.out_dir / "autodiff_modes.json"
    png_path = args.out_dir / "autodiff_modes.png"
    json_path.write_text(json.dumps(results, indent=2))
    plot(results, png_path)

    jac, hv = results["jacobian"], results["hvp"]
    log("summary")
    for sweep, stat in (("vary_n", ""), ("vary_m", ""), ("vary_n", "_by_min"), ("vary_m", "_by_min")):
        c, p = jac[sweep]["crossover" + stat], jac[sweep]["picks" + stat]
        log(
            f"  {sweep}{stat or ' (median)'}: large-{c['swept']} winner {c['large_size_winner']}: "
            f"first win at {c['first_size_where_large_winner_wins']}, "
            f"stable from {c['stable_crossover_size']}, interpolated {c['interpolated_crossover_size']} "
            f"(x{c['interpolated_crossover_over_fixed']} of fixed {c['fixed']}); "
            f"auto correct {p['correct_strict']}/{p['points']} strict, "
            f"{p['correct_within_tol']}/{p['points']} within tol, "
            f"max loss {p['max_time_lost_rel']:.1%}"
        )
    for k in ("grad", "hvp_fwd_rev", "hvp_rev_rev", "hvp_rev_fwd", "dense_hessian"):
        s, sl = hv["slopes_all"][k], hv["slopes_large_P"][k]
        sm, slm = hv["slopes_all_by_min"][k], hv["slopes_large_P_by_min"][k]
        log(
            f"  slope {k:14s}: all {s['slope']:.2f}   P>={sl['P_min']}: {sl['slope']:.2f}"
            f"   (by min time: {sm['slope']:.2f}, {slm['slope']:.2f})"
        )
    for k, r in hv["ratio_to_grad"].items():
        log(
            f"  {k}/grad: median {r['median_all']:.2f} (large P {r['median_large_P']:.2f}, "
            f"at largest P {r['at_largest_P']:.2f})"
        )
    log(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
