"""Chunkwise retention as Pallas TPU (Mosaic) kernels: the running state never leaves VMEM.

The XLA chunkwise form writes every chunk's C×C scores and per-chunk states to HBM and reads them back.
Here the grid is (B, H, G): one program per (batch row, head) steps through the G chunks of its sequence.
The chunk axis is the last grid dimension and is marked "arbitrary" (its steps run in order on one core),
so a float32 [K, V] state held in a VMEM scratch buffer is carried from one grid step to the next; B and H
are "parallel" (a megacore chip splits them between its TensorCores). Each grid step is handed one [C, K]
block of q and k and one [C, V] block of v by the Pallas pipeline (double-buffered DMAs from HBM), so HBM
traffic is q, k, v in and o out (backward: q, k, v, dO in, dq, dk, dv out) plus the states in and out.

The kernels compute unnormalized retention with a state S_0 in and the final state out, positions
counted from 0 in the call (``ops.tpu.chunkwise`` adds the row factors), per chunk g with local indices
i (query) and j (key) and e_g tokens (C, except the last chunk of a padded sequence):

* forward, chunks in order:   o_g = ((Q Kᵀ) ⊙ D) V + (Q ⊙ γ^(i+1)) S_g,
                              S_{g+1} = γ^(e_g) S_g + (K ⊙ γ^(e_g−1−j))ᵀ V
* dq, chunks in order:        dq_g = ((dO Vᵀ) ⊙ D) K + (dO S_gᵀ) ⊙ γ^(i+1)
* dk, dv, chunks reversed from dS_G (the final state's cotangent):
                              dk_g = ((dO Vᵀ) ⊙ D)ᵀ Q + (V dS_{g+1}ᵀ) ⊙ γ^(e_g−1−j)
                              dv_g = ((Q Kᵀ) ⊙ D)ᵀ dO + (K dS_{g+1}) ⊙ γ^(e_g−1−j)
                              dS_g = γ^(e_g) dS_{g+1} + (Q ⊙ γ^(i+1))ᵀ dO_g     (dS_0: the state's gradient)

with D_ij = γ^(i−j) for j ≤ i, else 0, built once per program from exponents with −inf above the
diagonal (no γ^(negative) is ever formed). Using the true length e_g of the last chunk makes the final
state exact when T is padded to a multiple of C; the padded rows carry zero q, k, v and dO.

The gradient of log γ needs no kernel: scaling q_n by e^(εn), k_m by e^(−εm) and S_0 by e^ε shifts log γ
by ε in every output, and the final state by e^(ε(T−1)), which gives for any centre c

    ∂L/∂log γ = Σ_n (n − c)(q_n·dq_n − k_n·dk_n) + (c + 1)⟨S_0, dS_0⟩ + (T − 1 − c)⟨S_T, dS_T⟩,

evaluated in XLA with c = (T − 1)/2 to keep the terms small.

TPU layout: q, k, v are viewed as [B, T, H·K] (a free reshape), so a block is the [C, K] slice of one
head: the head dim on the 128 lanes, time on the sublanes. The Mosaic tiling asks for block dims that are
multiples of (8, 128) for 32-bit and (16, 128) for 16-bit types; C is a multiple of 128 (the C×C scores put
C on the lanes too), and K and V are zero-padded to multiples of 128 (K = V = 64 → 128, V = 432 → 512),
which changes no score and only adds zero columns. log γ reaches the kernels by scalar prefetch (SMEM).

VMEM per program (K = 256, V = 512, C = 128, the largest preset): the f32 state scratch and the state's
input and output blocks (double-buffered) ≈ 2.5 MiB, the row blocks < 1 MiB, the [C, C] mask 64 KiB —
well inside the default scoped VMEM of every TPU generation, so the whole state stays in one program (no
K/V tiling, which would only re-read q, k, v).

Operand products take the input dtype (bfloat16 or float32; float32 at HIGHEST precision) and accumulate
in float32, as in the XLA form. ``interpret=True`` runs the same kernels through the Pallas TPU
interpreter on any backend (how the CPU tests check them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["AUTO_CHUNK", "LANES", "chunk_retention", "supported"]

LANES = 128  # lane width of a vreg: every block's last dim is a multiple of it

# The chunk length chunkwise(implementation="auto") runs the kernel with: one MXU tile of rows on
# v4 / v5e / v5p (128×128 systolic arrays). Not measured on a TPU; 256 may suit v6e's 256×256 MXU.
AUTO_CHUNK = 128

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def supported(q_shape, v_shape, chunk_size: int, dtype) -> str | None:
    """None if the kernels handle these sizes, else the reason they do not (for an error message).

    Any B, T, H, K and V: K and V are padded to multiples of 128 and T to a multiple of C.
    """
    del q_shape, v_shape  # every head shape is padded to the lane width
    if jnp.dtype(dtype) not in DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (the TPU kernel takes bfloat16 or float32)"
    if chunk_size % LANES:
        return f"chunk_size = {chunk_size} (the TPU kernel needs a multiple of {LANES})"
    return None


class _Static(NamedTuple):
    """The static sizes of one call (hashable: a non-differentiable argument of the custom VJP)."""

    heads: int  # H
    size: int  # C
    length: int  # T before padding
    interpret: bool


# ----------------------------------------------------------------------------------------------
# Kernel bodies: each runs once per grid step (b, h, t); refs are the blocks of that step.


def _dot(a, b, contract, precision):
    """2-D product contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


