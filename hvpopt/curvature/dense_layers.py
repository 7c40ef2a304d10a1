"""Finding the dense layers of any model from its jaxpr, with nothing registered.

A *dense layer* is a matrix product ``out = x W`` (``x @ W``, ``jnp.dot``,
``jnp.einsum``, ``lax.dot_general``) in which one operand is a parameter leaf,
or a part of one, seen through reshapes, transposes, casts and static slices,
and the other is not a parameter. Its contracted axes are the layer's inputs,
the weight's other axes its outputs, the activation's other axes its
*positions* (examples, tokens, heads of a shared projection). A parameter leaf
added to that product's output, one entry per output feature at every
position, is its bias.

:func:`find_dense_layers` traces ``model_fn`` to a jaxpr and follows every
parameter entry to where it is used, into the structures real models are
written with:

* ``jit`` calls, ``checkpoint`` (remat), and the bodies of ``custom_jvp`` and
  ``custom_vjp`` functions are looked into;
* ``scan``: a weight scanned over (Flax's ``nn.scan`` and ``nnx.scan`` over a
  stack of layers) is a *stack* of layers, one per iteration, with factors of
  a leading layer axis; a weight the scan closes over is one layer whose
  positions include the iterations;
* a stacked weight sliced by a static index (``w[l]`` in a Python loop) is one
  layer per slice.

Each leaf is then a Kronecker-factored layer's weight (or several, one per
slice), its bias, optionally an embedding table (``gather`` of whole rows by
token ids: a layer whose inputs are one-hot), or left to a diagonal treatment
with the reason: a product of two parameters, a batch axis, used in two
products, a scale, a loop's state, ...

:func:`layer_coverage` reports each leaf, its shape, its treatment and that
reason. :func:`hvpopt.tapped_model` runs the traced model with the layers'
inputs recorded.

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

__all__ = ["DenseLayer", "LeafTreatment", "find_dense_layers", "layer_coverage"]

#: Operations that move a parameter's entries without combining them (applied to an index array to follow them).
_VIEW_OPS = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "slice", "dynamic_slice",
                       "rev"})  # fmt: skip
#: Operations that leave the entries where they are.
_IDENTITY_OPS = frozenset({"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision"})
#: ``jax.checkpoint``'s names in the jaxpr.
REMAT_OPS = frozenset({"remat", "remat2", "checkpoint"})
#: Calls whose body runs once on the call's operands: looked into.
_CALL_OPS = REMAT_OPS | {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                         "custom_vjp_call_jaxpr"}  # fmt: skip
#: Why a leaf used by these operations is left to the diagonal.
_REASONS = {
    "mul": "multiplied elementwise (a scale or a gate)",
    "add": "added, but not as the bias of a dense layer",
    "add_any": "added, but not as the bias of a dense layer",
    "gather": "an embedding lookup (embedding factors are off: embeddings=True factors it)",
    "while": "used inside a while_loop",
    "cond": "used inside a cond",
    "dynamic_slice": "sliced by a traced index",
    "dynamic_update_slice": "updated in place",
    "concatenate": "concatenated with other arrays",
}


class Index:
    """Flat indices into a leaf, laid out as a layer's ``[*stack, in, out]`` matrix; compared and hashed by content
    (jit keys on layers)."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices
        self._key = (indices.shape, indices.tobytes())

    def __eq__(self, other):
        return isinstance(other, Index) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A dense layer found in a model: which leaves it uses and how its weight is a matrix.

    Attributes:
      name: the weight leaf's path in the parameter pytree (with ``[k]`` for the k-th slice of a leaf that
        holds several layers).
      weight: the weight's index among ``jax.tree.leaves(params)``.
      bias: the bias's leaf index, or None.
      in_features: the layer's inputs (the contracted size; an embedding's vocabulary), bias excluded.
      out_features: the layer's outputs.
      stack: the leading layer axes of a stack of layers (``(12,)`` for 12 layers scanned over), else ``()``.
      tied: the weight is also the table of embedding lookups.
      lookup: an embedding table: the inputs are one-hot token ids, the input factor diagonal.
    """

    name: str
    weight: int
    bias: int | None
    in_features: int
    out_features: int
    stack: tuple[int, ...] = ()
    tied: bool = False
    lookup: bool = False
    weight_index: Index | None = dataclasses.field(default=None, repr=False)
    bias_index: Index | None = dataclasses.field(default=None, repr=False)

    def matrix(self, weight: jax.Array) -> jax.Array:
        """The weight leaf (or a vector shaped like it) as the ``[*stack, in_features, out_features]`` matrix."""
        return _gather(weight, self.weight_index, (*self.stack, self.in_features, self.out_features))

    def bias_rows(self, bias: jax.Array) -> jax.Array:
        """The bias leaf as ``[*stack, out_features]``."""
        return _gather(bias, self.bias_index, (*self.stack, self.out_features))

    def block(self, leaves: list) -> jax.Array:
        """The layer's part of a parameter-shaped vector's ``leaves``: ``[*stack, in_features (+1), out_features]``,
        the weight with the bias (if any) as a last row."""
        matrix = self.matrix(leaves[self.weight])
        if self.bias is None:
            return matrix
        return jnp.concatenate([matrix, self.bias_rows(leaves[self.bias])[..., None, :]], axis=-2)

    def with_bias_input(self, inputs: jax.Array) -> jax.Array:
        """The layer's inputs ``[..., in]`` with a trailing 1 where it has a bias (an embedding's token ids
        unchanged): the rows of :meth:`block`."""
        if self.lookup or self.bias is None:
            return inputs
        return jnp.concatenate([inputs, jnp.ones((*inputs.shape[:-1], 1), inputs.dtype)], axis=-1)

    def gradient(self, inputs: jax.Array, output_gradients: jax.Array) -> jax.Array:
        """``sum_p a_p g_p^T`` ``[in (+1), out]``, the gradient of one application's :meth:`block`, from its
        inputs ``[p, in (+1)]`` (:meth:`with_bias_input`; an embedding's token ids ``[p]``, whose rows the
        output gradients are added into) and output gradients ``[p, out]``."""
        g = output_gradients
        if self.lookup:
            return jnp.zeros((self.in_features, g.shape[-1]), g.dtype).at[inputs].add(g)
        return inputs.astype(g.dtype).T @ g


def _gather(leaf: jax.Array, index: Index | None, shape: tuple[int, ...]) -> jax.Array:
    flat = leaf.reshape(-1)
    return (flat if index is None else flat[index.indices.reshape(-1)]).reshape(shape)


def scatter(leaf: jax.Array | None, index: Index | None, values: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``values`` written into a leaf of ``shape`` at ``index`` (the inverse of :meth:`DenseLayer.matrix`), into
    ``leaf`` or zeros."""
    if index is None:
        return values.reshape(shape)
    flat = jnp.zeros(math.prod(shape), values.dtype) if leaf is None else leaf.reshape(-1)
    return flat.at[index.indices.reshape(-1)].set(values.reshape(-1)).reshape(shape)


