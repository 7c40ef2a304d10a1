"""Hessian-vector products against dense float64 Hessians."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import custom_softplus, flat, make_custom_vjp, problem_hessian, random_like, rel_error

import hvpopt

MODES = ("auto", "fwd_rev", "rev_rev", "rev_fwd")


def modes_for(problem):
    # Forward mode is undefined through the custom_vjp problem's backward rule.
    return ("rev_rev",) if problem.name == "custom_vjp" else MODES


@pytest.fixture(scope="module")
def products(problem):
    """Every product of this module for one problem, from one compiled function."""
    u = random_like(jax.random.key(0), problem.params)
    v = random_like(jax.random.key(1), problem.params)
    modes = modes_for(problem)
    f_with_args = lambda p, x, y: problem.objective(p, x, y)

    @jax.jit
    def compute(params, u, v, inputs, targets):
        out = {}
        for mode in modes:
            matvec = hvpopt.hessian_operator(problem.objective, params, mode=mode)
            out[mode] = {
                "hvp": hvpopt.hvp(problem.objective, params, v, mode=mode),
                "operator_u": matvec(u),
                "operator_v": matvec(v),
            }
        with_args = hvpopt.hvp(f_with_args, params, v, inputs, targets, mode=modes[0])
        return out, with_args

    return u, v, *compute(problem.params, u, v, problem.inputs, problem.targets)


def test_every_mode_and_operator_match_dense_hessian(problem, products):
    hessian = problem_hessian(problem)
    u, v, out, with_args = products
    for mode, results in out.items():
        assert rel_error(flat(results["hvp"]), hessian @ flat(v)) < 1e-10, mode
        assert rel_error(flat(results["operator_v"]), hessian @ flat(v)) < 1e-10, mode
        assert rel_error(flat(results["operator_u"]), hessian @ flat(u)) < 1e-10, mode
    assert rel_error(flat(with_args), hessian @ flat(v)) < 1e-10


def test_symmetry(products):
    u, v, out, _ = products
    for mode, results in out.items():
        left = np.vdot(flat(u), flat(results["operator_v"]))
        right = np.vdot(flat(results["operator_u"]), flat(v))
        assert abs(left - right) <= 1e-10 * max(abs(left), 1.0), mode


def test_vmap_over_vectors(problem):
    mode = modes_for(problem)[0]
    hessian = problem_hessian(problem)
    keys = jax.random.split(jax.random.key(4), 3)
    vs = jax.vmap(lambda k: random_like(k, problem.params))(keys)
    batched = jax.vmap(lambda v: hvpopt.hvp(problem.objective, problem.params, v, mode=mode))
    out = jax.jit(batched)(vs)
    for i in range(3):
        v_i = jax.tree.map(lambda a: a[i], vs)
        hv_i = jax.tree.map(lambda a: a[i], out)
        assert rel_error(flat(hv_i), hessian @ flat(v_i)) < 1e-10


def test_vmap_over_parameters():
    f = lambda w: jnp.sum(jnp.sin(w) * w**2)
    ws = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    vs = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    for mode in MODES:
        batched = jax.vmap(lambda w, v: hvpopt.hvp(f, w, v, mode=mode))(ws, vs)
        for w, v, hv in zip(ws, vs, batched):
            np.testing.assert_allclose(hv, jax.hessian(f)(w) @ v, rtol=1e-12)


def test_auto_falls_back_with_one_warning_through_custom_vjp():
    problem = make_custom_vjp()
    hessian = problem_hessian(problem)
    v = random_like(jax.random.key(5), problem.params)
    product = jax.jit(lambda p, v: hvpopt.hvp(problem.objective, p, v))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hv = product(problem.params, v)
        product(problem.params, v)  # cached: no second trace, no second warning
    assert len(caught) == 1 and "reverse-over-reverse" in str(caught[0].message)
    assert rel_error(flat(hv), hessian @ flat(v)) < 1e-10
    with pytest.warns(UserWarning, match="reverse-over-reverse"):
        matvec = hvpopt.hessian_operator(problem.objective, problem.params)
    assert rel_error(flat(matvec(v)), hessian @ flat(v)) < 1e-10


def test_explicit_forward_mode_through_custom_vjp_fails_clearly():
    f = lambda w: jnp.sum(custom_softplus(w) ** 2)
    w = jnp.ones(3)
    with pytest.raises(TypeError, match="mode='fwd_rev' needs forward-mode autodiff"):
        jax.jit(lambda w: hvpopt.hvp(f, w, w, mode="fwd_rev"))(w)
    with pytest.raises(TypeError, match="mode='fwd_rev' needs forward-mode autodiff"):
        hvpopt.hessian_operator(f, w, mode="fwd_rev")
    with pytest.raises((TypeError, NotImplementedError)):  # JAX's own error
        hvpopt.hvp(f, w, w, mode="rev_fwd")


def test_auto_reraises_unrelated_errors():
    def broken(p):
        raise TypeError("a bug in the user's loss")

    with pytest.raises(TypeError, match="a bug in the user's loss"):
        hvpopt.hvp(broken, jnp.ones(2), jnp.ones(2))


def test_dtype_follows_inputs():
    f = lambda w: jnp.sum(w**4)
    w = jnp.ones(3, jnp.float32)
    for mode in MODES:
        assert hvpopt.hvp(f, w, w, mode=mode).dtype == jnp.float32


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f, p: hvpopt.hvp(f, p, {"a": jnp.ones(2)}), "same pytree structure"),
        (lambda f, p: hvpopt.hvp(f, p, {"w": jnp.ones(3)}), r"v\['w'\] must have shape \(2,\)"),
        (lambda f, p: hvpopt.hvp(lambda q: q["w"] * 2.0, p, p), "f must return a scalar"),
        (lambda f, p: hvpopt.hvp(lambda q: (1.0, 2.0), p, p), "f must return a scalar"),
        (lambda f, p: hvpopt.hvp(f, p, p, mode="forward"), "mode must be one of"),
        (lambda f, p: hvpopt.hessian_operator(f, p)({"w": jnp.ones(5)}), r"v\['w'\]"),
        (lambda f, p: hvpopt.hessian_operator(f, p, mode="bad"), "mode must be one of"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    f = lambda p: jnp.sum(p["w"] ** 3)
    with pytest.raises(ValueError, match=match):
        call(f, {"w": jnp.ones(2)})


def test_integer_params_are_refused():
    with pytest.raises(TypeError, match=r"params\['n'\] must have a floating dtype"):
        hvpopt.hvp(lambda p: 1.0 * jnp.sum(p["n"]), {"n": jnp.arange(3)}, {"n": jnp.arange(3)})


def test_a_vector_of_another_dtype_is_refused_clearly():
    p = {"w": jnp.ones(2, jnp.float64)}
    with pytest.raises(ValueError, match=r"v\['w'\] must have dtype float64"):
        hvpopt.hvp(lambda q: jnp.sum(q["w"] ** 3), p, {"w": jnp.ones(2, jnp.float32)})
