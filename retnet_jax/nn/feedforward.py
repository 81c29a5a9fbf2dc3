"""The feed-forward sublayer (REFERENCE §5): a GLU fc2(act(fc1 x) ⊙ gate x), or the paper's MLP.

The activation runs in float32. Init follows torch's nn.Linear default, U(±1/sqrt(fan_in)), as torchscale.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.models.config import RetNetConfig
from retnet_jax.nn.axes import EMBED, MLP, partitioned

ACTIVATIONS = {"swish": jax.nn.swish, "gelu": jax.nn.gelu}
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class FeedForward(nn.Module):
    """[B, T, D] → [B, T, D] through width F."""

    config: RetNetConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config

        def dense(features, names, name):
            return nn.Dense(
                features,
                use_bias=cfg.use_bias,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                kernel_init=partitioned(TORCH_LINEAR_INIT, *names),
                bias_init=partitioned(nn.initializers.zeros, names[-1]),
                name=name,
            )

        hidden = dense(cfg.ffn_dim, (EMBED, MLP), "fc1")(x)  # [B, T, F]
        hidden = ACTIVATIONS[cfg.activation](hidden.astype(jnp.promote_types(hidden.dtype, jnp.float32)))
        if cfg.ffn_type == "glu":
            hidden = hidden * dense(cfg.ffn_dim, (EMBED, MLP), "gate")(x)
        hidden = nn.with_logical_constraint(hidden.astype(cfg.compute_dtype), ("batch", "length", MLP))
        return dense(cfg.d_model, (MLP, EMBED), "fc2")(hidden)
