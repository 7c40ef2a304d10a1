"""Curvature-diagonal estimators for Sophia (Liu et al., 2023), to plug into ``optax.contrib.sophia``.

``optax.contrib.sophia(learning_rate, hessian_diagonal_fn=estimator)`` keeps a
moving average ``h`` of a curvature diagonal, refreshed every
``update_interval`` steps, and steps ``-eta clip(m / max(gamma h, eps), 1)``.
Both estimators here are optax transformations whose ``update`` returns one
unbiased sample of the diagonal; sophia forwards its own ``update`` keywords
to them:

* :func:`gauss_newton_bartlett` (Sophia-G): ``g_hat ** 2`` with ``g_hat`` one
  backpropagation of labels sampled from the model
  (:func:`hvpopt.sampled_gradient`), ``E[g_hat ** 2] = diag(G)``, the
  Gauss-Newton matrix's diagonal; takes ``curvature_batch=(inputs, targets)``.
* :func:`hutchinson_hessian` (Sophia-H): ``z * (H z)`` with Rademacher ``z``
  (:func:`hvpopt.hutchinson_diagonal` on :func:`hvpopt.hvp`, forward-over-reverse
  with the reverse-over-reverse fallback where forward mode is undefined, a
  ``custom_vjp`` say), ``E = diag(H)``; takes ``obj_fn`` as optax's own does.

:func:`sophia_win_rate` reads the fraction of coordinates sophia did not clip
from its state (the paper's "win rate"; 0.1 to 0.5 is healthy).

Reference:
  Liu, Li, Hall, Liang, Ma, "Sophia: a scalable stochastic second-order
  optimizer for language model pre-training", ICLR 2024.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from optax.contrib import SophiaState

from hvpopt.curvature.fisher import sampled_gradient
from hvpopt.curvature.hvp import hessian_operator
from hvpopt.linalg.diagonal import hutchinson_diagonal
from hvpopt.losses import Loss
from hvpopt.optim._common import require

__all__ = ["DiagonalEstimatorState", "gauss_newton_bartlett", "hutchinson_hessian", "sophia_win_rate"]


class DiagonalEstimatorState(NamedTuple):
    """The key of the next sample and how many samples were drawn.

    Attributes:
      key: the PRNG key of the next estimate.
      num_estimates: estimates drawn so far.
    """

    key: jax.Array
    num_estimates: jax.Array


def _estimator(sample: Callable, key: jax.Array | None) -> optax.GradientTransformationExtraArgs:
    """An optax transformation whose ``update`` returns ``sample(params, sample_key, **keywords)``."""

    def init(params: Any) -> DiagonalEstimatorState:
        del params
        return DiagonalEstimatorState(jax.random.key(0) if key is None else key, jnp.zeros([], jnp.int32))

    def update(updates, state: DiagonalEstimatorState, params=None, **keywords):
        del updates
        require("params", params, "the curvature-diagonal estimator", "the current parameters.")
        sample_key, next_key = jax.random.split(state.key)
        diagonal = otu.tree_cast_like(sample(params, sample_key, **keywords), params)
        return diagonal, DiagonalEstimatorState(next_key, state.num_estimates + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def gauss_newton_bartlett(
    model_fn: Callable, loss: Loss, *, key: jax.Array | None = None
) -> optax.GradientTransformationExtraArgs:
    """Sophia-G's estimator of the Gauss-Newton diagonal: ``g_hat ** 2``, one backpropagation per estimate.

    .. math:: \\hat g = \\sum_i \\sqrt{w_i}\\, J_i^\\top \\nabla_{f_i}\\ell(f_i, \\hat y_i),\\
       \\hat y_i \\sim p(\\cdot|f_i);\\qquad \\mathbb{E}[\\hat g \\odot \\hat g] = \\mathrm{diag}(G)

    ``update(grads, state, params, curvature_batch=(inputs, targets))``; the
    labels are drawn from the model at ``inputs`` (``targets`` give only
    masks and shapes). With uniform weights this is the paper's ``B * grad^2``.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``.
      loss: one of :mod:`hvpopt.losses` (its sampling law is the model's).
      key: the first key of the sampled labels (default ``jax.random.key(0)``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, hvpopt
      >>> model_fn = lambda p, x: x @ p
      >>> x = jax.random.normal(jax.random.key(0), (32, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
      >>> loss = hvpopt.losses.softmax_cross_entropy
      >>> tx = optax.contrib.sophia(1e-2, hessian_diagonal_fn=hvpopt.gauss_newton_bartlett(model_fn, loss))
      >>> params = jnp.zeros((3, 2)); state = tx.init(params)
      >>> grads = jax.grad(lambda p: loss(model_fn(p, x), y))(params)
      >>> updates, state = tx.update(grads, state, params, curvature_batch=(x, y))
      >>> updates.shape
      (3, 2)
    """
    if not isinstance(loss, Loss):
        raise TypeError(
            "gauss_newton_bartlett needs loss to be one of hvpopt.losses (softmax_cross_entropy, "
            "masked_softmax_cross_entropy, squared_error), whose labels it samples; "
            f"got {type(loss).__name__}."
        )

    def sample(params, sample_key, *, curvature_batch=None, **extra):
        del extra
        require("curvature_batch", curvature_batch, "gauss_newton_bartlett", "(inputs, targets) of the batch "
                "whose Gauss-Newton diagonal is estimated, as a keyword of sophia's update.")  # fmt: skip
        inputs, targets = curvature_batch
        g = sampled_gradient(model_fn, loss, params, inputs, targets, key=sample_key)
        return jax.tree.map(jnp.square, g)

    return _estimator(sample, key)


def hutchinson_hessian(*, key: jax.Array | None = None, mode: str = "auto") -> optax.GradientTransformationExtraArgs:
    """Sophia-H's estimator of the Hessian diagonal: ``z * (H z)``, ``z`` Rademacher, ``E = diag(H)``.

    ``update(grads, state, params, obj_fn=f)`` with ``f(params) -> loss``, as
    optax's ``hutchinson_estimator_diag_hessian`` is called; the product is
    :func:`hvpopt.hvp` with ``mode`` (``"auto"``: forward-over-reverse, or
    reverse-over-reverse with a warning where forward mode is undefined,
    e.g. in a ``custom_vjp``, where optax's estimator fails).

    Args:
      key: the first key of the probes (default ``jax.random.key(0)``).
      mode: one of :data:`hvpopt.curvature.HVP_MODES`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, hvpopt
      >>> f = lambda p: jnp.sum(p ** 4) / 4
      >>> tx = optax.contrib.sophia(1e-2, hessian_diagonal_fn=hvpopt.hutchinson_hessian())
      >>> params = jnp.array([1.0, 2.0]); state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(f)(params), state, params, obj_fn=f)
      >>> state[0].nu  # the moving average of diag(H) = 3 p^2, weight 1 - b2 = 0.01
      Array([0.03, 0.12], dtype=float32)
    """

    def sample(params, sample_key, *, obj_fn=None, **extra):
        del extra
        require("obj_fn", obj_fn, "hutchinson_hessian", "the loss as a function of the parameters only, "
                "as a keyword of sophia's update.")  # fmt: skip
        operator = hessian_operator(obj_fn, params, mode=mode)
        return hutchinson_diagonal(operator, params, key=sample_key, num_samples=1)

    return _estimator(sample, key)


def sophia_win_rate(
    state: Any, *, gamma: float = 0.01, clip_threshold: float = 1.0, b1: float = 0.965, eps: float = 1e-8
) -> jax.Array:
    """The fraction of coordinates ``|m_hat / max(gamma h, eps)| < clip_threshold``: those sophia did not clip.

    Found in ``state`` (sophia's own, or a chain holding it); pass the
    ``gamma``, ``clip_threshold``, ``b1`` and ``eps`` sophia was built with.
    It is computed from the state after the step, so on a step that
    refreshed ``h`` it uses the new ``h``; ValueError if ``state`` holds no
    ``optax.contrib.SophiaState``.

    Example:
      >>> import jax.numpy as jnp, optax, hvpopt
      >>> f = lambda p: jnp.sum(p ** 4) / 4
      >>> tx = optax.contrib.sophia(1e-2, hessian_diagonal_fn=hvpopt.hutchinson_hessian())
      >>> params = jnp.array([1.0, 2.0]); state = tx.init(params)
      >>> _, state = tx.update(f(params) * 0 + params ** 3, state, params, obj_fn=f)
      >>> float(hvpopt.sophia_win_rate(state))  # |m_hat| = p^3 against 0.01 * 0.01 * 3 p^2: both clipped
      0.0
    """
    is_sophia = lambda s: isinstance(s, SophiaState)
    found = [s for s in jax.tree.leaves(state, is_leaf=is_sophia) if is_sophia(s)]
    if not found:
        raise ValueError("state holds no optax.contrib.SophiaState: pass the state of optax.contrib.sophia.")
    (sophia,) = found
    count = jnp.maximum(sophia.count, 1)
    scale = 1.0 / (1.0 - b1 ** count.astype(jnp.float32))
    ratios = jax.tree.map(lambda m, h: jnp.abs(m * scale) / jnp.maximum(gamma * h, eps), sophia.mu, sophia.nu)
    within = sum(jnp.sum(r < clip_threshold) for r in jax.tree.leaves(ratios))
    return within / otu.tree_size(ratios)
