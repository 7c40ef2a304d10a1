"""A model run with its dense layers tapped: each layer's inputs recorded, a zero added to its outputs.

The cotangent of the zero added to a layer's output is the gradient of the loss
with respect to that output: with the recorded inputs, what Kronecker factors
are made of. The traced jaxpr is evaluated equation by equation; a call, a
remat or a scan that holds a layer is evaluated the same way inside a call, a
``jax.checkpoint`` or a ``lax.scan`` of its own, so a scanned stack stays a scan
(its inputs leave it as stacked outputs, its perturbations enter as scanned
inputs) and compile time does not grow with its depth. The body of a
``custom_jvp`` or ``custom_vjp`` function that holds a layer is run as written:
its custom derivative rule is not used there. Everything else is bound as it was
traced.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from hvpopt.curvature.dense_layers import REMAT_OPS, DenseLayer, Site, analyse, sub_jaxpr, trace
from hvpopt.types import PyTree

__all__ = ["TappedModel", "tapped_model"]


class TappedModel(NamedTuple):
    """A traced model with its dense layers tapped; see :func:`tapped_model`.

    Attributes:
      layers: the dense layers, ordered by weight leaf.
      run: ``(params, inputs, perturbations) -> (outputs, activations)``.
      perturbation_shapes: per layer, ``(*stack, positions, out_features)``.
      position_shapes: per layer, the shape of its positions at one application (the activation's free axes),
        with the iterations of the scans that repeat it in front.
    """

    layers: tuple[DenseLayer, ...]
    run: Callable
    perturbation_shapes: tuple[tuple[int, ...], ...]
    position_shapes: tuple[tuple[int, ...], ...]


def tapped_model(model_fn: Callable, params: PyTree, inputs: Any, *, embeddings: bool = False) -> TappedModel:
    """The model traced at these shapes, runnable with its dense layers' inputs and outputs tapped.

    ``run(params, inputs, perturbations) -> (outputs, activations)`` evaluates
    the model with ``perturbations[l]`` (``[*stack, positions, out]``, zeros)
    added to layer ``l``'s output, and returns each layer's input as
    ``[*stack, positions, in]`` (an embedding's: its token ids ``[*stack,
    positions]``). The cotangent of ``perturbations[l]`` is the gradient with
    respect to layer ``l``'s output. ``stack`` is a stack of layers' leading
    axes (:attr:`DenseLayer.stack`); ``positions`` counts every application of
    the layer, the iterations of a scan that repeats it included.

    Args:
      model_fn, params, inputs, embeddings: as for :func:`hvpopt.find_dense_layers`.
    """
    closed = trace(model_fn, params, inputs)
    analysis = analyse(closed, params, embeddings=embeddings)
    sites = analysis.sites
    tree = _tap_tree(sites)
    num_args = len(closed.jaxpr.invars)

    def run(params: PyTree, inputs: Any, perturbations: tuple) -> tuple[jax.Array, tuple]:
        args = [*jax.tree.leaves(params), *jax.tree.leaves(inputs)]
        if len(args) != num_args:
            raise ValueError("params and inputs must have the structure the layers were found at.")
        native = {k: _to_native(site, p) for k, (site, p) in enumerate(zip(sites, perturbations))}
        outs, recorded = _evaluate(tree, closed.jaxpr, closed.consts, args, native, sites)
        return outs[0], tuple(_from_native(site, recorded[k]) for k, site in enumerate(sites))

    shapes = tuple((*layer.stack, _positions(site), layer.out_features) for layer, site in zip(analysis.layers, sites))
    positions = tuple((*_repeats(site), *site.positions) for site in sites)
    return TappedModel(analysis.layers, run, shapes, positions)


def _repeats(site: Site) -> tuple[int, ...]:
    """The lengths of the scans that repeat a layer over more positions (not over its stack)."""
    return tuple(length for level, length in enumerate(site.loops) if level not in site.stack_levels)


def _positions(site: Site) -> int:
    return math.prod(_repeats(site)) * math.prod(site.positions)


def _tap_tree(sites: tuple[Site, ...]) -> dict:
    """Nested ``{equation: subtree}`` along each site's path, ending in the site's number."""
    tree = {}
    for k, site in enumerate(sites):
        node = tree
        for number in site.path[:-1]:
            node = node.setdefault(number, {})
        node[site.path[-1]] = k
    return tree


def _tap_ids(node) -> list[int]:
    return [node] if isinstance(node, int) else [k for child in node.values() for k in _tap_ids(child)]


def _native_order(site: Site) -> list[int]:
    """Where each scan level's axis is in the ``[*stack, *repeats]`` layout."""
    repeats = [level for level in range(len(site.loops)) if level not in site.stack_levels]
    return [site.stack_levels.index(lv) if lv in site.stack_levels else len(site.stack_levels) + repeats.index(lv)
            for lv in range(len(site.loops))]  # fmt: skip


