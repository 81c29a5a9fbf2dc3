"""Sharding as metadata: one table from the layers' logical axis names to the axes of a device mesh.

Parameters are created with logical names (``nn.axes``); activations are constrained with
``nn.with_logical_constraint``. ``LOGICAL_RULES`` maps each name to mesh axes of a mesh with axes
``MESH_AXES`` (data, fsdp, tensor). With no mesh and no rules in context the names are inert, so the
same model runs unchanged on one device.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from retnet_jax.nn.axes import BATCH, EMBED, HEAD_DIM, HEADS, LAYERS, LENGTH, MLP, VOCAB

MESH_AXES = ("data", "fsdp", "tensor")

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


def parse_mesh_shape(spec: str | tuple[int, ...], device_count: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor) from "D,F,T" (one of them may be -1: the rest of the devices)."""
    sizes = [int(s) for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(sizes) != len(MESH_AXES) or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"--config.mesh must give {len(MESH_AXES)} sizes for {MESH_AXES}, each >= 1 or one of them "
            f"-1 (the rest of the devices), e.g. '-1,1,1'; got {spec!r}."
        )
    known = 1
    for s in sizes:
        known *= s if s > 0 else 1
    if -1 in sizes:
        if device_count % known:
            raise ValueError(
                f"--config.mesh {spec!r}: the fixed axes use {known} devices, which does not divide "
                f"the {device_count} devices available."
            )
        sizes[sizes.index(-1)] = device_count // known
    total = sizes[0] * sizes[1] * sizes[2]
    if total != device_count:
        raise ValueError(
            f"--config.mesh {spec!r} asks for {total} devices but {device_count} are available; "
            f"make the sizes multiply to {device_count} or use -1 for one axis."
        )
    return tuple(sizes)


def make_mesh(spec: str | tuple[int, ...], devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of all processes) with automatic axes."""
    devices = jax.devices() if devices is None else devices
    shape = parse_mesh_shape(spec, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def shardings_of(boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree whose leaves carry logical names (unnamed leaves are replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Token batches [B, T]: rows split over data and fsdp, the sequence kept whole."""
    spec = nn.logical_to_mesh_axes((BATCH, LENGTH), LOGICAL_RULES)
    return jax.sharding.NamedSharding(mesh, spec)
