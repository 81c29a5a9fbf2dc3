"""Model configs: what a model *is* (its architecture), as frozen, validated dataclasses.

``ModelConfig`` holds what every decoder LM of the library shares — vocabulary, width, depth, heads, the
feed-forward sublayer, norms, embedding and head, dropout, dtypes — and its two kinds add their token
mixer's fields:

* ``RetNetConfig``: multi-scale retention (value width, head norm, rotation, decay, normalization).
* ``TransformerConfig``: causal softmax attention with RoPE (the baseline); ``matching`` sizes it like a
  RetNet.

How a model is *run* is not here: the retention form and chunk size, the kernel, layer scanning, remat and
decode unrolling are arguments of ``DecoderLM`` (``models.lm``), where they are used. A checkpoint stores
``to_dict()``, which ``from_dict`` turns back into the config of the right kind.

Each config also owns the constructor of its decoding state (``init_state``, as gemma's configs own their
caches): a recurrent state for the RetNet, a KV cache for the Transformer (``models.state``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from retnet_jax.models import state as state_lib
from retnet_jax.nn.attention import Attention
from retnet_jax.nn.feedforward import ACTIVATIONS, FFN_TYPES
from retnet_jax.nn.norms import HEAD_NORMS, NORMS
from retnet_jax.nn.retention import MultiScaleRetention
from retnet_jax.ops.retention import DECAY_SCHEDULES, forward_flops
from retnet_jax.ops.rotation import STYLES

__all__ = ["DTYPES", "ModelConfig", "RetNetConfig", "TransformerConfig", "from_dict"]

ROTATIONS = (*STYLES, "none")
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields every decoder LM shares. Derived sizes are properties; subclasses add the mixer's."""

    arch: ClassVar[str]  # "retnet" or "transformer": the key of ``from_dict``
    mixer_name: ClassVar[str]  # the mixer's parameter scope in each block ("retention" / "attention")
    state_class: ClassVar[type]  # the decoding state (``models.state``)
    unroll_decode: ClassVar[bool]  # DecoderLM's default for unrolling one-token steps over the layers

    vocab_size: int = 256  # N: rows of the embedding and the output head
    d_model: int = 64  # D: model width
    num_layers: int = 2  # L: blocks
    num_heads: int = 2  # H: mixer heads; key/query head width K = D / H
    ffn_dim: int = 128  # F: feed-forward width
    ffn_type: str = "glu"  # "glu": fc2(act(fc1 x) ⊙ gate x); "mlp": the paper's fc2(act(fc1 x))
    activation: str = "swish"  # FFN activation: "swish" or "gelu"
    norm: str = "rmsnorm"  # block and final norm: "rmsnorm" (with weight) or "layernorm"
    norm_eps: float = 1e-6
    rotation_base: float = 10000.0  # base of the rotation angles (θ_j = base^−…)
    use_bias: bool = False  # biases in the projections (torchscale v1 / paper) or not (v2)
    tie_embeddings: bool = False  # output head = embeddingᵀ
    embed_scale: bool = False  # multiply embeddings by sqrt(D)
    embed_norm: bool = False  # a norm right after the embedding
    dropout: float = 0.0  # residual and embedding dropout (paper: 0.1)
    dtype: str = "float32"  # compute dtype; norms, decay, recurrent state, softmax and loss stay float32
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(name, value, "an integer >= 1")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"{type(self).__name__}.d_model ({self.d_model}) must be divisible by num_heads "
                f"({self.num_heads}): each head gets K = d_model / num_heads. Change one of them."
            )
        self._check_choices(
            ("ffn_type", FFN_TYPES),
            ("activation", tuple(ACTIVATIONS)),
            ("norm", NORMS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
        )
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", self.dropout, "a rate in [0, 1)")
        if not self.norm_eps >= 0:
            self._fail("norm_eps", self.norm_eps, "a value >= 0")

    # -- derived sizes and dtypes ------------------------------------------------------------------

    @property
    def key_dim(self) -> int:
        """K: query/key width per head."""
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    # -- what the LM skeleton asks of its config ---------------------------------------------------

    def mixer(self, **run_options: Any):
        """The token mixer of one block: a Linen module called as ``(x, positions, state) → (y, state)``."""
        raise NotImplementedError

    def init_state(self, batch: int, *, max_length: int | None = None, state_dtype=None):
        """The empty decoding state of ``batch`` rows (see ``models.state``); ``state_dtype`` None is the
        kind's own (a recurrent state: float32; a KV cache: the compute dtype)."""
        raise NotImplementedError

    def mixer_flops_per_token(self, seq_len: int, chunk_size: int | None = None) -> float:
        """Forward FLOPs per token of the mixer itself (beyond its projections), one layer."""
        raise NotImplementedError

    # -- copies and dicts -------------------------------------------------------------------------

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``arch``, JSON-ready; ``from_dict`` reverses it."""
        return {"arch": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        values = dict(values)
        arch = values.pop("arch", cls.arch)
        if arch != cls.arch:
            raise ValueError(f"{cls.__name__}.from_dict: the dict describes arch {arch!r}, not {cls.arch!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)

    # -- validation helpers ----------------------------------------------------------------------

    def _fail(self, name: str, value: Any, expected: str):
        raise ValueError(f"{type(self).__name__}.{name} must be {expected}; got {value!r}.")

    def _check_choices(self, *pairs: tuple[str, tuple[str, ...]]):
        for name, allowed in pairs:
            if getattr(self, name) not in allowed:
                self._fail(name, getattr(self, name), f"one of {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetNetConfig(ModelConfig):
    """A RetNet language model: multi-scale retention as the mixer (the paper's §2.2)."""

    arch: ClassVar[str] = "retnet"
    mixer_name: ClassVar[str] = "retention"
    state_class: ClassVar[type] = state_lib.RecurrentState
    # Unrolled, paper-1.3b's batch-1 step took 3.12 ms against 3.31 looped (H100, 2026-11-22).
    unroll_decode: ClassVar[bool] = True

    value_dim: int = 128  # total value width H·V (paper: 2D; torchscale v2: ≈1.69·D)
    head_norm: str = "rms"  # per-head norm: "rms" (no weight, torchscale v2), "layernorm", "rms_weight" (fla)
    head_norm_eps: float = 1e-6
    rotation: str = "interleaved"  # "interleaved" (torchscale), "rotate_half" (fla), or "none"
    decay: str = "paper"  # γ schedule: "paper" (1 − 2^(−5−h)) or "linspace"
    normalize: bool = True  # normalized retention (divide by sqrt(c_n)); False = fla's unnormalized

    def __post_init__(self):
        super().__post_init__()
        value = self.value_dim
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self._fail("value_dim", value, "an integer >= 1")
        if self.value_dim % self.num_heads:
            raise ValueError(
                f"RetNetConfig.value_dim ({self.value_dim}) must be divisible by num_heads "
                f"({self.num_heads}); e.g. value_dim={self.num_heads * -(-self.value_dim // self.num_heads)}."
            )
        self._check_choices(("head_norm", HEAD_NORMS), ("rotation", ROTATIONS), ("decay", DECAY_SCHEDULES))
        if self.rotation != "none" and self.key_dim % 2:
            raise ValueError(
                f"RetNetConfig: the rotation pairs features, so K = d_model / num_heads must be even; "
                f"got K = {self.key_dim}. Change d_model or num_heads, or set rotation='none'."
            )
        if self.rotation == "interleaved" and self.key_dim < 4:
            raise ValueError(
                f"RetNetConfig: rotation='interleaved' needs K >= 4 (its angles span K/2 − 1 steps); "
                f"got K = {self.key_dim}. Use rotation='rotate_half' or wider heads."
            )
        if not self.head_norm_eps >= 0:
            self._fail("head_norm_eps", self.head_norm_eps, "a value >= 0")

    @property
    def head_value_dim(self) -> int:
        """V: value width per head."""
        return self.value_dim // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RetNetConfig:
        """A named preset (``models.presets.PRESETS``), with optional field overrides."""
        from retnet_jax.models.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; available: {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def mixer(
        self,
        *,
        mode="parallel",
        chunk_size=64,
        implementation="auto",
        projections="auto",
        return_state=False,
        fused_projections=False,
        name=None,
    ):
        return MultiScaleRetention(
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            value_dim=self.head_value_dim,
            rotation=self.rotation,
            rotation_base=self.rotation_base,
            decay=self.decay,
            normalize=self.normalize,
            head_norm=self.head_norm,
            head_norm_eps=self.head_norm_eps,
            use_bias=self.use_bias,
            dtype=self.compute_dtype,
            param_dtype=self.params_dtype,
            mode=mode,
            chunk_size=chunk_size,
            implementation=implementation,
            projections=projections,
            return_state=return_state,
            fused_projections=fused_projections,
            name=name,
        )

    def init_state(
        self, batch: int, *, max_length: int | None = None, state_dtype=None
    ) -> state_lib.RecurrentState:
        """The empty recurrent state, stored in ``state_dtype``: "float32" (None; exact) or "bfloat16"
        (half the bytes; each step still computes in float32: ``models.state``)."""
        del max_length  # the recurrent state's size does not depend on the length
        return state_lib.RecurrentState.empty(
            self.num_layers,
            batch,
            self.num_heads,
            self.key_dim,
            self.head_value_dim,
            "float32" if state_dtype is None else state_dtype,
        )

    def mixer_flops_per_token(self, seq_len: int, chunk_size: int | None = None) -> float:
        return forward_flops(seq_len, self.num_heads, self.key_dim, self.head_value_dim, chunk_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(ModelConfig):
    """The Transformer baseline: causal softmax attention with rotate-half RoPE as the mixer.

    ``matching(retnet_config)`` gives the baseline with the RetNet's size: attention costs 4·D² weights
    per layer and the FFN width takes the rest. For the paper presets (12·D² per layer: MSR 8·D², MLP
    4·D²) that is a GELU MLP with F = 4·D, so weights, norms and embeddings match exactly:

        paper-1.3b: 1,414,205,440 parameters (RetNet and Transformer alike)
        paper-2.7b: 2,774,471,680 parameters (RetNet and Transformer alike)

    GLU configs get F = (RetNet layer weights − 4·D²) / 3·D rounded to a multiple of 128 (8·D/3 for a
    12·D² RetNet). Heads are 128 wide (H = D / 128: 16 heads at 1.3b, 20 at 2.7b), the usual width for
    Transformers of this size and one that cuDNN's flash attention takes on every GPU generation; a
    width D that 128 does not divide keeps the RetNet's K = D / H.
    """

    arch: ClassVar[str] = "transformer"
    mixer_name: ClassVar[str] = "attention"
    state_class: ClassVar[type] = state_lib.KVCache
    # The cache rides in the layer loop's carry; unrolled, the paper-1.3b step at 8K context took 3.99 ms
    # against 3.50 looped (H200, 2026-12-01).
    unroll_decode: ClassVar[bool] = False

    ffn_dim: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.key_dim % 2:
            raise ValueError(
                f"TransformerConfig: RoPE pairs features, so K = d_model / num_heads must be even; "
                f"got K = {self.key_dim}. Change d_model or num_heads."
            )

    @property
    def head_dim(self) -> int:
        """K: query/key/value width per head."""
        return self.key_dim

    @classmethod
    def matching(
        cls, retnet: RetNetConfig, *, head_dim: int | None = None, ffn_multiple: int = 128, **overrides: Any
    ) -> TransformerConfig:
        """The Transformer with the RetNet's size: same D, L, N, norm, FFN kind, dtypes and options.

        Args:
            retnet: the RetNet config to match.
            head_dim: K per head (default 128 where it divides D, else the RetNet's K).
            ffn_multiple: F is rounded to a multiple of this (the paper presets need no rounding).
            **overrides: fields to change afterwards.
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
        shared = {f.name: getattr(retnet, f.name) for f in dataclasses.fields(ModelConfig)}
        fields = {**shared, "num_heads": d // head_dim, "ffn_dim": max(int(ffn_dim), ffn_multiple)}
        return cls(**{**fields, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """The Transformer matching the RetNet preset ``name`` (e.g. "paper-1.3b"), with field overrides."""
        return cls.matching(RetNetConfig.preset(name), **overrides)

    def mixer(
        self,
        *,
        implementation="auto",
        projections="auto",
        fused_projections=False,
        name=None,
        **unused_retention_options,
    ):
        del unused_retention_options  # one form of attention: mode and chunk size change nothing
        return Attention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            rotation_base=self.rotation_base,
            use_bias=self.use_bias,
            dtype=self.compute_dtype,
            param_dtype=self.params_dtype,
            implementation=implementation,
            projections=projections,
            fused_projections=fused_projections,
            name=name,
        )

    def init_state(self, batch: int, *, max_length: int | None = None, state_dtype=None) -> state_lib.KVCache:
        """The empty KV cache of ``max_length`` slots; it holds the compute dtype (``state_dtype`` may only
        name that one)."""
        if state_dtype is not None and _dtype_or_none(state_dtype) != self.compute_dtype:
            raise ValueError(
                f"TransformerConfig.init_state: a KV cache holds the compute dtype "
                f"({self.compute_dtype.name}); got state_dtype={state_dtype!r}. Leave state_dtype unset, "
                f"or change the config's dtype."
            )
        if max_length is None:
            raise ValueError(
                "TransformerConfig.init_state: a KV cache needs max_length (the most tokens a row will "
                "hold: prompt plus generated)."
            )
        return state_lib.KVCache.empty(
            self.num_layers, batch, self.num_heads, max_length, self.head_dim, self.compute_dtype
        )

    def mixer_flops_per_token(self, seq_len: int, chunk_size: int | None = None) -> float:
        # Q Kᵀ and (·)V over the full T×T scores (2·T·H·K each), counted as the RetNet's parallel form.
        del chunk_size
        return float(2 * 2 * seq_len * self.num_heads * self.head_dim)


def _dtype_or_none(dtype):
    try:
        return jnp.dtype(dtype)
    except TypeError:
        return None


CONFIGS: dict[str, type[ModelConfig]] = {c.arch: c for c in (RetNetConfig, TransformerConfig)}


def from_dict(values: dict[str, Any]) -> ModelConfig:
    """The config a ``to_dict()`` describes (its ``arch`` picks the kind)."""
    arch = values.get("arch")
    if arch not in CONFIGS:
        raise ValueError(f"A model config dict needs 'arch' in {sorted(CONFIGS)}; got {arch!r}.")
    return CONFIGS[arch].from_dict(values)
