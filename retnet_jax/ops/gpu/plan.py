"""Which kernel family, chunk length and tiles run a head shape, and whether they fit the GPU.

Two families compute the same function (``fused.chunk_retention``):

* ``"register"`` (``chunk_retention``): the running state of one (batch row, head) in registers; for heads
  whose whole state, K and V rounded up to powers of two, has at most 128·128 entries.
* ``"split"`` (``split_retention``): chunk states through device memory; any K and V (padded to tiles).
  Its tiles name one of two variants (``split_retention.Tiles.stored_scores``): the chunk passes recompute
  each chunk's C×C scores once per column tile, or read them from a scores pass that computes them once
  (the default where V spans 4 value tiles or more: ``split_retention.default_tiles``).

A plan is refused (``make`` returns the reason) when its estimated shared memory exceeds what one
program may use (``common.SHARED_MEMORY_BYTES``); ``make`` first lowers the pipelining stages, then (split)
the tiles, before it gives up.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from retnet_jax.ops.gpu import chunk_retention, common, split_retention

__all__ = [
    "FAMILIES",
    "MAX_CHUNK",
    "MIN_CHUNK",
    "MIN_REGISTER_PROGRAMS",
    "Plan",
    "family_of",
    "make",
    "padded_dims",
    "shared_memory",
]

FAMILIES = ("register", "split")

# Chunk lengths the kernels take: powers of two from 16 (Triton's smallest product) to 128 (a C×C float32
# score tile per program; C = 128 measured 3-6× slower than 64 at K = V = 128 on an H100).
MIN_CHUNK, MAX_CHUNK = 16, 128

# The register kernels run one program per (batch row, head, column tile): with fewer programs than this
# they leave most of the GPU idle, and the split kernels (programs per state tile and chunk range) are
# faster. H200, H32 fwd+bwd with a carried state, C=64, B2 T32768 (64 rows): K=V=64 (one tile a head, 64
# programs) register 2.776 ms, split 2.643 (2026-12-03, --tag=k64-fla3); K=V=128 with two tiles a head
# (128 programs) register 4.399 ms, split 5.451 (--tag=fla-register-64); K=V=128 on its former whole
# tile (64 programs, 2026-12-01) register 7.33 ms, split 5.78.
MIN_REGISTER_PROGRAMS = 128


class Plan(NamedTuple):
    family: str  # "register" or "split"
    chunk: int  # C
    tiles: chunk_retention.Tiles | split_retention.Tiles


def family_of(key_dim: int, value_dim: int) -> str:
    """The family that runs these heads by default: "register" where the whole state fits registers."""
    entries = common.next_power_of_two(key_dim) * common.next_power_of_two(value_dim)
    return "register" if entries <= chunk_retention.STATE_TILE_ENTRIES else "split"


def padded_dims(plan: Plan, key_dim: int, value_dim: int) -> tuple[int, int]:
    """K and V after padding: powers of two (register) or multiples of the tiles (split)."""
    if plan.family == "register":
        return common.next_power_of_two(key_dim), common.next_power_of_two(value_dim)
    bk, bv = plan.tiles.key, plan.tiles.value
    return -(-key_dim // bk) * bk, -(-value_dim // bv) * bv


def shared_memory(plan: Plan, key_dim: int, value_dim: int, dtype) -> dict[str, int]:
    """Estimated shared memory (bytes) per program of each kernel of the plan."""
    kp, vp = padded_dims(plan, key_dim, value_dim)
    module = chunk_retention if plan.family == "register" else split_retention
    return module.shared_memory(plan.tiles, plan.chunk, kp, vp, jnp.dtype(dtype).itemsize)


def _fits(plan, key_dim, value_dim, dtype) -> bool:
    return max(shared_memory(plan, key_dim, value_dim, dtype).values()) <= common.SHARED_MEMORY_BYTES


def _register(key_dim, value_dim, chunk, dtype) -> Plan | None:
    if family_of(key_dim, value_dim) != "register":
        return None
    kp, vp = common.next_power_of_two(key_dim), common.next_power_of_two(value_dim)
    whole = chunk_retention.default_tiles(kp, vp)
    for forward, backward in ((3, 2), (2, 2), (2, 1), (1, 1)):
        plan = Plan("register", chunk, whole._replace(num_stages=forward, backward_stages=backward))
        if _fits(plan, key_dim, value_dim, dtype):
            return plan
    return None


def _split(key_dim, value_dim, chunk, dtype, stored_scores=None) -> Plan | None:
    tiles = split_retention.default_tiles(key_dim, value_dim)
    if stored_scores is not None:
        tiles = tiles._replace(stored_scores=stored_scores)
    while True:
        for stages in (tiles.num_stages, 1):
            plan = Plan("split", chunk, tiles._replace(num_stages=stages))
            if _fits(plan, key_dim, value_dim, dtype):
                return plan
        if max(tiles.key, tiles.value) <= 16:
            return None
        tiles = tiles._replace(key=max(16, tiles.key // 2), value=max(16, tiles.value // 2))


def check_chunk(chunk: int) -> str | None:
    if chunk < MIN_CHUNK or chunk > MAX_CHUNK or chunk & (chunk - 1):
        return f"chunk_size = {chunk} (the kernels take powers of two from {MIN_CHUNK} to {MAX_CHUNK})"
    return None


def make(
    key_dim: int,
    value_dim: int,
    chunk: int,
    dtype,
    family: str | None = None,
    tiles=None,
    stored_scores: bool | None = None,
    rows: int | None = None,
) -> Plan | str:
    """The plan for these sizes, or the reason there is none.

    Args:
        key_dim, value_dim: K and V of the heads; chunk: C; dtype: the inputs' dtype.
        family: "register", "split", or None for the register family where it fits (and, when ``rows``
            is given, where its programs, rows times column tiles, number ``MIN_REGISTER_PROGRAMS`` or
            more), else split.
        tiles: the family's ``Tiles`` (default: the family's choice, fitted to shared memory).
        stored_scores: the split family's variant that computes each chunk's scores once
            (``split_retention``); True sets it on ``tiles`` too, and family None then means split;
            False the recomputing variant; None the default for the head shape
            (``split_retention.default_tiles``).
        rows: B·H, the (batch row, head) pairs of the call, or None (not known: rows do not decide).
    """
    if jnp.dtype(dtype) not in common.DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (the kernels take bfloat16, float16 or float32)"
    reason = check_chunk(chunk)
    if reason is not None:
        return reason
    if family not in (None, *FAMILIES):
        return f"kernel family {family!r} (expected one of {FAMILIES})"
    if stored_scores:
        if family == "register" or isinstance(tiles, chunk_retention.Tiles):
            return "stored_scores in the register family (a variant of the split family only)"
        family = "split"
        tiles = None if tiles is None else tiles._replace(stored_scores=True)
    if tiles is not None:
        plan = Plan(
            family or ("register" if isinstance(tiles, chunk_retention.Tiles) else "split"), chunk, tiles
        )
        if not _fits(plan, key_dim, value_dim, dtype):
            return f"tiles {tuple(tiles)}: {_too_big(plan, key_dim, value_dim, dtype)}"
        return plan
    if family in ("register", None):
        plan = _register(key_dim, value_dim, chunk, dtype)
        if family == "register":
            return plan or f"K = {key_dim}, V = {value_dim} in the register kernels at C = {chunk}"
        if plan is not None:
            tiles_per_row = padded_dims(plan, key_dim, value_dim)[1] // plan.tiles.value
            if rows is None or rows * tiles_per_row >= MIN_REGISTER_PROGRAMS:
                return plan
    return _split(key_dim, value_dim, chunk, dtype, stored_scores) or (
        f"K = {key_dim}, V = {value_dim} at C = {chunk}: even 16-wide tiles exceed shared memory"
    )


def _too_big(plan, key_dim, value_dim, dtype) -> str:
    name, size = max(shared_memory(plan, key_dim, value_dim, dtype).items(), key=lambda kv: kv[1])
    return (
        f"the {name} kernel needs ≈ {size // 1024} KiB of shared memory per program, "
        f"more than the {common.SHARED_MEMORY_BYTES // 1024} KiB available"
    )
