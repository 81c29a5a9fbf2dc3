"""The feed-forward sublayer: a GLU fc2(act(fc1 x) ⊙ gate x), or the paper's MLP fc2(act(fc1 x)).

The activation runs in float32. Init follows torch's nn.Linear default, U(±1/sqrt(fan_in)), as torchscale.

Where the first layer runs the few-row kernel (a decoding step), the layers are ``Projection``s with the
same parameters, so that the kernel's epilogue takes fc1's bias and activation and fc2's bias and the
block's residual (``residual=``): no XLA kernel between the products. A decoding loop's prepared
variables, whose kernels are stored transposed (``nn.projection.TRANSPOSED_KERNEL``), take that path too,
whatever the rows (``Projection`` contracts them with XLA where the kernel does not run).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from retnet_jax.nn.axes import BATCH, EMBED, LENGTH, MLP, partitioned
from retnet_jax.nn.projection import Projection, holds_transposed
from retnet_jax.nn.remat import name_projection
from retnet_jax.ops import products
from retnet_jax.ops.norms import Normed

ACTIVATIONS = products.ACTIVATIONS  # "swish", "gelu" (tanh-approximated): the kernel's epilogue's too
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
    def __call__(self, x, residual=None):
        """x [B, T, D], or the block norm of it not yet computed (``ops.norms.Normed``) → [B, T, D];
        residual + that where ``residual`` [B, T, D] is given (in fc2's epilogue where the kernel runs)."""
        # Kernels stored transposed (a decoding loop's prepared variables) are Projections' only.
        kernel = products.runs_kernel(self.implementation, x, self.ffn_dim, self.dtype)
        if kernel or holds_transposed(self, "fc1"):
            return self._through_kernel(x, residual)

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
        y = dense(x.shape[-1], (MLP, EMBED), "fc2")(hidden)
        return y if residual is None else residual + y

    def _through_kernel(self, x, residual):
        """The FFN through the few-row kernel: fc1's bias and activation, fc2's bias and the residual in
        the epilogues (float32, one cast each); the parameters are the ``Dense`` layers' (or the same
        stored transposed). Where the kernel does not run, each ``Projection`` computes what ``Dense``
        does: the bias in the compute dtype, the activation in float32."""

        def projection(features, in_name, out_name, name):
            return Projection(
                (features,),
                (in_name,),
                (out_name,),
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=TORCH_LINEAR_INIT,
                implementation=self.implementation,
                name=name,
            )

        hidden = projection(self.ffn_dim, EMBED, MLP, "fc1")(x, activation=self.activation)  # [B, T, F]
        if self.ffn_type == "glu":
            hidden = hidden * projection(self.ffn_dim, EMBED, MLP, "gate")(x)
        hidden = nn.with_logical_constraint(hidden, (BATCH, LENGTH, MLP))
        return projection(x.shape[-1], MLP, EMBED, "fc2")(hidden, residual=residual)
