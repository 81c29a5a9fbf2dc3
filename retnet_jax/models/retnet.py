"""The RetNet language model (REFERENCE §5): embedding → L pre-norm blocks → final norm → output head.

One model, three modes: a full-sequence call in the parallel, chunkwise or recurrent form, each able to
return the per-layer recurrent states so that a prompt prefilled in any form continues by decoding one
token at a time (``decode_step``). Logits are float32.

The model state is a ``RetentionState`` whose arrays carry a leading layer axis (kv: [L, B, H, K, V],
count: [L, B]): the layer loop slices it in place, where a batch-first layout would make XLA transpose
the whole state on every decode step. Every array has the batch on axis 1; ``select_rows`` selects or
reorders rows (beam search, dropping finished sequences).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.models.config import MODES, RetNetConfig
from retnet_jax.nn.axes import LAYERS
from retnet_jax.nn.embedding import ACTIVATION_AXES, embed_tokens, output_logits
from retnet_jax.nn.feedforward import FeedForward
from retnet_jax.nn.norms import Norm
from retnet_jax.nn.retention import MultiScaleRetention
from retnet_jax.ops import retention


class RetNetBlock(nn.Module):
    """x ← x + MSR(Norm(x)); x ← x + FFN(Norm(x)). Called as (x, state) → (x, state) for nn.scan."""

    config: RetNetConfig
    mode: str = "parallel"
    chunk_size: int = 64
    return_state: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, state):
        cfg = self.config
        norm = functools.partial(Norm, cfg.norm, cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype)
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        y, state = MultiScaleRetention(cfg, self.mode, self.chunk_size, self.return_state, name="retention")(
            norm(name="retention_norm")(x), state
        )
        x = x + dropout(y)
        x = x + dropout(FeedForward(cfg, name="ffn")(norm(name="ffn_norm")(x)))
        return nn.with_logical_constraint(x, ACTIVATION_AXES), state


class RetNetLM(nn.Module):
    """RetNet language model.

    Call: ``logits, state = model.apply(variables, tokens, state=None, mode=None, chunk_size=None,
    return_state=False, deterministic=True)``.

    Token ids must lie in [0, vocab_size): inside jit they cannot be checked (an out-of-range id reads a
    clamped embedding row), so the data pipeline and the CLIs validate them.
    """

    config: RetNetConfig

    @nn.compact
    def __call__(
        self,
        tokens,
        *,
        state: retention.RetentionState | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        return_state: bool = False,
        deterministic: bool = True,
    ):
        """Runs the model over tokens.

        Args:
            tokens: [B, T] integer token ids.
            state: per-layer states to continue from (from ``init_state`` or an earlier call), or None.
            mode: "parallel", "chunkwise" or "recurrent" (default: config.mode).
            chunk_size: C for the chunkwise form (default: config.chunk_size).
            return_state: return the state after the last token (implied when a state is passed).
            deterministic: disable dropout (pass False with a "dropout" rng to train with it).

        Returns:
            (logits [B, T, N] float32, the new state or None).
        """
        cfg = self.config
        mode = cfg.mode if mode is None else mode
        chunk_size = cfg.chunk_size if chunk_size is None else chunk_size
        _check_call(cfg, tokens, state, mode, chunk_size)
        return_state = return_state or state is not None

        x, embed = embed_tokens(cfg, tokens, deterministic=deterministic)  # [B, T, D]

        block_args = dict(
            config=cfg,
            mode=mode,
            chunk_size=chunk_size,
            return_state=return_state,
            deterministic=deterministic,
        )
        block = nn.remat(RetNetBlock, prevent_cse=not cfg.scan_layers) if cfg.remat else RetNetBlock
        if cfg.scan_layers:
            # A one-token decode step does little work per layer: unrolled, XLA fuses across layers and
            # the GPU runs the step as a few large kernels instead of a loop of small ones.
            one_step = mode == "recurrent" and tokens.shape[1] == 1 and state is not None
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=0,
                out_axes=0,
                length=cfg.num_layers,
                unroll=cfg.num_layers if one_step and cfg.unroll_decode else 1,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            x, state = blocks(**block_args, name="layers")(x, state)
        else:
            states = []
            for i in range(cfg.num_layers):
                layer_state = None if state is None else jax.tree.map(lambda a, i=i: a[i], state)
                x, layer_state = block(**block_args, name=f"layers_{i}")(x, layer_state)
                states.append(layer_state)
            state = jax.tree.map(lambda *a: jnp.stack(a), *states) if return_state else None

        return output_logits(cfg, embed, x), state


def init_state(config: RetNetConfig, batch: int) -> retention.RetentionState:
    """The empty model state: kv [L, B, H, K, V] float32 zeros, count [L, B] zeros."""
    one = retention.init_state(batch, config.num_heads, config.key_dim, config.head_value_dim)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (config.num_layers, *a.shape)), one)


def cast_params(params, dtype):
    """Floating parameters cast to ``dtype`` (e.g. bf16 for serving a bf16-compute model: half the bytes
    each decode step reads). Norms still compute in float32."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def select_rows(state: retention.RetentionState, rows) -> retention.RetentionState:
    """The state of batch rows ``rows`` (int indices [R]), in that order."""
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=1), state)


def decode_step(model: RetNetLM, variables, tokens, state: retention.RetentionState):
    """One recurrent step: tokens [B] int → (logits [B, N] float32, the new state). O(1) in the context."""
    logits, state = model.apply(variables, tokens[:, None], state=state, mode="recurrent")
    return logits[:, 0], state


def _check_call(cfg: RetNetConfig, tokens, state, mode, chunk_size):
    if mode not in MODES:
        raise ValueError(f"RetNetLM: mode must be one of {MODES}; got {mode!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"RetNetLM: chunk_size must be an integer >= 1; got {chunk_size!r}.")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"RetNetLM: tokens must be integer ids of shape [B, T]; got {tokens.dtype} {tuple(tokens.shape)}."
        )
    if tokens.shape[1] < 1:
        raise ValueError("RetNetLM: tokens is empty (T = 0); pass at least one token (e.g. BOS).")
    if state is not None:
        batch = tokens.shape[0]
        kv = (cfg.num_layers, batch, cfg.num_heads, cfg.key_dim, cfg.head_value_dim)
        if (
            not isinstance(state, retention.RetentionState)
            or state.kv.shape != kv
            or state.count.shape != (cfg.num_layers, batch)
        ):
            got = (
                f"kv {tuple(state.kv.shape)}, count {tuple(state.count.shape)}"
                if isinstance(state, retention.RetentionState)
                else type(state).__name__
            )
            raise ValueError(
                f"RetNetLM: state does not fit this model and batch: expected kv {kv} and count "
                f"({cfg.num_layers}, {batch}); got {got}. Was it made for another config or batch "
                f"size? Build one with retnet_jax.model.init_state(config, batch={batch})."
            )
