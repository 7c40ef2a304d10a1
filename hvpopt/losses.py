"""Losses on model outputs that know their output Hessian and their sampling law.

A :class:`Loss` is called like an ordinary loss, ``loss(outputs, targets) ->
scalar``, and also carries what the Gauss-Newton and Fisher products need:

* ``output_hessian(outputs, targets)``: ``u -> H_L u`` with ``H_L`` the Hessian of
  the loss in the outputs, in closed form. For softmax cross-entropy this is
  ``w * (p * u - p <p, u>)`` per position, so a language model never builds a
  ``batch x sequence x vocab x vocab`` tensor.
* ``sample_targets(key, outputs, targets)``: targets drawn from the model's own
  predictive distribution, for the Monte-Carlo Fisher.

Every loss here is the negative log-likelihood of an exponential family in its
natural parameters (softmax: categorical; squared error: unit-variance
Gaussian), so its output Hessian is also its output Fisher information: the
Gauss-Newton matrix and the true Fisher coincide (Martens, 2020, section 9.2).

Conventions: ``outputs`` has shape ``[..., K]``; each of the leading positions
(examples, or tokens of a sequence) contributes one term, and the loss is the
weighted sum of the per-position terms with weights summing to one (the mean
over positions, or over unmasked positions).

Reference:
  Martens, "New insights and perspectives on the natural gradient method",
  JMLR 2020.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hvpopt.types import MatVec

__all__ = ["Loss", "masked_softmax_cross_entropy", "softmax_cross_entropy", "squared_error"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss on model outputs with its analytic output Hessian.

    Attributes:
      name: a short name for messages and metadata.
      per_position: ``(outputs, targets) -> [...]``, the unreduced loss of each
        position (the leading axes of ``outputs``).
      weights: ``(outputs, targets) -> [...]``, the weight of each position; the
        loss is ``sum(weights * per_position)``.
      output_hessian: ``(outputs, targets) -> (u -> H_L u)``.
      sample_targets: ``(key, outputs, targets) -> targets`` drawn from the
        model's predictive distribution (masks are kept).
      output_hessian_factor: ``outputs -> S [..., K, K]`` with ``S S^T`` the
        unweighted Hessian of one position's term (the columns are ``S[..., :, k]``):
        the closed-form Fisher of K-FAC backpropagates its ``K`` columns.
    """

    name: str
    per_position: Callable[[Array, Any], Array]
    weights: Callable[[Array, Any], Array]
    output_hessian: Callable[[Array, Any], MatVec]
    sample_targets: Callable[[Array, Array, Any], Any]
    output_hessian_factor: Callable[[Array], Array]

    def __call__(self, outputs: Array, targets: Any) -> Array:
        return jnp.sum(self.weights(outputs, targets) * self.per_position(outputs, targets))


def _uniform_weights(outputs: Array, targets: Any) -> Array:
    positions = outputs.shape[:-1]
    return jnp.full(positions, 1.0 / max(1, _size(positions)), outputs.dtype)


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _cross_entropy_terms(logits: Array, labels: Array) -> Array:
    labels = jnp.clip(labels, 0, logits.shape[-1] - 1)  # padding may hold any id
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logits


def _softmax_hessian(weights: Array, logits: Array) -> MatVec:
    """``u -> w * (diag(p) - p p^T) u`` per position, ``p = softmax(logits)``."""
    probs = jax.nn.softmax(logits, axis=-1)

    def matvec(u: Array) -> Array:
        pu = probs * u
        return weights[..., None] * (pu - probs * jnp.sum(pu, axis=-1, keepdims=True))

    return matvec


def _ce_per_position(logits: Array, labels: Array) -> Array:
    if isinstance(labels, tuple):
        raise TypeError(
            "softmax_cross_entropy takes integer labels; for (labels, mask) targets use masked_softmax_cross_entropy."
        )
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"softmax cross-entropy labels must be integer class ids; got dtype {labels.dtype}.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {logits.shape[:-1]} (the logits without their class axis); got {labels.shape}."
        )
    return _cross_entropy_terms(logits, labels)


def _masked_ce_per_position(logits: Array, targets: tuple[Array, Array]) -> Array:
    labels, _ = _unpack_masked(targets)
    return _ce_per_position(logits, labels)


