"""The Transformer baseline: a decoder-only LM with the RetNet's embedding, FFN, norms and call signature.

Pre-norm blocks x ← x + Attention(Norm(x)); x ← x + FFN(Norm(x)), with causal softmax attention

    q, k, v: D → H·K    out: H·K → D    (H·K = D)
    Y = out( softmax(rope(q) rope(k)ᵀ / sqrt(K) + causal mask) v )

and standard rotate-half RoPE (θ_j = base^(−2j/K)) on q and k. The FFN, norms, embedding, head, dropout
and the scan / remat options are the RetNet's own (``feedforward``, ``norms``, ``model``), so the two models
differ in the token mixer alone. Axis letters as in ``retention``; S is the cache length.

Parameter match (``TransformerConfig.matching``): attention costs 4·D² per layer, and the FFN width takes
the rest of the RetNet's per-layer weights. For the paper presets (12·D² per layer: MSR 8·D², MLP 4·D²)
that is a GELU MLP with F = 4·D, so weights, norms and embeddings match exactly:

    paper-1.3b: 1,414,205,440 parameters (RetNet and Transformer alike)
    paper-2.7b: 2,774,471,680 parameters (RetNet and Transformer alike)

GLU configs get F = (RetNet layer weights − 4·D²) / 3·D rounded to a multiple of 128 (8·D/3 for a 12·D²
RetNet). Heads are 128 wide (H = D / 128: 16 heads at 1.3b, 20 at 2.7b), the usual width for Transformers
of this size and one that cuDNN's flash attention takes on every GPU generation; a width D that 128 does
not divide keeps the RetNet's K = D / H.

Attention runs through ``jax.nn.dot_product_attention``: cuDNN's flash attention on GPU in bf16/fp16,
XLA's einsum-softmax elsewhere (TPU, CPU, float32) — ``attention_impl`` picks.

Decoding keeps a ``KVCache`` of every layer's rotated keys and values (k, v: [L, B, H, S, K] in the
compute dtype, length: [B]); it grows with S = max_length, which is the cost the RetNet's O(1) state
avoids. A call with a cache attends over the cached tokens and its own in one softmax (``cached_attention``,
XLA einsums whatever ``attention_impl``: a decoding step is a memory-bound read of the cache) and writes
its keys at each row's length. The cache rides in the layer scan's carry, layer-major, so each layer
reads and updates its slice in place.

Measured on one H100 (paper-1.3b, bf16 compute, float32 params, B = 8, 2048-slot cache of 3.2 GB,
jitted step donating the cache): 8.0 ms per decoding step, 5.05 ms with a 64-slot cache, against 6.6 ms
for the RetNet's step. Reading the cache alone takes 1.05 ms; a step that skips the write takes 6.7 ms,
so XLA still spends ≈ 1.5 ms per step copying the cache around the in-place write. Training, B = 4,
T = 2048, remat: 165 ms per forward + backward with cuDNN attention, 305 ms with XLA's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.models.config import ACTIVATIONS, DTYPES, FFN_TYPES, MODES, NORMS, ConfigMethods, RetNetConfig
from retnet_jax.models.config import PRESETS as RETNET_PRESETS
from retnet_jax.nn.axes import BATCH, EMBED, HEAD_DIM, HEADS, LAYERS, LENGTH
from retnet_jax.nn.embedding import ACTIVATION_AXES, embed_tokens, output_logits
from retnet_jax.nn.feedforward import FeedForward
from retnet_jax.nn.norms import Norm
from retnet_jax.nn.projection import Projection
from retnet_jax.ops import rotation
from retnet_jax.ops.attention import cached_attention, causal_attention, write_cache

ATTENTION_IMPLS = ("auto", "cudnn", "xla")
HEAD_AXES = (BATCH, LENGTH, HEADS, HEAD_DIM)
CACHE_AXES = (LAYERS, BATCH, HEADS, LENGTH, HEAD_DIM)  # logical axes of KVCache.k and .v
HALF_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ConfigMethods):
    """Sizes and options of the Transformer LM. ``matching(retnet_config)`` gives the equal-size baseline.

    FeedForward reads the FFN fields by name (ffn_dim, ffn_type, activation, use_bias, d_model and the
    dtypes), which this config shares with RetNetConfig.
    """

    vocab_size: int = 256  # N: rows of the embedding and the output head
    d_model: int = 64  # D: model width
    num_layers: int = 2  # L: blocks
    num_heads: int = 2  # H: attention heads; head width K = D / H
    ffn_dim: int = 256  # F: feed-forward width
    ffn_type: str = "glu"  # "glu": fc2(act(fc1 x) ⊙ gate x); "mlp": fc2(act(fc1 x))
    activation: str = "swish"  # FFN activation: "swish" or "gelu"
    norm: str = "rmsnorm"  # block and final norm: "rmsnorm" (with weight) or "layernorm"
    norm_eps: float = 1e-6
    rotation_base: float = 10000.0  # RoPE base
    use_bias: bool = False  # biases in the projections
    tie_embeddings: bool = False  # output head = embeddingᵀ
    embed_scale: bool = False  # multiply embeddings by sqrt(D)
    embed_norm: bool = False  # a norm right after the embedding
    dropout: float = 0.0  # residual and embedding dropout, as the RetNet (no attention-weight dropout)
    attention_impl: str = "auto"  # "auto": cuDNN on GPU in bf16/fp16, else XLA; or "cudnn" / "xla"
    dtype: str = "float32"  # compute dtype (and the cache's); params, norms, softmax and loss stay float32
    param_dtype: str = "float32"
    scan_layers: bool = True  # stack blocks with nn.scan (one compiled block)
    remat: bool = False  # recompute blocks in the backward pass

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be an integer >= 1; got {value!r}.")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be divisible by num_heads "
                f"({self.num_heads}): each head gets K = d_model / num_heads. Change one of them."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"TransformerConfig: RoPE pairs features, so K = d_model / num_heads must be even; "
                f"got K = {self.head_dim}. Change d_model or num_heads."
            )
        for name, allowed in (
            ("ffn_type", FFN_TYPES),
            ("activation", ACTIVATIONS),
            ("norm", NORMS),
            ("attention_impl", ATTENTION_IMPLS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"one of {allowed}")
        if self.attention_impl == "cudnn" and self.dtype not in HALF_DTYPES:
            raise ValueError(
                f"TransformerConfig.attention_impl='cudnn' needs dtype in {HALF_DTYPES}; got "
                f"dtype={self.dtype!r}. Use attention_impl='auto' or 'xla', or a half-precision dtype."
            )
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a rate in [0, 1)")
        if self.norm_eps < 0:
            _fail("norm_eps", self.norm_eps, "a value >= 0")

    @property
    def head_dim(self) -> int:
        """K: query/key/value width per head."""
        return self.d_model // self.num_heads

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of attention itself in one layer: Q Kᵀ and (·)V over the full T×T
        scores (2·T·H·K each), counted as ``flops.retention_forward_flops`` counts the parallel form."""
        return float(2 * 2 * seq_len * self.num_heads * self.head_dim)

    @classmethod
    def matching(
        cls, retnet: RetNetConfig, *, head_dim: int | None = None, ffn_multiple: int = 128, **overrides: Any
    ) -> TransformerConfig:
        """The Transformer with the RetNet's size: same D, L, N, norm, FFN kind, dtypes and options.

        Args:
            retnet: the RetNet config to match.
            head_dim: K per head (default 128 where it divides D, else the RetNet's K).
            ffn_multiple: F is rounded to a multiple of this (the paper presets need no rounding).
            **overrides: fields to change afterwards (e.g. attention_impl).
        """
        d = retnet.d_model
        if head_dim is None:
            head_dim = 128 if d % 128 == 0 else retnet.key_dim
        if d % head_dim:
            raise ValueError(f"TransformerConfig.matching: head_dim ({head_dim}) must divide d_model ({d}).")
        # Weights of one RetNet layer: q, k (D² each), v, g, out (D·H·V each), FFN (2 or 3 matrices D×F).
        per_ffn_column = (3 if retnet.ffn_type == "glu" else 2) * d
        retnet_layer = 2 * d * d + 3 * d * retnet.value_dim + per_ffn_column * retnet.ffn_dim
        ffn_dim = (retnet_layer - 4 * d * d) / per_ffn_column
        ffn_dim = ffn_dim if ffn_dim == int(ffn_dim) else round(ffn_dim / ffn_multiple) * ffn_multiple
        fields = dict(
            vocab_size=retnet.vocab_size,
            d_model=d,
            num_layers=retnet.num_layers,
            num_heads=d // head_dim,
            ffn_dim=max(int(ffn_dim), ffn_multiple),
            ffn_type=retnet.ffn_type,
            activation=retnet.activation,
            norm=retnet.norm,
            norm_eps=retnet.norm_eps,
            rotation_base=retnet.rotation_base,
            use_bias=retnet.use_bias,
            tie_embeddings=retnet.tie_embeddings,
            embed_scale=retnet.embed_scale,
            embed_norm=retnet.embed_norm,
            dropout=retnet.dropout,
            dtype=retnet.dtype,
            param_dtype=retnet.param_dtype,
            scan_layers=retnet.scan_layers,
            remat=retnet.remat,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """The Transformer matching the RetNet preset ``name`` (e.g. "paper-1.3b"), with field overrides."""
        if name not in RETNET_PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; available: {sorted(RETNET_PRESETS)}.")
        return cls.matching(RetNetConfig.preset(name), **overrides)


def _fail(name: str, value: Any, expected: str):
    raise ValueError(f"TransformerConfig.{name} must be {expected}; got {value!r}.")


def attention_implementation(config: TransformerConfig) -> str:
    """The resolved ``attention_impl``: "auto" is cuDNN on GPU for bf16/fp16 heads it takes, else XLA."""
    if config.attention_impl != "auto":
        return config.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    fits = config.head_dim % 8 == 0 and config.head_dim <= 128  # cuDNN's limit before Hopper
    return "cudnn" if on_gpu and config.dtype in HALF_DTYPES and fits else "xla"


class KVCache(NamedTuple):
    """The decoding cache. Rows are axis 1 of k and v and axis 0 of length: reorder them with ``take``.

    Attributes:
        k: [L, B, H, S, K] rotated keys of every layer, compute dtype; slots >= length are unused. Layers
            first: the layer scan slices a contiguous [B, H, S, K], which the attention products read
            without a transpose (batch-major, XLA copied or transposed the whole cache on every step).
        v: [L, B, H, S, K] values.
        length: [B] int32: tokens cached so far (the absolute position of the next token). A negative
            start −p announces p left pads, as the RetNet state's count: they are neither cached nor
            attended to, and the row's first real token sits at position 0.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def take(self, rows) -> KVCache:
        """The cache of the given batch rows [B'] (e.g. to reorder beams)."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.length[rows])


def init_cache(config: TransformerConfig, batch: int, max_length: int) -> KVCache:
    """The empty cache for ``max_length`` tokens: 2·B·L·S·D values of the compute dtype."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"init_cache: max_length must be an integer >= 1; got {max_length!r}.")
    shape = (config.num_layers, batch, config.num_heads, max_length, config.head_dim)
    # Two arrays, not one shared: a jitted step that donates the cache must not donate a buffer twice.
    k, v = (jnp.zeros(shape, config.compute_dtype) for _ in range(2))
    return KVCache(k, v, jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# The modules.


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE over [B, T, D]; with a layer cache, continues it."""

    config: TransformerConfig
    implementation: str = "xla"  # resolved: "cudnn" or "xla"

    @nn.compact
    def __call__(self, x, positions, cache=None, layer=0):
        """Attention over the call, or over the cache and the call.

        Args:
            x: [B, T, D].
            positions: [B or 1, T] absolute positions of the call's tokens.
            cache: (k, v) [L, B, H, S, K] of every layer, or None.
            layer: this layer's index in L.

        Returns:
            (y [B, T, D], this call's (k, v) [B, T, H, K], the cache with them written at ``layer``).
        """
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.head_dim

        def project(name):
            y = Projection(
                (heads, head_dim),
                (EMBED,),
                (HEADS, HEAD_DIM),
                init_scale=(2**-0.5) ** 2,  # torchscale's MultiheadAttention: xavier-uniform, gain 2^-1/2
                use_bias=cfg.use_bias,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                name=name,
            )(x)
            return nn.with_logical_constraint(y, HEAD_AXES)

        q = rotation.rotate(project("q_proj"), positions, "rotate_half", cfg.rotation_base)  # [B, T, H, K]
        k = rotation.rotate(project("k_proj"), positions, "rotate_half", cfg.rotation_base)  # [B, T, H, K]
        v = project("v_proj")  # [B, T, H, K]
        if cache is None:
            o = causal_attention(q, k, v, self.implementation)
        else:
            k_cache, v_cache = cache  # [L, B, H, S, K] each
            layer_k = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)  # [B, H, S, K]
            layer_v = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
            o = cached_attention(q, k, v, layer_k, layer_v, positions)  # [B, T, H, K]
            cache = (write_cache(k_cache, k, layer, positions), write_cache(v_cache, v, layer, positions))
        o = nn.with_logical_constraint(o, HEAD_AXES)
        y = Projection(
            (cfg.d_model,),
            (HEADS, HEAD_DIM),
            (EMBED,),
            init_scale=1.0,  # torchscale: xavier-uniform, gain 1
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            name="out_proj",
        )(o)
        return y, (k, v), cache


class TransformerBlock(nn.Module):
    """x ← x + Attention(Norm(x)); x ← x + FFN(Norm(x)).

    Called as ((x, cache, layer), positions) → ((x, cache, layer + 1), this call's k, v) for nn.scan. The
    whole cache rides in the carry so that each layer reads its slice and writes the call's keys into it
    in place inside the scan's loop; without a cache, the call's k, v come out stacked over layers.
    """

    config: TransformerConfig
    implementation: str = "xla"
    return_kv: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, positions):
        x, cache, layer = carry
        cfg = self.config
        norm = functools.partial(Norm, cfg.norm, cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype)
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        y, kv, cache = Attention(cfg, self.implementation, name="attention")(
            norm(name="attention_norm")(x), positions, cache, layer
        )
        x = x + dropout(y)
        x = x + dropout(FeedForward(cfg, name="ffn")(norm(name="ffn_norm")(x)))
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return (x, cache, layer + 1), (kv if self.return_kv else None)


