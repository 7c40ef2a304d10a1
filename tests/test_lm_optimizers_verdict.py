"""experiments/lm_optimizers.py's verdict on hand-made runs: a reach that does not hold to the end, a
step too slow, or a seed mean that misses is no win. Cheap: no training."""

import importlib.util
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "lm_optimizers.py"


@pytest.fixture(scope="module")
def lm():
    spec = importlib.util.spec_from_file_location("lm_optimizers", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(optimizer, losses, *, seconds_per_step=0.1, seed=0, knobs=None, repeat=False):
    steps = [40 * (i + 1) for i in range(len(losses))]
    return {
        "model": "default",
        "optimizer": optimizer,
        "knobs": knobs or {"learning_rate": 1.0},
        "seed": seed,
        "steps": steps[-1],
        "diverged": False,
        "history": [{"step": s, "validation_loss": v} for s, v in zip(steps, losses)],
        "final_validation_loss": losses[-1],
        "seconds_per_step": seconds_per_step,
        "repeat": repeat,
    }


ADAMW = [3.0, 2.5, 2.2, 2.0, 1.9]  # 200 steps, final 1.9


def row_of(lm, runs, optimizer="kfac"):
    (row,) = [r for r in lm.verdict(runs, "default", [])["rows"] if r["optimizer"] == optimizer]
    return row


def test_a_reach_at_half_the_steps_and_time_that_holds_is_met(lm):
    runs = [run("adamw", ADAMW), run("kfac", [2.5, 1.85, 1.8, 1.7, 1.6], seconds_per_step=0.15)]
    row = row_of(lm, runs)
    assert row["steps_ratio"] == pytest.approx(80 / 200)
    assert row["seconds_ratio"] == pytest.approx(0.4 * 1.5)
    assert row["holds"] and row["met"]
    assert lm.verdict(runs, "default", [])["met"]


def test_a_reach_that_blows_up_later_is_not_met(lm):
    row = row_of(lm, [run("adamw", ADAMW), run("kfac", [2.5, 1.85, 1.8, 2.2, 1.95])])
    assert row["reached"] and row["steps_ratio"] == pytest.approx(0.4) and not row["holds"] and not row["met"]


def test_a_reach_in_few_steps_of_a_costly_step_is_not_met(lm):
    row = row_of(lm, [run("adamw", ADAMW), run("kfac", [2.5, 1.85, 1.8, 1.7, 1.6], seconds_per_step=0.3)])
    assert row["seconds_ratio"] == pytest.approx(1.2) and not row["met"]


def test_the_seed_mean_must_meet_the_target_too(lm):
    adamw = [run("adamw", ADAMW, repeat=True), *(run("adamw", ADAMW, seed=s, repeat=True) for s in (1, 2))]
    lucky = run("kfac", [2.5, 1.85, 1.8, 1.7, 1.6], repeat=True)
    unlucky = [run("kfac", [2.6, 2.3, 2.0, 1.95, 1.92], seed=s, repeat=True) for s in (1, 2)]
    row = row_of(lm, [*adamw, lucky, *unlucky])
    assert row["met"] is False and row["over_seeds"]["seeds"] == 3
    assert row["over_seeds"]["adamw_mean_final"] == pytest.approx(1.9)
    # The mean curve (2.567, 2.15, 1.933, 1.867, 1.813) first reaches 1.9 at step 160: 0.8x AdamW's steps.
    assert row["over_seeds"]["steps_ratio"] == pytest.approx(0.8)


def test_a_setting_of_another_knob_is_not_mixed_into_the_seeds(lm):
    runs = [run("adamw", ADAMW, repeat=True), run("adamw", ADAMW, seed=1, repeat=True)]
    runs += [run("kfac", [2.5, 1.85, 1.8, 1.7, 1.6], repeat=True)]
    runs += [run("kfac", [3.0, 3.0, 3.0, 3.0, 3.0], seed=1, repeat=True, knobs={"learning_rate": 9.0})]
    losses, _ = lm.setting_curves(runs, lm.best(runs, "default", "kfac"))
    assert losses.shape == (1, 5)


def test_a_quicker_setting_with_a_worse_final_loss_is_judged_and_reseeded_too(lm):
    best_final = run("kfac", [2.6, 2.3, 2.0, 1.8, 1.5], seconds_per_step=0.3)  # reaches at 160, 2.4x the time
    quick = run("kfac", [2.5, 1.85, 1.8, 1.7, 1.6], seconds_per_step=0.15, knobs={"learning_rate": 2.0})
    runs = [run("adamw", ADAMW), best_final, quick]
    row = row_of(lm, runs)
    assert row["knobs"] == {"learning_rate": 1.0} and not row["met"]
    assert row["fastest"]["knobs"] == {"learning_rate": 2.0} and row["fastest"]["met"]
    assert lm.verdict(runs, "default", [])["met"]
    assert lm.reseeded(runs, "default", "kfac") == [best_final, quick]


def test_the_time_is_the_median_over_the_seeds(lm):
    adamw = [run("adamw", ADAMW, seconds_per_step=t, seed=s, repeat=True) for s, t in enumerate((0.05, 0.1, 0.07))]
    kfac = [run("kfac", [2.5, 1.85, 1.8, 1.7, 1.6], seconds_per_step=t, seed=s, repeat=True)
            for s, t in enumerate((0.2, 0.1, 0.11))]  # fmt: skip
    row = row_of(lm, [*adamw, *kfac])
    assert row["seconds_per_step_ratio"] == pytest.approx(0.11 / 0.07)
    assert row["seconds_ratio"] == pytest.approx(0.4 * 0.11 / 0.07)


def test_a_paired_timing_replaces_the_runs_seconds_per_step(lm):
    runs = [run("adamw", ADAMW, seconds_per_step=0.1), run("kfac", [2.5, 1.85, 1.8, 1.7, 1.6], seconds_per_step=0.3)]
    paired = [{"optimizer": "adamw", "knobs": {"learning_rate": 1.0}, "seconds_per_step": 0.05},
              {"optimizer": "kfac", "knobs": {"learning_rate": 1.0}, "seconds_per_step": 0.1}]  # fmt: skip
    (row,) = [r for r in lm.verdict(runs, "default", paired)["rows"] if r["optimizer"] == "kfac"]
    assert row["seconds_per_step_ratio"] == pytest.approx(2.0) and row["runs_seconds_per_step_ratio"] == pytest.approx(
        3
    )
    assert row["seconds_ratio"] == pytest.approx(0.8) and row["met"]
    assert lm.timed_settings(runs, "default") == [("adamw", {"learning_rate": 1.0}), ("kfac", {"learning_rate": 1.0})]


def test_the_seed_spread_is_per_reseeded_setting(lm):
    quick = {"learning_rate": 2.0}
    runs = [run("kfac", [2.0, 1.7], repeat=True), run("kfac", [2.0, 1.9], seed=1, repeat=True)]
    runs += [
        run("kfac", [2.0, 1.5], knobs=quick, repeat=True),
        run("kfac", [2.0, 1.6], knobs=quick, seed=1, repeat=True),
    ]
    runs += [{**run("kfac", [2.0, 1.0], knobs={"learning_rate": 9.0}), "diverged": True}]
    spread = lm.seed_spread(runs, "default", "kfac")
    assert [(s["knobs"], s["seeds"]) for s in spread["settings"]] == [({"learning_rate": 1.0}, 2), (quick, 2)]
    assert [s["mean"] for s in spread["settings"]] == pytest.approx([1.8, 1.55])
    assert spread["diverged"] == 1