def _to_native(site: Site, perturbation: jax.Array) -> jax.Array:
    """``[*stack, positions, out]`` as ``[*loops, one application's positions, out]``, the scans' nesting order."""
    stack = [site.loops[level] for level in site.stack_levels]
    x = perturbation.reshape(*stack, *_repeats(site), math.prod(site.positions), site.out_features)
    n = len(site.loops)
    return jnp.transpose(x, (*_native_order(site), n, n + 1))


def _from_native(site: Site, activation: jax.Array) -> jax.Array:
    """``[*loops, one application's positions, ...]`` as ``[*stack, positions, ...]``."""
    n = len(site.loops)
    inverse = np.argsort(_native_order(site)).tolist()
    x = jnp.transpose(activation, (*inverse, *range(n, activation.ndim)))
    stack = [site.loops[level] for level in site.stack_levels]
    return x.reshape(*stack, -1, *activation.shape[n + 1 :])


def _bind(eqn, invals: list) -> list:
    bound = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) before JAX 0.7, params since
    subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _evaluate(tree: dict, jaxpr, consts, args, perturbations: dict, sites) -> tuple[list, dict]:
    """``jaxpr``'s outputs with the taps of ``tree`` applied, and the activations they recorded."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
    recorded = {}
    for number, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        node = tree.get(number)
        if node is None:
            outs = _bind(eqn, invals)
        elif isinstance(node, int):
            outs = _bind(eqn, invals)
            recorded[node], outs[0] = _tap(sites[node], invals, outs[0], perturbations[node])
        else:
            inner = {k: perturbations[k] for k in _tap_ids(node)}
            outs, found = _nested(eqn, node, invals, inner, sites)
            recorded.update(found)
        for var, value in zip(eqn.outvars, outs):
            if not isinstance(var, core.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars], recorded


def _tap(site: Site, invals: list, out: jax.Array, perturbation: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The layer's input as ``[positions, in]`` (token ids ``[positions]``), and its output plus the perturbation."""
    x = jax.lax.stop_gradient(invals[site.operand])
    if site.lookup:
        activation = x[..., site.activation_axes[0]].reshape(-1)
    else:
        activation = jnp.transpose(x, site.activation_axes).reshape(-1, site.in_features)
    added = perturbation.reshape(*[out.shape[d] for d in site.output_axes])
    added = jnp.transpose(added, tuple(np.argsort(site.output_axes)))
    return activation, out + added.astype(out.dtype)


def _nested(eqn, tree: dict, invals: list, perturbations: dict, sites) -> tuple[list, dict]:
    """A call, remat or scan holding taps, evaluated with them as the same kind of call."""
    body, consts = sub_jaxpr(eqn)
    name = eqn.primitive.name
    if name != "scan":
        evaluate = lambda invals, perturbations: _evaluate(tree, body, consts, invals, perturbations, sites)
        if name in REMAT_OPS:
            evaluate = jax.checkpoint(evaluate, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
        return evaluate(invals, perturbations)
    num_consts, num_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    fixed, init, xs = invals[:num_consts], invals[num_consts : num_consts + num_carry], invals[num_consts + num_carry :]

    def step(carry, scanned):
        x, perturbation = scanned
        outs, found = _evaluate(tree, body, consts, [*fixed, *carry, *x], perturbation, sites)
        return outs[:num_carry], (outs[num_carry:], found)

    carry, (ys, found) = jax.lax.scan(
        step, init, (xs, perturbations), length=eqn.params["length"], reverse=eqn.params["reverse"],
        unroll=eqn.params["unroll"],
    )  # fmt: skip
    return [*carry, *ys], found
