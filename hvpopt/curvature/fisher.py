"""Fisher-vector products: true, Monte-Carlo and empirical Fisher.

For a model with predictive distribution ``p(y | f(theta, x))`` and loss the
mean negative log-likelihood, the Fisher information is

.. math:: F = \\frac{1}{N}\\sum_i J_i^\\top\\,
   \\mathbb{E}_{y \\sim p(\\cdot|f_i)}\\big[\\nabla_f \\log p\\, \\nabla_f \\log p^\\top\\big]\\, J_i .

* :func:`fisher_vp` (true Fisher) takes the expectation in closed form. For the
  losses in :mod:`hvpopt.losses` it equals the Gauss-Newton matrix.
* :func:`mc_fisher_vp` replaces the expectation by targets sampled from the
  model (an unbiased estimate of ``F``), one outer product per output position.
* :func:`sampled_gradient` is one backpropagation whose outer product is an
  unbiased estimate of ``F`` (Sophia-G's Gauss-Newton-Bartlett estimator).
* :func:`empirical_fisher_vp` uses the observed labels:
  ``(1/N) sum_i g_i g_i^T`` with ``g_i`` the gradient of example ``i``'s loss.
  It is computed as ``J_l^T J_l v / N`` with ``J_l`` the Jacobian of the vector
  of per-example losses, so per-example gradients are never formed.

Reference:
  Kunstner, Hennig, Balles, "Limitations of the empirical Fisher approximation
  for natural gradient descent", NeurIPS 2019.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hvpopt import _checks
from hvpopt.curvature.averaged import average_over_chunks
from hvpopt.curvature.ggn import ggn_operator
from hvpopt.curvature.sandwich import sandwich_operator
from hvpopt.losses import Loss
from hvpopt.types import MatVec, PyTree


def fisher_operator(model_fn: Callable, loss: Loss, params: PyTree, inputs: Any, targets: Any) -> MatVec:
    """The true Fisher information at ``params`` as a matvec ``v -> F v``.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``.
      loss: one of :mod:`hvpopt.losses` (its output Fisher is known in closed
        form and equals its output Hessian, so ``F`` is the Gauss-Newton matrix).
      params: any pytree of floating arrays.
      inputs: the model's inputs.
      targets: the loss's targets (only masks and shapes matter).

    Returns:
      A function from a pytree like ``params`` to ``F v``.
    """
    _check_loss(loss, "fisher_operator")
    return ggn_operator(model_fn, loss, params, inputs, targets)


def fisher_vp(model_fn: Callable, loss: Loss, params: PyTree, v: PyTree, inputs: Any, targets: Any) -> PyTree:
    """True Fisher-vector product ``F v``; see :func:`fisher_operator`.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> model_fn = lambda w, x: x @ w
      >>> x, y = jnp.eye(2), jnp.array([0, 1])
      >>> hvpopt.fisher_vp(model_fn, hvpopt.losses.softmax_cross_entropy,
      ...                  jnp.zeros((2, 2)), jnp.eye(2), x, y)
      Array([[ 0.125, -0.125],
             [-0.125,  0.125]], dtype=float32)
    """
    _checks.check_like("v", v, "params", params)
    return fisher_operator(model_fn, loss, params, inputs, targets)(v)


def mc_fisher_operator(
    model_fn: Callable,
    loss: Loss,
    params: PyTree,
    inputs: Any,
    targets: Any,
    *,
    key: jax.Array,
    num_samples: int = 1,
) -> MatVec:
    """A Monte-Carlo Fisher as a matvec, from targets sampled from the model.

    .. math:: \\hat F v = J^\\top \\Big[\\frac{1}{S}\\sum_{s=1}^S \\sum_i w_i\\,
       s_{i}^{(s)} s_{i}^{(s)\\top}\\Big] J v,\\quad
       s_i^{(s)} = \\nabla_{f_i} \\ell(f_i, \\hat y_i^{(s)}),\\ \\hat y^{(s)} \\sim p(\\cdot|f)

    with ``w_i`` the loss's position weights. The targets are drawn once, when
    the operator is built, so every product uses the same estimate (as a
    solver needs). ``E[F_hat] = F``.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``.
      loss: one of :mod:`hvpopt.losses`.
      params: any pytree of floating arrays.
      inputs: the model's inputs.
      targets: the observed targets (only masks and shapes are used).
      key: a JAX PRNG key for the sampled targets.
      num_samples: samples per position.

    Returns:
      A function from a pytree like ``params`` to ``F_hat v``.
    """
    _check_loss(loss, "mc_fisher_operator")
    _checks.check_positive_int("num_samples", num_samples)
    _checks.check_floating("params", params)

    def middle(outputs: jax.Array) -> MatVec:
        keys = jax.random.split(key, num_samples)
        sampled = jax.vmap(lambda k: loss.sample_targets(k, outputs, targets))(keys)
        score = lambda t: jax.grad(lambda o: jnp.sum(loss.per_position(o, t)))(outputs)
        scores = jax.vmap(score)(sampled)  # [S, ..., K]
        weights = loss.weights(outputs, targets)[..., None] / num_samples

        def matvec(u: jax.Array) -> jax.Array:
            dots = jnp.sum(scores * u, axis=-1, keepdims=True)
            return weights * jnp.sum(scores * dots, axis=0)

        return matvec

    matvec = sandwich_operator(lambda p: model_fn(p, inputs), params, middle)
    return _checks.checked_matvec(matvec, params)


def mc_fisher_vp(
    model_fn: Callable,
    loss: Loss,
    params: PyTree,
    v: PyTree,
    inputs: Any,
    targets: Any,
    *,
    key: jax.Array,
    num_samples: int = 1,
) -> PyTree:
    """Monte-Carlo Fisher-vector product; see :func:`mc_fisher_operator`."""
    _checks.check_like("v", v, "params", params)
    operator = mc_fisher_operator(model_fn, loss, params, inputs, targets, key=key, num_samples=num_samples)
    return operator(v)


def empirical_fisher_operator(
    loss_fn: Callable, params: PyTree, batch: Any, *, chunk_size: int | None = None
) -> MatVec:
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` as a matvec.

    Computed as ``J_l^T J_l v / N`` with ``J_l`` the Jacobian of the vector of
    per-example losses: one forward and one backward pass per product, and no
    per-example gradient is ever held in memory. With ``chunk_size`` the batch
    is processed that many examples at a time (memory of one chunk).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example
        (the library vmaps it over the batch).
      params: any pytree of floating arrays.
      batch: a pytree of arrays with a leading example axis.
      chunk_size: examples per chunk; the whole batch at once by default.

    Returns:
      A function from a pytree like ``params`` to ``F_emp v``.
    """
    _checks.check_floating("params", params)
    num_examples = _checks.leading_size("batch", batch)

    def chunk_matvec(v: PyTree, chunk: Any) -> PyTree:
        size = _checks.leading_size("batch", chunk)
        example_loss = lambda p, example: _checks.scalar_fn("loss_fn", loss_fn, example)(p)
        losses = lambda p: jax.vmap(example_loss, in_axes=(None, 0))(p, chunk)
        return sandwich_operator(losses, params, lambda _: lambda u: u / size)(v)

    matvec = average_over_chunks(chunk_matvec, batch, chunk_size=chunk_size or num_examples)
    return _checks.checked_matvec(matvec, params)