class _Decays(NamedTuple):
    query: jax.Array  # γ^(i+1) [C, 1]
    key: jax.Array  # γ^(e−1−j) [C, 1], 0 for the padded rows j >= e
    chunk: jax.Array  # γ^e [1, 1]


def _decays(lam, size: int, valid) -> _Decays:
    """The chunk's decay factors for log γ = lam (a scalar) and e = valid tokens (a scalar)."""
    pos = jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    key_exponent = jnp.where(pos < valid, (valid - 1 - pos).astype(jnp.float32) * lam, -jnp.inf)
    return _Decays(
        query=jnp.exp((pos + 1).astype(jnp.float32) * lam),
        key=jnp.exp(key_exponent),
        chunk=jnp.exp(jnp.full((1, 1), valid, jnp.int32).astype(jnp.float32) * lam),
    )


def _fill_mask(mask_ref, lam, size: int):
    """D [C, C]: γ^(i−j) on and below the diagonal, 0 above (exp of −inf)."""
    i = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    mask_ref[...] = jnp.exp(jnp.where(i >= j, (i - j).astype(jnp.float32) * lam, -jnp.inf))


def _masked(a, b, mask, precision):
    """(a bᵀ) ⊙ D [C, S] in a's dtype: the decayed in-chunk scores (q, k) or (dO, v)."""
    return (_dot(a, b, (1, 1), precision) * mask).astype(a.dtype)


def _step(static: _Static, lam_ref, mask_ref, state_ref, init_ref, *, reverse: bool):
    """Per-step set-up shared by the kernels: on a program's first step, the mask and the carried state
    (from ``init_ref``); returns this chunk's decay factors."""
    groups = pl.num_programs(2)
    t = pl.program_id(2)
    g = groups - 1 - t if reverse else t
    lam = lam_ref[pl.program_id(1)]

    @pl.when(t == 0)
    def _():
        _fill_mask(mask_ref, lam, static.size)
        state_ref[...] = init_ref[...].astype(jnp.float32)

    last = static.length - (static.length - 1) // static.size * static.size  # tokens in the last chunk
    valid = jnp.where(g == groups - 1, last, static.size)
    return _decays(lam, static.size, valid)


def _forward_kernel(lam_ref, q_ref, k_ref, v_ref, kv_ref, o_ref, kv_out_ref, state_ref, mask_ref, *, static):
    d = _step(static, lam_ref, mask_ref, state_ref, kv_ref, reverse=False)
    precision = _precision(q_ref.dtype)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    state = state_ref[...]  # S_g [K, V] float32
    o = _dot(_masked(q, k, mask_ref[...], precision), v, (1, 0), precision)
    o = o + _dot((q * d.query).astype(q.dtype), state.astype(q.dtype), (1, 0), precision)
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = d.chunk * state + _dot((k * d.key).astype(k.dtype), v, (0, 0), precision)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        kv_out_ref[...] = state_ref[...]


