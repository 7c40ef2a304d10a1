"""Finding the dense layers of any model from its jaxpr, with nothing registered.

A *dense layer* is a matrix product ``out = x W`` (``x @ W``, ``jnp.dot``,
``jnp.einsum``, ``lax.dot_general``) in which one operand is a parameter leaf,
seen through reshapes, transposes and casts, and the other is not computed from
parameters alone. Its contracted axes are the layer's inputs, the weight's
other axes its outputs, the activation's other axes its *positions* (examples,
tokens, heads of a shared projection). A parameter leaf used only as an addend
to that product's output, broadcast over the positions, is its bias.

:func:`find_dense_layers` traces ``model_fn`` to a jaxpr (with ``jax.jit``
inlined) and reads every parameter leaf's uses:

* used once, as the weight of a dense product: a Kronecker-factored layer;
* used as a dense product's weight and otherwise only as the table of
  embedding lookups (``gather``), as tied embeddings are: the same, with the
  lookups' part of its curvature left to the EK-FAC eigenvalue correction,
  which sees the whole per-example gradient;
* anything else (embeddings, layer-norm scales, per-head weights with a batch
  axis, a weight used in two products): a diagonal treatment.

:func:`layer_coverage` reports each leaf, its shape and its treatment.
:func:`tapped_model` runs the traced model with the layers' inputs recorded and
a zero added to each layer's output, whose cotangent is the gradient of the
loss with respect to that output: what the Kronecker factors are made of.

Weight sharing (a layer applied at every token) is handled by treating each
position as an example of its own, the "expand" setting of Eschenhagen et al.
(2023) for a loss summed over positions.

Reference:
  Eschenhagen, Immer, Turner, Schneider, Hennig, "Kronecker-factored
  approximate curvature for modern neural network architectures", NeurIPS 2023.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from hvpopt.types import PyTree

__all__ = ["DenseLayer", "LeafTreatment", "TappedModel", "find_dense_layers", "layer_coverage", "tapped_model"]

#: Operations that move or cast a weight's entries without combining them.
_VIEW_OPS = frozenset({"reshape", "transpose", "convert_element_type", "squeeze", "expand_dims", "copy", "copy_p"})
#: A bias may also be broadcast over the positions.
_BIAS_VIEW_OPS = _VIEW_OPS | {"broadcast_in_dim"}


class _Order:
    """A permutation of a leaf's entries into a matrix's, compared and hashed by content (jit keys on it)."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices
        self.inverse = np.argsort(indices)
        self._key = indices.tobytes()

    def __eq__(self, other):
        return isinstance(other, _Order) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A dense layer found in a model: which leaves it uses and how its weight is a matrix.

    Attributes:
      name: the weight leaf's path in the parameter pytree.
      weight: the weight's index among ``jax.tree.leaves(params)``.
      bias: the bias's leaf index, or None.
      in_features: the layer's inputs (the contracted size), bias excluded.
      out_features: the layer's outputs.
      tied: the weight is also the table of embedding lookups.
    """

    name: str
    weight: int
    bias: int | None
    in_features: int
    out_features: int
    tied: bool = False
    order: _Order | None = dataclasses.field(default=None, repr=False)

    def matrix(self, weight: jax.Array) -> jax.Array:
        """The weight leaf (or a vector shaped like it) as the ``[in_features, out_features]`` matrix."""
        flat = weight.reshape(-1)
        if self.order is not None:
            flat = flat[self.order.indices]
        return flat.reshape(self.in_features, self.out_features)

    def unmatrix(self, matrix: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The inverse of :meth:`matrix`: an ``[in_features, out_features]`` matrix as a leaf of ``shape``."""
        flat = matrix.reshape(-1)
        if self.order is not None:
            flat = flat[self.order.inverse]
        return flat.reshape(shape)


class LeafTreatment(NamedTuple):
    """One row of :func:`layer_coverage`: a parameter leaf, its shape, and how K-FAC treats it.

    ``treatment`` is ``"kfac weight"``, ``"kfac weight (tied: also an embedding
    lookup)"``, ``"kfac bias"`` or ``"diagonal"``; ``layer`` names the layer's
    weight for the first three.
    """

    path: str
    shape: tuple[int, ...]
    treatment: str
    layer: str | None


