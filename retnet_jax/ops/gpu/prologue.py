"""The few-row kernels' norm prologue (``ops.gpu.skinny``, ``ops.gpu.skinny_nd``): x's rows normalized before
the product, in the kernel.

A block norm runs over all of x's D columns (RMSNorm with a scale, LayerNorm with a scale and a bias);
retention's head norm over each head's V columns (``group``; a scale [V] shared by the heads or none) and
multiplied by swish(g) (``gate``, apart or read in place from the joined q, k, v, g product). The loop that
both layouts' kernels run (``prologue_loop``) walks a program's BD-column steps in runs inside one group,
computes the group's statistics in float32 before each run, and hands each step's slice normalized,
scaled, gated and cast to W's dtype: ``ops.norms.normalize``'s numerics up to the order of the statistics'
float32 sums. ``xla_prologue`` is the same function by XLA (the backward pass's).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops import norms
from retnet_jax.ops.gpu import common

__all__ = [
    "STATISTICS_ELEMENTS",
    "Prologue",
    "fit_group",
    "prologue_loop",
    "prologue_of",
    "prologue_operands",
    "prologue_specs",
    "statistics_block",
    "xla_prologue",
]


class Prologue(NamedTuple):
    """The norm the kernel applies to x's rows before multiplying them (``ops.norms.normalize``)."""

    kind: str  # "rmsnorm" or "layernorm"
    eps: float
    group: int  # the columns each norm runs over: D (a block norm) or V (retention's per-head norm)
    operands: tuple[str, ...]  # which of "scale" [group], "bias" [group], "gate" [M, G·W] it takes, in order
    # The gate's layout: W columns a group, the group's gate at [gate_offset, gate_offset + group) of them
    # (a slice of retention's joined q, k, v, g product, read in place); W = group, offset 0: [M, D].
    gate_width: int = 0
    gate_offset: int = 0


# Elements of x a program loads per step of its statistics loop: few steps (one for a row of D ≤ 8192), in
# registers that a [16, 512] float32 tile fits.
STATISTICS_ELEMENTS = 8192


def statistics_block(rows: int, d: int, block_d: int) -> int:
    """The statistics loop's width: BD doubled while it divides D and [rows, width] fits
    ``STATISTICS_ELEMENTS`` (a power of two, as Triton's tiles must be)."""
    width = block_d
    while d % (2 * width) == 0 and 2 * width * rows <= STATISTICS_ELEMENTS:
        width *= 2
    return width