class LeafTreatment(NamedTuple):
    """One row of :func:`layer_coverage`: a parameter leaf, its shape, and how K-FAC treats it.

    ``treatment`` is ``"kfac weight"``, ``"kfac weight (tied: also an embedding
    lookup)"``, ``"kfac embedding"``, ``"kfac bias"`` or ``"diagonal"``;
    ``layer`` names the layer(s) for the others; ``detail`` says why a leaf is
    diagonal, or how a leaf holds several layers.
    """

    path: str
    shape: tuple[int, ...]
    treatment: str
    layer: str | None
    detail: str | None = None


class Site(NamedTuple):
    """Where a layer is in the nested jaxpr, and how its operands are laid out.

    ``path`` holds the equation numbers of the calls and scans around the
    product (outermost first) and then the product's; ``loops`` the lengths of
    those scans; ``stack_levels`` which of them iterate over the weight's
    leading axes (a stack of layers), the others repeating the layer over more
    positions. ``index`` is ``[*stack, in, out]`` flat indices into the leaf.
    """

    path: tuple[int, ...]
    loops: tuple[int, ...]
    stack_levels: tuple[int, ...]
    leaf: int
    index: np.ndarray
    operand: int
    activation_axes: tuple[int, ...]
    output_axes: tuple[int, ...]
    positions: tuple[int, ...]
    in_features: int
    out_features: int
    lookup: bool = False


