"""Mapping a torch checkpoint's named tensors onto the model's parameter tree, and back.

A format is a list of ``Rule``s: which checkpoint key fills which parameter, and how many leading axes
of our kernel are the contracted (input) axes. torch's ``nn.Linear`` stores its weight as [out, in]
with the output and input axes flattened; our kernels are born in their final shape with the input
axes first (q: [D, H, K], out: [H, V, D], fc1: [D, F]), so

    ours = Wᵀ reshaped to the kernel's shape,        W = ours reshaped to [in, out], transposed.

Heads are the major part of a flattened head axis in both libraries ("(h d)").

The model's own ``init`` (under ``jax.eval_shape``: no memory) gives the target tree, so the mapping
follows the model whether its layers are stacked by ``nn.scan`` (one ``layers`` subtree with a leading
layer axis) or unrolled (``layers_0``, ``layers_1``, ...). Every key and every shape is checked before a
tensor is read; every parameter must be filled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.convert.files import Tensors
from retnet_jax.models import RetNetConfig, RetNetLM

__all__ = ["Rule", "abstract_params", "check", "export", "load"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter and the checkpoint tensor that holds it.

    Attributes:
        ours: the parameter's path, "/"-joined (inside one block for per-layer rules),
            e.g. "retention/q_proj/kernel".
        theirs: the checkpoint key; per-layer keys contain "{i}" for the layer index.
        inputs: how many leading axes of our kernel are contracted (torch Linear weights); 0 copies the
            tensor as it is (embeddings, norm weights).
    """

    ours: str
    theirs: str
    inputs: int = 0

    def key(self, layer: int | None = None) -> str:
        return self.theirs if layer is None else self.theirs.format(i=layer)


def abstract_params(config: RetNetConfig) -> dict:
    """The model's parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory is allocated)."""
    model = RetNetLM(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables)["params"]


def _layer_trees(params: dict, num_layers: int) -> tuple[bool, dict[str, object]]:
    """(whether the layers are stacked, the flat "/"-path → leaf dict of the first layer)."""
    if "layers" in params:
        return True, _flatten(params["layers"])
    if "layers_0" in params and f"layers_{num_layers - 1}" in params:
        return False, _flatten(params["layers_0"])
    raise ValueError(
        "The parameter tree has neither 'layers' (stacked blocks) nor "
        f"'layers_0'..'layers_{num_layers - 1}'; it is not a RetNetLM's."
    )


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _set(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _torch_shape(shape: Sequence[int], inputs: int) -> tuple[int, ...]:
    """The shape of the torch tensor holding a parameter of ``shape``."""
    if inputs == 0:
        return tuple(shape)
    return (math.prod(shape[inputs:]), math.prod(shape[:inputs]))


def _describe(keys: Sequence[str], limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check(
    params: dict,
    tensors: Tensors,
    rules: Sequence[Rule],
    layer_rules: Sequence[Rule],
    num_layers: int,
    *,
    source: str,
    ignored: Sequence[str] = (),
):
    """Checks that ``tensors`` fill ``params`` exactly: no key missing or extra, every shape right.

    Args:
        params: the target tree (``abstract_params``), leaves with ``.shape``.
        tensors: the checkpoint.
        rules: rules for the parameters outside the blocks.
        layer_rules: rules applied to every block i = 0..num_layers−1.
        source: the checkpoint's name for error messages.
        ignored: checkpoint keys that are read elsewhere (buffers) and mapped to no parameter.

    Raises:
        ValueError: naming the missing or unexpected keys, or the key of a wrong shape with the shape
            expected.
    """
    stacked, layer = _layer_trees(params, num_layers)
    flat = _flatten(params)
    targets = {}  # checkpoint key → (parameter path, expected torch shape)
    covered = set()
    for rule in rules:
        if rule.ours not in flat:
            raise ValueError(f"{source}: the model has no parameter {rule.ours!r} for {rule.theirs!r}.")
        targets[rule.key()] = (rule.ours, _torch_shape(flat[rule.ours].shape, rule.inputs))
        covered.add(rule.ours)
    for rule in layer_rules:
        if rule.ours not in layer:
            raise ValueError(f"{source}: the model's blocks have no parameter {rule.ours!r}.")
        shape = layer[rule.ours].shape[1:] if stacked else layer[rule.ours].shape
        for i in range(num_layers):
            path = f"layers/{rule.ours}" if stacked else f"layers_{i}/{rule.ours}"
            targets[rule.key(i)] = (path, _torch_shape(shape, rule.inputs))
            covered.add(path)

    present = set(tensors.keys())
    missing = sorted(set(targets) - present)
    extra = sorted(present - set(targets) - set(ignored))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {_describe(missing)}")
        if extra:
            problems.append(f"unexpected {_describe(extra)}")
        raise ValueError(
            f"{source} does not match the model its config describes: {'; '.join(problems)}. "
            "Is it a checkpoint of another architecture, or was its config edited?"
        )
    for key, (path, expected) in targets.items():
        got = tensors.shape(key)
        if got != expected:
            raise ValueError(
                f"{tensors.origin(key)}: tensor {key!r} has shape {list(got)}; the config implies "
                f"{list(expected)} (for parameter {path}). The config and the weights disagree."
            )
    unfilled = sorted(set(flat) - covered)
    if unfilled:
        raise ValueError(
            f"{source}: no checkpoint tensor fills the model's parameters {_describe(unfilled)}."
        )


def load(
    params: dict,
    tensors: Tensors,
    rules: Sequence[Rule],
    layer_rules: Sequence[Rule],
    num_layers: int,
    dtype,
) -> dict:
    """The parameter tree filled from ``tensors`` (call ``check`` first), as jax arrays of ``dtype``."""
    stacked, layer = _layer_trees(params, num_layers)
    flat = _flatten(params)
    dtype = np.dtype(jnp.dtype(dtype))
    out: dict = {}

    def convert(key: str, shape, inputs: int):
        weight = tensors.get(key)
        if inputs:
            weight = weight.T
        return np.ascontiguousarray(weight.reshape(shape)).astype(dtype, copy=False)

    for rule in rules:
        _set(out, rule.ours, jnp.asarray(convert(rule.key(), flat[rule.ours].shape, rule.inputs)))
    for rule in layer_rules:
        shape = layer[rule.ours].shape[1:] if stacked else layer[rule.ours].shape
        arrays = [convert(rule.key(i), shape, rule.inputs) for i in range(num_layers)]
        if stacked:
            _set(out, f"layers/{rule.ours}", jnp.asarray(np.stack(arrays)))
        else:
            for i, array in enumerate(arrays):
                _set(out, f"layers_{i}/{rule.ours}", jnp.asarray(array))
    return out


def export(
    params: dict, rules: Sequence[Rule], layer_rules: Sequence[Rule], num_layers: int
) -> dict[str, np.ndarray]:
    """The checkpoint tensors (NumPy, the parameters' dtype) of a parameter tree: ``load``'s inverse."""
    params = nn.unbox(params)
    stacked, _ = _layer_trees(params, num_layers)
    flat = _flatten(params)

    def convert(value, inputs: int):
        value = np.asarray(value)
        if inputs:
            value = value.reshape(math.prod(value.shape[:inputs]), -1).T
        return np.ascontiguousarray(value)

    tensors = {}
    for rule in rules:
        tensors[rule.key()] = convert(flat[rule.ours], rule.inputs)
    for rule in layer_rules:
        for i in range(num_layers):
            value = flat[f"layers/{rule.ours}"][i] if stacked else flat[f"layers_{i}/{rule.ours}"]
            tensors[rule.key(i)] = convert(value, rule.inputs)
    return tensors
