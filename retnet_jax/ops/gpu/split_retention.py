"""Chunk retention with the chunk states in device memory: the kernels for wide heads (any K, V).

A [K, V] state of the paper's heads (256 × 512 float32) does not fit one program's registers, and tiles of
it that each walk the whole sequence (``chunk_retention``) re-read their inputs once per tile. Here the
work is split in two kinds of pass (chunk g, rows i / j, decays of ``common``):

* state passes walk the chunks of one (batch row, head, key tile, value tile) in order and write the state
  entering every chunk, h[B, H, G, K, V] (in the input dtype; the final state in float32):

      h_0 = h0,   h_{g+1} = chunk · h_g + (K_g ⊙ key)ᵀ V_g,   ht = h_G

* chunk passes run one program per (chunk, column tile), all chunks at once, and read h_g:

      o_g = ((Q Kᵀ) ⊙ D) V + (Q ⊙ query) h_g

The backward recomputes h (cheaper than keeping it: h holds K·V/C values per token, 2,048 at the
paper's heads and C = 64, against 2K + V = 1,024 for q, k, v), then walks the chunks in reverse for
the state gradients dh[g] = ∂L/∂h_{g+1}:

      dh[G−1] = dht,   dh[g−1] = chunk_g · dh[g] + (Q_g ⊙ query)ᵀ dO_g,   dh0 = the same step from dh[0]

and then, in parallel over chunks,

      dq_g = ((dO Vᵀ) ⊙ D) K + (dO h_gᵀ) ⊙ query      (per key tile, a loop over value tiles)
      dk_g = ((dO Vᵀ) ⊙ D)ᵀ Q + (V dh[g]ᵀ) ⊙ key       (the same program)
      dv_g = ((Q Kᵀ) ⊙ D)ᵀ dO + (K dh[g]) ⊙ key         (per value tile, a loop over key tiles)

The chunk passes recompute the C×C scores once per column tile; the tiles trade that against parallelism.
With ``Tiles.stored_scores`` they do not: a scores pass (one program per chunk and head) writes each chunk's
masked, decayed scores once, in the input dtype, [B, H, G, C, C] (C values per token and head),

      A_g = (Q_g K_gᵀ) ⊙ D      and, in the backward,      dA_g = (dO_g V_gᵀ) ⊙ D,

and the output and dv passes read A_g, the dq/dk pass dA_g, in place of their loops over the other width
(which keep only the state terms). Both variants round the masked scores to the input dtype before the
products, so they compute the same function up to the order of float32 sums.

Inputs arrive padded (``fused``): T to a multiple of C, K and V to multiples of their tiles. With packed
documents every pass also takes the document starts (``first``: the batch row's in the state passes, the
chunk's in the chunk passes) and derives each chunk's decay factors from them (``common.decays``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from retnet_jax.ops.gpu import common
from retnet_jax.ops.gpu.common import dot

__all__ = ["Tiles", "backward", "default_tiles", "forward", "shared_memory"]


class Tiles(NamedTuple):
    """Tile widths and Triton's launch parameters of the split kernels."""

    key: int  # BK: key columns of a state tile, and the step of the loops over K (power of two >= 16)
    value: int  # BV: value columns of a state tile, and the step of the loops over V
    num_warps: int = 4
    num_stages: int = 2  # software-pipelining stages of every kernel's loop
    stored_scores: bool = False  # chunk scores once, through device memory (module docstring), not per tile


def default_tiles(key_dim: int, value_dim: int) -> Tiles:
    """64-wide tiles, narrower only for narrow heads, 4 warps, 3 stages: at the paper's heads (H8 K256
    V512, B8 T8192, C64, bf16 fwd+bwd, H200 2026-12-01) 7.69 ms, against 8.24 with 2 stages, 7.70 with
    64×128 tiles and 9.94 with 8 warps.

    Scores are stored (``stored_scores``) where V spans at least 4 value tiles, since the recomputing
    variant computes each chunk's scores once per value tile. Measured on the H200 (2026-12-01, B8, C64,
    bf16, ``bench_retention_H200_2026-12-01_stored-scores.md``): paper heads (V512, 8 tiles) fwd+bwd 7.35
    against 7.50 ms at T8192 and 1.92 against 1.96 at T2048, forward 2.17 against 2.31 ms; fla's heads
    (V128, 2 tiles) 6.21 against 5.70 ms, slower.
    """
    value = min(64, common.next_power_of_two(value_dim))
    return Tiles(
        key=min(64, common.next_power_of_two(key_dim)),
        value=value,
        num_stages=3,
        stored_scores=value_dim >= 4 * value,
    )


