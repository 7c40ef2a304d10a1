"""Small flax (NNX) models, each returned as a pure ``model_fn(params, inputs)``.

The curvature functions take a plain parameter pytree and a pure function, so
every constructor here returns ``(model_fn, params)`` with ``params`` the
model's ``nnx.Param`` state (a pytree) and ``model_fn`` merging it back into the
module to run it. :func:`pure` does this for any NNX module of your own.
"""

from hvpopt.testbed.models._functional import pure
from hvpopt.testbed.models.mlp import logistic_regression, mlp
from hvpopt.testbed.models.transformer import TransformerConfig, transformer_classifier, transformer_lm

__all__ = ["TransformerConfig", "logistic_regression", "mlp", "pure", "transformer_classifier", "transformer_lm"]
