"""The token embedding and the output head, shared by every LM of the library.

Both are functions called inside the LM's compact ``__call__``, so their parameters sit at the top level
of the model (``embed``, ``embed_norm``, ``final_norm``, ``head``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from retnet_jax.nn.axes import ACTIVATION_AXES, EMBED, VOCAB, partitioned
from retnet_jax.nn.norms import Norm
from retnet_jax.nn.projection import Projection
from retnet_jax.ops import products
from retnet_jax.ops.norms import Normed


def embed_tokens(
    tokens,
    *,
    vocab_size: int,
    d_model: int,
    scale: bool,
    norm: str | None,
    norm_eps: float,
    dropout: float,
    deterministic: bool,
    dtype,
    param_dtype,
):
    """tokens [B, T] → (x [B, T, D] in ``dtype``, the embedding module for a tied head).

    Embedding N(0, D^−1/2) as torchscale; optional √D scale (``scale``) and norm (``norm``: a kind of
    ``Norm``, or None); dropout.
    """
    embed = nn.Embed(
        vocab_size,
        d_model,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=partitioned(nn.initializers.normal(d_model**-0.5), VOCAB, EMBED),
        name="embed",
    )
    x = embed(tokens)
    if scale:
        x = x * jnp.asarray(d_model**0.5, x.dtype)
    if norm is not None:
        x = Norm(norm, norm_eps, dtype, param_dtype, name="embed_norm")(x)
    x = nn.Dropout(dropout, deterministic=deterministic)(x)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), embed


def output_logits(
    x,
    embed: nn.Embed,
    *,
    vocab_size: int,
    tied: bool,
    norm: str,
    norm_eps: float,
    dtype,
    param_dtype,
    implementation: str = "xla",
):
    """Final norm and head: x [B, T, D] → logits [B, T, N] float32 (``tied``: the embedding transposed).
    ``implementation``: how an untied head's product runs (``ops.products``; where it runs the few-row
    kernel, the final norm runs in the kernel's prologue)."""
    defer = "xla" if tied else implementation
    x = Norm(norm, norm_eps, dtype, param_dtype, defer=defer, name="final_norm")(x)
    init = nn.initializers.normal(x.shape[-1] ** -0.5)
    if tied:
        logits = embed.attend(x)
    elif isinstance(x, Normed):  # the same parameter as the Dense below, as a Projection that takes the norm
        logits = Projection(
            (vocab_size,),
            (EMBED,),
            (VOCAB,),
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=init,
            implementation=implementation,
            name="head",
        )(x)
    else:
        logits = nn.Dense(
            vocab_size,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=partitioned(init, EMBED, VOCAB),
            dot_general=products.dense_dot_general(implementation),
            name="head",
        )(x)
    return logits.astype(jnp.float32)