class _Origin(NamedTuple):
    """A variable made of a leaf's entries: their flat indices ``[*stack, *shape]``; the stack axes follow
    the scans ``levels`` (positions in the loop context) over that leaf's leading axes."""

    leaf: int
    index: np.ndarray
    levels: tuple[int, ...]


class _Use(NamedTuple):
    leaf: int
    kind: str  # "dense", "lookup", "bias" or "other"
    site: Site | None = None
    reason: str | None = None
    product: tuple[int, ...] | None = None  # "bias": the product's path
    index: np.ndarray | None = None  # "bias": [*stack, out]
    levels: tuple[int, ...] = ()


def trace(model_fn: Callable, params: PyTree, inputs: Any):
    """``model_fn``'s closed jaxpr at these shapes (nested calls and scans kept as they are)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), (params, inputs))
    closed, out_shape = jax.make_jaxpr(model_fn, return_shape=True)(*shapes)
    if not isinstance(out_shape, jax.ShapeDtypeStruct):
        raise TypeError(
            "model_fn must return one array of outputs [..., K]; got a "
            f"{type(out_shape).__name__}. Wrap it to return the array the loss takes."
        )
    return closed


def sub_jaxpr(eqn) -> tuple[Any, list]:
    """A call's or a scan's body as ``(jaxpr, consts)``."""
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr")))
    if hasattr(body, "consts"):
        return body.jaxpr, list(body.consts)
    return body, []


def _moved(eqn, index: np.ndarray, num_stack: int) -> np.ndarray | None:
    """Where a view equation puts each entry: the equation applied to the index array (batched over the stack)."""
    if eqn.primitive.name in _IDENTITY_OPS:
        return index
    rest = eqn.invars[1:]
    if not all(isinstance(v, core.Literal) for v in rest):
        return None
    apply = lambda x: eqn.primitive.bind(x, *[v.val for v in rest], **eqn.params)
    for _ in range(num_stack):
        apply = jax.vmap(apply)
    with jax.ensure_compile_time_eval():  # concrete even while an outer function is traced
        return np.asarray(apply(jnp.asarray(index)))


def _dense_site(eqn, operand: int, origin: _Origin, path, loops) -> Site | str:
    """The layer whose weight is operand ``operand`` of this ``dot_general``, or why it is none."""
    other = eqn.invars[1 - operand]
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if batch_l or batch_r:
        return "a batch axis in its product (per-head weights)"
    w_contract, x_contract = (contract_l, contract_r) if operand == 0 else (contract_r, contract_l)
    w_shape, x_shape = eqn.invars[operand].aval.shape, other.aval.shape
    w_free = [d for d in range(len(w_shape)) if d not in w_contract]
    x_free = [d for d in range(len(x_shape)) if d not in x_contract]
    n_x, n_w = len(x_free), len(w_free)  # dot_general's output: the lhs's free axes, then the rhs's
    x_out, w_out = (range(n_w, n_w + n_x), range(n_w)) if operand == 0 else (range(n_x), range(n_x, n_x + n_w))
    in_features = math.prod(w_shape[d] for d in w_contract)
    out_features = math.prod(w_shape[d] for d in w_free)
    ns = len(origin.levels)
    stack = origin.index.shape[:ns]
    axes = (*range(ns), *(ns + d for d in w_contract), *(ns + d for d in w_free))
    index = np.transpose(origin.index, axes).reshape(*stack, in_features, out_features)
    if np.unique(index).size != index.size:
        return "broadcast before its product (entries used more than once)"
    return Site(path, loops, origin.levels, origin.leaf, index, 1 - operand, (*x_free, *x_contract),
                (*x_out, *w_out), tuple(x_shape[d] for d in x_free), in_features, out_features)  # fmt: skip


def _lookup_site(eqn, origin: _Origin, path, loops) -> Site | str:
    """The embedding whose table is this ``gather``'s operand, or why it is none.

    A lookup gathers whole rows ``table[i]`` of a ``[vocabulary, d]`` table:
    slices of size ``(1, d)`` started at ``(i, 0)`` (``jnp.take``, ``table[i]``,
    and its ``vmap``). ``activation_axes`` holds the column of the row index in
    the index vectors.
    """
    numbers = eqn.params["dimension_numbers"]
    table, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    offsets = tuple(numbers.offset_dims)
    rows = (
        len(table) == 2
        and 0 in numbers.start_index_map
        and not numbers.operand_batching_dims
        and tuple(eqn.params["slice_sizes"]) == (1, table[1])
        and len(offsets) == 2 - len(numbers.collapsed_slice_dims)
        and set(numbers.collapsed_slice_dims) <= {0}
    )
    if not rows:
        return "used by a gather other than a lookup of whole rows"
    batch = tuple(d for d in range(len(out)) if d not in offsets)
    column = tuple(numbers.start_index_map).index(0)
    return Site(path, loops, origin.levels, origin.leaf, origin.index, 1, (column,), (*batch, *offsets),
                tuple(out[d] for d in batch), table[0], table[1], lookup=True)  # fmt: skip


def _feature_map(site: Site, out_shape: tuple[int, ...]) -> np.ndarray:
    """The product's output, each entry holding its output feature (0 to out - 1)."""
    positions = np.broadcast_to(np.arange(site.out_features), (*site.positions, site.out_features))
    native = [out_shape[d] for d in site.output_axes]
    return np.transpose(positions.reshape(native), np.argsort(site.output_axes))


