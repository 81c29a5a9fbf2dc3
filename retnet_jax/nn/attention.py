"""Multi-head causal self-attention with RoPE: the Transformer baseline's token mixer.

    q, k, v: D → H·K    out: H·K → D    (H·K = D)
    Y = out( softmax(rope(q) rope(k)ᵀ / sqrt(K) + causal mask) v )

with rotate-half RoPE (θ_j = base^(−2j/K)) on q and k. Called as every mixer of the library is,
``(x, positions, state) → (y, state)``: the state a layer gets is its KV-cache slice, and the new state it
returns is the call's own keys and values, which the cache appends (``models.state.KVCache``).

``implementation`` picks how a call without a cache runs: "cudnn" (cuDNN's flash attention, GPU, bf16 or
fp16), "xla" (einsum-softmax, any backend) or "auto" (cuDNN on a GPU where it takes the heads and dtype,
else XLA). A call with a cache always runs the XLA einsums (``ops.attention.cached_attention``): a
decoding step is a memory-bound read of the cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.nn.axes import EMBED, HEAD_AXES, HEAD_DIM, HEADS
from retnet_jax.nn.projection import FusedProjection, Projection
from retnet_jax.nn.remat import name_projection, name_token_mixing
from retnet_jax.ops import rotation
from retnet_jax.ops.attention import cached_attention, causal_attention

IMPLEMENTATIONS = ("auto", "cudnn", "xla")
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_implementation(implementation: str, head_dim: int, dtype) -> str:
    """ "auto" → "cudnn" on a GPU for bf16/fp16 heads cuDNN takes, else "xla"; a forced choice is checked."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Attention: implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}."
        )
    half = jnp.dtype(dtype) in HALF_DTYPES
    if implementation == "cudnn" and not half:
        raise ValueError(
            f"Attention: implementation='cudnn' needs a bfloat16 or float16 compute dtype; got "
            f"{jnp.dtype(dtype).name}. Use implementation='auto' or 'xla', or a half-precision dtype."
        )
    if implementation != "auto":
        return implementation
    fits = head_dim % 8 == 0 and head_dim <= 128  # cuDNN's limit before Hopper
    return "cudnn" if jax.default_backend() == "gpu" and half and fits else "xla"


class Attention(nn.Module):
    """Causal self-attention over [B, T, D]; with a layer's cache, over the cached tokens too.

    Attributes:
        num_heads, head_dim: H and K.
        rotation_base: RoPE base.
        use_bias, dtype, param_dtype: projections' bias, compute and parameter dtypes.
        implementation: "auto", "cudnn" or "xla" (calls without a cache).
        projections: how the projections' products run ("auto", "xla", "pallas": ``ops.products``).
        fused_projections: q, k and v through one ``FusedProjection`` (``qkv_proj``, kernel [D, H, 3K])
            instead of three ``Projection``s; its parameters are ``fuse_projections``' of the three (a
            decoding loop's prepared variables); checkpoints keep the three.
    """

    INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # of the same x: fusable
    FUSED_PROJECTION = "qkv_proj"

    num_heads: int
    head_dim: int
    rotation_base: float = 10000.0
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    implementation: str = "auto"
    projections: str = "auto"
    fused_projections: bool = False

    @nn.compact
    def __call__(self, x, positions, state=None, *, segment_ids=None, residual=None):
        """Attention over the call, or over the cache and the call.

        Args:
            x: [B, T, D], or its block norm not yet computed (``ops.norms.Normed``, which only the
                projections read; a decoding step through the few-row kernel).
            positions: [B or 1, T] absolute positions of the call's tokens (negative: left pads, attended
                by no one).
            state: this layer's cache (k, v [B, H, S, K], position [B]) from ``KVCache.layer``, or None.
            segment_ids: [B, T] document ids of packed rows, or None: no query attends across a document
                start (``positions`` restart there too). Calls without a cache only.
            residual: [B, T, D] or None: returned y is residual + the layer's output, added in the output
                projection's epilogue where it runs the few-row kernel (the block's residual stream).

        Returns:
            (y [B, T, D], the call's (k, v) [B, T, H, K] for the cache to append).
        """
        heads, head_dim = self.num_heads, self.head_dim

        options = dict(
            in_names=(EMBED,),
            out_names=(HEADS, HEAD_DIM),
            init_scale=(2**-0.5) ** 2,  # torchscale's MultiheadAttention: xavier-uniform, gain 2^-1/2
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=self.projections,
        )
        features = (heads, head_dim)
        if self.fused_projections:
            outputs = FusedProjection([features] * 3, **options, name=self.FUSED_PROJECTION)(x)
        else:
            outputs = [Projection(features, **options, name=name)(x) for name in self.INPUT_PROJECTIONS]
        # [B, T, H, K] each: what a remat policy may keep
        q, k, v = (name_projection(nn.with_logical_constraint(y, HEAD_AXES)) for y in outputs)
        q = rotation.rotate(q, positions, "rotate_half", self.rotation_base)
        k = rotation.rotate(k, positions, "rotate_half", self.rotation_base)
        if state is None:
            implementation = resolve_implementation(self.implementation, head_dim, self.dtype)
            o = causal_attention(q, k, v, implementation, segment_ids=segment_ids)
            if implementation != "cudnn":  # the "mixer" policy keeps cuDNN's output already (nn/remat.py)
                o = name_token_mixing(o)
        else:
            k_cache, v_cache, _ = state  # [B, H, S, K] each
            positions = jnp.broadcast_to(positions, x.shape[:2])
            o = cached_attention(q, k, v, k_cache, v_cache, positions)  # [B, T, H, K]
        o = nn.with_logical_constraint(o, HEAD_AXES)
        y = Projection(
            (x.shape[-1],),
            (HEADS, HEAD_DIM),
            (EMBED,),
            init_scale=1.0,  # torchscale: xavier-uniform, gain 1
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=self.projections,
            name="out_proj",
        )(o, residual=residual)
        return y, (k, v)