def _dq_kernel(lam_ref, k_ref, v_ref, do_ref, kv_ref, dq_ref, state_ref, mask_ref, *, static):
    d = _step(static, lam_ref, mask_ref, state_ref, kv_ref, reverse=False)
    precision = _precision(k_ref.dtype)
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    state = state_ref[...]  # S_g [K, V] float32
    dq = _dot(_masked(do, v, mask_ref[...], precision), k, (1, 0), precision)
    dq = dq + _dot(do, state.astype(do.dtype), (1, 1), precision) * d.query
    dq_ref[...] = dq.astype(dq_ref.dtype)
    state_ref[...] = d.chunk * state + _dot((k * d.key).astype(k.dtype), v, (0, 0), precision)


def _dkdv_kernel(
    lam_ref, q_ref, k_ref, v_ref, do_ref, dkv_ref, dk_ref, dv_ref, dkv_out_ref, state_ref, mask_ref, *, static
):
    d = _step(static, lam_ref, mask_ref, state_ref, dkv_ref, reverse=True)
    precision = _precision(q_ref.dtype)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    mask = mask_ref[...]
    dstate = state_ref[...]  # dS_{g+1} [K, V] float32
    low = dstate.astype(q.dtype)
    dk = _dot(_masked(do, v, mask, precision), q, (0, 0), precision)
    dk_ref[...] = (dk + _dot(v, low, (1, 1), precision) * d.key).astype(dk_ref.dtype)
    dv = _dot(_masked(q, k, mask, precision), do, (0, 0), precision)
    dv_ref[...] = (dv + _dot(k, low, (1, 0), precision) * d.key).astype(dv_ref.dtype)
    state_ref[...] = d.chunk * dstate + _dot((q * d.query).astype(q.dtype), do, (0, 0), precision)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dkv_out_ref[...] = state_ref[...]


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ----------------------------------------------------------------------------------------------
# Launch.


def _interpret_mode(interpret: bool):
    """The ``interpret`` argument of ``pallas_call``: the TPU interpreter (simulates VMEM, SMEM and the
    DMAs, and fills uninitialized scratch with NaN so that a missed initialization shows)."""
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def _launch(kernel, rows, states, outs, log_decay, static: _Static, *, reverse: bool = False):
    """Runs ``kernel`` over the grid (B, H, G).

    Args:
        rows: arrays [B, T, H·W]: each step gets the [C, W] block of chunk g of head h.
        states: arrays [B, H, K, V]: each program gets its (b, h) block, fetched once.
        outs: (shape, dtype, "rows" | "state") of each output, blocked like the inputs.
        reverse: walk the chunks last to first (the index maps, not the kernel, reverse the order).
    """
    batch, length = rows[0].shape[:2]
    groups = length // static.size
    key_dim, value_dim = states[0].shape[-2:]

    def chunk(t):
        return groups - 1 - t if reverse else t

    def row_spec(width):
        return pl.BlockSpec((None, static.size, width), lambda b, h, t, lam: (b, chunk(t), h))

    state_spec = pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h, t, lam: (b, h, 0, 0))

    def spec(shape, kind):
        return row_spec(shape[-1] // static.heads) if kind == "rows" else state_spec

    call = pl.pallas_call(
        functools.partial(kernel, static=static),
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _ in outs],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, static.heads, groups),
            in_specs=[spec(x.shape, "rows") for x in rows] + [state_spec] * len(states),
            out_specs=[spec(shape, kind) for shape, _, kind in outs],
            scratch_shapes=[
                pltpu.VMEM((key_dim, value_dim), jnp.float32),  # the carried state (or its cotangent)
                pltpu.VMEM((static.size, static.size), jnp.float32),  # D
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret_mode(static.interpret),
        name=kernel.__name__.strip("_"),
    )
    return call(log_decay, *rows, *states)


