"""Chunkwise retention as fused Pallas kernels: the chunk's scores live only in on-chip memory.

The XLA chunkwise form (``retention.chunkwise``) writes every chunk's C×C score tile, the decayed
weights and the per-chunk states to device memory and reads them back; on a GPU that traffic, not the
arithmetic, sets its speed. Here one program per (batch row, head, column tile) walks the chunks in
order and holds its tile of the running state in float32 registers, so the only device-memory traffic
is reading q, k, v and writing o (the backward: q, k, v, dO in, dq, dk, dv out).

The kernels compute unnormalized retention from position 0 with no state in or out (the wrapper in
``retention.chunkwise`` adds those in XLA):

* forward, chunks in order:   o_g = ((Q Kᵀ) ⊙ D) V + (Q ⊙ γ^(i+1)) S_g,
                              S_{g+1} = γ^C S_g + (K ⊙ γ^(C−1−j))ᵀ V
* dq, chunks in order:        dq_g = ((dO Vᵀ) ⊙ D) K + (dO S_gᵀ) ⊙ γ^(i+1)
* dk, dv, chunks reversed:    dk_g = ((dO Vᵀ) ⊙ D)ᵀ Q + (V dS_{g+1}ᵀ) ⊙ γ^(C−1−j)
                              dv_g = ((Q Kᵀ) ⊙ D)ᵀ dO + (K dS_{g+1}) ⊙ γ^(C−1−j)
                              dS_g = γ^C dS_{g+1} + (Q ⊙ γ^(i+1))ᵀ dO

with D_ij = γ^(i−j) for j ≤ i inside a chunk, else 0 (built from exponents with −inf, REFERENCE §1).
Each program writes whole rows of one output tile, so no partial sums are left over: the forward and
dv kernels take a tile of value columns (state tile [K, BV]), the dq and dk kernels a tile of key
columns ([BK, V]); when the whole state fits one tile a single reversed pass gives dk and dv.

The gradient of log γ comes from the identity
∂L/∂log γ = Σ_n (n − c)(q_n · dq_n) − Σ_m (m − c)(k_m · dk_m) for any c (both sums without the (n − c)
weights are equal), taken around the middle of the sequence to keep the terms small.

On GPU the kernels lower through Triton; elsewhere ``interpret=True`` runs the same kernel bodies
(slowly), which is how the CPU tests check them. TPUs use the XLA form (``retention.chunkwise``).
Operand products take the input dtype and accumulate in float32, as in the XLA form.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["Tiles", "default_tiles", "fused_chunk_retention", "preferred", "supported"]

# The chunk length chunkwise(implementation="auto") runs the kernels with (C = 128 measured 3-6× slower
# than 64 at K = V = 128 on an H100: its score tiles overflow the registers).
AUTO_CHUNK = 64

# Shared memory the pipelined input buffers of one program may take (an H100 has 227 KiB per block,
# an A100 163 KiB; the rest is left to the products' operand staging).
PIPELINE_BYTES = 144 * 1024

# A state tile of at most this many float32 entries stays in registers (64 per thread at 8 warps).
STATE_TILE_ENTRIES = 128 * 128


class Tiles(NamedTuple):
    """Kernel tiling: the state tile of each program and Triton's launch parameters.

    The forward and dv kernels hold a [K, value] state tile and write [C, value] output tiles; the dq and
    dk kernels hold a [key, V] tile and write [C, key] tiles. When the whole [K, V] state fits one tile,
    dk and dv come from one kernel.
    """

    key: int  # key columns per program of the dq / dk kernels (a power of two >= 16, at most K)
    value: int  # value columns per program of the forward / dv kernels
    num_warps: int = 8
    num_stages: int = 3  # software-pipelining stages of the forward kernel's loop
    backward_stages: int = 2  # of the backward kernels' loops (3 exceeds shared memory at K = V = 128)


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def supported(q_shape, v_shape, chunk_size: int, dtype) -> str | None:
    """None if the kernels handle these sizes, else the reason they do not."""
    key_dim, value_dim = q_shape[-1], v_shape[-1]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"dtype {jnp.dtype(dtype).name} (the kernels take bfloat16, float16 or float32)"
    for name, size in (("chunk_size", chunk_size), ("K", key_dim), ("V", value_dim)):
        if not _power_of_two(size):
            return f"{name} = {size} (the kernels need powers of two >= 16)"
    return None


def preferred(q_shape, v_shape, chunk_size: int, dtype) -> bool:
    """Whether ``chunkwise(implementation="auto")`` takes the kernels: supported sizes whose whole [K, V]
    state fits one tile. Wider heads (e.g. the paper's K = 256, V = 512) need tiles that re-read
    their inputs and measured slower than the XLA form on an H100."""
    fits = q_shape[-1] * v_shape[-1] <= STATE_TILE_ENTRIES
    return fits and supported(q_shape, v_shape, chunk_size, dtype) is None


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Refs arrive as the [T, width] columns (all of them, or one tile) of one (batch row,
# head); lam_ref is that head's log γ repeated C times (a vector, so no scalar loads are needed).


def _dot(a, b, contract, precision):
    """2-D product contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


class _Decays(NamedTuple):
    mask: jax.Array  # D [C, C]
    query: jax.Array  # γ^(i+1) [C, 1]
    key: jax.Array  # γ^(C−1−j) [C, 1]
    chunk: jax.Array  # γ^C, a scalar


def _decays(lam_ref, size: int) -> _Decays:
    lam = lam_ref[...].astype(jnp.float32)  # [C], every entry log γ
    i = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    exponent = jnp.where(i >= j, (i - j).astype(jnp.float32) * lam[None, :], -jnp.inf)
    pos = jax.lax.broadcasted_iota(jnp.int32, (size,), 0).astype(jnp.float32)
    return _Decays(
        mask=jnp.exp(exponent),
        query=jnp.exp((pos + 1.0) * lam)[:, None],
        key=jnp.exp((size - 1.0 - pos) * lam)[:, None],
        chunk=jnp.max(jnp.exp(size * lam)),
    )


def _walk(size: int, groups: int, body, init, *, reverse: bool = False):
    """Runs ``carry = body(rows, carry)`` over the chunks (in order, or last to first) from ``init``;
    ``rows`` is the chunk's slice of the [T, ·] refs."""

    def step(t, carry):
        g = groups - 1 - t if reverse else t
        return body(pl.ds(pl.multiple_of(g * size, size), size), carry)

    jax.lax.fori_loop(0, groups, step, init)


def _masked(a, b, d: _Decays, precision):
    """(a bᵀ) ⊙ D [C, S] in the inputs' dtype: the decayed in-chunk scores (q, k) or (dO, v)."""
    return (_dot(a, b, (1, 1), precision) * d.mask).astype(a.dtype)


def _carried(state, x, decay, y, chunk, precision):
    """γ^C state + (x ⊙ decay)ᵀ y: S_{g+1} from (k, γ^(C−1−j), v), or dS_g from (q, γ^(i+1), dO)."""
    return chunk * state + _dot((x * decay).astype(x.dtype), y, (0, 0), precision)


def _dk_rows(q, v, do, dstate, d: _Decays, precision):
    """dk of one chunk: ((dO Vᵀ) ⊙ D)ᵀ Q + (V dS_{g+1}ᵀ) ⊙ γ^(C−1−j)."""
    intra = _dot(_masked(do, v, d, precision), q, (0, 0), precision)
    return intra + _dot(v, dstate.astype(v.dtype), (1, 1), precision) * d.key


def _dv_rows(q, k, do, dstate, d: _Decays, precision):
    """dv of one chunk: ((Q Kᵀ) ⊙ D)ᵀ dO + (K dS_{g+1}) ⊙ γ^(C−1−j)."""
    intra = _dot(_masked(q, k, d, precision), do, (0, 0), precision)
    return intra + _dot(k, dstate.astype(k.dtype), (1, 0), precision) * d.key


def _forward_kernel(lam_ref, q_ref, k_ref, v_ref, o_ref, *, size, groups, precision):
    d = _decays(lam_ref, size)

    def body(rows, state):  # S_g [K, BV] float32
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        q_decayed = (q * d.query).astype(q.dtype)
        o = _dot(_masked(q, k, d, precision), v, (1, 0), precision)
        o = o + _dot(q_decayed, state.astype(q.dtype), (1, 0), precision)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return _carried(state, k, d.key, v, d.chunk, precision)

    _walk(size, groups, body, jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32))