class _Tap(NamedTuple):
    """Where a layer is in one trace: the product's equation, its activation operand, and the axis orders
    that make the activation ``[positions, in]`` and the output ``[positions, out]``."""

    layer: DenseLayer
    equation: int
    operand: int
    activation_axes: tuple[int, ...]
    output_axes: tuple[int, ...]
    positions: tuple[int, ...]


class _Use(NamedTuple):
    equation: int
    operand: int
    chain: tuple  # the view equations from the leaf to the operand


def _trace(model_fn: Callable, params: PyTree, inputs: Any):
    """``model_fn``'s jaxpr with every nested ``jit`` inlined, and its output structure."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), (params, inputs))
    with jax.disable_jit():
        closed, out_shape = jax.make_jaxpr(model_fn, return_shape=True)(*shapes)
    if not isinstance(out_shape, jax.ShapeDtypeStruct):
        raise TypeError(
            "model_fn must return one array of outputs [..., K]; got a "
            f"{type(out_shape).__name__}. Wrap it to return the array the loss takes."
        )
    return closed


def _leaf_uses(jaxpr, num_leaves: int) -> dict[int, list[_Use]]:
    """Every use of each parameter leaf that is not a view: ``(equation, operand, view chain)``."""
    origin = {var: (leaf, ()) for leaf, var in enumerate(jaxpr.invars[:num_leaves])}
    uses = {leaf: [] for leaf in range(num_leaves)}
    for index, eqn in enumerate(jaxpr.eqns):
        sources = [(k, origin[v]) for k, v in enumerate(eqn.invars) if not isinstance(v, core.Literal) and v in origin]
        if eqn.primitive.name in _BIAS_VIEW_OPS and len(eqn.invars) == 1 and sources:
            leaf, chain = sources[0][1]
            origin[eqn.outvars[0]] = (leaf, (*chain, eqn))
            continue
        for operand, (leaf, chain) in sources:
            uses[leaf].append(_Use(index, operand, chain))
    for var in jaxpr.outvars:
        if not isinstance(var, core.Literal) and var in origin:
            uses[origin[var][0]].append(_Use(len(jaxpr.eqns), 0, ()))
    return uses


def _apply_chain(chain: tuple, value: np.ndarray) -> np.ndarray:
    """The view equations applied to an integer array (casts skipped): where each entry moves."""
    with jax.ensure_compile_time_eval():  # concrete even while an outer function is traced
        out = jnp.asarray(value)
        for eqn in chain:
            if eqn.primitive.name not in ("convert_element_type", "copy", "copy_p"):
                out = eqn.primitive.bind(out, **eqn.params)
        return np.asarray(out)


def _dense_tap(jaxpr, use: _Use, leaf_shape, weight_origins: set) -> tuple | None:
    """If ``use`` is the weight of a dense product: ``(tap fields, order, in, out)``; else None."""
    eqn = jaxpr.eqns[use.equation] if use.equation < len(jaxpr.eqns) else None
    if (
        eqn is None
        or eqn.primitive.name != "dot_general"
        or any(e.primitive.name == "broadcast_in_dim" for e in use.chain)
    ):
        return None
    other = 1 - use.operand
    if not isinstance(eqn.invars[other], core.Literal) and eqn.invars[other] in weight_origins:
        return None  # a product of two parameters does not factor
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if batch_l or batch_r:
        return None  # a batch axis (per-head weights) is not one shared matrix
    w_contract, x_contract = (contract_l, contract_r) if use.operand == 0 else (contract_r, contract_l)
    w_shape, x_shape = eqn.invars[use.operand].aval.shape, eqn.invars[other].aval.shape
    w_free = [d for d in range(len(w_shape)) if d not in w_contract]
    x_free = [d for d in range(len(x_shape)) if d not in x_contract]
    # dot_general's output axes: the lhs's free axes, then the rhs's.
    n_x, n_w = len(x_free), len(w_free)
    x_out, w_out = (range(n_w, n_w + n_x), range(n_w)) if use.operand == 0 else (range(n_x), range(n_x, n_x + n_w))
    in_features = math.prod(w_shape[d] for d in w_contract)
    out_features = math.prod(w_shape[d] for d in w_free)
    viewed = _apply_chain(use.chain, np.arange(math.prod(leaf_shape)).reshape(leaf_shape))
    indices = np.transpose(viewed, (*w_contract, *w_free)).reshape(-1)
    order = None if np.array_equal(indices, np.arange(indices.size)) else _Order(indices)
    fields = (use.equation, other, (*x_free, *x_contract), (*x_out, *w_out), tuple(x_shape[d] for d in x_free))
    return fields, order, in_features, out_features


def _is_bias(jaxpr, use: _Use, leaf_shape, product: int, output_axes, out_features: int) -> bool:
    """Whether ``use`` adds the leaf to product ``product``'s output, one entry per output feature."""
    eqn = jaxpr.eqns[use.equation] if use.equation < len(jaxpr.eqns) else None
    if eqn is None or eqn.primitive.name not in ("add", "add_any") or math.prod(leaf_shape) != out_features:
        return False
    other = eqn.invars[1 - use.operand]
    if isinstance(other, core.Literal) or other is not jaxpr.eqns[product].outvars[0]:
        return False
    out_shape = other.aval.shape
    try:
        placed = np.broadcast_to(_apply_chain(use.chain, np.arange(out_features).reshape(leaf_shape)), out_shape)
    except ValueError:
        return False
    rows = np.transpose(placed, output_axes).reshape(-1, out_features)
    return bool(np.all(rows == np.arange(out_features)))


