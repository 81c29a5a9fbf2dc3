"""The feed-forward sublayer: a GLU fc2(act(fc1 x) ⊙ gate x), or the paper's MLP fc2(act(fc1 x)).

The activation runs in float32. Init follows torch's nn.Linear default, U(±1/sqrt(fan_in)), as torchscale.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.nn.axes import BATCH, EMBED, LENGTH, MLP, partitioned
from retnet_jax.nn.projection import Projection
from retnet_jax.nn.remat import name_projection
from retnet_jax.ops import products
from retnet_jax.ops.norms import Normed

ACTIVATIONS = {"swish": jax.nn.swish, "gelu": jax.nn.gelu}
FFN_TYPES = ("glu", "mlp")
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class FeedForward(nn.Module):
    """[B, T, D] → [B, T, D] through width F.

    Attributes:
        ffn_dim: F.
        ffn_type: "glu" or "mlp".
        activation: "swish" or "gelu".
        use_bias: biases in the three (or two) projections.
        dtype, param_dtype: compute and parameter dtypes.
        implementation: how the products run (``ops.products``: the few-row kernel in decoding steps).
    """

    ffn_dim: int
    ffn_type: str = "glu"
    activation: str = "swish"
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x):
        """x [B, T, D], or the block norm of it not yet computed (``ops.norms.Normed``) → [B, T, D]."""

        def dense(features, names, name):
            return nn.Dense(
                features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(TORCH_LINEAR_INIT, *names),
                bias_init=partitioned(nn.initializers.zeros, names[-1]),
                dot_general=products.dense_dot_general(self.implementation),
                name=name,
            )

        def first(name):  # fc1 and gate
            if isinstance(x, Normed):  # the same parameters, as a Projection that takes the norm
                return Projection(
                    (self.ffn_dim,),
                    (EMBED,),
                    (MLP,),
                    use_bias=self.use_bias,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=TORCH_LINEAR_INIT,
                    implementation=self.implementation,
                    name=name,
                )
            return dense(self.ffn_dim, (EMBED, MLP), name)

        hidden = name_projection(first("fc1")(x))  # [B, T, F]
        hidden = ACTIVATIONS[self.activation](hidden.astype(jnp.promote_types(hidden.dtype, jnp.float32)))
        if self.ffn_type == "glu":
            hidden = hidden * name_projection(first("gate")(x))
        hidden = nn.with_logical_constraint(hidden.astype(self.dtype), (BATCH, LENGTH, MLP))
        return dense(x.shape[-1], (MLP, EMBED), "fc2")(hidden)
