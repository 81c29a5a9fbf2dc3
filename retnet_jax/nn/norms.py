"""Normalization layers, computed in float32 whatever the compute dtype (the maths: ``ops.norms``)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from retnet_jax.nn.axes import EMBED, HEAD_DIM, partitioned
from retnet_jax.ops import products
from retnet_jax.ops.norms import KINDS, Normed, layer_normalize, rms_normalize

NORMS = KINDS  # of Norm
HEAD_NORMS = ("rms", "layernorm", "rms_weight")  # of HeadNorm

__all__ = ["HEAD_NORMS", "NORMS", "HeadNorm", "Norm", "Normed", "layer_normalize", "rms_normalize"]


class Norm(nn.Module):
    """The block / final norm over D: RMSNorm with weight (torchscale v2) or LayerNorm (paper).

    Attributes:
        kind: "rmsnorm" or "layernorm"; eps: its epsilon.
        dtype: the output's dtype; param_dtype: the scale's and bias's.
        defer: the implementation of the products that take the output (``ops.products``). Where they may
            run the few-row kernel (a decoding step's few rows), the norm returns itself not yet computed
            (``ops.norms.Normed``) for the kernel's prologue to compute; the layers that take it
            (``Projection``, ``FeedForward``) materialize it where they do not. "xla" (the default):
            always the computed array.
    """

    kind: str = "rmsnorm"
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32  # output dtype
    param_dtype: jnp.dtype = jnp.float32
    defer: str = "xla"

    @nn.compact
    def __call__(self, x):  # [..., D] → [..., D] in dtype, or a Normed of that shape
        width = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, EMBED), (width,), self.param_dtype)
        bias = None
        if self.kind != "rmsnorm":
            bias = self.param("bias", partitioned(nn.initializers.zeros, EMBED), (width,), self.param_dtype)
        normed = Normed(x, scale, bias, self.kind, self.eps, self.dtype)
        if self.defer != "xla" and products.defers_norm(self.defer, normed):
            return normed
        return normed.materialize()


class HeadNorm(nn.Module):
    """Per-head norm over V of the retention output [B, T, H, V], in float32 (returned in float32); with a
    gate, retention's swish(g) ⊙ norm, in ``dtype``.

    "rms": RMSNorm without weight (torchscale v2); "layernorm": LayerNorm without affine (paper's
    GroupNorm); "rms_weight": RMSNorm with a weight [V] shared by the heads (fla).

    Attributes:
        kind, eps, param_dtype: the norm and its weight's dtype.
        dtype: the gated output's dtype (the compute dtype).
        defer: the implementation of the output projection that takes the gated output
            (``ops.products``), which contracts [H, V]. Where it may run the few-row kernel, the gated
            norm is returned not yet computed (``ops.norms.Normed`` with the gate) for the kernel's
            prologue; the projection materializes it where it does not. "xla" (the default): always the
            computed array; "auto" only where ``ops.products.AUTO_HEAD_NORM_PROLOGUE`` says
            (``products.head_norm_prologue``).
    """

    kind: str = "rms"
    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32
    defer: str = "xla"

    @nn.compact
    def __call__(self, o, gate=None, gate_offset: int = 0):
        """o [B, T, H, V] → the norm [B, T, H, V] in float32; with ``gate`` [B, T, H, V], swish(gate) ⊙ the
        norm in ``dtype`` (or a ``Normed`` of it: ``defer``). ``gate`` may be [B, T, H, W] with the gate at
        [gate_offset, gate_offset + V) of W (retention's joined product, read in place by the kernel)."""
        scale = None
        if self.kind == "rms_weight":
            init = partitioned(nn.initializers.ones, HEAD_DIM)
            scale = self.param("scale", init, (o.shape[-1],), self.param_dtype)
        if gate is None:
            if self.kind == "layernorm":
                return layer_normalize(o, self.eps)
            y = rms_normalize(o, self.eps)
            return y if scale is None else y * scale
        kind = "layernorm" if self.kind == "layernorm" else "rmsnorm"
        normed = Normed(o, scale, None, kind, self.eps, self.dtype, gate=gate, gate_offset=gate_offset)
        if products.head_norm_prologue(self.defer) and products.defers_norm(self.defer, normed, in_axes=2):
            return normed
        return normed.materialize()
