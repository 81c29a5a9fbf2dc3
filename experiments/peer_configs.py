"""The PyTorch peers of ``bench_training`` sized like our presets: pure functions, no PyTorch needed.

torchscale's and fla's RetNets always use a swish GLU FFN (three D×F' matrices), so a preset with a
two-matrix MLP (the paper presets: F = 2D) gets the GLU width F' = 2F/3, which keeps the FFN's parameters.
fla's ``RetNetConfig`` (flash-linear-attention 0.6.0) is mapped field by field from ours:

    ours                         fla
    d_model D                    hidden_size
    num_layers L                 num_hidden_layers
    num_heads H                  num_heads (K = D / H per head, as ours: expand_k = 1)
    value_dim                    expand_v = value_dim / D
    ffn_dim F, ffn_type          intermediate_size = matched_ffn (hidden_act swish: fla's only GLU)
    vocab_size, tie_embeddings   vocab_size, tie_word_embeddings
    norm_eps                     norm_eps (fla's one eps for the block, final and head norms)

What fla fixes and ours may not: RMSNorm everywhere (the paper presets use LayerNorm, with a bias), a head
RMSNorm with a weight of V shared by the heads, rotate-half rotation, unnormalized retention, no biases.
Its fused kernels stay at their defaults: chunk mode, fused norms (and norm + swish gate), fused SwiGLU,
fused cross-entropy (not the fused linear + cross-entropy, off by default).
"""

from __future__ import annotations

import functools
from typing import Any

from retnet_jax.models.config import RetNetConfig

__all__ = [
    "FLA_CHUNK",
    "FLA_MAX_HEAD_K_DIM",
    "fla_num_params",
    "fla_retnet_config",
    "matched_ffn",
    "ours_num_params",
]

FLA_MAX_HEAD_K_DIM = 256  # fla's retention layer asserts head_k_dim <= 256 (its rotary kernel)
FLA_CHUNK = 64  # the chunk size of fla's chunk_retention (chunk_simple_gla's default), not an option


@functools.cache
def ours_num_params(model: str) -> int:
    """The parameter count of our RetNet of preset ``model``, from abstract shapes: nothing is allocated
    and no device backend is started (a process that leaves the GPU to a worker may call it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from retnet_jax.models import RetNetLM

    lm = RetNetLM(RetNetConfig.preset(model))
    shapes = jax.eval_shape(lambda: lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)["params"]))


def matched_ffn(cfg: RetNetConfig) -> int:
    """The GLU width with the parameters of the preset's FFN (3·D·F' = 2·D·F for an MLP), a multiple of 8."""
    return cfg.ffn_dim if cfg.ffn_type == "glu" else int(round(2 * cfg.ffn_dim / 3 / 8)) * 8


def fla_retnet_config(ours: RetNetConfig) -> dict[str, Any]:
    """Keyword arguments of ``fla.models.RetNetConfig`` for the model of ``ours``'s sizes (module docstring).

    Raises:
        ValueError: a head width K = D / H over 256 (fla's rotary kernel refuses it).
    """
    if ours.key_dim > FLA_MAX_HEAD_K_DIM:
        raise ValueError(
            f"fla's RetNet needs K = d_model / num_heads <= {FLA_MAX_HEAD_K_DIM}; got K = {ours.key_dim} "
            f"(d_model {ours.d_model}, num_heads {ours.num_heads}). Use more heads."
        )
    return dict(
        attn_mode="chunk",
        hidden_size=ours.d_model,
        num_hidden_layers=ours.num_layers,
        num_heads=ours.num_heads,
        num_kv_heads=None,
        expand_k=1.0,
        expand_v=ours.value_dim / ours.d_model,  # fla rounds D · expand_v back to value_dim
        intermediate_size=matched_ffn(ours),
        hidden_act="swish",
        use_output_gate=True,
        elementwise_affine=True,
        norm_eps=ours.norm_eps,
        vocab_size=ours.vocab_size,
        tie_word_embeddings=ours.tie_embeddings,
        fuse_norm=True,
        fuse_swiglu=True,
        fuse_cross_entropy=True,
        fuse_linear_cross_entropy=False,
        use_cache=False,
    )


def fla_num_params(kwargs: dict[str, Any]) -> int:
    """The parameter count of fla's ``RetNetForCausalLM`` built from ``kwargs`` (``fla_retnet_config``).

    Per block: RMSNorm weights before the mixer and the FFN (D each); q and k (D × D·expand_k each), v and
    the output gate g (D × D·expand_v each), the output projection (D·expand_v × D); the head norm's weight
    (V = D·expand_v / H, shared by the heads); the GLU (3 · D · intermediate_size). Then the embedding
    (N × D), the final RMSNorm (D) and the head (N × D) unless tied.
    """
    d, n = kwargs["hidden_size"], kwargs["vocab_size"]
    keys, values = round(d * kwargs["expand_k"]), round(d * kwargs["expand_v"])
    head_norm = values // kwargs["num_heads"] if kwargs["elementwise_affine"] else 0
    block = 2 * d + 2 * d * keys + 3 * d * values + head_norm + 3 * d * kwargs["intermediate_size"]
    head = 0 if kwargs["tie_word_embeddings"] else n * d
    return kwargs["num_hidden_layers"] * block + n * d + d + head
