"""Multi-scale retention (the paper's §2.2; REFERENCE §4): projections, rotation, retention, head norm, gate.

    q, k: D → H·K    v, g: D → H·V    out: H·V → D
    Y = out( swish(g) ⊙ HeadNorm(Retention(rotate(q), rotate(k)·K^−1/2, v)) )

The module owns the parameters; the numerics live in ``retention`` (the three forms) and ``rotation``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.models.config import RetNetConfig
from retnet_jax.nn.axes import EMBED, HEAD_DIM, HEADS
from retnet_jax.nn.norms import HeadNorm
from retnet_jax.nn.projection import Projection
from retnet_jax.ops import dispatch, retention, rotation


class MultiScaleRetention(nn.Module):
    """One retention layer over [B, T, D].

    Attributes:
        config: the model config.
        mode: "parallel", "chunkwise" or "recurrent" (T = 1 with a state runs one recurrent step).
        chunk_size: C for the chunkwise form.
        return_state: also return the state after the last token (parallel mode computes it separately).
    """

    config: RetNetConfig
    mode: str = "parallel"
    chunk_size: int = 64
    return_state: bool = False

    @nn.compact
    def __call__(self, x, state: retention.RetentionState | None = None):
        """x: [B, T, D]; state: carried in, or None (positions start at 0).

        Returns:
            (y [B, T, D] in the compute dtype, the new state or None).
        """
        cfg = self.config
        heads, key_dim, value_dim = cfg.num_heads, cfg.key_dim, cfg.head_value_dim
        dtype, param_dtype = cfg.compute_dtype, cfg.params_dtype

        def project(features, name):
            return Projection(
                features,
                (EMBED,),
                (HEADS, HEAD_DIM),
                init_scale=(2**-2.5) ** 2,  # torchscale: xavier-uniform, gain 2^-2.5
                use_bias=cfg.use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                name=name,
            )(x)

        q = project((heads, key_dim), "q_proj")  # [B, T, H, K]
        k = project((heads, key_dim), "k_proj") * key_dim**-0.5  # [B, T, H, K]
        v = project((heads, value_dim), "v_proj")  # [B, T, H, V]
        g = project((heads, value_dim), "g_proj")  # [B, T, H, V]

        length = x.shape[1]
        positions = jnp.arange(length)[None]  # [1, T]
        if state is not None:
            positions = state.count[:, None] + positions  # [B, T]; negative = left padding
            k = jnp.where((positions >= 0)[..., None, None], k, 0)  # pads never enter the state
        if cfg.rotation != "none":
            q = rotation.rotate(q, positions, cfg.rotation, cfg.rotation_base)
            k = rotation.rotate(k, positions, cfg.rotation, cfg.rotation_base)

        o, state = self._retention(q, k, v, state)  # [B, T, H, V]
        o = HeadNorm(cfg.head_norm, cfg.head_norm_eps, param_dtype, name="head_norm")(o)
        o = (jax.nn.swish(g.astype(o.dtype)) * o).astype(dtype)
        y = Projection(
            (cfg.d_model,),
            (HEADS, HEAD_DIM),
            (EMBED,),
            init_scale=(2**-1) ** 2,  # torchscale: xavier-uniform, gain 2^-1
            use_bias=cfg.use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            name="out_proj",
        )(o)
        return y, state

    def _retention(self, q, k, v, state):
        cfg = self.config
        log_decay = retention.log_decays(cfg.num_heads, cfg.decay)
        norm = cfg.normalize
        wants_state = self.return_state or state is not None
        if self.mode == "recurrent":
            if q.shape[1] == 1 and state is not None:
                o, state = retention.recurrent_step(
                    q[:, 0], k[:, 0], v[:, 0], log_decay, state, normalize=norm
                )
                return o[:, None], state
            o, state = retention.recurrent(q, k, v, log_decay, state=state, normalize=norm)
        elif self.mode == "chunkwise":
            o, state = dispatch.chunkwise(
                q,
                k,
                v,
                log_decay,
                chunk_size=self.chunk_size,
                state=state,
                normalize=norm,
                implementation=cfg.retention_impl,
            )
        elif state is not None:
            # Parallel over the whole call, continuing a state: one chunk of the chunkwise form.
            o, state = retention.chunkwise(
                q, k, v, log_decay, chunk_size=q.shape[1], state=state, normalize=norm
            )
        else:
            o = retention.parallel(q, k, v, log_decay, normalize=norm)
            if wants_state:
                empty = retention.init_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
                state = retention.update_state(k, v, log_decay, empty)
        return o, (state if wants_state else None)
