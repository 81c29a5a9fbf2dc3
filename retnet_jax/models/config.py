"""Model configuration: a frozen, validated dataclass and the named presets.

Sizes follow REFERENCE §6: the paper's Table 2 (``paper-*``: GELU MLP with F = 2D, LayerNorm, value width
2D, 12·D² parameters per layer) and torchscale's v2 archs (``torchscale-*``: swish GLU, RMSNorm, no bias,
value width = F ≈ 1.69·D).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from retnet_jax.retention import DECAY_SCHEDULES
from retnet_jax.retention import IMPLEMENTATIONS as RETENTION_IMPLS

FFN_TYPES = ("glu", "mlp")
ACTIVATIONS = ("swish", "gelu")
NORMS = ("rmsnorm", "layernorm")
HEAD_NORMS = ("rms", "layernorm", "rms_weight")
ROTATIONS = ("interleaved", "rotate_half", "none")
MODES = ("parallel", "chunkwise", "recurrent")
DTYPES = ("float32", "bfloat16", "float16", "float64")


class ConfigMethods:
    """What the model configs (RetNet, Transformer baseline) share: dtypes, copies, dicts."""

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class RetNetConfig(ConfigMethods):
    """Sizes and options of a RetNet language model. Derived sizes are properties."""

    vocab_size: int = 256  # N: rows of the embedding and the output head
    d_model: int = 64  # D: model width
    num_layers: int = 2  # L: blocks
    num_heads: int = 2  # H: retention heads; key/query head dim K = D / H
    value_dim: int = 128  # total value width H·V (paper: 2D; torchscale v2: ≈1.69·D)
    ffn_dim: int = 128  # F: feed-forward width
    ffn_type: str = "glu"  # "glu": fc2(act(fc1 x) ⊙ gate x); "mlp": the paper's fc2(act(fc1 x))
    activation: str = "swish"  # FFN activation: "swish" or "gelu"
    norm: str = "rmsnorm"  # block and final norm: "rmsnorm" (with weight) or "layernorm"
    norm_eps: float = 1e-6
    head_norm: str = "rms"  # per-head norm: "rms" (no weight, torchscale v2), "layernorm", "rms_weight"
    head_norm_eps: float = 1e-6
    rotation: str = "interleaved"  # "interleaved" (torchscale), "rotate_half" (fla), or "none"
    rotation_base: float = 10000.0
    decay: str = "paper"  # γ schedule: "paper" (1 − 2^(−5−h)) or "linspace"
    normalize: bool = True  # normalized retention (divide by sqrt(c_n)); False = fla's unnormalized
    use_bias: bool = False  # biases in the projections (torchscale v1 / paper) or not (v2)
    tie_embeddings: bool = False  # output head = embeddingᵀ
    embed_scale: bool = False  # multiply embeddings by sqrt(D)
    embed_norm: bool = False  # a norm right after the embedding
    dropout: float = 0.0  # residual and embedding dropout (paper: 0.1)
    mode: str = "parallel"  # default form for full-sequence calls
    chunk_size: int = 64  # C for the chunkwise form
    retention_impl: str = "auto"  # chunkwise form: "xla", "pallas" (fused kernels) or "auto" (pallas on GPU)
    dtype: str = "float32"  # compute dtype; params, norms, decay, state and loss stay float32
    param_dtype: str = "float32"
    scan_layers: bool = True  # stack blocks with nn.scan (one compiled block)
    remat: bool = False  # recompute blocks in the backward pass
    unroll_decode: bool = True  # unroll the layer loop of one-token decode steps (one fused program)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "value_dim", "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetNetConfig.{name} must be an integer >= 1; got {value!r}.")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"RetNetConfig.d_model ({self.d_model}) must be divisible by num_heads "
                f"({self.num_heads}): each head gets K = d_model / num_heads. Change one of them."
            )
        if self.value_dim % self.num_heads:
            raise ValueError(
                f"RetNetConfig.value_dim ({self.value_dim}) must be divisible by num_heads "
                f"({self.num_heads}); e.g. value_dim={self.num_heads * -(-self.value_dim // self.num_heads)}."
            )
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
        chunk = self.chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            _fail("chunk_size", self.chunk_size, "an integer >= 1")
        for name, allowed in (
            ("ffn_type", FFN_TYPES),
            ("activation", ACTIVATIONS),
            ("norm", NORMS),
            ("head_norm", HEAD_NORMS),
            ("rotation", ROTATIONS),
            ("decay", DECAY_SCHEDULES),
            ("mode", MODES),
            ("retention_impl", RETENTION_IMPLS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"one of {allowed}")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a rate in [0, 1)")
        for name in ("norm_eps", "head_norm_eps"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "a value >= 0")

    @property
    def key_dim(self) -> int:
        """K: query/key width per head."""
        return self.d_model // self.num_heads

    @property
    def head_value_dim(self) -> int:
        """V: value width per head."""
        return self.value_dim // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RetNetConfig:
        """A named preset (see ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; available: {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


def _fail(name: str, value: Any, expected: str):
    raise ValueError(f"RetNetConfig.{name} must be {expected}; got {value!r}.")


def _paper(d_model: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    # Table 2/7: K = 256 per head, value width 2D, GELU MLP with F = 2D, LayerNorm ("GroupNorm" per head).
    return dict(
        vocab_size=50304,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        value_dim=2 * d_model,
        ffn_dim=2 * d_model,
        ffn_type="mlp",
        activation="gelu",
        norm="layernorm",
        head_norm="layernorm",
        dropout=0.1,
        chunk_size=512,
        dtype="bfloat16",
    )


def _torchscale(d_model: int, num_layers: int, num_heads: int, ffn_dim: int) -> dict[str, Any]:
    # torchscale 0.3.0 (v2) archs: swish GLU, RMSNorm, no bias, value width = F.
    return dict(
        vocab_size=50304,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        value_dim=ffn_dim,
        ffn_dim=ffn_dim,
        chunk_size=512,
        dtype="bfloat16",
    )


PRESETS: dict[str, dict[str, Any]] = {
    # CPU sizes for tests, notebooks and the default run.
    "tiny": dict(
        vocab_size=264,
        d_model=64,
        num_layers=2,
        num_heads=2,
        value_dim=128,
        ffn_dim=128,
        chunk_size=32,
    ),
    "small": dict(
        vocab_size=264,
        d_model=256,
        num_layers=4,
        num_heads=4,
        value_dim=512,
        ffn_dim=512,
        chunk_size=64,
    ),
    "paper-1.3b": _paper(2048, 24, 8),
    "paper-2.7b": _paper(2560, 32, 10),
    "paper-6.7b": _paper(4096, 32, 16),
    "paper-13b": _paper(5120, 40, 20),
    "torchscale-base": _torchscale(512, 6, 2, 864),
    "torchscale-medium": _torchscale(1024, 16, 4, 1728),
    "torchscale-xl": _torchscale(2048, 24, 8, 3456),
    "torchscale-3b": _torchscale(2560, 32, 10, 4280),
    "torchscale-7b": _torchscale(4096, 32, 16, 6912),
    "torchscale-13b": _torchscale(5120, 40, 20, 8560),
    "torchscale-65b": _torchscale(8192, 64, 32, 13824),
}