def _dq_kernel(lam_ref, k_ref, v_ref, do_ref, dq_ref, *, size, groups, precision):
    d = _decays(lam_ref, size)

    def body(rows, state):  # S_g [BK, V] float32
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dq = _dot(_masked(do, v, d, precision), k, (1, 0), precision)
        dq = dq + _dot(do, state.astype(do.dtype), (1, 1), precision) * d.query
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return _carried(state, k, d.key, v, d.chunk, precision)

    _walk(size, groups, body, jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32))


def _dk_kernel(lam_ref, q_ref, v_ref, do_ref, dk_ref, *, size, groups, precision):
    d = _decays(lam_ref, size)

    def body(rows, dstate):  # dS_{g+1} [BK, V] float32
        q, v, do = q_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dk_ref[rows, :] = _dk_rows(q, v, do, dstate, d, precision).astype(dk_ref.dtype)
        return _carried(dstate, q, d.query, do, d.chunk, precision)

    init = jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    _walk(size, groups, body, init, reverse=True)


def _dv_kernel(lam_ref, q_ref, k_ref, do_ref, dv_ref, *, size, groups, precision):
    d = _decays(lam_ref, size)

    def body(rows, dstate):  # dS_{g+1} [K, BV] float32
        q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
        dv_ref[rows, :] = _dv_rows(q, k, do, dstate, d, precision).astype(dv_ref.dtype)
        return _carried(dstate, q, d.query, do, d.chunk, precision)

    init = jnp.zeros((q_ref.shape[-1], do_ref.shape[-1]), jnp.float32)
    _walk(size, groups, body, init, reverse=True)