def shared_memory(tiles: Tiles, size: int, key_dim: int, value_dim: int, itemsize: int) -> dict[str, int]:
    """Estimated shared memory (bytes) of each kernel's program: the loads of one loop step times the
    stages, plus the register-made product operands (state tiles, masked scores, decayed rows) and the
    loaded score tiles (``stored_scores``)."""
    bk, bv, c, s = tiles.key, tiles.value, size, tiles.num_stages
    tile = bk * bv
    out = {
        "states": s * c * (bk + bv) + tile + c * bk,
        "dstates": s * c * (bk + bv) + tile + c * bk,
    }
    if tiles.stored_scores:
        out |= {
            "scores": s * 2 * c * bk + 2 * c * c,
            "dscores": s * 2 * c * bv + 2 * c * c,
            "output": s * (c * bk + tile) + c * bv + c * c + c * bk,
            "dqk": s * (2 * c * bv + 2 * tile) + 2 * c * bk + 2 * c * c,
            "dv": s * (c * bk + tile) + c * bv + c * c + c * bk,
        }
    else:
        out |= {
            "output": s * (2 * c * bk + tile) + c * bv + 2 * c * c + c * bk,
            "dqk": s * (2 * c * bv + 2 * tile) + 2 * c * bk + 2 * c * c,
            "dv": s * (2 * c * bk + tile) + c * bv + 2 * c * c + c * bk,
        }
    return {name: n * itemsize for name, n in out.items()}


# ----------------------------------------------------------------------------------------------
# State passes: grid (key tile · value tile, H, B).


def _states_kernel(
    lam_ref, k_ref, v_ref, h0_ref, h_ref, ht_ref, *, size, groups, length, precision, first_ref=None
):
    lam = lam_ref[...].astype(jnp.float32)

    def step(g, state):  # h_g [BK, BV] float32
        h_ref[g] = state.astype(h_ref.dtype)
        d = common.decays(
            lam, size, common.chunk_length(g, size, length), start=common.local_starts(first_ref, g, size)
        )
        k, v = k_ref[common.rows(g, size), :], v_ref[common.rows(g, size), :]
        return d.chunk * state + dot((k * d.key).astype(k.dtype), v, (0, 0), precision)

    ht_ref[...] = jax.lax.fori_loop(0, groups, step, h0_ref[...])


def _dstates_kernel(
    lam_ref, q_ref, do_ref, dht_ref, dh_ref, dh0_ref, *, size, groups, length, precision, first_ref=None
):
    lam = lam_ref[...].astype(jnp.float32)

    def step(t, dstate):  # ∂L/∂h_{g+1} [BK, BV] float32
        g = groups - 1 - t
        dh_ref[g] = dstate.astype(dh_ref.dtype)
        d = common.decays(
            lam, size, common.chunk_length(g, size, length), start=common.local_starts(first_ref, g, size)
        )
        q, do = q_ref[common.rows(g, size), :], do_ref[common.rows(g, size), :]
        return d.chunk * dstate + dot((q * d.query).astype(q.dtype), do, (0, 0), precision)

    dh0_ref[...] = jax.lax.fori_loop(0, groups, step, dht_ref[...])


