"""Named model sizes: the paper's Table 2, torchscale's v2 architectures, and CPU sizes for tests.

``paper-*``: GELU MLP with F = 2D, LayerNorm (a per-head LayerNorm for the paper's "GroupNorm"), value
width 2D, 12·D² parameters per layer. ``torchscale-*`` (torchscale 0.3.0's v2 archs): swish GLU, RMSNorm,
no bias, value width = F ≈ 1.69·D. ``RetNetConfig.preset(name, **overrides)`` builds one;
``TransformerConfig.preset(name)`` builds the Transformer of the same size.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]


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
        dtype="bfloat16",
    )


PRESETS: dict[str, dict[str, Any]] = {
    # CPU sizes for tests, notebooks and the default run.
    "tiny": dict(vocab_size=264, d_model=64, num_layers=2, num_heads=2, value_dim=128, ffn_dim=128),
    "small": dict(vocab_size=264, d_model=256, num_layers=4, num_heads=4, value_dim=512, ffn_dim=512),
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
