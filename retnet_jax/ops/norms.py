"""Normalization maths over the last axis, in float32 whatever the compute dtype, and the deferred norm.

``normalize`` is the block / final norm's computation (``nn.norms.Norm`` runs it): RMSNorm with a scale, or
LayerNorm with a scale and a bias, statistics and affine in float32, the result cast to the compute dtype.

``Normed`` is that norm not yet computed: the input x and the norm's parameters (and, for retention's head
norm, the swish gate that multiplies it: ``normalize(gate=...)``). A block's norm returns
one where the layers that take its output may run the few-row kernel (``ops.products``), whose prologue
normalizes the rows it multiplies (``ops.gpu.skinny``), so that a decoding step runs no separate norm.
A consumer that does not run the kernel calls ``materialize()`` and gets exactly the norm's output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["KINDS", "Normed", "layer_normalize", "normalize", "rms_normalize"]

KINDS = ("rmsnorm", "layernorm")


def rms_normalize(x, eps: float):
    """x / sqrt(mean(x², last axis) + eps), in float32 (float64 for float64 x)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def layer_normalize(x, eps: float):
    """(x − mean) / sqrt(var + eps) over the last axis, in float32 (float64 for float64 x)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)


def normalize(x, kind: str, eps: float, scale=None, bias=None, dtype=None, gate=None):
    """The norm of x [..., D] over its last axis: x̂ (· scale) (+ bias) (· swish(gate)), in float32.

    "rmsnorm": x̂ = x / rms(x) (the block norm takes a scale; retention's head norm none, or fla's weight);
    "layernorm": x̂ centred first (the block norm takes a scale and a bias; the head norm neither).

    Args:
        x: [..., D], any float dtype (the statistics are float32, float64 for float64 x).
        kind: "rmsnorm" or "layernorm".
        eps: added to the mean square / variance.
        scale: [D] or None; bias: [D] or None.
        dtype: the result's dtype (default: the float32 computation's).
        gate: [..., D] or None: the result multiplied by swish(gate) (computed in the norm's float dtype),
            as retention multiplies its head norm's output (``nn.retention``).
    """
    y = rms_normalize(x, eps) if kind == "rmsnorm" else layer_normalize(x, eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    if gate is not None:
        y = jax.nn.swish(gate.astype(y.dtype)) * y
    return y if dtype is None else y.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Normed:
    """normalize(x, kind, eps, scale, bias, dtype, gate), not yet computed.

    The statistics run over x's last axis (D for the block norm; V for retention's per-head norm, whose
    consumer, the output projection, contracts x's last two axes [H, V]).

    Attributes:
        x: [..., D] the norm's input.
        scale: [D] or None; bias: [D] or None (the block norm: a scale, and a bias for "layernorm").
        kind, eps, dtype: as ``normalize``'s; ``dtype`` is the value's (the compute dtype).
        gate: [..., D] or None: the value multiplied by swish(gate) (retention's gate). Or [..., W] holding
            it at [gate_offset, gate_offset + D) (a slice of a wider product, which the kernel reads in
            place: retention's joined q, k, v, g).
        gate_offset: see ``gate``.
    """

    x: jax.Array
    scale: jax.Array
    bias: jax.Array | None
    kind: str
    eps: float
    dtype: jnp.dtype
    gate: jax.Array | None = None
    gate_offset: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The value's shape (x's), for the layers that size their parameters by it."""
        return self.x.shape

    @property
    def ndim(self) -> int:
        return self.x.ndim

    def materialize(self):
        """The norm's output [..., D] in ``dtype``: the computation ``nn.norms.Norm`` (``HeadNorm`` with
        the gate) runs."""
        gate = self.gate
        if gate is not None and gate.shape[-1] != self.x.shape[-1]:
            gate = gate[..., self.gate_offset : self.gate_offset + self.x.shape[-1]]
        return normalize(self.x, self.kind, self.eps, self.scale, self.bias, self.dtype, gate)


jax.tree_util.register_dataclass(
    Normed, data_fields=["x", "scale", "bias", "gate"], meta_fields=["kind", "eps", "dtype", "gate_offset"]
)