class TransformerLM(nn.Module):
    """Transformer language model with RetNetLM's call signature.

    Call: ``logits, cache = model.apply(variables, tokens, state=None, mode=None, chunk_size=None,
    return_state=False, deterministic=True)``.

    Token ids must lie in [0, vocab_size) (not checkable inside jit; see RetNetLM).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        tokens,
        *,
        state: KVCache | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        return_state: bool = False,
        deterministic: bool = True,
    ):
        """Runs the model over tokens.

        Args:
            tokens: [B, T] integer token ids.
            state: a ``KVCache`` to continue (from ``init_cache``, ``prefill`` or an earlier call), or None.
                The call's keys are written at each row's ``length``; every row needs length + T <= S.
                Outside jit a longer call raises; inside jit the rows that run past S get NaN logits.
            mode, chunk_size: accepted so that one training loop drives RetNetLM and TransformerLM alike;
                validated as RetNetLM does, they do not change the result (attention has one form).
            return_state: return the cache. Without ``state`` it holds exactly this call's T tokens
                (``prefill`` pads it to a max_length); implied when a state is passed.
            deterministic: disable dropout (pass False with a "dropout" rng to train with it).

        Returns:
            (logits [B, T, N] float32, the new cache or None).
        """
        cfg = self.config
        _check_call(cfg, tokens, state, mode, chunk_size)
        return_state = return_state or state is not None
        batch, length = tokens.shape

        x, embed = embed_tokens(cfg, tokens, deterministic=deterministic)  # [B, T, D]

        positions = jnp.arange(length, dtype=jnp.int32)[None]  # [1, T]
        cache = None
        if state is not None:
            positions = state.length[:, None] + positions  # [B, T]
            cache = (state.k, state.v)  # [L, B, H, S, K] each; a block sees its layer's [B, H, S, K]

        block_args = dict(
            config=cfg,
            implementation=attention_implementation(cfg),
            return_kv=return_state and state is None,
            deterministic=deterministic,
        )
        block = nn.remat(TransformerBlock, prevent_cse=not cfg.scan_layers) if cfg.remat else TransformerBlock
        if cfg.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                out_axes=0,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            (x, cache, _), new_kv = blocks(**block_args, name="layers")((x, cache, 0), positions)
        else:
            outputs = []
            for i in range(cfg.num_layers):
                (x, cache, _), kv = block(**block_args, name=f"layers_{i}")((x, cache, i), positions)
                outputs.append(kv)
            new_kv = jax.tree.map(lambda *a: jnp.stack(a, axis=0), *outputs) if return_state else None

        logits = output_logits(cfg, embed, x)

        if not return_state:
            return logits, None
        if state is None:
            k, v = (jnp.swapaxes(a, 2, 3) for a in new_kv)  # [L, B, T, H, K] → [L, B, H, T, K]
            return logits, KVCache(k, v, jnp.full((batch,), length, jnp.int32))
        # Rows whose call runs past the cache lost keys (dropped writes): make that loud, not silent.
        overflow = state.length + length > state.max_length  # [B]
        logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
        return logits, KVCache(*cache, state.length + length)


def prefill(model: TransformerLM, variables, tokens, max_length: int):
    """Runs a prompt with causal attention (cuDNN where chosen) and returns a cache sized for decoding.

    Args:
        tokens: [B, T] prompt ids, T <= max_length.
        max_length: S, the cache's capacity (static under jit).

    Returns:
        (logits [B, T, N] float32, a ``KVCache`` with S = max_length slots and length T).
    """
    if tokens.ndim == 2 and tokens.shape[1] > max_length:
        raise ValueError(
            f"prefill: the prompt has {tokens.shape[1]} tokens but max_length is {max_length}; "
            f"raise max_length to at least the prompt length plus the tokens to decode."
        )
    logits, cache = model.apply(variables, tokens, return_state=True)
    pad = [(0, 0), (0, 0), (0, 0), (0, max_length - tokens.shape[1]), (0, 0)]
    return logits, cache._replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))


def decode_step(model: TransformerLM, variables, tokens, cache: KVCache):
    """One decoding step: tokens [B] int → (logits [B, N] float32, the cache one token longer)."""
    logits, cache = model.apply(variables, tokens[:, None], state=cache)
    return logits[:, 0], cache


@dataclasses.dataclass(frozen=True)
class TransformerDecoder:
    """The Transformer as a ``generate.Decoder``: the prompt through the cache, then one-token steps.

    Left pads are announced by a negative cache length, so ``generate_with`` / ``stream_with`` run it
    exactly as they run the RetNet.
    """

    model: TransformerLM

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def init_state(self, pads, max_length):
        """An empty cache for rows with ``pads`` [B] left pads and up to max_length − pads real tokens."""
        cache = init_cache(self.model.config, pads.shape[0], max_length)
        return cache._replace(length=-pads.astype(jnp.int32))

    def prefill(self, variables, tokens, state):
        # As RetNetDecoder: the head's logits of all but the last token are unused, so jit drops them.
        if tokens.shape[1] > 1:
            _, state = self.model.apply(variables, tokens[:, :-1], state=state)
        return self.step(variables, tokens[:, -1], state)

    def step(self, variables, tokens, state):
        return decode_step(self.model, variables, tokens, state)


def _check_call(cfg: TransformerConfig, tokens, cache, mode, chunk_size):
    if mode is not None and mode not in MODES:
        raise ValueError(f"TransformerLM: mode must be one of {MODES} (or None); got {mode!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"TransformerLM: chunk_size must be an integer >= 1; got {chunk_size!r}.")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"TransformerLM: tokens must be integer ids of shape [B, T]; got {tokens.dtype} "
            f"{tuple(tokens.shape)}."
        )
    batch, length = tokens.shape
    if length < 1:
        raise ValueError("TransformerLM: tokens is empty (T = 0); pass at least one token (e.g. BOS).")
    if cache is None:
        return
    if (
        not isinstance(cache, KVCache)
        or cache.k.ndim != 5
        or (*cache.k.shape[:3], cache.k.shape[4]) != (cfg.num_layers, batch, cfg.num_heads, cfg.head_dim)
        or cache.v.shape != cache.k.shape
        or cache.length.shape != (batch,)
    ):
        got = (
            f"k {tuple(cache.k.shape)}, v {tuple(cache.v.shape)}, length {tuple(cache.length.shape)}"
            if isinstance(cache, KVCache)
            else type(cache).__name__
        )
        raise ValueError(
            f"TransformerLM: the cache does not fit this model and batch: expected k and v of shape "
            f"({cfg.num_layers}, {batch}, {cfg.num_heads}, max_length, {cfg.head_dim}) and length "
            f"({batch},); got {got}. Was it made for another config or batch size? Build one with "
            f"retnet_jax.transformer.init_cache(config, batch={batch}, max_length=...)."
        )
    if cache.k.dtype != cfg.compute_dtype or cache.v.dtype != cfg.compute_dtype:
        raise ValueError(
            f"TransformerLM: the cache holds {cache.k.dtype} but the model computes in {cfg.dtype}; "
            f"build it with init_cache for this config."
        )
    if length > cache.max_length:
        raise ValueError(
            f"TransformerLM: {length} tokens do not fit a cache of max_length {cache.max_length}; "
            f"build a larger one with init_cache(config, batch, max_length=...)."
        )
    if not isinstance(cache.length, jax.core.Tracer):
        longest = int(np.max(np.asarray(cache.length)))
        if longest + length > cache.max_length:
            raise ValueError(
                f"TransformerLM: a cache row already holds {longest} tokens, so {length} more exceed its "
                f"max_length {cache.max_length}; build a larger cache with init_cache(..., max_length=...)."
            )