def _unpack_masked(targets: Any) -> tuple[Array, Array]:
    if not isinstance(targets, tuple) or len(targets) != 2:
        raise TypeError(f"masked_softmax_cross_entropy takes targets=(labels, mask); got {type(targets).__name__}.")
    labels, mask = targets
    if jnp.shape(mask) != jnp.shape(labels):
        raise ValueError(f"mask must have the shape of labels {jnp.shape(labels)}; got {jnp.shape(mask)}.")
    return labels, mask


def _masked_weights(logits: Array, targets: tuple[Array, Array]) -> Array:
    mask = _unpack_masked(targets)[1].astype(logits.dtype)
    return mask / jnp.maximum(jnp.sum(mask), 1.0)


def _ce_hessian(weights_fn: Callable) -> Callable:
    return lambda logits, targets: _softmax_hessian(weights_fn(logits, targets), logits)


def _softmax_hessian_factor(logits: Array) -> Array:
    """``S = diag(sqrt p) - p sqrt(p)^T``, so ``S S^T = diag(p) - p p^T`` (as ``sum_k p_k = 1``)."""
    probs = jax.nn.softmax(logits, axis=-1)
    root = jnp.sqrt(probs)
    return root[..., None, :] * (jnp.eye(logits.shape[-1], dtype=logits.dtype) - probs[..., :, None])


def _sample_labels(key: Array, logits: Array, labels: Array) -> Array:
    sampled = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
    return sampled.astype(jnp.asarray(labels).dtype)


def _sample_masked_labels(key: Array, logits: Array, targets: Any) -> Any:
    labels, mask = _unpack_masked(targets)
    return _sample_labels(key, logits, labels), mask


#: Mean softmax cross-entropy with integer labels.
#:
#: ``loss(logits, labels) = mean_i [logsumexp(logits_i) - logits_i[labels_i]]`` over
#: every leading position ``i``; ``labels`` has shape ``logits.shape[:-1]``.
softmax_cross_entropy = Loss(
    name="softmax_cross_entropy",
    per_position=_ce_per_position,
    weights=_uniform_weights,
    output_hessian=_ce_hessian(_uniform_weights),
    sample_targets=_sample_labels,
    output_hessian_factor=_softmax_hessian_factor,
)

#: Softmax cross-entropy averaged over unmasked positions.
#:
#: ``loss(logits, (labels, mask)) = sum_i m_i ce_i / sum_i m_i`` with ``mask`` of the
#: shape of ``labels`` (1 for a real token, 0 for padding). Labels at padded
#: positions may hold any integer. An all-padding batch has loss 0, not NaN.
masked_softmax_cross_entropy = Loss(
    name="masked_softmax_cross_entropy",
    per_position=_masked_ce_per_position,
    weights=_masked_weights,
    output_hessian=_ce_hessian(_masked_weights),
    sample_targets=_sample_masked_labels,
    output_hessian_factor=_softmax_hessian_factor,
)


def _se_per_position(outputs: Array, targets: Array) -> Array:
    if jnp.shape(targets) != outputs.shape:
        raise ValueError(
            f"squared_error targets must have the shape of the outputs {outputs.shape}; got {jnp.shape(targets)}."
        )
    return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1)


def _se_hessian(outputs: Array, targets: Array) -> MatVec:
    weights = _uniform_weights(outputs, targets)[..., None]
    return lambda u: weights * u


def _sample_gaussian(key: Array, outputs: Array, targets: Array) -> Array:
    mean = jax.lax.stop_gradient(outputs)
    return mean + jax.random.normal(key, mean.shape, mean.dtype)


#: Half squared error, summed over the last axis, averaged over positions.
#:
#: ``loss(outputs, targets) = mean_i 0.5 * ||outputs_i - targets_i||^2``; the negative
#: log-likelihood of a unit-variance Gaussian up to a constant. A scalar regression
#: uses outputs of shape ``[batch, 1]``.
squared_error = Loss(
    name="squared_error",
    per_position=_se_per_position,
    weights=_uniform_weights,
    output_hessian=_se_hessian,
    sample_targets=_sample_gaussian,
    output_hessian_factor=lambda outputs: jnp.broadcast_to(
        jnp.eye(outputs.shape[-1], dtype=outputs.dtype), (*outputs.shape, outputs.shape[-1])
    ),
)