def _analyse(closed, params: PyTree) -> tuple[list[_Tap], list[LeafTreatment]]:
    jaxpr = closed.jaxpr
    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = [tuple(jnp.shape(leaf)) for _, leaf in paths_leaves]
    paths = [jax.tree_util.keystr(path) for path, _ in paths_leaves]
    uses = _leaf_uses(jaxpr, len(shapes))
    origins = set(jaxpr.invars[: len(shapes)])
    for eqn in jaxpr.eqns:  # the views of parameters are parameters too
        single = eqn.invars[0] if len(eqn.invars) == 1 else None
        if eqn.primitive.name in _BIAS_VIEW_OPS and not isinstance(single, (core.Literal, type(None))):
            if single in origins:
                origins.add(eqn.outvars[0])
    found = {}
    for leaf, leaf_uses in uses.items():
        dense = [(use, _dense_tap(jaxpr, use, shapes[leaf], origins)) for use in leaf_uses]
        dense = [(use, tap) for use, tap in dense if tap is not None]
        lookups = [u for u in leaf_uses if u.equation < len(jaxpr.eqns) and _is_lookup(jaxpr.eqns[u.equation], u)]
        if len(dense) == 1 and len(leaf_uses) == 1 + len(lookups):
            found[leaf] = (dense[0][1], bool(lookups))
    taps, biases = [], {}
    for leaf, ((fields, order, in_features, out_features), tied) in found.items():
        bias = None
        for other, other_uses in uses.items():
            if other in found or other in biases or len(other_uses) != 1:
                continue
            if _is_bias(jaxpr, other_uses[0], shapes[other], fields[0], fields[3], out_features):
                bias = other
                break
        if bias is not None:
            biases[bias] = leaf
        layer = DenseLayer(paths[leaf], leaf, bias, in_features, out_features, tied, order)
        taps.append(_Tap(layer, *fields))
    by_weight = {tap.layer.weight: tap.layer for tap in taps}
    report = []
    for leaf, (path, shape) in enumerate(zip(paths, shapes)):
        if leaf in by_weight:
            tied = " (tied: also an embedding lookup)" if by_weight[leaf].tied else ""
            report.append(LeafTreatment(path, shape, f"kfac weight{tied}", path))
        elif leaf in biases:
            report.append(LeafTreatment(path, shape, "kfac bias", paths[biases[leaf]]))
        else:
            report.append(LeafTreatment(path, shape, "diagonal", None))
    return sorted(taps, key=lambda tap: tap.layer.weight), report


def _is_lookup(eqn, use: _Use) -> bool:
    """An embedding lookup: a gather from the leaf (operand 0) as a table."""
    return eqn.primitive.name == "gather" and use.operand == 0


