"""K-FAC (Martens & Grosse, 2015) as an optax transformation: Kronecker-factored natural gradient.

Each step preconditions the gradient with the inverse of a damped K-FAC
approximation of the Gauss-Newton / Fisher matrix,

.. math:: \\Delta = (\\bar C + \\lambda I)^{-1} g,\\qquad
   \\bar C_W = Q_A \\otimes Q_G\\, \\mathrm{diag}(a \\otimes g)\\, (Q_A \\otimes Q_G)^\\top,

where ``A`` and ``G`` of each dense layer (and the diagonal of every other
leaf) are exponential moving averages of :func:`hvpopt.kronecker_statistics`
on the curvature batches, refreshed every ``curvature_every`` steps and
eigendecomposed every ``inverse_every`` steps (each inside ``lax.cond``, so
the step stays one compiled function). The damping is exact in the
eigenbasis, ``1 / (a_i g_j + lambda)``, not Martens & Grosse's factored
approximation, so changing ``lambda`` costs nothing. Then:

* the step (``step_rule``): ``"quadratic"`` (Martens & Grosse, sections 6.4
  and 7) takes ``u = eta (alpha Delta + mu u_prev)`` with ``alpha`` and ``mu``
  minimising the exact damped Gauss-Newton model
  ``g^T u + u^T (G + lambda I) u / 2`` on the curvature batch (a 2 x 2
  system from two forward-mode products: no learning rate to tune,
  ``eta = 1``) over ``0 <= mu <= momentum`` (the model's optimum ``mu``
  clipped, then the best ``alpha`` for it: a model from a few examples can
  otherwise choose ``mu = 6`` and diverge); ``"kl_clip"`` (Ba, Grosse & Martens,
  2017) takes ``nu = min(1, sqrt(kl_clip / (eta^2 Delta^T g)))``, which bounds
  the predicted change ``eta^2 Delta^T C Delta ~ eta^2 Delta^T g`` of the
  model's predictions (a trust region in KL divergence), heavy-ball momentum
  ``v <- mu v + nu Delta`` and the update ``-eta v``;
* Levenberg-Marquardt adaptation of ``lambda`` every ``adapt_damping_every``
  steps from the reduction ratio ``rho = (f(x + u) - f(x)) / (g^T u + u^T G u / 2)``
  of the step ``u`` against the undamped Gauss-Newton model on the curvature
  batch: ``lambda <- omega lambda`` when ``rho > 3/4``, ``lambda / omega``
  when ``rho < 1/4``, ``omega = (19/20)^T`` (Martens & Grosse, section 6.5),
  kept in ``[min_damping, max_damping]``. On an objective without L2 the
  ratio can stay above 3/4 for hundreds of steps (it did on the language
  models of ``experiments/lm_optimizers.py``) and ``lambda`` falls to its
  floor; the floor then bounds the step ``g_i / (c_i + lambda)`` of the
  coordinates a small curvature batch barely sees (``c_i ~ 0``: the
  embedding rows of characters it lacks). Its default, ``1e-4``, is
  measured: on the Shakespeare LM with 8-example curvature batches a floor
  of ``1e-8`` let the validation loss jump from 2.05 to 3.45 at step 200,
  ``1e-4`` trained smoothly to 1.67, ``1e-2`` damped it to 1.82.

References:
  Martens, Grosse, "Optimizing neural networks with Kronecker-factored
  approximate curvature", ICML 2015.
  Ba, Grosse, Martens, "Distributed second-order optimization using
  Kronecker-factored approximations", ICLR 2017.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax.sharding import Mesh

from hvpopt import _checks
from hvpopt.curvature.ggn import output_hessian
from hvpopt.curvature.kronecker import (
    KroneckerFactors,
    KroneckerStatistics,
    kronecker_factors,
    kronecker_inverse,
    kronecker_statistics,
)
from hvpopt.frameworks import plain_arrays
from hvpopt.losses import Loss
from hvpopt.optim._common import require, skip_step, step_or_skip
from hvpopt.tree import all_finite

__all__ = ["KFAC_STEP_RULES", "KFACState", "kfac"]

#: How :func:`kfac` scales its step: the exact quadratic model's optimum, or a KL trust region with fixed momentum.
KFAC_STEP_RULES = ("quadratic", "kl_clip")


class KFACState(NamedTuple):
    """The moving averages, their last decomposition, the momentum, the damping and diagnostics.

    Attributes:
      count: steps taken, skipped ones included.
      key: the key of the next sampled Fisher.
      statistics: the moving averages of ``A``, ``G`` and the diagonal.
      factors: their eigendecomposition at the last inversion.
      buffer: ``"quadratic"``: the last update ``u``; ``"kl_clip"``: the momentum ``v``.
      damping: the current ``lambda``.
      reduction_ratio: ``rho`` at the last adaptation (0 before the first).
      step_size: ``eta alpha`` (quadratic) or ``eta nu`` (KL clip) of the last step (0 if skipped).
      momentum: ``mu`` of the last step.
      kl_scale: ``nu`` of the last step (1: not clipped, or the quadratic rule).
      num_curvature_updates: refreshes of the moving averages so far.
      num_inversions: eigendecompositions so far.
      skipped_steps: steps skipped for a non-finite loss, gradient or statistic.
    """

    count: jax.Array
    key: jax.Array
    statistics: KroneckerStatistics
    factors: KroneckerFactors
    buffer: Any
    damping: jax.Array
    reduction_ratio: jax.Array
    step_size: jax.Array
    momentum: jax.Array
    kl_scale: jax.Array
    num_curvature_updates: jax.Array
    num_inversions: jax.Array
    skipped_steps: jax.Array


def kfac(
    model_fn: Callable,
    loss: Loss,
    *,
    example_batch: tuple[Any, Any],
    learning_rate: float | Callable = 1.0,
    damping: float = 1e-3,
    step_rule: str = "quadratic",
    momentum: float = 0.9,
    kl_clip: float = 1e-3,
    ema_decay: float = 0.95,
    curvature_every: int = 1,
    inverse_every: int = 10,
    adapt_damping_every: int | None = 5,
    min_damping: float = 1e-4,
    max_damping: float = 1e4,
    fisher: str = "sampled",
    key: jax.Array | None = None,
    chunk_size: int = 64,
    mesh: Mesh | None = None,
    embeddings: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC: the gradient preconditioned by moving-average Kronecker factors, KL-clipped, with momentum.

    Called as::

      updates, state = tx.update(grads, state, params, curvature_batch=(inputs, targets),
                                 value=loss, value_fn=f)

    The gradient preconditioned is ``updates`` (so ``tx`` can follow
    ``optax.clip_by_global_norm`` in a chain); ``curvature_batch`` feeds the
    statistics (often the gradient batch); ``value_fn`` (the loss on the
    batch, a function of the parameters) and ``value`` are needed only by the
    damping adaptation. A non-finite value, gradient or statistic skips the
    step: parameters, moving averages and momentum stay as they were.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``; its dense layers are
        found automatically (:func:`hvpopt.layer_coverage`), every other leaf
        gets the diagonal.
      loss: one of :mod:`hvpopt.losses`.
      example_batch: ``(inputs, targets)`` shaped like a curvature batch (one
        example is enough): ``init`` reads the layers' shapes from it.
      learning_rate: ``eta > 0``, or an optax schedule of the step count
        (with ``"quadratic"``, a multiplier of the model's optimal step).
      damping: the initial ``lambda > 0`` (the L2 coefficient of the
        objective, if any, belongs in ``min_damping``).
      step_rule: one of :data:`KFAC_STEP_RULES`.
      momentum: in ``[0, 1)``: ``"kl_clip"``'s ``mu``; the largest ``mu`` ``"quadratic"`` may choose.
      kl_clip: ``"kl_clip"``: the KL trust region ``> 0``.
      ema_decay: the moving averages' decay in ``[0, 1)`` (the first refresh
        takes the statistics as they are).
      curvature_every: steps between refreshes of the moving averages.
      inverse_every: steps between eigendecompositions.
      adapt_damping_every: steps ``T`` between Levenberg-Marquardt adaptations
        (one loss evaluation and one Gauss-Newton product each), or None for
        a fixed ``damping``.
      min_damping: the lowest ``lambda`` the adaptation goes to (at least
        the objective's L2 coefficient).
      max_damping: the highest.
      fisher: one of :data:`hvpopt.curvature.FISHER_TARGETS`.
      key: the key of the sampled labels (default ``jax.random.key(0)``);
        each refresh draws from a fresh split.
      chunk_size: examples per chunk of the statistics.
      mesh: a :class:`jax.sharding.Mesh` whose ``"data"`` axis the curvature
        batch is split over.
      embeddings: embedding tables get Kronecker factors too (a diagonal
        input factor of token frequencies), not the diagonal.

    Example:
      >>> import jax, jax.numpy as jnp, optax, hvpopt
      >>> model_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
      >>> params = {"w1": jnp.ones((3, 8)) / 3, "w2": jnp.ones((8, 2)) / 8}
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
      >>> loss = hvpopt.losses.softmax_cross_entropy
      >>> f = lambda p: loss(model_fn(p, x), y)
      >>> tx = hvpopt.kfac(model_fn, loss, example_batch=(x, y))
      >>> @jax.jit
      ... def step(params, state):
      ...     value, grads = jax.value_and_grad(f)(params)
      ...     updates, state = tx.update(grads, state, params, value=value, value_fn=f, curvature_batch=(x, y))
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(params, tx.init(params))  # compiles once
      >>> for _ in range(10):
      ...     params, state = step(params, state)
      >>> bool(f(params) < 0.1 * jnp.log(2.0)), int(state.num_inversions)
      (True, 2)
    """
    if not callable(learning_rate):
        _checks.check_number("learning_rate", learning_rate, "> 0 and finite (or an optax schedule)", lambda x: x > 0)
    for name, value in (("damping", damping), ("min_damping", min_damping), ("max_damping", max_damping)):
        _checks.check_number(name, value, "> 0 and finite", lambda x: x > 0)
    if not min_damping <= damping <= max_damping:
        raise ValueError(
            f"damping ({damping}) must lie between min_damping ({min_damping}) and max_damping ({max_damping})."
        )
    _checks.check_choice("step_rule", step_rule, KFAC_STEP_RULES)
    _checks.check_number("momentum", momentum, "in [0, 1)", lambda x: 0 <= x < 1)
    _checks.check_number("ema_decay", ema_decay, "in [0, 1)", lambda x: 0 <= x < 1)
    _checks.check_number("kl_clip", kl_clip, "> 0 and finite", lambda x: x > 0)
    _checks.check_positive_int("curvature_every", curvature_every)
    _checks.check_positive_int("inverse_every", inverse_every)
    if adapt_damping_every is not None:
        _checks.check_positive_int("adapt_damping_every", adapt_damping_every)
    if not (isinstance(example_batch, tuple) and len(example_batch) == 2):
        raise TypeError(
            "kfac needs example_batch=(inputs, targets), shaped like the curvature batches; "
            f"got {type(example_batch).__name__}."
        )
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
    statistics_of = lambda params, batch, k: kronecker_statistics(
        model_fn,
        loss,
        params,
        tuple(batch),
        fisher=fisher,
        key=k,
        chunk_size=chunk_size,
        mesh=mesh,
        embeddings=embeddings,
    )

    def init(params: Any) -> KFACState:
        params = plain_arrays(params)  # nnx.Optimizer's are Variables here, plain arrays in update
        one = jax.tree.map(lambda x: x[:1], example_batch)
        shapes = jax.eval_shape(lambda p: statistics_of(p, one, jax.random.key(0)), params)
        statistics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zero, dtype = jnp.zeros([], jnp.int32), jnp.result_type(*jax.tree.leaves(params))
        scalar = lambda x: jnp.asarray(x, dtype)
        return KFACState(
            count=zero,
            key=jax.random.key(0) if key is None else key,
            statistics=statistics,
            factors=_identity_factors(statistics),
            buffer=otu.tree_zeros_like(params),
            damping=scalar(damping),
            reduction_ratio=scalar(0.0),
            step_size=scalar(0.0),
            momentum=scalar(0.0),
            kl_scale=scalar(1.0),
            num_curvature_updates=zero,
            num_inversions=zero,
            skipped_steps=zero,
        )

    def update(updates, state: KFACState, params=None, *, value=None, value_fn=None, curvature_batch=None, **extra):
        del extra
        require("params", params, "kfac", "the current parameters, as the third argument.")
        require("curvature_batch", curvature_batch, "kfac", "(inputs, targets) of the batch the statistics are of.")
        if adapt_damping_every is not None:
            require("value_fn", value_fn, "kfac", "the loss as a function of the parameters, for the damping "
                    "adaptation (or adapt_damping_every=None: a fixed damping).")  # fmt: skip
        structure = jax.tree.structure(updates)  # NNX Variables or not: the state is of plain arrays
        grad, params = plain_arrays(updates), plain_arrays(params)
        sample_key, next_key = jax.random.split(state.key)
        skip = lambda: skip_step(grad, state, key=next_key, step_size=jnp.zeros_like(state.step_size))

        def step():
            statistics, refreshes = _refreshed(state, params, curvature_batch, sample_key)
            factors, inversions = jax.lax.cond(
                state.count % inverse_every == 0,
                lambda: (kronecker_factors(statistics), state.num_inversions + 1),
                lambda: (state.factors, state.num_inversions),
            )
            natural = kronecker_inverse(factors, damping=state.damping)(grad)
            eta = jnp.asarray(schedule(state.count), state.step_size.dtype)
            if step_rule == "quadratic":
                step_updates, alpha, mu, model_change = _quadratic_step(params, curvature_batch, natural, eta)
                buffer, step_size, nu = step_updates, eta * alpha, jnp.ones_like(eta)
            else:
                predicted = eta**2 * jnp.maximum(otu.tree_vdot(natural, grad), jnp.finfo(eta.dtype).tiny)
                nu = jnp.minimum(1.0, jnp.sqrt(kl_clip / predicted))
                buffer = otu.tree_add_scale(otu.tree_scale(momentum, state.buffer), nu, natural)
                step_updates, step_size, mu = otu.tree_scale(-eta, buffer), eta * nu, jnp.asarray(momentum, eta.dtype)
                model_change = lambda: _model_change(params, curvature_batch, step_updates)
            step_updates = otu.tree_cast_like(step_updates, grad)
            new_damping, rho = _adapted(state, params, step_updates, model_change)
            new_state = state._replace(
                count=state.count + 1,
                key=next_key,
                statistics=statistics,
                factors=factors,
                buffer=buffer,
                damping=new_damping,
                reduction_ratio=rho,
                step_size=step_size,
                momentum=mu.astype(state.momentum.dtype),
                kl_scale=nu,
                num_curvature_updates=refreshes,
                num_inversions=inversions,
            )
            finite = all_finite(step_updates, statistics, new_damping)
            return jax.lax.cond(finite, lambda: (step_updates, new_state), skip)

        def _quadratic_step(params, batch, natural, eta):
            """``u = eta (alpha d + mu u_prev)``, ``d = -natural``, minimising the damped Gauss-Newton model."""
            inputs, targets = batch
            outputs, linear = jax.linearize(lambda p: model_fn(p, inputs), params)
            hessian = output_hessian(loss, outputs, targets)
            d, previous = otu.tree_scale(-1.0, natural), state.buffer
            jd, jp = linear(d), linear(previous)
            hjd, hjp = hessian(jd), hessian(jp)
            curv = jnp.array([[jnp.vdot(jd, hjd), jnp.vdot(jd, hjp)], [jnp.vdot(jp, hjd), jnp.vdot(jp, hjp)]])
            gram = jnp.array([[otu.tree_vdot(d, d), otu.tree_vdot(d, previous)],
                              [otu.tree_vdot(previous, d), otu.tree_vdot(previous, previous)]])  # fmt: skip
            curv, gram = curv.astype(eta.dtype), gram.astype(eta.dtype)
            damped = curv + state.damping * gram
            slope = jnp.array([otu.tree_vdot(grad, d), otu.tree_vdot(grad, previous)]).astype(eta.dtype)
            finfo = jnp.finfo(eta.dtype)
            det = damped[0, 0] * damped[1, 1] - damped[0, 1] ** 2
            # Collinear d and u_prev (the first step, u_prev = 0, among them) leave mu undetermined: 0.
            well_posed = det > jnp.sqrt(finfo.eps) * damped[0, 0] * damped[1, 1]
            free_mu = (damped[0, 1] * slope[0] - damped[0, 0] * slope[1]) / jnp.maximum(det, finfo.tiny)
            mu = jnp.clip(jnp.where(well_posed, free_mu, 0.0), 0.0, momentum)  # the model's optimum on [0, momentum]
            alpha = -(slope[0] + damped[0, 1] * mu) / jnp.maximum(damped[0, 0], finfo.tiny)  # the best alpha given mu
            optimum = jnp.stack([alpha, mu])
            coefficients = eta * optimum
            step_updates = otu.tree_add_scale(otu.tree_scale(coefficients[0], d), coefficients[1], previous)
            change = lambda: slope @ coefficients + 0.5 * coefficients @ curv @ coefficients
            return step_updates, optimum[0], optimum[1], change

        def _model_change(params, batch, step_updates):
            """``g^T u + u^T G u / 2``: the undamped Gauss-Newton model's change, one forward-mode product."""
            inputs, targets = batch
            outputs, ju = jax.jvp(lambda p: model_fn(p, inputs), (params,), (step_updates,))
            return otu.tree_vdot(grad, step_updates) + 0.5 * jnp.vdot(ju, output_hessian(loss, outputs, targets)(ju))

        def _refreshed(state, params, batch, sample_key):
            def refresh():
                fresh = statistics_of(params, batch, sample_key)
                decay = jnp.where(state.num_curvature_updates > 0, ema_decay, 0.0)
                mixed = jax.tree.map(lambda old, new: decay * old + (1 - decay) * new, state.statistics, fresh)
                return mixed, state.num_curvature_updates + 1

            keep = lambda: (state.statistics, state.num_curvature_updates)
            return jax.lax.cond(state.count % curvature_every == 0, refresh, keep)

        def _adapted(state, params, step_updates, model_change):
            if adapt_damping_every is None:
                return state.damping, state.reduction_ratio
            omega = (19 / 20) ** adapt_damping_every

            def adapt():
                before = value_fn(params) if value is None else value
                after = value_fn(optax.apply_updates(params, step_updates))
                change = model_change()
                predicted = change < -jnp.finfo(state.damping.dtype).tiny  # else no decrease to compare with
                rho = (after - before) / jnp.where(predicted, change, -1.0)
                rho = jnp.where(jnp.isfinite(rho), rho, -1.0).astype(state.damping.dtype)  # a blow-up: damp more
                lam = jnp.where(rho > 0.75, state.damping * omega, state.damping)
                lam = jnp.where(rho < 0.25, state.damping / omega, lam)
                lam = jnp.where(predicted, jnp.clip(lam, min_damping, max_damping), state.damping)
                return lam, jnp.where(predicted, rho, state.reduction_ratio)

            keep = lambda: (state.damping, state.reduction_ratio)
            return jax.lax.cond(state.count % adapt_damping_every == 0, adapt, keep)

        finite = all_finite(jnp.zeros([]) if value is None else value, grad)
        step_updates, new_state = step_or_skip(finite, step, skip)
        return jax.tree.unflatten(structure, jax.tree.leaves(step_updates)), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _identity_factors(statistics: KroneckerStatistics) -> KroneckerFactors:
    """The factors of all-zero statistics (what ``kronecker_factors`` would give), without an ``eigh``."""
    eye = lambda m: jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
    return KroneckerFactors(
        tuple(None if layer.lookup else eye(a) for layer, a in zip(statistics.layers, statistics.input_moments)),
        tuple(eye(g) for g in statistics.output_moments),
        tuple(jnp.zeros((*g.shape[:-2], a.shape[-1], g.shape[-1]), a.dtype)
              for a, g in zip(statistics.input_moments, statistics.output_moments)),
        statistics.diagonal, statistics.layers, "kfac", statistics.treedef, statistics.shapes,
    )  # fmt: skip