def _forward(q, k, v, log_decay, kv, static):
    return _launch(
        _forward_kernel,
        [q, k, v],
        [kv],
        [(v.shape, v.dtype, "rows"), (kv.shape, jnp.float32, "state")],
        log_decay,
        static,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _retention(q, k, v, log_decay, kv, static):
    return tuple(_forward(q, k, v, log_decay, kv, static))


def _retention_fwd(q, k, v, log_decay, kv, static):
    o, kv_final = _forward(q, k, v, log_decay, kv, static)
    return (o, kv_final), (q, k, v, log_decay, kv, kv_final)


def _retention_bwd(static, residuals, cotangents):
    q, k, v, log_decay, kv, kv_final = residuals
    do, dkv_final = cotangents
    do = do.astype(v.dtype)
    dkv_final = dkv_final.astype(jnp.float32)
    (dq,) = _launch(_dq_kernel, [k, v, do], [kv], [(q.shape, q.dtype, "rows")], log_decay, static)
    dk, dv, dkv = _launch(
        _dkdv_kernel,
        [q, k, v, do],
        [dkv_final],
        [(k.shape, k.dtype, "rows"), (v.shape, v.dtype, "rows"), (kv.shape, jnp.float32, "state")],
        log_decay,
        static,
        reverse=True,
    )
    # ∂L/∂log γ from the scaling identity of the module docstring, centred at c = (T − 1)/2.
    batch, length = q.shape[:2]
    centre = 0.5 * (static.length - 1)
    per_head = (batch, length, static.heads, -1)
    moment = jnp.einsum(
        "BTHK,BTHK->BTH", q.reshape(per_head), dq.reshape(per_head), preferred_element_type=jnp.float32
    )
    moment = moment - jnp.einsum(
        "BTHK,BTHK->BTH", k.reshape(per_head), dk.reshape(per_head), preferred_element_type=jnp.float32
    )
    dlog_decay = jnp.einsum("T,BTH->H", jnp.arange(length, dtype=jnp.float32) - centre, moment)
    dlog_decay = dlog_decay + (centre + 1) * jnp.einsum("BHKV,BHKV->H", kv, dkv)
    dlog_decay = dlog_decay + (static.length - 1 - centre) * jnp.einsum("BHKV,BHKV->H", kv_final, dkv_final)
    return dq, dk, dv, dlog_decay.astype(log_decay.dtype), dkv


_retention.defvjp(_retention_fwd, _retention_bwd)


def _rows(x, length: int, width: int):
    """[B, T, H, W] → [B, T', H·W']: zero rows to T' and zero columns to W' (a reshape if none)."""
    batch, steps, heads, columns = x.shape
    if (steps, columns) != (length, width):
        x = jnp.pad(x, [(0, 0), (0, length - steps), (0, 0), (0, width - columns)])
    return x.reshape(batch, length, heads * width)


def chunk_retention(q, k, v, log_decay, kv=None, *, chunk_size: int, interpret: bool = False):
    """Unnormalized retention with a state in and out, positions from 0, through the TPU kernels.

    o_n = Σ_{m ≤ n} γ^(n−m) (q_n · k_m) v_m + γ^(n+1) q_n S_0;  S_T = γ^T S_0 + Σ_m γ^(T−1−m) k_mᵀ v_m.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (bfloat16 or float32); log_decay: [H] float32.
        kv: the incoming state S_0 [B, H, K, V] (float32), or None for zeros.
        chunk_size: C, a multiple of 128; T is padded with zeros to a multiple of C, K and V to multiples
            of 128.
        interpret: run the kernels through the Pallas TPU interpreter (any backend; for tests).

    Returns:
        (o [B, T, H, V] in the input dtype, S_T [B, H, K, V] float32). Differentiable in q, k, v,
        log_decay and kv.
    """
    reason = supported(q.shape, v.shape, chunk_size, q.dtype)
    if reason is not None:
        raise ValueError(f"chunk_retention: unsupported {reason}; use ops.retention.chunkwise instead.")
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    padded = _round_up(length, chunk_size)
    key_width, value_width = _round_up(key_dim, LANES), _round_up(value_dim, LANES)
    q2, k2 = (_rows(x, padded, key_width) for x in (q, k))
    v2 = _rows(v, padded, value_width)
    if kv is None:
        kv = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    kv2 = jnp.pad(
        kv.astype(jnp.float32), [(0, 0), (0, 0), (0, key_width - key_dim), (0, value_width - value_dim)]
    )
    static = _Static(heads, chunk_size, length, bool(interpret))
    o, kv_final = _retention(q2, k2, v2, log_decay.astype(jnp.float32), kv2, static)
    o = o.reshape(batch, padded, heads, value_width)[:, :length, :, :value_dim]
    return o, kv_final[:, :, :key_dim, :value_dim]