def _bias_index(features: np.ndarray, origin: _Origin, out_shape) -> np.ndarray | None:
    """``[*stack, out]``: the bias entry added to each output feature, if the same at every position; else None."""
    ns = len(origin.levels)
    stack, shape = origin.index.shape[:ns], origin.index.shape[ns:]
    if len(shape) > len(out_shape):
        return None
    try:
        placed = np.broadcast_to(
            origin.index.reshape(*stack, *([1] * (len(out_shape) - len(shape))), *shape), (*stack, *out_shape)
        )
    except ValueError:
        return None
    features_seen, first = np.unique(features.reshape(-1), return_index=True)  # each feature's first position
    if not np.array_equal(features_seen, np.arange(features_seen.size)):
        return None
    rows = placed.reshape(*stack, -1)[..., first]
    if not np.array_equal(rows[..., features.reshape(-1)].reshape(placed.shape), placed):
        return None
    return rows


def _walk(jaxpr, origins: dict, loops: tuple[int, ...], path: tuple[int, ...], uses: list, lookups: bool) -> list:
    """Follows the parameters' entries through ``jaxpr`` (and the calls and scans in it), appending a
    :class:`_Use` for each use that is not a view; returns the origins of ``jaxpr``'s outputs."""
    products = {}  # product outputs (and their views): var -> (path, feature map)
    for number, eqn in enumerate(jaxpr.eqns):
        name, here = eqn.primitive.name, (*path, number)
        ins = [origins.get(v) if isinstance(v, core.Var) else None for v in eqn.invars]
        if name == "scan":
            body, _ = sub_jaxpr(eqn)
            consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
            inner = {}
            for k, (var, origin) in enumerate(zip(body.invars, ins)):
                if origin is None:
                    continue
                if consts <= k < consts + carry:
                    uses.append(_Use(origin.leaf, "other", reason="carried through a scan (a loop's state)"))
                else:  # a scanned-over leaf's leading axis becomes a stack axis: its index layout is already that
                    levels = origin.levels if k < consts else (*origin.levels, len(loops))
                    inner[var] = origin._replace(levels=levels)
            _walk(body, inner, (*loops, eqn.params["length"]), here, uses, lookups)
            continue
        if name in _CALL_OPS:
            body, _ = sub_jaxpr(eqn)
            inner = {var: origin for var, origin in zip(body.invars, ins) if origin is not None}
            for var, origin in zip(eqn.outvars, _walk(body, inner, loops, here, uses, lookups)):
                if origin is not None:
                    origins[var] = origin
            continue
        sources = [(k, o) for k, o in enumerate(ins) if o is not None]
        if name in _VIEW_OPS | _IDENTITY_OPS and [k for k, _ in sources] == [0]:
            origin = sources[0][1]
            index = _moved(eqn, origin.index, len(origin.levels))
            if index is not None:
                origins[eqn.outvars[0]] = origin._replace(index=index)
                continue
        if name in _VIEW_OPS | _IDENTITY_OPS and isinstance(eqn.invars[0], core.Var) and eqn.invars[0] in products:
            product, features = products[eqn.invars[0]]
            moved = _moved(eqn, features, 0)
            if moved is not None:
                products[eqn.outvars[0]] = (product, moved)
        for k, origin in sources:
            uses.append(_classify(eqn, k, origin, ins, here, loops, products, lookups))
            if uses[-1].kind == "dense":
                out = eqn.outvars[0]
                products[out] = (here, _feature_map(uses[-1].site, out.aval.shape))
    return [origins.get(v) if isinstance(v, core.Var) else None for v in jaxpr.outvars]


