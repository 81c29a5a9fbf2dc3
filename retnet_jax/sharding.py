"""Sharding as metadata: logical axis names on every parameter and activation, one table to the mesh.

Parameters are created with ``nn.with_logical_partitioning`` using the names below; activations are
constrained with ``nn.with_logical_constraint``. ``LOGICAL_RULES`` maps each name to mesh axes of a mesh
with axes ``MESH_AXES`` (data, fsdp, tensor). With no mesh and no rules in context the names are inert,
so the same model runs unchanged on one device.
"""

from __future__ import annotations

import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names (the axis letters of retention.py in words).
BATCH = "batch"  # B
LENGTH = "length"  # T
EMBED = "embed"  # D
HEADS = "heads"  # H
HEAD_DIM = "kv"  # K or V (per-head width)
MLP = "mlp"  # F
VOCAB = "vocab"  # N
LAYERS = "layers"  # L (stacked by nn.scan)

# Logical name -> mesh axes. Batches split over data and fsdp; parameters fully sharded over fsdp on
# their model width and split over tensor on heads / feed-forward / vocabulary (Megatron style).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LAYERS, None),
)


def partitioned(init, *names: str):
    """An initializer that tags its parameter with logical axis names."""
    return nn.with_logical_partitioning(init, names)