def _dkdv_kernel(lam_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, *, size, groups, precision):
    """dk and dv in one reversed pass, when the whole [K, V] state fits one program."""
    d = _decays(lam_ref, size)

    def body(rows, dstate):  # dS_{g+1} [K, V] float32
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dk_ref[rows, :] = _dk_rows(q, v, do, dstate, d, precision).astype(dk_ref.dtype)
        dv_ref[rows, :] = _dv_rows(q, k, do, dstate, d, precision).astype(dv_ref.dtype)
        return _carried(dstate, q, d.query, do, d.chunk, precision)

    init = jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    _walk(size, groups, body, init, reverse=True)


# ----------------------------------------------------------------------------------------------
# Launch. Grid (tiles, H, B); the tile index runs fastest so that the programs reading the same
# (row, head) columns run side by side and share them through the L2 cache.


def _launch(kernel, ins, outs, log_decay, size, tiles: Tiles, interpret: bool, stages: int):
    """Runs ``kernel`` over (batch row, head, tile).

    Args:
        ins: [(array [B, T, H, width], tile width or None for all columns)].
        outs: [(width, dtype, tile width or None)]: arrays [B, T, H, width].
        One tile width is shared by every tiled operand; the grid has width / tile programs per (row, head).
    """
    batch, length, heads = ins[0][0].shape[:3]
    widths = [(x.shape[-1], tile) for x, tile in ins] + [(w, tile) for w, _, tile in outs]
    count = max((width // tile for width, tile in widths if tile), default=1)

    def spec(width, tile):
        if tile is None:
            return pl.BlockSpec((None, length, None, width), lambda t, h, b: (b, 0, h, 0))
        return pl.BlockSpec((None, length, None, tile), lambda t, h, b: (b, 0, h, t))

    lam = jnp.broadcast_to(log_decay.astype(jnp.float32)[:, None], (heads, size))
    precision = jax.lax.Precision.HIGHEST if ins[0][0].dtype == jnp.float32 else None
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        params["compiler_params"] = pl_triton.CompilerParams(num_warps=tiles.num_warps, num_stages=stages)
    call = pl.pallas_call(
        functools.partial(kernel, size=size, groups=length // size, precision=precision),
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, w), dtype) for w, dtype, _ in outs],
        grid=(count, heads, batch),
        in_specs=[pl.BlockSpec((None, size), lambda t, h, b: (h, 0))]
        + [spec(x.shape[-1], tile) for x, tile in ins],
        out_specs=[spec(w, tile) for w, _, tile in outs],
        interpret=interpret,
        **params,
    )
    return call(lam, *(x for x, _ in ins))


def _tile(tile: int, width: int) -> int | None:
    """A tile width, or None when the tile spans the whole width."""
    return None if tile >= width else tile


