"""The token embedding and the output head, shared by the RetNet and the Transformer LM.

Both are called inside the parent's compact ``__call__``, so their parameters sit at the top level of
the model (``embed``, ``embed_norm``, ``final_norm``, ``head``) whatever the model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retnet_jax.nn.axes import BATCH, EMBED, LENGTH, VOCAB, partitioned
from retnet_jax.nn.norms import Norm

ACTIVATION_AXES = (BATCH, LENGTH, EMBED)


def embed_tokens(cfg: Any, tokens, *, deterministic: bool):
    """tokens [B, T] → (x [B, T, D] in the compute dtype, the embedding module for a tied head).

    Embedding N(0, D^−1/2) as torchscale; optional √D scale and norm; dropout.
    """
    embed = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        embedding_init=partitioned(nn.initializers.normal(cfg.d_model**-0.5), VOCAB, EMBED),
        name="embed",
    )
    x = embed(tokens)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
    if cfg.embed_norm:
        x = Norm(cfg.norm, cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name="embed_norm")(x)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), embed


def output_logits(cfg: Any, embed: nn.Embed, x):
    """Final norm and head: x [B, T, D] → logits [B, T, N] float32 (tied: the embedding transposed)."""
    x = Norm(cfg.norm, cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
        logits = embed.attend(x)
    else:
        logits = nn.Dense(
            cfg.vocab_size,
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            kernel_init=partitioned(nn.initializers.normal(cfg.d_model**-0.5), EMBED, VOCAB),
            name="head",
        )(x)
    return logits.astype(jnp.float32)