def find_dense_layers(model_fn: Callable, params: PyTree, inputs: Any) -> tuple[DenseLayer, ...]:
    """The dense layers of ``model_fn`` at these parameters and input shapes, ordered by weight leaf.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``, one array.
      params: any pytree of arrays (only shapes and dtypes are read).
      inputs: a batch of inputs (only shapes and dtypes are read).

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(3)}
      >>> model_fn = lambda p, x: (x * p["scale"]) @ p["w"] + p["b"]
      >>> [(layer.name, layer.in_features, layer.out_features) for layer in
      ...  hvpopt.find_dense_layers(model_fn, params, jnp.zeros((4, 3)))]
      [("['w']", 3, 2)]
    """
    return tuple(tap.layer for tap in _analyse(_trace(model_fn, params, inputs), params)[0])


def layer_coverage(model_fn: Callable, params: PyTree, inputs: Any) -> list[LeafTreatment]:
    """Each parameter leaf, its shape and its treatment: part of a Kronecker-factored layer, or diagonal.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(3)}
      >>> model_fn = lambda p, x: (x * p["scale"]) @ p["w"] + p["b"]
      >>> for row in hvpopt.layer_coverage(model_fn, params, jnp.zeros((4, 3))):
      ...     print(row.path, row.shape, row.treatment)
      ['b'] (2,) kfac bias
      ['scale'] (3,) diagonal
      ['w'] (3, 2) kfac weight
    """
    return _analyse(_trace(model_fn, params, inputs), params)[1]


class TappedModel(NamedTuple):
    """A traced model with its dense layers tapped; see :func:`tapped_model`.

    Attributes:
      layers: the dense layers, ordered by weight leaf.
      run: ``(params, inputs, perturbations) -> (outputs, activations)``.
      perturbation_shapes: per layer, ``(positions, out_features)``.
      position_shapes: per layer, the shape of its positions (the activation's free axes).
    """

    layers: tuple[DenseLayer, ...]
    run: Callable
    perturbation_shapes: tuple[tuple[int, int], ...]
    position_shapes: tuple[tuple[int, ...], ...]


def tapped_model(model_fn: Callable, params: PyTree, inputs: Any) -> TappedModel:
    """The model traced at these shapes, runnable with its dense layers' inputs and outputs tapped.

    ``run(params, inputs, perturbations) -> (outputs, activations)`` evaluates
    the model with ``perturbations[l]`` (``[positions, out]``, zeros) added to
    layer ``l``'s output, and returns each layer's input as ``[positions,
    in]``. The cotangent of ``perturbations[l]`` is the gradient with respect
    to layer ``l``'s output, ``[positions, out]``.
    """
    closed = _trace(model_fn, params, inputs)
    taps = _analyse(closed, params)[0]
    num_leaves = len(jax.tree.leaves(params))
    at = {tap.equation: k for k, tap in enumerate(taps)}

    def run(params: PyTree, inputs: Any, perturbations: tuple) -> tuple[jax.Array, tuple]:
        args = [*jax.tree.leaves(params), *jax.tree.leaves(inputs)]
        if len(args) != len(closed.jaxpr.invars) or num_leaves != len(jax.tree.leaves(params)):
            raise ValueError("params and inputs must have the structure the layers were found at.")
        activations = [None] * len(taps)
        env = dict(zip(closed.jaxpr.constvars, closed.consts))
        env.update(zip(closed.jaxpr.invars, args))
        read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
        for index, eqn in enumerate(closed.jaxpr.eqns):
            bound = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) before JAX 0.7, params since
            subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
            invals = [read(v) for v in eqn.invars]
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            outs = list(outs) if eqn.primitive.multiple_results else [outs]
            if index in at:
                k = at[index]
                tap = taps[k]
                x = jax.lax.stop_gradient(invals[tap.operand])
                activations[k] = jnp.transpose(x, tap.activation_axes).reshape(-1, tap.layer.in_features)
                inverse_axes = tuple(np.argsort(tap.output_axes))
                added = perturbations[k].reshape(*tap.positions, tap.layer.out_features)
                added = jnp.transpose(added.reshape(*[outs[0].shape[d] for d in tap.output_axes]), inverse_axes)
                outs[0] = outs[0] + added.astype(outs[0].dtype)
            for var, value in zip(eqn.outvars, outs):
                if not isinstance(var, core.DropVar):
                    env[var] = value
        return read(closed.jaxpr.outvars[0]), tuple(activations)

    shapes = tuple((math.prod(tap.positions), tap.layer.out_features) for tap in taps)
    return TappedModel(tuple(tap.layer for tap in taps), run, shapes, tuple(tap.positions for tap in taps))
