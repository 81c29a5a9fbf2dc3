"""The relative-position rotation of queries and keys (the paper's θ; docs/retention.md §3).

Both q and k are rotated by the same positive angle n·θ_j at absolute position n, so q_n·k_m depends on
n − m only. No xPos length scaling: the decay takes its place.

* ``"interleaved"`` (torchscale): θ_j = base^(−j/(K/2 − 1)), j = 0..K/2−1, acting on pairs (x_2j, x_2j+1).
* ``"rotate_half"`` (fla / RoPE): θ_j = base^(−2j/K), acting on pairs (x_j, x_j+K/2).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

STYLES = ("interleaved", "rotate_half")


def angles(key_dim: int, style: str = "interleaved", base: float = 10000.0) -> np.ndarray:
    """θ_j for j = 0..K/2−1, float64 [K/2]."""
    half = key_dim // 2
    if style == "interleaved":
        # torchscale: 1 / base^linspace(0, 1, K/2), both endpoints included.
        return 1.0 / base ** np.linspace(0.0, 1.0, half)
    if style == "rotate_half":
        return 1.0 / base ** (np.arange(half, dtype=np.float64) * 2.0 / key_dim)
    raise ValueError(f"rotation style must be one of {STYLES}; got {style!r}.")


def rotate(x, positions, style: str = "interleaved", base: float = 10000.0):
    """Rotates each feature pair of x by the angle position·θ_j.

    Args:
        x: [B, T, H, K] queries or keys.
        positions: [B, T] or [T] integer absolute positions.
        style: "interleaved" or "rotate_half".

    Returns:
        The rotated x, [B, T, H, K], in x's dtype (angles computed in float32, or float64 for float64 x).
    """
    key_dim = x.shape[-1]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    theta = jnp.asarray(angles(key_dim, style, base), dtype)  # [K/2]
    positions = jnp.broadcast_to(positions, x.shape[:2]).astype(dtype)  # [B, T]
    phase = positions[..., None, None] * theta  # [B, T, 1, K/2]
    cos, sin = jnp.cos(phase), jnp.sin(phase)
    xf = x.astype(dtype)
    if style == "interleaved":
        even, odd = xf[..., 0::2], xf[..., 1::2]
        rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
        return rotated.reshape(x.shape).astype(x.dtype)
    first, second = xf[..., : key_dim // 2], xf[..., key_dim // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
