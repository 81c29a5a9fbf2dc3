"""The few-row product on a weight stored transposed, Wᵀ [N, D] (D contiguous): one kernel per product.

``ops.gpu.skinny`` reads W [D, N] (N contiguous). At one row a decoding step's matrices have too few
columns to give every SM work unless D is split, and a split writes float32 partials that XLA sums in
kernels of its own (a reduce and a convert with the residual add: paper-1.3b's batch-1 step ran 5 such
kernels a layer on an H200), while the epilogue then runs in XLA's sum rather than in the kernel. Without
a split each program reads a BN-wide run of every row of W, 32–256 bytes, which was measured slower.

Stored [N, D], output n is one contiguous row of Wᵀ: program c of a grid (N / BN,) reads the BN whole rows
of its outputs, BD elements of each per step (BN contiguous runs of BD·itemsize bytes), accumulates in
float32 and writes its [R, BN] tile of the output in W's dtype, the norm prologue and the epilogue
(``skinny.matmul``'s, the same numerics) applied in the kernel: one kernel whatever N, no partials. BN is
chosen so that the grid has about ``skinny.PROGRAMS`` programs (N = 2048 → BN = 8, 256 programs).

* One row: no product to pad; each step multiplies the [1, BD] slice of x into the [BN, BD] tile of Wᵀ
  (a broadcast, float32) and adds it to a [BN, BD] float32 accumulator, summed over BD once at the end:
  memory bound, no tensor cores needed, and BN may be 8 (a tensor-core product needs 16). A plan with
  ``reduce`` instead sums each step's products over BD into a [BN] accumulator: more reductions, but the
  tile a step loads is no longer bounded by the accumulator's registers, so that a program can keep more
  bytes in flight (paper-1.3b's decoding products at one row read 1.4 TB/s with the default tiles of
  8 KiB a step, H200 2026-12-02: the candidates with ``reduce`` load 32–64 KiB a step).
* 2 to 16 rows: padded to 16 rows, each step a [16, BD] × [BN, BD]ᵀ product (float32 accumulation), as
  ``skinny``'s; BN ≥ 16.

The backward pass is ``skinny``'s (XLA's matmuls, the norm's and the epilogue's vjps), on W transposed.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops.gpu import common, skinny
from retnet_jax.ops.gpu.prologue import (
    Prologue,
    fit_group,
    prologue_loop,
    prologue_of,
    prologue_operands,
    prologue_specs,
    statistics_block,
)
from retnet_jax.ops.gpu.skinny import (
    MAX_ROWS,
    PROGRAMS,
    Epilogue,
    _check_epilogue,
    _padded_rows,
    epilogue,
)

__all__ = ["MAX_CANDIDATES", "MAX_ROWS", "Plan", "candidates", "check", "matmul", "plan"]

MAX_CANDIDATES = skinny.MAX_CANDIDATES
TILE_ELEMENTS = 4096  # BN · BD of the default plan: an 8 KiB bf16 tile of Wᵀ per step (bytes in flight)
# One row keeps a [BN, BD] float32 accumulator in registers: at most 64 KiB of them per program.
MAX_ACCUMULATOR = 16384
# A ``reduce`` plan's tile (BN · BD elements a step, held in registers once loaded): at most 128 KiB of them
# in float32 per program.
MAX_TILE = 32768
WIDEST_N = 256


class Plan(NamedTuple):
    block_d: int  # BD: elements of each row of Wᵀ per loop step
    block_n: int  # BN: rows of Wᵀ (outputs) per program
    num_warps: int = 4
    num_stages: int = 3
    reduce: int = 0  # one row: 1 sums each step's products over BD (a [BN] accumulator), 0 once at the end


def _narrowest_n(rows: int) -> int:
    """BN's least value: 8 at one row (a broadcast product), 16 for Triton's 16-row product."""
    return 8 if rows == 1 else 16


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def plan(rows: int, d: int, n: int, dtype) -> Plan | str:
    """The kernel's tiles for x [rows, d] @ wᵀ, wᵀ [n, d], or why it does not take them.

    BN: the power of two (8 or 16 up to 256, dividing N) whose grid N / BN is nearest ``PROGRAMS`` (by
    ratio; the wider on a tie); BD: the widest power of two up to ``TILE_ELEMENTS`` / BN dividing D.
    """
    if jnp.dtype(dtype) not in common.DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (the kernel takes bfloat16, float16 or float32)"
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows (the kernel takes 1 to {MAX_ROWS})"
    narrowest = _narrowest_n(rows)
    if d % 16 or n % narrowest:
        return f"D = {d}, N = {n} (the kernel needs D a multiple of 16 and N of {narrowest})"
    widths = [w for w in (2**i for i in range(3, 9)) if narrowest <= w <= WIDEST_N and n % w == 0]
    block_n = min(widths, key=lambda w: (abs(math.log(n / w / PROGRAMS)), -w))
    block_d = 16
    while 2 * block_d * block_n <= TILE_ELEMENTS and d % (2 * block_d) == 0:
        block_d *= 2
    return Plan(block_d, block_n)


def check(tiles: Plan, rows: int, d: int, n: int, dtype) -> str | None:
    """Why the kernel cannot run x [rows, d] @ wᵀ (wᵀ [n, d]) with ``tiles``, or None when it can.

    BD a power of two ≥ 16 dividing D, BN a power of two dividing N of at least 8 (one row) or 16, the
    warps a power of two up to 32, ``num_stages`` buffers of a step's tiles ([BN, BD] of Wᵀ and [R, BD] of
    x) within an H100's shared memory, and at one row the [BN, BD] accumulator within ``MAX_ACCUMULATOR``.
    """
    default = plan(rows, d, n, dtype)
    if isinstance(default, str):
        return default
    narrowest = _narrowest_n(rows)
    if not (_power_of_two(tiles.block_d) and tiles.block_d >= 16):
        return f"block_d = {tiles.block_d} (a power of two of at least 16)"
    if not (_power_of_two(tiles.block_n) and tiles.block_n >= narrowest):
        return f"block_n = {tiles.block_n} (a power of two of at least {narrowest} at {rows} rows)"
    if d % tiles.block_d or n % tiles.block_n:
        return f"block_d = {tiles.block_d}, block_n = {tiles.block_n} must divide D = {d} and N = {n}"
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
    if tiles.reduce not in (0, 1) or (tiles.reduce and rows != 1):
        return f"reduce = {tiles.reduce} (0, or 1 at one row; got {rows} rows)"
    if tiles.reduce and tiles.block_d * tiles.block_n > MAX_TILE:
        return f"a [{tiles.block_n}, {tiles.block_d}] tile exceeds {MAX_TILE} elements"
    if rows == 1 and not tiles.reduce and tiles.block_d * tiles.block_n > MAX_ACCUMULATOR:
        return f"a [{tiles.block_n}, {tiles.block_d}] accumulator exceeds {MAX_ACCUMULATOR} floats"
    return None


def candidates(rows: int, d: int, n: int, dtype) -> list[Plan]:
    """Plans worth measuring for x [rows, d] @ wᵀ [n, d], ``plan``'s first, at most ``MAX_CANDIDATES``;
    empty where the kernel does not take the shape.

    * at one row, ``reduce`` plans: the default's BN and half of it with tiles of 16384 and 32768
      elements a step (8 warps);
    * BN at half, once and twice the default's with BD in {64, 128, 256, 512} (more programs or fewer,
      shorter or longer steps);
    * the default's tiles with 2, 4 or 8 warps and 2, 3 or 4 stages.

    Each is one ``check`` accepts; duplicates are listed once.
    """
    default = plan(rows, d, n, dtype)
    if isinstance(default, str):
        return []
    listed = [default]
    if rows == 1:
        for bn in (default.block_n, default.block_n // 2):
            listed += [
                Plan(tile // bn, bn, 8, 3, reduce=1) for tile in (16384, MAX_TILE) if bn and tile // bn <= d
            ]
    widths = (default.block_n // 2, default.block_n, default.block_n * 2)
    listed += [Plan(bd, bn) for bn in widths for bd in (64, 128, 256, 512)]
    listed += [default._replace(num_warps=w, num_stages=s) for w in (4, 8, 2) for s in (3, 2, 4)]
    unique = list(dict.fromkeys(p for p in listed if check(p, rows, d, n, dtype) is None))
    return unique[:MAX_CANDIDATES]


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
    reduce: int,
):
    # the prologue's operands (scale [1, group], bias [1, group], gate [R, D]) or nothing; the epilogue's
    # bias [1, BN] and residual [R, BN] or not
    o_ref = refs[-1]
    operands = refs[: 0 if prologue is None else len(prologue.operands)]
    finishing = list(refs[len(operands) : -1])
    loop = functools.partial(
        prologue_loop,
        x_ref,
        operands,
        prologue,
        first=0,
        steps=steps,
        block_d=block_d,
        block_s=block_s,
        dtype=w_ref.dtype,
    )

    if x_ref.shape[0] == 1 and reduce:  # one row: each step's products summed over BD

        def one_row_summed(d, acc, rows):
            weights = w_ref[:, pl.ds(d, block_d)]  # [BN, BD]
            products = rows.astype(jnp.float32) * weights.astype(jnp.float32)
            return acc + jnp.sum(products, axis=1, keepdims=True)  # [BN, 1]

        acc = loop(body=one_row_summed, init=jnp.zeros(w_ref.shape[:1] + (1,), jnp.float32))
        acc = jnp.transpose(acc)  # [1, BN]
    elif x_ref.shape[0] == 1:  # one row: products added elementwise, summed over BD once at the end

        def one_row(d, acc, rows):
            weights = w_ref[:, pl.ds(d, block_d)]  # [BN, BD]: BN contiguous runs of Wᵀ's rows
            return acc + rows.astype(jnp.float32) * weights.astype(jnp.float32)  # [1, BD] into [BN, BD]

        acc = loop(body=one_row, init=jnp.zeros(w_ref.shape[:1] + (block_d,), jnp.float32))
        acc = jnp.transpose(jnp.sum(acc, axis=1, keepdims=True))  # [1, BN]
    else:

        def product(d, acc, rows):
            weights = w_ref[:, pl.ds(d, block_d)]  # [BN, BD]
            return acc + common.dot(rows, weights, (1, 1), precision)  # [R, BD] · [BN, BD]ᵀ

        acc = loop(body=product, init=jnp.zeros(o_ref.shape, jnp.float32))
    if finish is not None:
        bias = finishing.pop(0)[...] if finish.bias else None
        residual = finishing.pop(0)[...] if finish.residual else None
        acc = epilogue(acc, bias, finish.activation, residual)
    o_ref[...] = acc.astype(o_ref.dtype)


def _forward(x, w, affine, bias, residual, prologue, activation, tiles: Plan, interpret: bool):
    rows, d = x.shape
    n = w.shape[0]
    padded_rows = _padded_rows(rows)
    padded = jnp.pad(x, ((0, padded_rows - rows), (0, 0)))  # [R, D]; padded rows normalize to finite values
    finish = None
    if bias is not None or activation is not None or residual is not None:
        finish = Epilogue(bias is not None, activation, residual is not None)
    kernel = functools.partial(
        _kernel,
        block_d=tiles.block_d,
        steps=d // tiles.block_d,
        precision=common.precision_of(w.dtype),
        prologue=prologue,
        block_s=statistics_block(padded_rows, prologue.group if prologue else d, tiles.block_d),
        finish=finish,
        reduce=tiles.reduce,
    )
    operands = [padded, w] + prologue_operands(prologue, affine, padded_rows)
    specs = [
        pl.BlockSpec((padded_rows, d), lambda c: (0, 0)),
        pl.BlockSpec((tiles.block_n, d), lambda c: (c, 0)),
    ] + prologue_specs(prologue, padded_rows, d, lambda c: (0, 0))
    if bias is not None:
        operands.append(bias.reshape(1, n))
        specs.append(pl.BlockSpec((1, tiles.block_n), lambda c: (0, c)))
    if residual is not None:
        operands.append(jnp.pad(residual, ((0, padded_rows - rows), (0, 0))))  # [R, N]
        specs.append(pl.BlockSpec((padded_rows, tiles.block_n), lambda c: (0, c)))
    out = common.launch(
        kernel,
        (n // tiles.block_n,),
        specs,
        jax.ShapeDtypeStruct((padded_rows, n), w.dtype),
        pl.BlockSpec((padded_rows, tiles.block_n), lambda c: (0, c)),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )(*operands)
    return out if padded_rows == rows else out[:rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _product(x, w, affine, bias, residual, prologue, activation, tiles, interpret):
    return _forward(x, w, affine, bias, residual, prologue, activation, tiles, interpret)


def _product_fwd(x, w, affine, bias, residual, prologue, activation, tiles, interpret):
    y = _forward(x, w, affine, bias, residual, prologue, activation, tiles, interpret)
    return y, (x, w, affine, bias, residual)


def _product_bwd(prologue, activation, tiles, interpret, residuals, dy):
    """``skinny``'s backward pass (XLA's) on W = (Wᵀ)ᵀ, its weight gradient transposed back."""
    x, w, affine, bias, residual = residuals
    dx, dw, d_affine, d_bias, d_residual = skinny._product_bwd(
        prologue, activation, tiles, interpret, (x, w.T, affine, bias, residual), dy
    )
    return dx, dw.T, d_affine, d_bias, d_residual


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
    """x [M, D] @ wᵀ with w [N, D] (the weight stored transposed) → [M, N] in w's dtype, float32
    accumulation, for M ≤ ``MAX_ROWS``; the norm prologue and the epilogue as ``skinny.matmul``'s.

    Args:
        x: [M, D] rows, in w's dtype (without ``norm``) or any dtype the kernel takes (with it).
        w: [N, D]: output n's weights are row n.
        norm, scale, bias, eps, gate, group, gate_offset: the norm prologue (``skinny.matmul``).
        output_bias: [N] or None; activation: a key of ``skinny.ACTIVATIONS`` or None; residual: [M, N] or
            None: act(x wᵀ + output_bias) + residual on the float32 accumulator, one cast.
        tiles: the kernel's plan (default ``plan(M, D, N, w.dtype)``); any that ``check`` accepts.
        interpret: run the kernel through the Pallas interpreter (any backend; for tests).

    Raises:
        ValueError: shapes or dtypes the kernel does not take (``plan`` says which), ``tiles`` that do
            not fit the shape (``check`` says why), or a prologue's or epilogue's bad parameters.
    """
    same_dtype = norm is not None or x.dtype == w.dtype
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or not same_dtype:
        raise ValueError(
            f"skinny_nd.matmul: expected x [M, D] and w [N, D] of one dtype; got x {x.shape} {x.dtype}, "
            f"w {w.shape} {w.dtype}."
        )
    shape = (x.shape[0], x.shape[1], w.shape[0], w.dtype)
    operands = f"x {x.shape} @ w {w.shape}ᵀ"
    affine, prologue = prologue_of("skinny_nd.matmul", norm, x, scale, bias, eps, gate, group, gate_offset)
    chosen = skinny.resolve_plan("skinny_nd.matmul", tiles, shape, plan, check, Plan, operands)
    chosen = fit_group("skinny_nd.matmul", chosen, prologue, explicit=tiles is not None)
    _check_epilogue(x.shape[0], w.shape[0], output_bias, activation, residual)
    return _product(x, w, affine, output_bias, residual, prologue, activation, chosen, interpret)