def _classify(eqn, k: int, origin: _Origin, ins: list, here, loops, products: dict, lookups: bool) -> _Use:
    """What the use of a leaf's entries as operand ``k`` of ``eqn`` is."""
    name = eqn.primitive.name
    if name == "dot_general":
        if ins[1 - k] is not None:
            return _Use(origin.leaf, "other", reason="a product of two parameters (does not factor)")
        site = _dense_site(eqn, k, origin, here, loops)
        return _Use(origin.leaf, "dense", site) if isinstance(site, Site) else _Use(origin.leaf, "other", reason=site)
    if name == "gather" and k == 0 and ins[1] is None:
        site = _lookup_site(eqn, origin, here, loops)
        if isinstance(site, str):
            return _Use(origin.leaf, "other", reason=site)
        return _Use(origin.leaf, "lookup", site, reason=None if lookups else _REASONS["gather"])
    if name in ("add", "add_any") and len(eqn.invars) == 2:
        other = eqn.invars[1 - k]
        if isinstance(other, core.Var) and other in products and ins[1 - k] is None:
            product, features = products[other]
            index = _bias_index(features, origin, eqn.outvars[0].aval.shape)
            if index is not None and features.shape == eqn.outvars[0].aval.shape:
                return _Use(origin.leaf, "bias", product=product, index=index, levels=origin.levels)
    reason = _REASONS.get(name, f"used by {name}")
    return _Use(origin.leaf, "other", reason=reason)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """The layers of a traced model (ordered by weight leaf), the site of each, and every leaf's treatment."""

    layers: tuple[DenseLayer, ...]
    sites: tuple[Site, ...]
    report: tuple[LeafTreatment, ...]


