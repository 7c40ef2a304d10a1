"""LiSSA against the exact inverse, and its divergence report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_error

import hvpopt


def matrix_with_spectrum(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues)) @ q.T


@pytest.fixture(scope="module")
def system():
    a = matrix_with_spectrum(np.linspace(0.05, 2.0, 30))
    b = np.random.default_rng(1).normal(size=30)
    return a, b


def test_matches_the_exact_inverse_with_automatic_scale(system):
    a, b = system
    run = jax.jit(
        lambda b: hvpopt.lissa(lambda v: jnp.asarray(a) @ v, b, damping=0.1, depth=600, key=jax.random.key(0))
    )
    result = run(jnp.asarray(b))
    assert not bool(result.diverged)
    assert rel_error(result.x, np.linalg.solve(a + 0.1 * np.eye(30), b)) < 1e-8
    largest = 2.0 + 0.1
    assert largest / 2 < float(result.scale) <= 1.1 * largest + 1e-9  # the series converges
    assert int(result.num_matvecs) == 20 + 600


def test_stochastic_products_averaged_over_repeats(system):
    a, b = system
    rng = np.random.default_rng(2)
    # A = mean of 8 random PSD pieces; each step sees one piece, drawn with its key.
    pieces = np.stack([matrix_with_spectrum(rng.uniform(0, 2, 30), seed=s) for s in range(8)])
    mean = pieces.mean(0)
    sample = lambda v, key: jnp.asarray(pieces)[jax.random.randint(key, (), 0, 8)] @ v
    result = hvpopt.lissa(
        sample,
        jnp.asarray(b),
        damping=0.5,
        depth=200,
        num_repeats=64,
        key=jax.random.key(3),
        stochastic=True,
        scale=4.0,
    )
    exact = np.linalg.solve(mean + 0.5 * np.eye(30), b)
    assert not bool(result.diverged)
    assert rel_error(result.x, exact) < 0.1
    single = hvpopt.lissa(
        sample, jnp.asarray(b), damping=0.5, depth=200, num_repeats=1, key=jax.random.key(3), stochastic=True, scale=4.0
    )
    assert rel_error(result.x, exact) < rel_error(single.x, exact)  # repeats reduce the noise


def test_divergence_is_reported_not_overflowed():
    a = matrix_with_spectrum(np.linspace(-1.0, 2.0, 20), seed=4)  # indefinite
    b = jnp.asarray(np.random.default_rng(5).normal(size=20))
    result = hvpopt.lissa(lambda v: jnp.asarray(a) @ v, b, damping=0.0, depth=100_000, key=jax.random.key(6))
    assert bool(result.diverged)
    assert np.all(np.isfinite(result.x)) and np.isfinite(result.step_norm)
    assert int(result.num_matvecs) < 100_000  # it stopped at the first sign of growth


def test_a_scale_too_small_diverges(system):
    a, b = system
    result = hvpopt.lissa(
        lambda v: jnp.asarray(a) @ v, jnp.asarray(b), damping=0.0, depth=500, key=jax.random.key(7), scale=0.5
    )  # needs s > 1
    assert bool(result.diverged) and np.all(np.isfinite(result.x))


def test_pytree_right_hand_side():
    b = {"x": jnp.ones(2), "y": jnp.ones(1)}
    matvec = lambda v: {"x": v["x"] * jnp.array([1.0, 2.0]), "y": 4.0 * v["y"]}
    result = hvpopt.lissa(matvec, b, damping=0.0, depth=400, key=jax.random.key(8))
    np.testing.assert_allclose(result.x["x"], [1.0, 0.5], rtol=1e-10)
    np.testing.assert_allclose(result.x["y"], [0.25], rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=0), "depth must be a positive integer"),
        (dict(num_repeats=0), "num_repeats must be a positive integer"),
        (dict(damping=-0.1), "damping must be a finite number >= 0"),
        (dict(scale=0.0), "scale must be > 0"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    options = dict(damping=0.0, depth=5, key=jax.random.key(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        hvpopt.lissa(lambda v: v, jnp.ones(3), **options)


@pytest.mark.parametrize("scale, depth", [(0.95, 50), (0.99, 200)])
def test_slow_divergence_is_caught(system, scale, depth):
    a, b = system  # largest eigenvalue 2: a scale just under 1 diverges slowly
    result = hvpopt.lissa(
        lambda v: jnp.asarray(a) @ v, jnp.asarray(b), damping=0.0, depth=depth, key=jax.random.key(9), scale=scale
    )
    assert bool(result.diverged)


def test_a_traced_nonpositive_scale_is_divergence_not_infinity(system):
    a, b = system
    run = jax.jit(
        lambda s: hvpopt.lissa(
            lambda v: jnp.asarray(a) @ v, jnp.asarray(b), damping=0.1, depth=20, key=jax.random.key(10), scale=s
        )
    )
    for scale in (0.0, -1.0):
        result = run(scale)
        assert bool(result.diverged)
        assert np.all(np.isfinite(result.x)) and np.isfinite(result.step_norm)


def test_mixed_precision_and_a_float64_damping():
    b = {"full": jnp.ones(2, jnp.float32), "half": jnp.ones(2, jnp.bfloat16)}
    matvec = lambda v: jax.tree.map(lambda x: 2.0 * x, v)
    result = hvpopt.lissa(matvec, b, damping=np.float64(0.5), depth=200, key=jax.random.key(11))
    assert result.x["full"].dtype == jnp.float32 and result.x["half"].dtype == jnp.bfloat16
    np.testing.assert_allclose(result.x["full"], 0.4, rtol=1e-5)
    assert not bool(result.diverged)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_non_finite_number_anywhere_stops_lissa_with_the_last_finite_partial_sum(dtype):
    from hvpopt.linalg.neumann_series import LissaStatus

    a = jnp.diag(jnp.array([1.0, 2.0], dtype))
    ones = jnp.ones(2, dtype)
    later_nan = lambda v: jnp.where(v[0] != v[1], jnp.nan, a @ v)  # from the second product on
    s = 4.0
    first_sum = (2 * ones - a @ ones / s) / s  # h_1 / s
    cases = {  # name: (matvec, b, options, the last finite partial sum / s)
        "nan in b": (lambda v: a @ v, ones.at[0].set(jnp.nan), {}, 0 * ones),
        "inf in b": (lambda v: a @ v, ones.at[0].set(jnp.inf), {}, 0 * ones),
        "matvec nan at step 2": (later_nan, ones, {}, first_sum),
        "damping inf": (lambda v: a @ v, ones, dict(damping=jnp.asarray(jnp.inf, dtype)), ones / s),
        "damping nan": (lambda v: a @ v, ones, dict(damping=jnp.asarray(jnp.nan)), ones / s),
        "scale inf": (lambda v: a @ v, ones, dict(scale=jnp.asarray(jnp.inf)), 0 * ones),
        "overflowing update": (lambda v: -jnp.finfo(dtype).max * v, ones, {}, ones / s),
    }
    for name, (matvec, b, options, last_finite) in cases.items():
        options = dict(damping=0.0, depth=50, key=jax.random.key(0), scale=s) | options
        result = hvpopt.lissa(matvec, b, **options)
        assert LissaStatus.NAMES[int(result.status)] == "non_finite", name
        assert bool(result.diverged) and np.isfinite(result.step_norm), name
        assert result.x.dtype == dtype and np.all(np.isfinite(result.x)), name
        np.testing.assert_allclose(result.x, last_finite, rtol=1e-6, err_msg=name)
    healthy = hvpopt.lissa(lambda v: a @ v, ones, damping=0.0, depth=50, key=jax.random.key(0), scale=s)
    assert LissaStatus.NAMES[int(healthy.status)] == "completed" and not bool(healthy.diverged)