def _state_pass(kernel, x, y, start, out_dtype, log_decay, first, size, length, tiles, interpret):
    """Runs a state pass over x [B, T, H, K] and y [B, T, H, V] from ``start`` [B, H, K, V] float32:
    (every chunk's state [B, H, G, K, V] in ``out_dtype``, the last state [B, H, K, V] float32)."""
    batch, padded, heads, key_dim = x.shape
    value_dim = y.shape[-1]
    bk, bv = tiles.key, tiles.value
    nv = value_dim // bv
    groups = padded // size
    state = pl.BlockSpec((None, None, bk, bv), lambda t, h, b: (b, h, t // nv, t % nv))
    static = dict(size=size, groups=groups, length=length, precision=common.precision_of(x.dtype))
    documents = [] if first is None else [pl.BlockSpec((None, padded), lambda t, h, b: (b, 0))]
    call = common.launch(
        common.kernel_body(kernel, first is not None, **static),
        ((key_dim // bk) * nv, heads, batch),
        [
            pl.BlockSpec((None, size), lambda t, h, b: (h, 0)),
            *documents,
            pl.BlockSpec((None, padded, None, bk), lambda t, h, b: (b, 0, h, t // nv)),
            pl.BlockSpec((None, padded, None, bv), lambda t, h, b: (b, 0, h, t % nv)),
            state,
        ],
        [
            jax.ShapeDtypeStruct((batch, heads, groups, key_dim, value_dim), out_dtype),
            jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
        ],
        [
            pl.BlockSpec((None, None, groups, bk, bv), lambda t, h, b: (b, h, 0, t // nv, t % nv)),
            state,
        ],
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )
    return call(common.head_decays(log_decay, size), *([] if first is None else [first]), x, y, start)


# ----------------------------------------------------------------------------------------------
# Chunk passes: grid (column tile, G, H, B); every program reads one chunk.


def _chunk_decays(lam_ref, size, length, first_ref, *, axis=1, mask=True):
    """The decay factors of this program's chunk (grid axis ``axis``); ``first_ref`` [C]: its document
    starts; ``mask``: whether D is needed (the kernels reading stored scores need only the row factors)."""
    lam = lam_ref[...].astype(jnp.float32)
    g = pl.program_id(axis)
    start = common.local_starts(first_ref, g, size)
    d_mask = common.decay_mask(lam, size) if mask else None
    return common.decays(lam, size, common.chunk_length(g, size, length), d_mask, start)


def _output_kernel(
    lam_ref, q_ref, k_ref, v_ref, h_ref, o_ref, *, size, length, key_tile, precision, first_ref=None
):
    d = _chunk_decays(lam_ref, size, length, first_ref)
    bv = v_ref.shape[-1]

    def step(t, carry):  # over key tiles: the scores and the entering state's term
        scores, cross = carry
        cols = common.columns(t, key_tile)
        q, k = q_ref[:, cols], k_ref[:, cols]
        scores = scores + dot(q, k, (1, 1), precision)
        return scores, cross + dot(q, h_ref[cols, :].astype(q.dtype), (1, 0), precision)

    init = (jnp.zeros((size, size), jnp.float32), jnp.zeros((size, bv), jnp.float32))
    scores, cross = jax.lax.fori_loop(0, q_ref.shape[-1] // key_tile, step, init)
    v = v_ref[...]
    # The rows' decays scale the product in float32 (not q before it is rounded to the input dtype).
    o = dot((scores * d.mask).astype(v.dtype), v, (1, 0), precision) + cross * d.query
    o_ref[...] = o.astype(o_ref.dtype)


def _dqk_kernel(
    lam_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    h_ref,
    dh_ref,
    dq_ref,
    dk_ref,
    *,
    size,
    length,
    value_tile,
    precision,
    first_ref=None,
):
    d = _chunk_decays(lam_ref, size, length, first_ref)
    bk = q_ref.shape[-1]

    def step(t, carry):  # over value tiles: dO Vᵀ and the state terms
        dscores, dq, dk = carry
        cols = common.columns(t, value_tile)
        v, do = v_ref[:, cols], do_ref[:, cols]
        dscores = dscores + dot(do, v, (1, 1), precision)
        dq = dq + dot(do, h_ref[:, cols].astype(do.dtype), (1, 1), precision)
        dk = dk + dot(v, dh_ref[:, cols].astype(v.dtype), (1, 1), precision)
        return dscores, dq, dk

    zeros = jnp.zeros((size, bk), jnp.float32)
    init = (jnp.zeros((size, size), jnp.float32), zeros, zeros)
    dscores, dq, dk = jax.lax.fori_loop(0, v_ref.shape[-1] // value_tile, step, init)
    q, k = q_ref[...], k_ref[...]
    dscores = (dscores * d.mask).astype(q.dtype)
    dq_ref[...] = (dq * d.query + dot(dscores, k, (1, 0), precision)).astype(dq_ref.dtype)
    dk_ref[...] = (dk * d.key + dot(dscores, q, (0, 0), precision)).astype(dk_ref.dtype)


def _dv_kernel(
    lam_ref, q_ref, k_ref, do_ref, dh_ref, dv_ref, *, size, length, key_tile, precision, first_ref=None
):
    d = _chunk_decays(lam_ref, size, length, first_ref)
    bv = do_ref.shape[-1]

    def step(t, carry):  # over key tiles: Q Kᵀ and the state term
        scores, inter = carry
        cols = common.columns(t, key_tile)
        q, k = q_ref[:, cols], k_ref[:, cols]
        scores = scores + dot(q, k, (1, 1), precision)
        return scores, inter + dot(k, dh_ref[cols, :].astype(k.dtype), (1, 0), precision)

    init = (jnp.zeros((size, size), jnp.float32), jnp.zeros((size, bv), jnp.float32))
    scores, inter = jax.lax.fori_loop(0, q_ref.shape[-1] // key_tile, step, init)
    do = do_ref[...]
    dv = dot((scores * d.mask).astype(do.dtype), do, (0, 0), precision) + inter * d.key
    dv_ref[...] = dv.astype(dv_ref.dtype)


# The variant with stored scores (``Tiles.stored_scores``): a scores pass, grid (G, H, B), then chunk passes
# that read A_g or dA_g and loop over the other width only for the state terms.


def _scores_kernel(lam_ref, x_ref, y_ref, a_ref, *, size, length, tile, precision, first_ref=None):
    """(X Yᵀ) ⊙ D [C, C] of one chunk, in the input dtype, from X, Y [C, W] in column tiles of ``tile``."""
    d = _chunk_decays(lam_ref, size, length, first_ref, axis=0)

    def step(t, scores):
        cols = common.columns(t, tile)
        return scores + dot(x_ref[:, cols], y_ref[:, cols], (1, 1), precision)

    scores = jax.lax.fori_loop(0, x_ref.shape[-1] // tile, step, jnp.zeros((size, size), jnp.float32))
    a_ref[...] = (scores * d.mask).astype(a_ref.dtype)


def _output_stored_kernel(
    lam_ref, q_ref, a_ref, v_ref, h_ref, o_ref, *, size, length, key_tile, precision, first_ref=None
):
    d = _chunk_decays(lam_ref, size, length, first_ref, mask=False)
    bv = v_ref.shape[-1]

    def step(t, cross):  # over key tiles: Q h_g (the row factors γ^(i+1) after the loop)
        cols = common.columns(t, key_tile)
        q = q_ref[:, cols]
        return cross + dot(q, h_ref[cols, :].astype(q.dtype), (1, 0), precision)

    cross = jax.lax.fori_loop(0, q_ref.shape[-1] // key_tile, step, jnp.zeros((size, bv), jnp.float32))
    o = dot(a_ref[...], v_ref[...], (1, 0), precision) + cross * d.query
    o_ref[...] = o.astype(o_ref.dtype)


def _dqk_stored_kernel(
    lam_ref,
    q_ref,
    k_ref,
    da_ref,
    v_ref,
    do_ref,
    h_ref,
    dh_ref,
    dq_ref,
    dk_ref,
    *,
    size,
    length,
    value_tile,
    precision,
    first_ref=None,
):
    d = _chunk_decays(lam_ref, size, length, first_ref, mask=False)
    bk = q_ref.shape[-1]

    def step(t, carry):  # over value tiles: the state terms only
        dq, dk = carry
        cols = common.columns(t, value_tile)
        v, do = v_ref[:, cols], do_ref[:, cols]
        dq = dq + dot(do, h_ref[:, cols].astype(do.dtype), (1, 1), precision)
        dk = dk + dot(v, dh_ref[:, cols].astype(v.dtype), (1, 1), precision)
        return dq, dk

    zeros = jnp.zeros((size, bk), jnp.float32)
    dq, dk = jax.lax.fori_loop(0, v_ref.shape[-1] // value_tile, step, (zeros, zeros))
    da = da_ref[...]
    dq_ref[...] = (dq * d.query + dot(da, k_ref[...], (1, 0), precision)).astype(dq_ref.dtype)
    dk_ref[...] = (dk * d.key + dot(da, q_ref[...], (0, 0), precision)).astype(dk_ref.dtype)


def _dv_stored_kernel(
    lam_ref, k_ref, a_ref, do_ref, dh_ref, dv_ref, *, size, length, key_tile, precision, first_ref=None
):
    d = _chunk_decays(lam_ref, size, length, first_ref, mask=False)
    bv = do_ref.shape[-1]

    def step(t, inter):  # over key tiles: the state term only
        cols = common.columns(t, key_tile)
        k = k_ref[:, cols]
        return inter + dot(k, dh_ref[cols, :].astype(k.dtype), (1, 0), precision)

    inter = jax.lax.fori_loop(0, k_ref.shape[-1] // key_tile, step, jnp.zeros((size, bv), jnp.float32))
    dv = dot(a_ref[...], do_ref[...], (0, 0), precision) + inter * d.key
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _scores_pass(x, y, tile, log_decay, first, size, length, tiles, interpret):
    """(X Yᵀ) ⊙ D of every chunk, [B, H, G, C, C] in x's dtype, for x, y [B, T, H, W] (W a multiple of
    ``tile``); one program per (chunk, head, batch row)."""
    batch, padded, heads, width = x.shape
    groups = padded // size
    seq = pl.BlockSpec((None, size, None, width), lambda g, h, b: (b, g, h, 0))
    documents = [] if first is None else [pl.BlockSpec((None, size), lambda g, h, b: (b, g))]
    static = dict(size=size, length=length, tile=tile, precision=common.precision_of(x.dtype))
    call = common.launch(
        common.kernel_body(_scores_kernel, first is not None, **static),
        (groups, heads, batch),
        [pl.BlockSpec((None, size), lambda g, h, b: (h, 0)), *documents, seq, seq],
        [jax.ShapeDtypeStruct((batch, heads, groups, size, size), x.dtype)],
        [pl.BlockSpec((None, None, None, size, size), lambda g, h, b: (b, h, g, 0, 0))],
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )
    (a,) = call(common.head_decays(log_decay, size), *([] if first is None else [first]), x, y)
    return a


def _chunk_pass(kernel, ins, outs, tiled: str, log_decay, first, size, length, tiles, interpret):
    """Runs a chunk pass. ``ins`` / ``outs``: (array or output shape, kind) with kind "seq" ([B, T, H, ·],
    all columns), "seq tile" (its column tile), "state" ([B, H, G, K, V], the chunk's rows and the column
    tile), "state rows" (the chunk's key-tile rows, all value columns) or "scores" ([B, H, G, C, C], the
    chunk's); the first is a "seq" or "seq tile"; ``tiled`` names the width ("key" or "value") whose tiles
    the grid runs over."""
    x = ins[0][0]
    batch, padded, heads = x.shape[:3]
    key_dim = x.shape[-1]
    tile = tiles.key if tiled == "key" else tiles.value
    width = next(a.shape[-1] for a, kind in ins if kind == "seq tile")
    groups = padded // size

    def spec(shape, kind):
        if kind == "seq":
            return pl.BlockSpec((None, size, None, shape[-1]), lambda t, g, h, b: (b, g, h, 0))
        if kind == "seq tile":
            return pl.BlockSpec((None, size, None, tile), lambda t, g, h, b: (b, g, h, t))
        if kind == "scores":  # [C, C] of chunk g
            return pl.BlockSpec((None, None, None, size, size), lambda t, g, h, b: (b, h, g, 0, 0))
        if kind == "state":  # [K, BV] of chunk g
            return pl.BlockSpec((None, None, None, shape[-2], tile), lambda t, g, h, b: (b, h, g, 0, t))
        return pl.BlockSpec((None, None, None, tile, shape[-1]), lambda t, g, h, b: (b, h, g, t, 0))

    step = dict(key_tile=tiles.key) if tiled == "value" else dict(value_tile=tiles.value)
    del key_dim
    static = dict(size=size, length=length, precision=common.precision_of(x.dtype), **step)
    documents = [] if first is None else [pl.BlockSpec((None, size), lambda t, g, h, b: (b, g))]
    call = common.launch(
        common.kernel_body(kernel, first is not None, **static),
        (width // tile, groups, heads, batch),
        [pl.BlockSpec((None, size), lambda t, g, h, b: (h, 0)), *documents]
        + [spec(a.shape, kind) for a, kind in ins],
        [o for o, _ in outs],
        [spec(o.shape, kind) for o, kind in outs],
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )
    return call(
        common.head_decays(log_decay, size), *([] if first is None else [first]), *(a for a, _ in ins)
    )


# ----------------------------------------------------------------------------------------------
# The two directions.


def _states(k, v, log_decay, h0, first, size, length, tiles, interpret):
    return _state_pass(_states_kernel, k, v, h0, v.dtype, log_decay, first, size, length, tiles, interpret)


def forward(q, k, v, log_decay, h0, first=None, *, size: int, length: int, tiles: Tiles, interpret: bool):
    """Unnormalized retention from the state h0: (o [B, T, H, V], final state [B, H, K, V] float32).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V], T a multiple of ``size``, K and V multiples of their tiles,
            zero past ``length`` tokens; log_decay: [H] float32; h0: [B, H, K, V] float32.
        first: [B, T] int32 or None: the index of each token's document start (−1: the document carried
            in), padded rows repeating the last real one (``common.decays``); None: no resets.
    """
    context = dict(
        log_decay=log_decay, first=first, size=size, length=length, tiles=tiles, interpret=interpret
    )
    h, ht = _states(k, v, log_decay, h0, first, size, length, tiles, interpret)
    out = [(jax.ShapeDtypeStruct(v.shape, v.dtype), "seq tile")]
    if tiles.stored_scores:
        a = _scores_pass(q, k, tiles.key, **context)
        (o,) = _chunk_pass(
            _output_stored_kernel,
            [(q, "seq"), (a, "scores"), (v, "seq tile"), (h, "state")],
            out,
            "value",
            **context,
        )
    else:
        (o,) = _chunk_pass(
            _output_kernel, [(q, "seq"), (k, "seq"), (v, "seq tile"), (h, "state")], out, "value", **context
        )
    return o, ht


def backward(
    q, k, v, log_decay, h0, do, dht, first=None, *, size: int, length: int, tiles: Tiles, interpret: bool
):
    """Gradients (dq, dk, dv, dh0) of ``forward`` for the cotangents do [B, T, H, V] and dht [B, H, K, V]
    (float32)."""
    context = dict(
        log_decay=log_decay, first=first, size=size, length=length, tiles=tiles, interpret=interpret
    )
    h, _ = _states(k, v, log_decay, h0, first, size, length, tiles, interpret)
    dh, dh0 = _state_pass(
        _dstates_kernel, q, do, dht, v.dtype, log_decay, first, size, length, tiles, interpret
    )
    dqk_out = [
        (jax.ShapeDtypeStruct(q.shape, q.dtype), "seq tile"),
        (jax.ShapeDtypeStruct(k.shape, k.dtype), "seq tile"),
    ]
    dv_out = [(jax.ShapeDtypeStruct(v.shape, v.dtype), "seq tile")]
    states = [(h, "state rows"), (dh, "state rows")]
    if tiles.stored_scores:
        a = _scores_pass(q, k, tiles.key, **context)
        da = _scores_pass(do, v, tiles.value, **context)
        dqk_in = [(q, "seq tile"), (k, "seq tile"), (da, "scores"), (v, "seq"), (do, "seq"), *states]
        dq, dk = _chunk_pass(_dqk_stored_kernel, dqk_in, dqk_out, "key", **context)
        dv_in = [(k, "seq"), (a, "scores"), (do, "seq tile"), (dh, "state")]
        (dv,) = _chunk_pass(_dv_stored_kernel, dv_in, dv_out, "value", **context)
    else:
        dqk_in = [(q, "seq tile"), (k, "seq tile"), (v, "seq"), (do, "seq"), *states]
        dq, dk = _chunk_pass(_dqk_kernel, dqk_in, dqk_out, "key", **context)
        dv_in = [(q, "seq"), (k, "seq"), (do, "seq tile"), (dh, "state")]
        (dv,) = _chunk_pass(_dv_kernel, dv_in, dv_out, "value", **context)
    return dq, dk, dv, dh0