def _forward(q, k, v, log_decay, size, tiles, interpret):
    bv = _tile(tiles.value, v.shape[-1])
    (o,) = _launch(
        _forward_kernel,
        [(q, None), (k, None), (v, bv)],
        [(v.shape[-1], v.dtype, bv)],
        log_decay,
        size,
        tiles,
        interpret,
        tiles.num_stages,
    )
    return o


def _backward(q, k, v, do, log_decay, size, tiles, interpret):
    launch = functools.partial(
        _launch,
        log_decay=log_decay,
        size=size,
        tiles=tiles,
        interpret=interpret,
        stages=tiles.backward_stages,
    )
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    bk, bv = _tile(tiles.key, key_dim), _tile(tiles.value, value_dim)
    (dq,) = launch(_dq_kernel, [(k, bk), (v, None), (do, None)], [(key_dim, q.dtype, bk)])
    if bk is None and bv is None:  # the whole state in one tile: dk and dv in one pass
        dk, dv = launch(
            _dkdv_kernel,
            [(q, None), (k, None), (v, None), (do, None)],
            [(key_dim, k.dtype, None), (value_dim, v.dtype, None)],
        )
    else:
        (dk,) = launch(_dk_kernel, [(q, bk), (v, None), (do, None)], [(key_dim, k.dtype, bk)])
        (dv,) = launch(_dv_kernel, [(q, None), (k, None), (do, bv)], [(value_dim, v.dtype, bv)])
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _retention(q, k, v, log_decay, size, tiles, interpret):
    return _forward(q, k, v, log_decay, size, tiles, interpret)


def _retention_fwd(q, k, v, log_decay, size, tiles, interpret):
    return _forward(q, k, v, log_decay, size, tiles, interpret), (q, k, v, log_decay)


def _retention_bwd(size, tiles, interpret, residuals, do):
    q, k, v, log_decay = residuals
    dq, dk, dv = _backward(q, k, v, do.astype(v.dtype), log_decay, size, tiles, interpret)
    # ∂L/∂log γ_h = Σ_n (n − c)(q_n · dq_n − k_n · dk_n), c the middle position (see the module docstring).
    centred = jnp.arange(q.shape[1], dtype=jnp.float32) - 0.5 * (q.shape[1] - 1)
    moment = jnp.einsum("BTHK,BTHK->BTH", q, dq, preferred_element_type=jnp.float32)
    moment = moment - jnp.einsum("BTHK,BTHK->BTH", k, dk, preferred_element_type=jnp.float32)
    dlog_decay = jnp.einsum("T,BTH->H", centred, moment).astype(log_decay.dtype)
    return dq, dk, dv, dlog_decay


_retention.defvjp(_retention_fwd, _retention_bwd)


def default_tiles(key_dim: int, value_dim: int) -> Tiles:
    """The tiling used unless one is given: the whole state per program where it fits in 128·128
    entries (measured fastest at K = V = 128 on an H100), else the widest tile that does."""
    return Tiles(
        key=max(16, min(key_dim, STATE_TILE_ENTRIES // value_dim)),
        value=max(16, min(value_dim, STATE_TILE_ENTRIES // key_dim)),
    )


def fused_chunk_retention(
    q, k, v, log_decay, *, chunk_size: int, tiles: Tiles | None = None, interpret: bool = False
):
    """Unnormalized retention from position 0, no state in or out, through the fused kernels.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (bfloat16, float16 or float32); log_decay: [H] float32.
        chunk_size: C, a power of two >= 16; T is padded with zeros to a multiple of C.
        tiles: key / value tile widths and launch parameters (default ``default_tiles(K, V)``).
        interpret: run the kernel bodies through the Pallas interpreter (any backend; for tests).

    Returns:
        o: [B, T, H, V] in the input dtype. Differentiable in q, k, v and log_decay.
    """
    reason = supported(q.shape, v.shape, chunk_size, q.dtype)
    if reason is not None:
        raise ValueError(f"fused_chunk_retention: unsupported {reason}; use retention.chunkwise instead.")
    tiles = tiles or default_tiles(q.shape[-1], v.shape[-1])
    length = q.shape[1]
    padded = -(-length // chunk_size) * chunk_size
    if padded != length:  # zero keys and values at the end change nothing before them
        pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    o = _retention(q, k, v, log_decay.astype(jnp.float32), chunk_size, tiles, interpret)
    return o[:, :length]