def empirical_fisher_vp(
    loss_fn: Callable, params: PyTree, v: PyTree, batch: Any, *, chunk_size: int | None = None
) -> PyTree:
    """Empirical Fisher-vector product; see :func:`empirical_fisher_operator`.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> loss_fn = lambda w, x: jnp.dot(w, x)  # per-example gradient is x
      >>> xs = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> hvpopt.empirical_fisher_vp(loss_fn, jnp.zeros(2), jnp.ones(2), xs)
      Array([2., 3.], dtype=float32)
    """
    _checks.check_like("v", v, "params", params)
    return empirical_fisher_operator(loss_fn, params, batch, chunk_size=chunk_size)(v)


def sampled_gradient(
    model_fn: Callable, loss: Loss, params: PyTree, inputs: Any, targets: Any, *, key: jax.Array
) -> PyTree:
    """A gradient ``g_hat`` with ``E[g_hat g_hat^T] = F``: one backpropagation of labels drawn from the model.

    .. math:: \\hat g = \\sum_i \\sqrt{w_i}\\, J_i^\\top \\nabla_{f_i} \\ell(f_i, \\hat y_i),\\quad
       \\hat y_i \\sim p(\\cdot | f_i),\\qquad \\mathbb{E}[\\hat g \\hat g^\\top] = \\sum_i w_i J_i^\\top H_i J_i = F

    with ``w_i`` the loss's position weights (summing to one): the scores of
    different positions are independent with mean zero, so their cross terms
    vanish in expectation. ``g_hat ** 2`` is an unbiased estimate of the
    Fisher's (here the Gauss-Newton matrix's) diagonal; with uniform weights
    over ``B`` positions it is the ``B * grad^2`` of the Gauss-Newton-Bartlett
    estimator of Sophia-G (Liu et al., 2023).

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``.
      loss: one of :mod:`hvpopt.losses`.
      params: any pytree of floating arrays.
      inputs: the model's inputs.
      targets: the observed targets (only masks and shapes are used).
      key: a JAX PRNG key for the sampled labels.

    Returns:
      ``g_hat``, with the structure of ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> x, y = jnp.eye(3), jnp.array([0, 1, 2])
      >>> g = hvpopt.sampled_gradient(lambda w, x: x @ w, hvpopt.losses.softmax_cross_entropy,
      ...                             jnp.zeros((3, 3)), x, y, key=jax.random.key(0))
      >>> g.shape
      (3, 3)
    """
    _check_loss(loss, "sampled_gradient")
    _checks.check_floating("params", params)
    outputs, pullback = jax.vjp(lambda p: model_fn(p, inputs), params)
    labels = loss.sample_targets(key, outputs, targets)
    return pullback(weighted_score(loss, outputs, targets, labels))[0]


def weighted_score(loss: Loss, outputs: jax.Array, targets: Any, labels: Any) -> jax.Array:
    """``sqrt(w) * d l(outputs, labels) / d outputs`` per position, ``w`` the loss's weights at ``targets``."""
    outputs = jax.lax.stop_gradient(outputs)
    score = jax.grad(lambda o: jnp.sum(loss.per_position(o, labels)))(outputs)
    return score * jnp.sqrt(loss.weights(outputs, targets))[..., None]


def _check_loss(loss: Any, caller: str) -> None:
    if not isinstance(loss, Loss):
        raise TypeError(
            f"{caller} needs loss to be one of hvpopt.losses (softmax_cross_entropy, "
            "masked_softmax_cross_entropy, squared_error), whose predictive "
            f"distribution is known; got {type(loss).__name__}. For another loss "
            "use empirical_fisher_vp or ggn_vp."
        )
