"""Chunk retention with the running state in registers: the kernels for narrow heads (K·V ≤ 128·128).

The XLA chunkwise form (``retention.chunkwise``) writes every chunk's C×C score tile, the decayed weights
and the per-chunk states to device memory and reads them back; on a GPU that traffic, not the arithmetic,
sets its speed. Here one program per (batch row, head, column tile) walks the chunks in order and holds
its tile of the running state in float32 registers, so the only device-memory traffic is reading q, k, v
and writing o (the backward: q, k, v, dO in, dq, dk, dv out). Chunk g, rows i / j, decays of ``common``:

* forward, chunks in order:   o_g = ((Q Kᵀ) ⊙ D) V + (Q ⊙ query) S_g,
                              S_{g+1} = chunk · S_g + (K ⊙ key)ᵀ V,         S_0 = h0, S_G = ht
* dq, chunks in order:        dq_g = ((dO Vᵀ) ⊙ D) K + (dO S_gᵀ) ⊙ query
* dk, dv, chunks reversed:    dk_g = ((dO Vᵀ) ⊙ D)ᵀ Q + (V dS_{g+1}ᵀ) ⊙ key
                              dv_g = ((Q Kᵀ) ⊙ D)ᵀ dO + (K dS_{g+1}) ⊙ key
                              dS_g = chunk · dS_{g+1} + (Q ⊙ query)ᵀ dO,     dS_G = dht, dS_0 = dh0

Each program writes whole rows of one output tile, so no partial sums are left over: the forward and dv
kernels take a tile of value columns (state tile [K, BV]), the dq and dk kernels a tile of key columns
([BK, V]); when the whole state fits one tile a single reversed pass gives dk and dv. Narrower tiles
re-read their inputs once per tile, which pays at K = V = 128 (two tiles of 64 columns, twice the
programs: ``PROGRAM_TILE_ENTRIES``) but not for wider heads, whose states take ``split_retention``.
Inputs arrive padded (``fused``): T to a multiple of C, K and V to powers of two. With packed documents
every kernel also takes its batch row's document starts (``first``, one more operand after log γ) and
derives each chunk's decay factors from them (``common.decays``); the bodies are otherwise the same.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops.gpu import common
from retnet_jax.ops.gpu.common import dot, masked

__all__ = ["Tiles", "backward", "default_tiles", "forward", "shared_memory"]

# Heads whose whole state, K and V rounded up to powers of two, has at most this many entries take the
# register family (``plan.family_of``); wider ones the split family.
STATE_TILE_ENTRIES = 128 * 128
# The state tile of one program: at most this many float32 entries, on 4 warps (64 registers a thread).
# H200, H32 fwd+bwd with a carried state, C=64 (2026-12-03, bench_retention --tag=fla-register-64,
# k64-plans, k64-plans2): at K=V=128, tiles of 64 columns (two programs a head, [128, 64] / [64, 128]
# states) on 4 warps take 3.310 ms at B32 T2048, 3.186 at B8 T8192 and 4.399 at B2 T32768, where the
# whole 128×128 state took 3.866 / 3.773 / 7.233 on 8 warps and 5.224 (B8 T8192) on 4; at K=V=64 the
# whole state on 4 warps takes 1.112 ms (B32 T2048), on 8 warps 2.142, on 2 warps 19.4.
PROGRAM_TILE_ENTRIES = 64 * 128


class Tiles(NamedTuple):
    """The state tile of each program and Triton's launch parameters.

    The forward and dv kernels hold a [K, value] state tile; the dq and dk kernels a [key, V] tile.
    When the whole [K, V] state fits one tile, dk and dv come from one kernel.
    """

    key: int  # key columns per program of the dq / dk kernels (a power of two >= 16, at most K)
    value: int  # value columns per program of the forward / dv kernels
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining stages of the forward kernel's loop
    backward_stages: int = 2  # of the backward kernels' loops (3 exceeds shared memory at K = V = 128)


def default_tiles(key_dim: int, value_dim: int) -> Tiles:
    """The whole state per program where it fits ``PROGRAM_TILE_ENTRIES``, else the widest column tiles
    that do (K = V = 128: two tiles of 64 columns); 4 warps."""
    key = max(16, min(key_dim, PROGRAM_TILE_ENTRIES // value_dim))
    value = max(16, min(value_dim, PROGRAM_TILE_ENTRIES // key_dim))
    return Tiles(key=key, value=value, num_warps=4)


def shared_memory(tiles: Tiles, size: int, key_dim: int, value_dim: int, itemsize: int) -> dict[str, int]:
    """Estimated shared memory (bytes) of each kernel's program: the pipelined loads of one loop step
    times the stages, plus the register-made product operands staged through shared memory (the state
    tile and the masked scores in the input dtype, the decayed rows). Checked against the H100: the fused
    dk-dv pass at K = V = C·2 = 128 bf16 fits at 2 stages and fails at 3; the f32 forward at K = 64,
    V = 128, C = 64 fails at 3 stages."""
    bk, bv, c = min(tiles.key, key_dim), min(tiles.value, value_dim), size
    fs, bs = tiles.num_stages, tiles.backward_stages
    scores = c * c
    out = {
        "forward": fs * c * (2 * key_dim + bv) + key_dim * bv + scores + 2 * c * key_dim,
        "dq": bs * c * (bk + 2 * value_dim) + bk * value_dim + scores + c * value_dim,
    }
    if bk >= key_dim and bv >= value_dim:
        out["dkdv"] = bs * c * 2 * (key_dim + value_dim) + key_dim * value_dim + 2 * scores + c * key_dim
    else:
        out["dk"] = bs * c * (bk + 2 * value_dim) + bk * value_dim + scores + c * bk
        out["dv"] = bs * c * (2 * key_dim + bv) + key_dim * bv + scores + c * key_dim
    return {name: n * itemsize for name, n in out.items()}


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Refs arrive as the [T, width] columns (all of them, or one tile) of one (batch row,
# head) and the matching [K|BK, V|BV] tile of a state; lam_ref is that head's log γ as a [C] vector.


def _walk(lam_ref, size: int, groups: int, length: int, body, init, *, reverse: bool = False, first_ref=None):
    """``carry = body(rows, decays, carry)`` over the chunks (in order, or last to first); returns the
    last carry. ``first_ref`` [T]: the document starts of this batch row (``common``), or None."""
    lam = lam_ref[...].astype(jnp.float32)
    mask = common.decay_mask(lam, size)

    def step(t, carry):
        g = groups - 1 - t if reverse else t
        start = common.local_starts(first_ref, g, size)
        d = common.decays(lam, size, common.chunk_length(g, size, length), mask, start)
        return body(common.rows(g, size), d, carry)

    return jax.lax.fori_loop(0, groups, step, init)


def _carried(state, x, decay, y, chunk, precision):
    """chunk · state + (x ⊙ decay)ᵀ y: S_{g+1} from (k, key, v), or dS_g from (q, query, dO)."""
    return chunk * state + dot((x * decay).astype(x.dtype), y, (0, 0), precision)


def _dk_rows(q, v, do, dstate, d, precision):
    intra = dot(masked(do, v, d, precision), q, (0, 0), precision)
    return intra + dot(v, dstate.astype(v.dtype), (1, 1), precision) * d.key


def _dv_rows(q, k, do, dstate, d, precision):
    intra = dot(masked(q, k, d, precision), do, (0, 0), precision)
    return intra + dot(k, dstate.astype(k.dtype), (1, 0), precision) * d.key


def _forward_kernel(
    lam_ref, q_ref, k_ref, v_ref, h0_ref, o_ref, ht_ref, *, size, groups, length, precision, first_ref=None
):
    def body(rows, d, state):  # S_g [K, BV] float32
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        o = dot(masked(q, k, d, precision), v, (1, 0), precision)
        o = o + dot(q, state.astype(q.dtype), (1, 0), precision) * d.query  # decays in float32
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return _carried(state, k, d.key, v, d.chunk, precision)

    ht_ref[...] = _walk(lam_ref, size, groups, length, body, h0_ref[...], first_ref=first_ref)


def _dq_kernel(
    lam_ref, k_ref, v_ref, do_ref, h0_ref, dq_ref, *, size, groups, length, precision, first_ref=None
):
    def body(rows, d, state):  # S_g [BK, V] float32
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dq = dot(masked(do, v, d, precision), k, (1, 0), precision)
        dq = dq + dot(do, state.astype(do.dtype), (1, 1), precision) * d.query
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return _carried(state, k, d.key, v, d.chunk, precision)

    _walk(lam_ref, size, groups, length, body, h0_ref[...], first_ref=first_ref)


def _dk_kernel(
    lam_ref, q_ref, v_ref, do_ref, dht_ref, dk_ref, *, size, groups, length, precision, first_ref=None
):
    def body(rows, d, dstate):  # dS_{g+1} [BK, V] float32
        q, v, do = q_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dk_ref[rows, :] = _dk_rows(q, v, do, dstate, d, precision).astype(dk_ref.dtype)
        return _carried(dstate, q, d.query, do, d.chunk, precision)

    _walk(lam_ref, size, groups, length, body, dht_ref[...], reverse=True, first_ref=first_ref)


def _dv_kernel(
    lam_ref,
    q_ref,
    k_ref,
    do_ref,
    dht_ref,
    dv_ref,
    dh0_ref,
    *,
    size,
    groups,
    length,
    precision,
    first_ref=None,
):
    def body(rows, d, dstate):  # dS_{g+1} [K, BV] float32
        q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
        dv_ref[rows, :] = _dv_rows(q, k, do, dstate, d, precision).astype(dv_ref.dtype)
        return _carried(dstate, q, d.query, do, d.chunk, precision)

    dh0_ref[...] = _walk(lam_ref, size, groups, length, body, dht_ref[...], reverse=True, first_ref=first_ref)


def _dkdv_kernel(
    lam_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    dht_ref,
    dk_ref,
    dv_ref,
    dh0_ref,
    *,
    size,
    groups,
    length,
    precision,
    first_ref=None,
):
    """dk and dv in one reversed pass, when the whole [K, V] state fits one program."""

    def body(rows, d, dstate):  # dS_{g+1} [K, V] float32
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dk_ref[rows, :] = _dk_rows(q, v, do, dstate, d, precision).astype(dk_ref.dtype)
        dv_ref[rows, :] = _dv_rows(q, k, do, dstate, d, precision).astype(dv_ref.dtype)
        return _carried(dstate, q, d.query, do, d.chunk, precision)

    dh0_ref[...] = _walk(lam_ref, size, groups, length, body, dht_ref[...], reverse=True, first_ref=first_ref)


# ----------------------------------------------------------------------------------------------
# Launch. Grid (tile, H, B); the tile index runs fastest so that the programs reading the same
# (row, head) columns run side by side and share them through the L2 cache.


def _seq(length: int, width: int, tile: int | None):
    """Spec of a [B, T, H, width] operand: all columns, or column tile t."""
    if tile is None or tile >= width:
        return pl.BlockSpec((None, length, None, width), lambda t, h, b: (b, 0, h, 0))
    return pl.BlockSpec((None, length, None, tile), lambda t, h, b: (b, 0, h, t))


def _state(key_dim: int, value_dim: int, key_tile: int | None, value_tile: int | None):
    """Spec of a [B, H, K, V] state: the whole of it, key rows tile t, or value columns tile t."""
    if key_tile is not None and key_tile < key_dim:
        return pl.BlockSpec((None, None, key_tile, value_dim), lambda t, h, b: (b, h, t, 0))
    if value_tile is not None and value_tile < value_dim:
        return pl.BlockSpec((None, None, key_dim, value_tile), lambda t, h, b: (b, h, 0, t))
    return pl.BlockSpec((None, None, key_dim, value_dim), lambda t, h, b: (b, h, 0, 0))


def _call(
    kernel, count, ins, specs, outs, out_specs, log_decay, first, size, length, stages, tiles, interpret
):
    batch, padded, heads = ins[0].shape[:3]
    static = dict(
        size=size, groups=padded // size, length=length, precision=common.precision_of(ins[0].dtype)
    )
    in_specs = [pl.BlockSpec((None, size), lambda t, h, b: (h, 0))]
    operands = [common.head_decays(log_decay, size)]
    body = common.kernel_body(kernel, first is not None, **static)
    if first is not None:
        in_specs.append(pl.BlockSpec((None, padded), lambda t, h, b: (b, 0)))
        operands.append(first)
    call = common.launch(
        body,
        (count, heads, batch),
        [*in_specs, *specs],
        outs,
        out_specs,
        num_warps=tiles.num_warps,
        num_stages=stages,
        interpret=interpret,
    )
    return call(*operands, *ins)


def forward(q, k, v, log_decay, h0, first=None, *, size: int, length: int, tiles: Tiles, interpret: bool):
    """Unnormalized retention from the state h0: (o [B, T, H, V], final state [B, H, K, V] float32).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V], T a multiple of ``size``, K and V powers of two >= 16, zero
            past ``length`` tokens; log_decay: [H] float32; h0: [B, H, K, V] float32.
        first: [B, T] int32 or None: the index of each token's document start (−1: the document carried
            in), padded rows repeating the last real one (``common.decays``); None: no resets.
    """
    batch, padded, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    bv = tiles.value if tiles.value < value_dim else None
    out = [
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
    ]
    state_spec = _state(key_dim, value_dim, None, bv)
    return _call(
        _forward_kernel,
        value_dim // (bv or value_dim),
        [q, k, v, h0],
        [_seq(padded, key_dim, None), _seq(padded, key_dim, None), _seq(padded, value_dim, bv), state_spec],
        out,
        [_seq(padded, value_dim, bv), state_spec],
        log_decay,
        first,
        size,
        length,
        tiles.num_stages,
        tiles,
        interpret,
    )


def backward(
    q, k, v, log_decay, h0, do, dht, first=None, *, size: int, length: int, tiles: Tiles, interpret: bool
):
    """Gradients (dq, dk, dv, dh0) of ``forward`` for the cotangents do [B, T, H, V] and dht [B, H, K, V]
    (float32)."""
    padded, key_dim, value_dim = q.shape[1], q.shape[-1], v.shape[-1]
    bk = tiles.key if tiles.key < key_dim else None
    bv = tiles.value if tiles.value < value_dim else None
    call = functools.partial(
        _call,
        log_decay=log_decay,
        first=first,
        size=size,
        length=length,
        stages=tiles.backward_stages,
        tiles=tiles,
    )

    def seq(width, tile=None):
        return _seq(padded, width, tile)

    def like(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    row_state = _state(key_dim, value_dim, bk, None)
    (dq,) = call(
        _dq_kernel,
        key_dim // (bk or key_dim),
        [k, v, do, h0],
        [seq(key_dim, bk), seq(value_dim), seq(value_dim), row_state],
        [like(q)],
        [seq(key_dim, bk)],
        interpret=interpret,
    )
    whole = _state(key_dim, value_dim, None, None)
    if bk is None and bv is None:  # the whole state in one tile: dk and dv in one pass
        dk, dv, dh0 = call(
            _dkdv_kernel,
            1,
            [q, k, v, do, dht],
            [seq(key_dim), seq(key_dim), seq(value_dim), seq(value_dim), whole],
            [like(k), like(v), like(dht)],
            [seq(key_dim), seq(value_dim), whole],
            interpret=interpret,
        )
        return dq, dk, dv, dh0
    (dk,) = call(
        _dk_kernel,
        key_dim // (bk or key_dim),
        [q, v, do, dht],
        [seq(key_dim, bk), seq(value_dim), seq(value_dim), row_state],
        [like(k)],
        [seq(key_dim, bk)],
        interpret=interpret,
    )
    column_state = _state(key_dim, value_dim, None, bv)
    dv, dh0 = call(
        _dv_kernel,
        value_dim // (bv or value_dim),
        [q, k, do, dht],
        [seq(key_dim), seq(key_dim), seq(value_dim, bv), column_state],
        [like(v), like(dht)],
        [seq(value_dim, bv), column_state],
        interpret=interpret,
    )
    return dq, dk, dv, dh0
