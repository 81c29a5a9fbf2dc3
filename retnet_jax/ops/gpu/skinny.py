"""Products of a few rows by a weight matrix, as one decoding step's projections make them.

One decoding step multiplies M rows (the batch: 1–16) by every weight matrix W [D, N] of the model once, so
its time is the time to read the weights. XLA does not always read them once: in paper-1.3b's compiled
batch-1 step (H200, jax 0.11.2) each layer's output projection and both FFN projections run as two
kernels, one writing x ⊙ W (a weight-sized bf16 tensor) and one reducing it: three passes over those
weights instead of one (``experiments/results/bench_inference_H200_2026-12-01_floor_hlo.zip``).

Here program (n, s) of a grid (N / BN, S) takes the n-th BN columns of W and the s-th of S equal slices of
its D rows, walks the slice in BD-row steps (a [R, BD] × [BD, BN] product each, float32 accumulation; the
rows padded to R = 16, Triton's smallest product, or for one row a broadcast product summed over BD) and
writes a float32 partial [R, BN]; the S partials are summed afterwards (S·R·N floats, small against W's
D·N), by XLA: one more kernel. With S = 1 there is nothing to sum: each program writes its [R, BN] tile of
the output in W's dtype, and the call is one kernel (two with rows padded to 16: the padding and the slice
back). ``plan`` picks S as the smallest divisor of D / BD that gives the grid ``PROGRAMS`` programs, so
that a matrix of few columns is still read by every SM, but no more than keeps the partials within 1/16 of
W's bytes; ``candidates`` lists other plans worth measuring (S = 1 with narrower or wider tiles, other warp
and stage counts), and ``matmul(tiles=...)`` runs any plan ``check`` accepts. W is read once, a [BD, BN]
tile at a time along its rows (contiguous BN-element runs).

With a norm prologue (``matmul(norm=...)``: RMSNorm with a scale, LayerNorm with a scale and a bias) the
kernel multiplies normalize(x) instead of x, so that a decoding step's block norm is no kernel of its own
(XLA makes ~3 of each: two reductions and the normalization). Each program first computes the rows'
statistics over all of D in float32 (x is a few rows, read from L2 by every program after the first; the
LayerNorm's variance is that of the centred rows, as ``ops.norms``), then normalizes each [R, BD] slice it
loads, applies the affine in float32 and casts to W's dtype before the product: ``ops.norms.normalize``'s
numerics, up to the order of the statistics' float32 sums.

The norm may also run over groups of columns and be gated (``matmul(group=, gate=)``): retention's head
norm (over each head's V columns, a scale [V] shared by the heads or none) times swish(g), in front of its
output projection, so that a decoding step runs no XLA kernel between the decode-step kernel and that
product. Each BD step then lies in one group (BD divides it); a program computes a group's statistics
before its first step in that group (over the group's columns, from L2), normalizes and scales each slice,
multiplies it by swish of the gate's slice (float32) and casts. (The prologue's code, shared with
``ops.gpu.skinny_nd``: ``ops.gpu.prologue``.)

With an epilogue (``matmul(output_bias=, activation=, residual=)``) the output is act(x W + b) + r, computed
in float32 on the accumulator before the one cast to W's dtype: an FFN's first layer (its bias and GELU or
swish) or a block's last product (its bias and the residual stream) is then no XLA kernel of its own after
the product (XLA cannot fuse anything into a kernel's output). With S = 1 the kernel applies it; with
S > 1 XLA applies the same function after the sum of the partials, in the one fusion that sums them.

The backward pass is XLA's (``jax.custom_vjp``): a few-row product's gradients are ordinary matmuls; with
a prologue, XLA's norm (recomputed from the few rows) and its vjp come before them; with an epilogue, its
vjp (the product recomputed by XLA where the activation needs it) after them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops.gpu import common
from retnet_jax.ops.gpu.prologue import (
    Prologue,
    fit_group,
    prologue_loop,
    prologue_of,
    prologue_operands,
    prologue_specs,
    statistics_block,
    xla_prologue,
)

__all__ = [
    "ACTIVATIONS",
    "MAX_CANDIDATES",
    "MAX_ROWS",
    "PROGRAMS",
    "Plan",
    "Prologue",
    "candidates",
    "check",
    "epilogue",
    "matmul",
    "plan",
]

MAX_ROWS = 16  # rows the kernel takes: Triton's smallest product is 16 rows; more rows are a matmul
PROGRAMS = 2 * 132  # programs wanted per call: two per SM of an H100 / H200
MAX_CANDIDATES = 24  # plans ``candidates`` lists per shape: a sweep of every shape stays a few minutes

# The FFN's activations, as the model computes them (``nn.feedforward`` takes this table): GELU in its tanh
# approximation (``jax.nn.gelu``'s default) and swish = SiLU.
ACTIVATIONS = {"swish": jax.nn.swish, "gelu": jax.nn.gelu}


def _padded_rows(rows: int) -> int:
    """R: one row stays one (no product: a broadcast and a sum), more are padded to a 16-row product."""
    return 1 if rows == 1 else 16


class Plan(NamedTuple):
    block_d: int  # BD: rows of W per loop step
    block_n: int  # BN: columns of W per program
    splits: int  # S: slices of D, one program each per column tile
    num_warps: int = 4
    num_stages: int = 3


def _tile(size: int, widest: int) -> int | None:
    for tile in (widest, widest // 2, widest // 4, widest // 8):
        if tile >= 16 and size % tile == 0:
            return tile
    return None


def plan(rows: int, d: int, n: int, dtype) -> Plan | str:
    """The kernel's tiles for x [rows, d] @ w [d, n], or why it does not take them."""
    if jnp.dtype(dtype) not in common.DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (the kernel takes bfloat16, float16 or float32)"
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows (the kernel takes 1 to {MAX_ROWS})"
    block_d, block_n = _tile(d, 64), _tile(n, 128)
    if block_d is None or block_n is None:
        return f"D = {d}, N = {n} (the kernel needs both multiples of 16)"
    steps, columns = d // block_d, n // block_n
    most = max(1, d * jnp.dtype(dtype).itemsize // (16 * 4 * _padded_rows(rows)))  # partials ≤ W / 16
    divisors = [s for s in range(1, steps + 1) if steps % s == 0 and s <= most]
    splits = next((s for s in divisors if columns * s >= PROGRAMS), divisors[-1])
    return Plan(block_d, block_n, splits)


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def check(tiles: Plan, rows: int, d: int, n: int, dtype) -> str | None:
    """Why the kernel cannot run x [rows, d] @ w [d, n] with ``tiles``, or None when it can.

    BD and BN are powers of two of at least 16 (Triton's tiles) that divide D and N, S divides D / BD,
    the warps are a power of two up to 32, and ``num_stages`` buffers of a step's tiles ([BD, BN] of W
    and [R, BD] of x) fit an H100's shared memory (``common.SHARED_MEMORY_BYTES``).
    """
    default = plan(rows, d, n, dtype)
    if isinstance(default, str):  # rows, dtype or widths the kernel never takes
        return default
    for name, value in (("block_d", tiles.block_d), ("block_n", tiles.block_n)):
        if not (_power_of_two(value) and value >= 16):
            return f"{name} = {value} (a power of two of at least 16)"
    if d % tiles.block_d or n % tiles.block_n:
        return f"block_d = {tiles.block_d}, block_n = {tiles.block_n} must divide D = {d} and N = {n}"
    if tiles.splits < 1 or (d // tiles.block_d) % tiles.splits:
        return f"splits = {tiles.splits} must divide D / block_d = {d // tiles.block_d}"
    if not (_power_of_two(tiles.num_warps) and tiles.num_warps <= 32) or tiles.num_stages < 1:
        return (
            f"num_warps = {tiles.num_warps} (1 to 32, a power of two), num_stages = {tiles.num_stages} (≥ 1)"
        )
    step = tiles.block_d * (tiles.block_n + _padded_rows(rows)) * jnp.dtype(dtype).itemsize
    if tiles.num_stages * step > common.SHARED_MEMORY_BYTES:
        return (
            f"{tiles.num_stages} stages of {step} bytes exceed {common.SHARED_MEMORY_BYTES} bytes of shared "
            "memory (fewer stages or smaller tiles)"
        )
    return None


def candidates(rows: int, d: int, n: int, dtype) -> list[Plan]:
    """Plans worth measuring for x [rows, d] @ w [d, n], ``plan``'s first, at most ``MAX_CANDIDATES``;
    empty where the kernel does not take the shape.

    * S = 1 (no partials to sum afterwards) with BN in {16, 32, 64, 128} and BD in {64, 128, 256}: the
      fewer columns per program, the more programs read W; the longer the step, the fewer loop steps;
    * ``plan``'s tiles and S with 4 or 8 warps and 2, 3 or 4 stages;
    * the widest S = 1 tiles with 8 warps, and a middle one with 2 and 4 stages.

    Each is one ``check`` accepts; duplicates are listed once.
    """
    default = plan(rows, d, n, dtype)
    if isinstance(default, str):
        return []
    listed = [default]
    listed += [Plan(bd, bn, 1) for bn in (16, 32, 64, 128) for bd in (64, 128, 256)]
    listed += [default._replace(num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]
    listed += [Plan(bd, bn, 1, num_warps=8) for bn in (64, 128) for bd in (128, 256)]
    listed += [Plan(128, 64, 1, num_stages=s) for s in (2, 4)]
    unique = list(dict.fromkeys(p for p in listed if check(p, rows, d, n, dtype) is None))
    return unique[:MAX_CANDIDATES]


class Epilogue(NamedTuple):
    """What the kernel applies to its float32 accumulator before the cast (``epilogue``)."""

    bias: bool  # + b [N]
    activation: str | None  # a key of ACTIVATIONS, or None
    residual: bool  # + r [M, N], after the activation


def epilogue(acc, bias=None, activation: str | None = None, residual=None):
    """act(acc + bias) + residual in float32: what the kernel does to its accumulator before the cast.

    Args:
        acc: [M, N] float32, x W.
        bias: [N] or [1, N] (any float dtype) or None.
        activation: a key of ``ACTIVATIONS`` or None.
        residual: [M, N] (any float dtype) or None.
    """
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    if activation is not None:
        acc = ACTIVATIONS[activation](acc)
    if residual is not None:
        acc = acc + residual.astype(jnp.float32)
    return acc


def _kernel(
    x_ref,
    w_ref,
    *refs,
    block_d: int,
    steps: int,
    precision,
    prologue: Prologue | None,
    block_s: int,
    finish: Epilogue | None,
):
    # the prologue's operands (scale [1, group], bias [1, group], gate [R, D]) or nothing; the epilogue's
    # bias [1, BN] and residual [R, BN] or not
    o_ref = refs[-1]
    operands = refs[: 0 if prologue is None else len(prologue.operands)]
    finishing = list(refs[len(operands) : -1])

    def step(d, acc, rows):  # rows [R, BD]
        weights = w_ref[pl.ds(d, block_d), :]  # [BD, BN]
        if rows.shape[0] == 1:  # one row: no product to pad to 16 rows
            column = jnp.transpose(rows).astype(jnp.float32)  # [BD, 1]
            return acc + jnp.sum(column * weights.astype(jnp.float32), axis=0, keepdims=True)
        return acc + common.dot(rows, weights, (1, 0), precision)

    # [R, BN]: a float32 partial (S > 1), or the output in W's dtype (S = 1, the epilogue applied first)
    acc = prologue_loop(
        x_ref,
        operands,
        prologue,
        first=pl.program_id(1) * steps,
        steps=steps,
        block_d=block_d,
        block_s=block_s,
        dtype=w_ref.dtype,
        body=step,
        init=jnp.zeros(o_ref.shape, jnp.float32),
    )
    if finish is not None:
        bias = finishing.pop(0)[...] if finish.bias else None
        residual = finishing.pop(0)[...] if finish.residual else None
        acc = epilogue(acc, bias, finish.activation, residual)
    o_ref[...] = acc.astype(o_ref.dtype)


def _forward(x, w, affine, bias, residual, prologue, activation, tiles: Plan, interpret: bool):
    rows, d = x.shape
    n = w.shape[1]
    padded_rows = _padded_rows(rows)
    padded = jnp.pad(x, ((0, padded_rows - rows), (0, 0)))  # [R, D]; padded rows normalize to finite values
    steps = d // tiles.block_d // tiles.splits
    finish = None
    if bias is not None or activation is not None or residual is not None:
        finish = Epilogue(bias is not None, activation, residual is not None)
    in_kernel = finish if tiles.splits == 1 else None  # S > 1: XLA applies it after the sum
    kernel = functools.partial(
        _kernel,
        block_d=tiles.block_d,
        steps=steps,
        precision=common.precision_of(w.dtype),
        prologue=prologue,
        block_s=statistics_block(padded_rows, prologue.group if prologue else d, tiles.block_d),
        finish=in_kernel,
    )
    affine = prologue_operands(prologue, affine, padded_rows)
    finishing, finishing_specs = [], []
    if in_kernel is not None and bias is not None:
        finishing.append(bias.reshape(1, n))
        finishing_specs.append(pl.BlockSpec((1, tiles.block_n), lambda c, s: (0, c)))
    if in_kernel is not None and residual is not None:
        finishing.append(jnp.pad(residual, ((0, padded_rows - rows), (0, 0))))  # [R, N]
        finishing_specs.append(pl.BlockSpec((padded_rows, tiles.block_n), lambda c, s: (0, c)))
    if tiles.splits == 1:  # the output itself, in W's dtype: nothing to sum afterwards
        out_shape = jax.ShapeDtypeStruct((padded_rows, n), w.dtype)
        out_spec = pl.BlockSpec((padded_rows, tiles.block_n), lambda c, s: (0, c))
    else:  # [S, R, N] float32 partials
        out_shape = jax.ShapeDtypeStruct((tiles.splits, padded_rows, n), jnp.float32)
        out_spec = pl.BlockSpec((None, padded_rows, tiles.block_n), lambda c, s: (s, 0, c))
    out = common.launch(
        kernel,
        (n // tiles.block_n, tiles.splits),
        [
            pl.BlockSpec((padded_rows, d), lambda c, s: (0, 0)),
            pl.BlockSpec((d, tiles.block_n), lambda c, s: (0, c)),
        ]
        + prologue_specs(prologue, padded_rows, d, lambda c, s: (0, 0))
        + finishing_specs,
        out_shape,
        out_spec,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )(padded, w, *affine, *finishing)
    if tiles.splits == 1:
        return out if padded_rows == rows else out[:rows]
    acc = out.sum(0)[:rows]
    if finish is not None:
        acc = epilogue(acc, bias, activation, residual)
    return acc.astype(w.dtype)


def _product_gradients(x, w, dy):
    """(dx, dw) of x [M, D] @ w [D, N]: ordinary matmuls."""
    dx = jnp.einsum("MN,DN->MD", dy, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("MD,MN->DN", x, dy, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _product(x, w, affine, bias, residual, prologue, activation, tiles, interpret):
    return _forward(x, w, affine, bias, residual, prologue, activation, tiles, interpret)


def _product_fwd(x, w, affine, bias, residual, prologue, activation, tiles, interpret):
    y = _forward(x, w, affine, bias, residual, prologue, activation, tiles, interpret)
    return y, (x, w, affine, bias, residual)


def _product_bwd(prologue, activation, tiles, interpret, residuals, dy):
    """XLA's: the norm's vjp (recomputed from x: a few rows), the product's gradients, the epilogue's vjp."""
    del tiles, interpret
    x, w, affine, bias, residual = residuals

    def norm(x, affine):
        return xla_prologue(x, affine, prologue, w.dtype)

    normed, norm_vjp = jax.vjp(norm, x, affine)
    d_bias = d_residual = None
    if bias is not None or activation is not None or residual is not None:
        acc = jnp.einsum("MD,DN->MN", normed, w, preferred_element_type=jnp.float32)

        def finish(acc, bias, residual):
            return epilogue(acc, bias, activation, residual).astype(w.dtype)

        _, finish_vjp = jax.vjp(finish, acc, bias, residual)
        dy, d_bias, d_residual = finish_vjp(dy)  # dy: float32 now, the accumulator's cotangent
    d_normed, dw = _product_gradients(normed, w, dy)
    dx, d_affine = norm_vjp(d_normed)
    return dx, dw, d_affine, d_bias, d_residual


_product.defvjp(_product_fwd, _product_bwd)


def matmul(
    x,
    w,
    *,
    norm: str | None = None,
    scale=None,
    bias=None,
    eps: float = 1e-6,
    gate=None,
    group: int | None = None,
    gate_offset: int = 0,
    output_bias=None,
    activation: str | None = None,
    residual=None,
    tiles: Plan | None = None,
    interpret: bool = False,
):
    """x [M, D] @ w [D, N] → [M, N] in w's dtype, float32 accumulation, for M ≤ ``MAX_ROWS``; with
    ``norm``, normalize(x) @ w (``ops.norms.normalize``, cast to w's dtype), the norm computed in the kernel
    (over each ``group`` of columns, times swish(gate) where given); with an epilogue, act(· + output_bias)
    + residual on the float32 accumulator before the cast (``epilogue``).

    Args:
        x: [M, D] rows, in w's dtype (without ``norm``) or any dtype the kernel takes (with it).
        w: [D, N].
        norm: None, "rmsnorm" (a ``scale`` or none) or "layernorm" (a ``scale`` and a ``bias``, or neither).
        scale, bias: [group] the norm's parameters (shared by the groups); eps: its epsilon.
        gate: [M, D] or None: the norm's output multiplied by swish(gate) in float32 (retention's gate).
            Or [M, D / group · W]: each group's W columns hold its gate at [gate_offset, gate_offset +
            group) (the gate a slice of a wider product, read in place).
        group: the columns each norm's statistics run over (default D; retention's head norm: V), a
            multiple of 16 dividing D; the plan's BD is narrowed to divide it.
        output_bias: [N] added to the product (any float dtype the kernel takes), or None.
        activation: applied after the bias: a key of ``ACTIVATIONS`` ("gelu": tanh-approximated, as
            ``jax.nn.gelu``; "swish") or None.
        residual: [M, N] added after the activation (any float dtype the kernel takes), or None.
        tiles: the kernel's plan (default ``plan(M, D, N, w.dtype)``); any that ``check`` accepts.
        interpret: run the kernel through the Pallas interpreter (any backend; for tests).

    Raises:
        ValueError: shapes or dtypes the kernel does not take (``plan`` says which), ``tiles`` that do
            not fit the shape (``check`` says why, or BD does not divide ``group``), a norm's parameters
            that do not match its kind or group, or an epilogue's of the wrong shape, dtype or name.
    """
    same_dtype = norm is not None or x.dtype == w.dtype
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or not same_dtype:
        raise ValueError(
            f"skinny.matmul: expected x [M, D] and w [D, N] of one dtype; got x {x.shape} {x.dtype}, "
            f"w {w.shape} {w.dtype}."
        )
    shape = (x.shape[0], x.shape[1], w.shape[1], w.dtype)
    affine, prologue = prologue_of("skinny.matmul", norm, x, scale, bias, eps, gate, group, gate_offset)
    chosen = resolve_plan("skinny.matmul", tiles, shape, plan, check, Plan, f"x {x.shape} @ w {w.shape}")
    chosen = fit_group("skinny.matmul", chosen, prologue, explicit=tiles is not None)
    _check_epilogue(x.shape[0], w.shape[1], output_bias, activation, residual)
    return _product(x, w, affine, output_bias, residual, prologue, activation, chosen, interpret)


def resolve_plan(name: str, tiles, shape: tuple, plan_of, check_of, plan_type, operands: str):
    """The plan a product runs: ``plan_of(*shape)`` where ``tiles`` is None, else ``tiles`` as
    ``plan_type`` once ``check_of`` accepts it; a ValueError naming the product (``name``, ``operands``)
    and the fix otherwise. (One rule for both weight layouts: ``skinny`` and ``skinny_nd``.)"""
    if tiles is None:
        tiles = plan_of(*shape)
        if isinstance(tiles, str):
            raise ValueError(f"{name} cannot run {tiles}; use XLA's product.")
        return tiles
    tiles = plan_type(*tiles)
    reason = check_of(tiles, *shape)
    if reason is not None:
        raise ValueError(
            f"{name}: the plan {tiles} does not fit {operands}: {reason}. "
            "Leave tiles=None for plan()'s, or pick one of candidates()."
        )
    return tiles


def _check_epilogue(rows: int, n: int, bias, activation, residual):
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"skinny.matmul: activation must be one of {tuple(ACTIVATIONS)} or None; got {activation!r}."
        )
    for name, array, shape in (("output_bias", bias, (n,)), ("residual", residual, (rows, n))):
        if array is None:
            continue
        if array.shape != shape or jnp.dtype(array.dtype) not in common.DTYPES:
            raise ValueError(
                f"skinny.matmul: {name} must be {list(shape)} in bfloat16, float16 or float32; got "
                f"{array.shape} {jnp.dtype(array.dtype).name}."
            )