def _statistics(x_ref, prologue: Prologue, block: int, start=0):
    """(mean, 1 / sqrt(var + eps)) of every row over the group of columns [start, start + group), [R, 1]
    float32 each (mean 0 for RMSNorm), in steps of ``block`` columns.

    Every program computes them for itself: x is a few rows (at most 16 × D), read from L2 after the first.
    """
    width = prologue.group

    def chunk(i):
        return x_ref[:, pl.ds(pl.multiple_of(start + i * block, block), block)].astype(jnp.float32)

    def total(term):
        def step(i, acc):
            return acc + jnp.sum(term(chunk(i)), axis=1, keepdims=True)

        return jax.lax.fori_loop(0, width // block, step, jnp.zeros((x_ref.shape[0], 1), jnp.float32))

    mean = 0.0
    if prologue.kind == "layernorm":  # centred before squaring, as ops.norms.layer_normalize
        mean = total(lambda rows: rows) / width
    square = total(lambda rows: jnp.square(rows - mean)) / width
    return mean, jax.lax.rsqrt(square + prologue.eps)


def prologue_loop(
    x_ref,
    operands,
    prologue: Prologue | None,
    *,
    first,
    steps: int,
    block_d: int,
    block_s: int,
    dtype,
    body,
    init,
):
    """``body(d, acc, rows)`` over the BD-column steps first, …, first + steps − 1 of x (d: the step's first
    column), acc carried from ``init``; rows: x's [R, BD] slice there, through the prologue if any
    (normalized, scaled, shifted and gated in float32, cast to ``dtype``). (Both weight layouts' loop.)

    A group's statistics are computed once per run of steps inside it: ``math.gcd(steps, group / BD)``
    steps, which never straddle two groups (a program's first step is a multiple of ``steps``).
    """

    def columns(k):
        return pl.multiple_of((first + k) * block_d, block_d)

    if prologue is None:
        return jax.lax.fori_loop(
            0, steps, lambda k, acc: body(columns(k), acc, x_ref[:, pl.ds(columns(k), block_d)]), init
        )
    named = dict(zip(prologue.operands, operands, strict=True))
    per_group = prologue.group // block_d
    inner = math.gcd(steps, per_group)

    def within_group(j, acc):
        start = 0
        if per_group * block_d != x_ref.shape[1]:  # several groups: the one holding step j · inner
            start = pl.multiple_of(jax.lax.div(first + j * inner, per_group) * prologue.group, prologue.group)
        mean, inverse = _statistics(x_ref, prologue, block_s, start)

        def step(i, acc):
            d = columns(j * inner + i)
            rows = (x_ref[:, pl.ds(d, block_d)].astype(jnp.float32) - mean) * inverse
            offset = pl.multiple_of(d - start, block_d)  # in the group: the scale's and bias's column
            if "scale" in named:
                rows = rows * named["scale"][:, pl.ds(offset, block_d)].astype(jnp.float32)
            if "bias" in named:
                rows = rows + named["bias"][:, pl.ds(offset, block_d)].astype(jnp.float32)
            if "gate" in named:
                column = d  # the gate's column of x's column d
                if (prologue.gate_width, prologue.gate_offset) != (prologue.group, 0):
                    head = jax.lax.div(start, prologue.group) if per_group * block_d != x_ref.shape[1] else 0
                    column = head * prologue.gate_width + prologue.gate_offset + offset
                gate = named["gate"][:, pl.ds(column, block_d)].astype(jnp.float32)
                rows = rows * jax.nn.swish(gate)
            return body(d, acc, rows.astype(dtype))

        return jax.lax.fori_loop(0, inner, step, acc)

    if inner == steps:  # one run: no outer loop
        return within_group(0, init)
    return jax.lax.fori_loop(0, steps // inner, within_group, init)


def prologue_specs(prologue: Prologue | None, rows: int, d: int, index_map) -> list:
    """The prologue's operands' blocks, each whole: scale and bias [1, group], the gate [R, D]."""
    if prologue is None:
        return []
    gate = (rows, d // prologue.group * prologue.gate_width)
    shapes = {"scale": (1, prologue.group), "bias": (1, prologue.group), "gate": gate}
    return [pl.BlockSpec(shapes[name], index_map) for name in prologue.operands]


def prologue_operands(prologue: Prologue | None, operands, rows: int) -> list:
    """The prologue's operands as the kernel takes them: scale and bias [1, group] (reshapes, no copy),
    the gate padded to the kernel's ``rows``."""
    if prologue is None:
        return []
    shaped = []
    for name, array in zip(prologue.operands, operands, strict=True):
        if name == "gate":
            shaped.append(jnp.pad(array, ((0, rows - array.shape[0]), (0, 0))))  # padded rows: swish(0) = 0
        else:
            shaped.append(array.reshape(1, prologue.group))
    return shaped


def xla_prologue(x, operands, prologue: Prologue | None, dtype):
    """What the kernel's prologue computes, by XLA (``ops.norms.normalize`` on each group): x [M, D] →
    [M, D] in ``dtype``; x itself without a prologue."""
    if prologue is None:
        return x
    m, d = x.shape
    grouped = (m, d // prologue.group, prologue.group)
    named = dict(zip(prologue.operands, operands, strict=True))
    gate = named.get("gate")
    if gate is not None:  # the group's columns of each group's W
        gate = gate.reshape(m, d // prologue.group, prologue.gate_width)
        gate = gate[..., prologue.gate_offset : prologue.gate_offset + prologue.group]
    y = norms.normalize(
        x.reshape(grouped),
        prologue.kind,
        prologue.eps,
        named.get("scale"),
        named.get("bias"),
        dtype,
        gate,
    )
    return y.reshape(m, d)


def prologue_of(
    name: str, norm: str | None, x, scale, bias, eps, gate, group, gate_offset: int = 0
) -> tuple[tuple, Prologue | None]:
    """(the prologue's operands, its ``Prologue``), checked against x [M, D]; ((), None) without a norm."""
    if norm is None:
        if gate is not None or group is not None:
            raise ValueError(f"{name}: gate and group belong to a norm prologue; pass norm= too.")
        return (), None
    if norm not in norms.KINDS:
        raise ValueError(f"{name}: norm must be one of {norms.KINDS} or None; got {norm!r}.")
    width = x.shape[1]
    group = width if group is None else group
    if group < 16 or group % 16 or width % group:
        raise ValueError(f"{name}: group = {group} must be a multiple of 16 dividing D = {width}.")
    shape = (group,)
    if norm == "rmsnorm":
        wanted, bad = f"a scale of shape {shape} (or none) and no bias", bias is not None
    else:
        wanted, bad = f"a scale and a bias of shape {shape} (or neither)", (scale is None) != (bias is None)
    present = [a for a in (scale, bias) if a is not None]
    if bad or any(a.shape != shape for a in present):
        raise ValueError(f"{name}: norm={norm!r} takes {wanted}.")
    groups = width // group
    gate_width = group if gate is None else gate.shape[-1] // groups
    fits = gate is None or (gate.shape[0] == x.shape[0] and gate.shape[1] == groups * gate_width)
    if not fits or not 0 <= gate_offset <= gate_width - group:
        got = None if gate is None else gate.shape
        raise ValueError(
            f"{name}: the gate must be [M, D / group · W] (W ≥ group + gate_offset), each group's gate at "
            f"[gate_offset, gate_offset + group) of its W; got {got} for x {x.shape}, gate_offset = "
            f"{gate_offset}, group = {group}."
        )
    operands = {"scale": scale, "bias": bias, "gate": gate}
    operands = {key: array for key, array in operands.items() if array is not None}
    for array in (x, *operands.values()):
        if jnp.dtype(array.dtype) not in common.DTYPES:
            raise ValueError(
                f"{name}: the norm's input, parameters and gate must be bfloat16, float16 or float32; got "
                f"{jnp.dtype(array.dtype).name}. Normalize with XLA (ops.norms.normalize) first."
            )
    prologue = Prologue(norm, float(eps), group, tuple(operands), gate_width, gate_offset)
    return tuple(operands.values()), prologue


def fit_group(name: str, tiles, prologue: Prologue | None, *, explicit: bool):
    """The plan with BD dividing the prologue's group: a default plan's BD halved until it does (fewer
    columns per step: every constraint of ``check`` still holds, S still divides D / BD); an explicit
    plan's BD must already."""
    if prologue is None or prologue.group % tiles.block_d == 0:
        return tiles
    if explicit:
        raise ValueError(
            f"{name}: block_d = {tiles.block_d} must divide the norm's group of {prologue.group} columns."
        )
    block_d = tiles.block_d
    while prologue.group % block_d:
        block_d //= 2
    return tiles._replace(block_d=block_d)
