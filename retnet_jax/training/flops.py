"""FLOP counts and device peaks, for MFU in the training log and the benchmarks.

Counts are of the matrix products actually executed (2 FLOPs per multiply-add), forward only; a
training step costs three times the forward (forward, and two products per product in the backward).
"""

from __future__ import annotations

import jax

# Dense bf16 peak of one chip from its datasheet, FLOP/s, keyed by a substring of jax's device_kind.
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """The datasheet bf16 peak of a device, or None when unknown (e.g. a CPU)."""
    device = device or jax.devices()[0]
    for name, peak in PEAK_BF16.items():
        if name.lower() in device.device_kind.lower():
            return peak
    return None


def retention_forward_flops(
    seq_len: int, heads: int, key_dim: int, value_dim: int, chunk_size: int | None
) -> float:
    """Forward FLOPs per token of retention itself, for one layer.

    Parallel: Q Kᵀ and (·)V over the whole T×T score matrix. Chunkwise: the same inside chunks of C,
    plus the state update and the cross-chunk product (2·K·V each).
    """
    span = seq_len if not chunk_size else min(chunk_size, seq_len)
    flops = 2 * span * heads * (key_dim + value_dim)
    if chunk_size:
        flops += 2 * 2 * heads * key_dim * value_dim
    return float(flops)


def lm_forward_flops_per_token(num_matmul_params: int, num_layers: int, mixer_flops: float) -> float:
    """2 per weight of every projection (embedding lookup excluded) plus the token mixer per layer."""
    return 2.0 * num_matmul_params + num_layers * mixer_flops
