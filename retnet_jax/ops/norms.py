"""Normalization maths over the last axis, in float32 whatever the compute dtype, and the deferred norm.

``normalize`` is the block / final norm's computation (``nn.norms.Norm`` runs it): RMSNorm with a scale, or
LayerNorm with a scale and a bias, statistics and affine in float32, the result cast to the compute dtype.

``Normed`` is that norm not yet computed: the input x and the norm's parameters. A block's norm returns
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


def normalize(x, kind: str, eps: float, scale, bias=None, dtype=None):
    """The block norm of x [..., D]: "rmsnorm" (x̂ · scale) or "layernorm" (x̂ · scale + bias).

    Args:
        x: [..., D], any float dtype (the statistics are float32, float64 for float64 x).
        kind: "rmsnorm" or "layernorm".
        eps: added to the mean square / variance.
        scale: [D]; bias: [D] for "layernorm", None for "rmsnorm".
        dtype: the result's dtype (default: the float32 computation's).
    """
    if kind == "rmsnorm":
        y = rms_normalize(x, eps) * scale
    else:
        y = layer_normalize(x, eps) * scale + bias
    return y if dtype is None else y.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Normed:
    """normalize(x, kind, eps, scale, bias, dtype), not yet computed.

    Attributes:
        x: [..., D] the norm's input.
        scale: [D]; bias: [D] ("layernorm") or None ("rmsnorm").
        kind, eps, dtype: as ``normalize``'s; ``dtype`` is the value's (the compute dtype).
    """

    x: jax.Array
    scale: jax.Array
    bias: jax.Array | None
    kind: str
    eps: float
    dtype: jnp.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The value's shape (x's), for the layers that size their parameters by it."""
        return self.x.shape

    @property
    def ndim(self) -> int:
        return self.x.ndim

    def materialize(self):
        """The norm's output [..., D] in ``dtype``: the computation ``nn.norms.Norm`` runs."""
        return normalize(self.x, self.kind, self.eps, self.scale, self.bias, self.dtype)


jax.tree_util.register_dataclass(
    Normed, data_fields=["x", "scale", "bias"], meta_fields=["kind", "eps", "dtype"]
)