def analyse(closed, params: PyTree, *, embeddings: bool = False) -> Analysis:
    """Reads the layers of ``closed`` (the jaxpr of ``model_fn(params, inputs)``)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = [tuple(jnp.shape(leaf)) for _, leaf in paths_leaves]
    paths = [jax.tree_util.keystr(path) for path, _ in paths_leaves]
    origins = {
        var: _Origin(leaf, np.arange(math.prod(shape), dtype=np.int32).reshape(shape), ())
        for leaf, (var, shape) in enumerate(zip(closed.jaxpr.invars, shapes))
    }
    uses: list[_Use] = []
    for origin in _walk(closed.jaxpr, origins, (), (), uses, embeddings):
        if origin is not None:
            uses.append(_Use(origin.leaf, "other", reason="returned as an output"))
    by_leaf = {leaf: [u for u in uses if u.leaf == leaf] for leaf in range(len(shapes))}
    layers, sites, why, detail = [], [], {}, {}
    for leaf, leaf_uses in by_leaf.items():
        found = _leaf_layers(leaf, leaf_uses, shapes[leaf], paths[leaf])
        if isinstance(found, str):
            why[leaf] = found
            continue
        for layer, site in found:
            layers.append(layer)
            sites.append(site)
        if len(found) > 1:
            detail[leaf] = f"{len(found)} layers, one per slice"
        elif found and found[0][0].stack:
            detail[leaf] = f"a stack of {math.prod(found[0][0].stack)} layers (scanned over)"
    layers, biased = _attach_biases(layers, sites, by_leaf, shapes, why)
    order = sorted(range(len(layers)), key=lambda k: (layers[k].weight, layers[k].name))
    layers, sites = [layers[k] for k in order], [sites[k] for k in order]
    report = []
    for leaf, (path, shape) in enumerate(zip(paths, shapes)):
        own = [layer for layer in layers if layer.weight == leaf]
        names = ", ".join(layer.name for layer in own) or None
        if own and own[0].tied:
            report.append(LeafTreatment(path, shape, "kfac weight (tied: also an embedding lookup)", names))
        elif own and own[0].lookup:
            report.append(LeafTreatment(path, shape, "kfac embedding", names, detail.get(leaf)))
        elif own:
            report.append(LeafTreatment(path, shape, "kfac weight", names, detail.get(leaf)))
        elif leaf in biased:
            report.append(LeafTreatment(path, shape, "kfac bias", biased[leaf]))
        else:
            report.append(LeafTreatment(path, shape, "diagonal", None, why.get(leaf)))
    return Analysis(tuple(layers), tuple(sites), tuple(report))


def _leaf_layers(leaf: int, uses: list[_Use], shape, path: str) -> list[tuple[DenseLayer, Site]] | str:
    """The layers whose weight is this leaf, or why it has none."""
    if not uses:
        return "not used by the model"
    other = [u.reason for u in uses if u.kind == "other"]
    if other:
        return "; ".join(dict.fromkeys(other))
    if any(u.kind == "bias" for u in uses):
        return "bias"  # resolved with the layers
    dense = [u.site for u in uses if u.kind == "dense"]
    lookups = [u for u in uses if u.kind == "lookup"]
    size = math.prod(shape)
    if len(dense) == 1 and lookups:  # a tied embedding: the product is the layer, the lookups EK-FAC's to correct
        if dense[0].index.size != size or any(u.site.index.size != size for u in lookups):
            return "a tied embedding whose lookups and product use different entries"
        return [(_layer(path, leaf, dense[0], size, tied=True), dense[0])]
    if dense and lookups:
        return f"used in {len(dense)} products and looked up"
    if lookups and lookups[0].reason:
        return lookups[0].reason
    if len(lookups) > 1:
        return f"looked up in {len(lookups)} places"
    sites = dense or [u.site for u in lookups]
    every = np.concatenate([s.index.reshape(-1) for s in sites])
    if np.unique(every).size != every.size:
        return f"used in {len(sites)} products (a shared weight: its curvature is not one Kronecker product)"
    if every.size != size:
        return "only part of it is the weight of a dense layer"
    if len(sites) == 1:
        return [(_layer(path, leaf, sites[0], size), sites[0])]
    ordered = sorted(sites, key=lambda s: int(s.index.min()))
    return [(_layer(f"{path}[{k}]", leaf, site, size), site) for k, site in enumerate(ordered)]


def _layer(name: str, leaf: int, site: Site, size: int, *, tied: bool = False) -> DenseLayer:
    stack = site.index.shape[: len(site.stack_levels)]
    index = _index(site.index, size)
    return DenseLayer(name, leaf, None, site.in_features, site.out_features, tuple(stack), tied, site.lookup, index)


def _index(indices: np.ndarray, size: int) -> Index | None:
    """``indices`` into a leaf of ``size`` entries, or None where they are the whole leaf as it is, row-major."""
    return None if np.array_equal(indices.reshape(-1), np.arange(size)) else Index(indices)


def _attach_biases(layers, sites, by_leaf, shapes, why) -> tuple[list[DenseLayer], dict[int, str]]:
    """Each bias leaf attached to the layers whose outputs it is added to; ``{bias leaf: layer names}``."""
    at = {site.path: k for k, site in enumerate(sites)}
    biased = {}
    for leaf, uses in by_leaf.items():
        if why.get(leaf) != "bias":
            continue
        targets = [(at.get(u.product), u) for u in uses]
        if any(k is None or layers[k].bias is not None or layers[k].lookup for k, _ in targets):
            why[leaf] = "added to a product that is not a Kronecker-factored layer"
            continue
        if any(u.levels != sites[k].stack_levels for k, u in targets):
            why[leaf] = "added to a stack of layers along other axes than its weight's"
            continue
        every = np.concatenate([u.index.reshape(-1) for _, u in targets])
        if np.unique(every).size != every.size or every.size != math.prod(shapes[leaf]):
            why[leaf] = "added to its layers' outputs with entries used more than once"
            continue
        for k, u in targets:
            layers[k] = dataclasses.replace(layers[k], bias=leaf, bias_index=_index(u.index, math.prod(shapes[leaf])))
        biased[leaf] = ", ".join(layers[k].name for k, _ in targets)
    return layers, biased


def find_dense_layers(
    model_fn: Callable, params: PyTree, inputs: Any, *, embeddings: bool = False
) -> tuple[DenseLayer, ...]:
    """The dense layers of ``model_fn`` at these parameters and input shapes, ordered by weight leaf.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``, one array.
      params: any pytree of arrays (only shapes and dtypes are read).
      inputs: a batch of inputs (only shapes and dtypes are read).
      embeddings: embedding tables (a ``gather`` of whole rows by token id) are layers too, with a diagonal
        input factor (the token frequencies).

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(3)}
      >>> model_fn = lambda p, x: (x * p["scale"]) @ p["w"] + p["b"]
      >>> [(layer.name, layer.in_features, layer.out_features) for layer in
      ...  hvpopt.find_dense_layers(model_fn, params, jnp.zeros((4, 3)))]
      [("['w']", 3, 2)]
    """
    return analyse(trace(model_fn, params, inputs), params, embeddings=embeddings).layers


def layer_coverage(model_fn: Callable, params: PyTree, inputs: Any, *, embeddings: bool = False) -> list[LeafTreatment]:
    """Each parameter leaf, its shape, its treatment (part of a Kronecker-factored layer, or diagonal) and why.

    Args:
      model_fn, params, inputs, embeddings: as for :func:`find_dense_layers`.

    Example:
      >>> import jax.numpy as jnp, hvpopt
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(3)}
      >>> model_fn = lambda p, x: (x * p["scale"]) @ p["w"] + p["b"]
      >>> for row in hvpopt.layer_coverage(model_fn, params, jnp.zeros((4, 3))):
      ...     print(row.path, row.shape, row.treatment, row.detail)
      ['b'] (2,) kfac bias None
      ['scale'] (3,) diagonal multiplied elementwise (a scale or a gate)
      ['w'] (3, 2) kfac weight None
    """
    return list(analyse(trace(model_fn, params, inputs), params, embeddings=embeddings).report)
