"""Normalization layers, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.nn.axes import EMBED, HEAD_DIM, partitioned

NORMS = ("rmsnorm", "layernorm")  # of Norm
HEAD_NORMS = ("rms", "layernorm", "rms_weight")  # of HeadNorm


def rms_normalize(x, eps: float):
    """x / sqrt(mean(x², last axis) + eps), in float32 (float64 for float64 x)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def layer_normalize(x, eps: float):
    """(x − mean) / sqrt(var + eps) over the last axis, in float32 (float64 for float64 x)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)


class Norm(nn.Module):
    """The block / final norm over D: RMSNorm with weight (torchscale v2) or LayerNorm (paper)."""

    kind: str = "rmsnorm"
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32  # output dtype
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D]
        width = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, EMBED), (width,), self.param_dtype)
        if self.kind == "rmsnorm":
            y = rms_normalize(x, self.eps) * scale
        else:
            bias = self.param("bias", partitioned(nn.initializers.zeros, EMBED), (width,), self.param_dtype)
            y = layer_normalize(x, self.eps) * scale + bias
        return y.astype(self.dtype)


class HeadNorm(nn.Module):
    """Per-head norm over V of the retention output [B, T, H, V], in float32 (returned in float32).

    "rms": RMSNorm without weight (torchscale v2); "layernorm": LayerNorm without affine (paper's
    GroupNorm); "rms_weight": RMSNorm with a weight [V] shared by the heads (fla).
    """

    kind: str = "rms"
    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, o):  # [B, T, H, V]
        if self.kind == "layernorm":
            return layer_normalize(o, self.eps)
        y = rms_normalize(o, self.eps)
        if self.kind == "rms_weight":
            width = o.shape[-1]
            y = y * self.param(
                "scale", partitioned(nn.initializers.ones, HEAD_DIM), (width,), self.param_dtype
            )
        return y
