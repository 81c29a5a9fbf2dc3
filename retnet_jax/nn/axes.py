"""Logical axis names: every parameter and activation is tagged with them where it is created.

The names are the axis letters of ``ops.retention`` in words. They mean nothing until a mesh and a rules
table are in context (``training.sharding.LOGICAL_RULES`` maps each to mesh axes), so the same layers run
unchanged with no mesh, one device or many.
"""

from __future__ import annotations

import flax.linen as nn

BATCH = "batch"  # B
LENGTH = "length"  # T
EMBED = "embed"  # D
HEADS = "heads"  # H
HEAD_DIM = "kv"  # K or V (per-head width)
MLP = "mlp"  # F
VOCAB = "vocab"  # N
LAYERS = "layers"  # L (stacked by nn.scan)

ACTIVATION_AXES = (BATCH, LENGTH, EMBED)  # the residual stream [B, T, D]
HEAD_AXES = (BATCH, LENGTH, HEADS, HEAD_DIM)  # per-head activations [B, T, H, K|V]


def partitioned(init, *names: str):
    """An initializer that tags its parameter with logical axis names."""
    return nn.with_logical_partitioning(init, names)
