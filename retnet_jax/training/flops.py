"""Device peaks and the LM's FLOP count, for MFU in the training log and the benchmarks.

Counts are of the matrix products actually executed (2 FLOPs per multiply-add), forward only; a
training step costs three times the forward (forward, and two products per product in the backward).
The token mixers' own counts are the models' (``ModelConfig.mixer_flops_per_token``; retention's is
``ops.retention.forward_flops``).
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


def lm_forward_flops_per_token(num_matmul_params: int, num_layers: int, mixer_flops: float) -> float:
    """2 per weight of every projection (embedding lookup excluded) plus the token mixer per layer."""
    return 2.0 * num_matmul_params + num_layers * mixer_flops
