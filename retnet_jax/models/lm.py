"""One decoder-only language model over a token mixer: embedding → L pre-norm blocks → final norm → head.

    x ← x + Mixer(Norm(x));  x ← x + FFN(Norm(x))

The mixer is the config's: multi-scale retention for a ``RetNetConfig`` (``RetNetLM``), causal attention
for a ``TransformerConfig`` (``TransformerLM``, the baseline). Every mixer is called as
``(x, positions, state) → (y, state)``, so embedding, blocks, norms, head, dropout, layer scanning, remat
and decoding are this one skeleton whatever the mixer, and the two models differ in the mixer alone.

A call may continue a decoding state (``config.init_state``, or one an earlier call returned; the
protocol is ``models.state``'s): the state rides in the layer loop's carry, each block reads its layer's
slice and writes its new state back in place. Logits are float32.

How the model runs is set by the module's attributes (``mode``, ``chunk_size``, ``implementation``,
``scan_layers``, ``remat``, ``unroll_decode``), not by its config; a call may override ``mode`` and
``chunk_size``. One model, three retention forms: a full call in the parallel, chunkwise or recurrent
form, each able to return the state, so a prompt prefilled in any form continues one token at a time
(``decode_step``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.models.config import ModelConfig, RetNetConfig, TransformerConfig
from retnet_jax.nn import remat as remat_lib
from retnet_jax.nn.axes import ACTIVATION_AXES, LAYERS
from retnet_jax.nn.embedding import embed_tokens, output_logits
from retnet_jax.nn.feedforward import FeedForward
from retnet_jax.nn.norms import Norm
from retnet_jax.nn.projection import fuse_projections, transpose_kernel
from retnet_jax.nn.retention import MODES
from retnet_jax.ops import products
from retnet_jax.ops.documents import check_segment_ids, document_positions

__all__ = [
    "MODES",
    "Block",
    "DecoderLM",
    "RetNetLM",
    "TransformerLM",
    "cast_params",
    "decode_step",
    "fuse_input_projections",
    "prefill",
    "transpose_projections",
]


class Block(nn.Module):
    """One pre-norm block. Called as ((x, state, layer), positions) → ((x, state, layer + 1), new) for
    nn.scan: the whole decoding state rides in the carry (or None); ``new`` is the mixer's new layer state
    when the call started without one and ``return_state`` asks for it (stacked over layers by the scan)."""

    config: ModelConfig
    mode: str = "parallel"
    chunk_size: int = 64
    implementation: str = "auto"
    projections: str = "auto"
    fused_projections: bool = False
    return_state: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, positions, segment_ids=None):
        x, state, layer = carry
        cfg = self.config
        # Where the projections run the few-row kernel, the norms are left to its prologue (``Norm.defer``).
        norm = functools.partial(
            Norm, cfg.norm, cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, defer=self.projections
        )
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        mixer = cfg.mixer(
            mode=self.mode,
            chunk_size=self.chunk_size,
            implementation=self.implementation,
            projections=self.projections,
            fused_projections=self.fused_projections,
            return_state=self.return_state,
            name=cfg.mixer_name,
        )
        view = None if state is None else state.layer(layer)
        # Without dropout, where the projections run the few-row kernel (a decoding step), each residual
        # add is the epilogue of the sublayer's last product (its output projection, fc2): no kernel of
        # its own. Elsewhere (training, prefill) the block adds, as below.
        rows, width = math.prod(x.shape[:-1]), x.shape[-1]
        joined = self.deterministic and products.uses_kernel(self.projections, rows, width, width, x.dtype)
        residual = x if joined else None
        mixer_norm = norm(name=f"{cfg.mixer_name}_norm")(x)
        y, new = mixer(mixer_norm, positions, view, segment_ids=segment_ids, residual=residual)
        if not joined:
            y = remat_lib.name_mixer_output(y)  # the FFN norm's backward needs x + y: "mixer" keeps y
        if state is not None:
            state, new = state.write(layer, new, positions), None
        elif not self.return_state:
            new = None
        x = y if joined else x + dropout(y)
        ffn = FeedForward(
            cfg.ffn_dim,
            cfg.ffn_type,
            cfg.activation,
            cfg.use_bias,
            cfg.compute_dtype,
            cfg.params_dtype,
            implementation=self.projections,
            name="ffn",
        )
        ffn_norm = norm(name="ffn_norm")(x)
        x = ffn(ffn_norm, residual=x) if joined else x + dropout(ffn(ffn_norm))
        return (nn.with_logical_constraint(x, ACTIVATION_AXES), state, layer + 1), new


class DecoderLM(nn.Module):
    """A decoder-only LM; the mixer comes from the config.

    Call: ``logits, state = model.apply(variables, tokens, state=None, mode=None, chunk_size=None,
    return_state=False, deterministic=True)``.

    Token ids must lie in [0, vocab_size): inside jit they cannot be checked (an out-of-range id reads a
    clamped embedding row), so the data pipeline and the CLIs validate them.

    Attributes:
        config: the architecture (``RetNetConfig`` or ``TransformerConfig``).
        mode: the retention form of full calls: "parallel", "chunkwise" or "recurrent" (attention has one).
        chunk_size: C for the chunkwise form.
        implementation: the mixer's kernel choice: retention's chunkwise form "auto" / "xla" / "pallas"
            (``ops.dispatch``), attention's "auto" / "cudnn" / "xla" (``nn.attention``).
        projections: how the projections, FFN and untied head multiply (``ops.products``): "xla", "auto"
            or "pallas" (a decoding step's few rows through the few-row kernel; interpreted on a CPU).
        scan_layers: stack the blocks with nn.scan (one compiled block; parameters get a layer axis).
        remat: what each block keeps for the backward pass (``nn.remat``): "none" (everything; the
            most memory), "full" (nothing: the block's forward reruns), "projections" (the input
            projections' outputs: the mixer's forward and elementwise work rerun) or "mixer" (those and
            the token mixer's output: only elementwise work reruns). True / False mean "full" / "none".
        unroll_decode: unroll the layer loop of one-token steps with a state (a step does little work per
            layer; unrolled, XLA fuses across layers and runs it as a few large kernels), or None for the
            config's ``unroll_decode`` (measured per mixer).

        fused_projections: each mixer's input projections of the same x (a RetNet's q, k, v, g; attention's
            q, k, v) as one parameter and one product (``nn.projection.FusedProjection``), with the
            parameters ``fuse_input_projections`` makes of the separate ones. Checkpoints and training
            keep them separate; a decoding loop's prepared variables are fused
            (``inference.decoding.LMDecoder``), and its steps run the model with this set.
    """

    config: ModelConfig
    mode: str = "parallel"
    chunk_size: int = 64
    implementation: str = "auto"
    projections: str = "auto"
    scan_layers: bool = True
    remat: bool | str = False
    unroll_decode: bool | None = None
    fused_projections: bool = False

    def __post_init__(self):
        remat_lib.resolve(self.remat, f"{type(self).__name__}: remat")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        tokens,
        *,
        state=None,
        mode: str | None = None,
        chunk_size: int | None = None,
        return_state: bool = False,
        deterministic: bool = True,
        segment_ids=None,
    ):
        """Runs the model over tokens.

        Args:
            tokens: [B, T] integer token ids.
            state: a decoding state to continue (``config.init_state`` or an earlier call's), or None.
                A KV cache needs room for the call: rows that run past it get NaN logits inside jit
                (outside jit the call raises).
            mode: the retention form (default: the module's ``mode``).
            chunk_size: C for the chunkwise form (default: the module's ``chunk_size``).
            return_state: return the state after the last token (implied when a state is passed).
                Without ``state``, a KV cache holds exactly this call's T tokens (``prefill`` reserves
                room for more).
            deterministic: disable dropout (pass False with a "dropout" rng to train with it).
            segment_ids: [B, T] integers or None: rows that pack several documents (training). Where the
                id changes between t − 1 and t a document starts at t: no token attends or is retained
                across it, and positions (rotation, normalization) restart there, so each document is
                computed as if alone. Not with a state (decoding continues one document per row).

        Returns:
            (logits [B, T, N] float32, the new state or None).
        """
        cfg = self.config
        mode = self.mode if mode is None else mode
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        _check_call(cfg, tokens, state, mode, chunk_size)
        if segment_ids is not None:
            _check_segments(cfg, tokens, segment_ids, state, return_state)
        incoming = state is not None
        return_state = return_state or incoming
        length = tokens.shape[1]

        x, embed = embed_tokens(
            tokens,
            vocab_size=cfg.vocab_size,
            d_model=cfg.d_model,
            scale=cfg.embed_scale,
            norm=cfg.norm if cfg.embed_norm else None,
            norm_eps=cfg.norm_eps,
            dropout=cfg.dropout,
            deterministic=deterministic,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )  # [B, T, D]
        positions = jnp.arange(length, dtype=jnp.int32)[None]  # [1, T]
        if incoming:
            positions = state.position[:, None] + positions  # [B, T]; negative = left pads
        if segment_ids is not None:
            positions = document_positions(segment_ids)  # [B, T]: restart at every document

        block_args = dict(
            config=cfg,
            mode=mode,
            chunk_size=chunk_size,
            implementation=self.implementation,
            projections=self.projections,
            fused_projections=self.fused_projections,
            return_state=return_state and not incoming,
            deterministic=deterministic,
        )
        policy = remat_lib.resolve(self.remat)
        block = Block
        if policy != "none":
            block = nn.remat(Block, prevent_cse=not self.scan_layers, policy=remat_lib.policy(policy))
        if self.scan_layers:
            unroll = cfg.unroll_decode if self.unroll_decode is None else self.unroll_decode
            one_step = length == 1 and incoming and unroll
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                out_axes=0,
                length=cfg.num_layers,
                unroll=cfg.num_layers if one_step else 1,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            (x, state, _), new = blocks(**block_args, name="layers")((x, state, 0), positions, segment_ids)
        else:
            news = []
            for i in range(cfg.num_layers):
                carry = (x, state, i)
                (x, state, _), new = block(**block_args, name=f"layers_{i}")(carry, positions, segment_ids)
                news.append(new)
            new = jax.tree.map(lambda *a: jnp.stack(a), *news) if return_state and not incoming else None

        logits = output_logits(
            x,
            embed,
            vocab_size=cfg.vocab_size,
            tied=cfg.tie_embeddings,
            norm=cfg.norm,
            norm_eps=cfg.norm_eps,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            implementation=self.projections,
        )
        if not return_state:
            return logits, None
        if not incoming:
            return logits, cfg.state_class.from_layers(new, length)
        overflow = state.overflows(length)  # a KV cache's rows that lost keys: loud, not silent
        if overflow is not None:
            logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
        return logits, state.advance(length)


class RetNetLM(DecoderLM):
    """The RetNet language model: ``DecoderLM`` over multi-scale retention (config: ``RetNetConfig``)."""

    def __post_init__(self):
        _check_config(self, RetNetConfig)
        super().__post_init__()


class TransformerLM(DecoderLM):
    """The Transformer baseline: ``DecoderLM`` over causal attention (config: ``TransformerConfig``)."""

    def __post_init__(self):
        _check_config(self, TransformerConfig)
        super().__post_init__()


def _check_config(module, kind):
    if not isinstance(module.config, kind):
        raise ValueError(
            f"{type(module).__name__} takes a {kind.__name__}; got {type(module.config).__name__}. "
            f"Use DecoderLM(config) for either."
        )


def decode_step(model: DecoderLM, variables, tokens, state):
    """One decoding step: tokens [B] int → (logits [B, N] float32, the new state).

    O(1) in the context for a RetNet (the recurrent form); a Transformer reads its whole cache.
    """
    logits, state = model.apply(variables, tokens[:, None], state=state, mode="recurrent")
    return logits[:, 0], state


def fuse_input_projections(config: ModelConfig, variables):
    """The variables of a model without ``fused_projections`` as the same model's with it: in every
    block (the scanned stack ``layers``, whose leaves carry the layer axis, or ``layers_0`` …), the mixer's
    input projections become its one fused projection (``nn.projection.fuse_projections``). Everything
    else is left as it is."""
    mixer = config.mixer()
    params = dict(variables["params"])
    blocks = [scope for scope in params if scope == "layers" or scope.startswith("layers_")]
    for scope in blocks:
        block = dict(params[scope])
        block[config.mixer_name] = fuse_projections(
            block[config.mixer_name], mixer.INPUT_PROJECTIONS, mixer.FUSED_PROJECTION
        )
        params[scope] = block
    return {**variables, "params": params}


OUTPUT_PROJECTION = "out_proj"  # every mixer's output projection, [H, V] (or [H, K]) → D
FFN_PROJECTIONS = ("fc1", "gate", "fc2")  # the FFN's (gate with a GLU only), [D] → F and [F] → D


def transpose_projections(config: ModelConfig, variables):
    """The variables with every block's projection kernels stored transposed (``nn.projection.
    transpose_kernel``: ``kernel_transposed`` [*out, *in] in place of ``kernel`` [*in, *out]), as the
    few-row kernel reads them best at a decoding step's rows (``ops.gpu.skinny_nd``); the same model
    takes them (its projections use the transposed kernel where they find one). For a decoding loop's
    copy of the weights only: the model's parameters, its training and its checkpoints keep ``kernel``.

    Blocks are the scanned stack ``layers`` (leaves [L, ...]) or ``layers_0`` …; the mixer's input
    projections (separate or joined) and the FFN's contract their one input axis, the mixer's
    ``out_proj`` all of its axes but the last (D). Embedding, norms and head are left as they are.
    """
    mixer = config.mixer()
    inputs = (*mixer.INPUT_PROJECTIONS, mixer.FUSED_PROJECTION)
    params = dict(variables["params"])
    for scope in [scope for scope in params if scope == "layers" or scope.startswith("layers_")]:
        lead = 1 if scope == "layers" else 0
        block = dict(params[scope])
        for sublayer, names in ((config.mixer_name, (*inputs, OUTPUT_PROJECTION)), ("ffn", FFN_PROJECTIONS)):
            layer = dict(block[sublayer])
            for name in names:
                if name not in layer or "kernel" not in layer[name]:
                    continue
                rank = nn.unbox(layer[name]["kernel"]).ndim - lead
                in_axes = rank - 1 if name == OUTPUT_PROJECTION else 1
                layer[name] = transpose_kernel(layer[name], in_axes, lead)
            block[sublayer] = layer
        params[scope] = block
    return {**variables, "params": params}


def prefill(model: DecoderLM, variables, tokens, *, max_length: int | None = None, mode: str | None = None):
    """Runs a prompt without a state (the parallel or chunkwise form; cuDNN attention where chosen) and
    returns the state to decode from, with room for ``max_length`` tokens (a KV cache's capacity).

    Args:
        tokens: [B, T] prompt ids.
        max_length: S >= T for a KV cache (static under jit); None keeps S = T.
        mode: the retention form (default: the model's).

    Returns:
        (logits [B, T, N] float32, the state after the prompt).
    """
    if max_length is not None and tokens.ndim == 2 and tokens.shape[1] > max_length:
        raise ValueError(
            f"prefill: the prompt has {tokens.shape[1]} tokens but max_length is {max_length}; raise "
            f"max_length to at least the prompt length plus the tokens to decode."
        )
    logits, state = model.apply(variables, tokens, mode=mode, return_state=True)
    return logits, state if max_length is None else state.reserve(max_length)


def cast_params(params, dtype):
    """Floating parameters cast to ``dtype`` (e.g. bf16 for serving a bf16-compute model: half the bytes
    each decode step reads). Norms still compute in float32."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _check_segments(cfg: ModelConfig, tokens, segment_ids, state, return_state: bool):
    name = type(cfg).__name__.replace("Config", "LM")
    check_segment_ids(name, segment_ids, *tokens.shape)
    if state is not None or return_state:
        raise ValueError(
            f"{name}: segment_ids packs several documents into a row for training; a decoding state "
            "continues one document per row. Call without segment_ids to prefill or decode."
        )


def _check_call(cfg: ModelConfig, tokens, state: Any, mode, chunk_size):
    name = type(cfg).__name__.replace("Config", "LM")
    if mode not in MODES:
        raise ValueError(f"{name}: mode must be one of {MODES}; got {mode!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be an integer >= 1; got {chunk_size!r}.")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name}: tokens must be integer ids of shape [B, T]; got {tokens.dtype} {tuple(tokens.shape)}."
        )
    if tokens.shape[1] < 1:
        raise ValueError(f"{name}: tokens is empty (T = 0); pass at least one token (e.g. BOS).")
    if state is not None:
        if not isinstance(state, cfg.state_class):
            raise ValueError(
                f"{name}: state must be a {cfg.state_class.__name__} (from config.init_state); got "
                f"{type(state).__name__}."
            )
        try:
            state.check(cfg, tokens.shape[0], tokens.shape[1])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
