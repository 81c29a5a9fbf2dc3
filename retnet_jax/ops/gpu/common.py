"""What the chunk-retention kernels share: products, per-chunk decay factors, launches, and the probe for
Pallas's Triton backend.

Axis letters as in ``ops.retention``; inside a kernel i indexes a chunk's query rows and j its key rows.
Every kernel gets log γ of its head as a [C] vector (the value repeated), so that no scalar loads are
needed, and derives the decay factors of one chunk from it:

    D_ij = γ^(i−j) for j ≤ i, else 0        (inside the chunk; built from exponents with −inf, then exp)
    query_i = γ^(i+1)                       (the state entering the chunk, seen from row i)
    key_j = γ^(L−1−j) for j < L, else 0     (row j's weight in the state leaving the chunk)
    chunk = γ^L                             (the entering state's weight in the leaving one)

where L is the number of real tokens in the chunk: C except in a last chunk padded to C. These four
factors are the only place where the kernels learn the structure of the sequence, so packed documents
(docs/kernels.md §5) change them and nothing else. With document resets a kernel also gets, per token,
the index of its document's first token (``first``; −1 for the document carried in from before the
call), and with s_i = first − (the chunk's first index) the local start of row i's document:

    D_ij = γ^(i−j) for s_i ≤ j ≤ i, else 0   (no score across a document start)
    query_i = γ^(i+1) if s_i < 0, else 0     (the entering state belongs to the document open at the start)
    key_j = γ^(L−1−j) for s ≤ j < L, else 0  (s = max_i s_i: only the last document enters the next state)
    chunk = γ^L if s < 0, else 0             (a start inside the chunk empties the carried state)
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Shared memory one program may use: 227 KiB per block on an H100 / H200 (an A100 has 163 KiB).
SHARED_MEMORY_BYTES = 227 * 1024

# Input dtypes the kernels take (products in that dtype, accumulation in float32).
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@functools.cache
def triton_unavailable() -> str | None:
    """None when this JAX's Pallas has its Triton backend, else why not (checked once)."""
    try:
        importlib.import_module("jax.experimental.pallas.triton")
    except ImportError as error:
        return f"this JAX ({jax.__version__}) has no Pallas Triton backend ({error})"
    return None


def compiler_params(num_warps: int, num_stages: int):
    """Triton launch parameters for ``pallas_call``."""
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_power_of_two(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def dot(a, b, contract, precision):
    """2-D product contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def precision_of(dtype):
    """float32 inputs take exact float32 products; low-precision inputs the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Decays(NamedTuple):
    mask: jax.Array | None  # D [C, C] (None where not needed)
    query: jax.Array  # γ^(i+1) [C, 1]
    key: jax.Array  # γ^(L−1−j) for j < L, else 0 [C, 1]
    chunk: jax.Array  # γ^L, a scalar


def chunk_length(g, size: int, length: int):
    """L of chunk g (an int32 scalar): C, or what is left of the ``length`` real tokens."""
    return jnp.minimum(size, length - g * size)


def decay_mask(lam, size: int):
    """D [C, C] from lam = log γ as a [C] float32 vector (the same for every chunk)."""
    i = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return jnp.exp(jnp.where(i >= j, (i - j).astype(jnp.float32) * lam[None, :], -jnp.inf))


def decays(lam, size: int, length, mask=None, start=None) -> Decays:
    """The decay factors of one chunk of ``length`` real tokens (module docstring); ``mask`` is D if the
    caller needs it (computed once, outside its loop over chunks), else None.

    ``start`` [C] int32, with document resets: row i's document begins at chunk row start[i] (negative:
    before the chunk). Rows past ``length`` must repeat the last real row's value. None: no resets, and
    the factors are exactly those of a sequence without documents.
    """
    pos = jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    last = jnp.asarray(length, jnp.int32) - 1
    if start is None:
        key = jnp.where(pos <= last, (last - pos).astype(jnp.float32) * lam, -jnp.inf)
        return Decays(
            mask=mask,
            query=jnp.exp((pos.astype(jnp.float32) + 1.0) * lam)[:, None],
            key=jnp.exp(key)[:, None],
            chunk=jnp.max(jnp.exp((last + 1).astype(jnp.float32) * lam)),
        )
    # The starts never decrease along the sequence, so the largest is that of the chunk's last document.
    begin = jnp.max(start)
    if mask is not None:  # keys before the start of row i's document are cut like future keys
        j = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
        mask = jnp.where(j >= start[:, None], mask, 0.0)
    key = jnp.where((pos <= last) & (pos >= begin), (last - pos).astype(jnp.float32) * lam, -jnp.inf)
    query = jnp.where(start < 0, (pos.astype(jnp.float32) + 1.0) * lam, -jnp.inf)
    chunk = jnp.where(begin < 0, (last + 1).astype(jnp.float32) * lam, -jnp.inf)
    return Decays(
        mask=mask, query=jnp.exp(query)[:, None], key=jnp.exp(key)[:, None], chunk=jnp.max(jnp.exp(chunk))
    )


def local_starts(first_ref, g, size: int):
    """Chunk g's rows of the document starts ``first`` (indices in the call) as chunk-local indices [C]
    (``first_ref`` holds the whole row, or just chunk g's rows); None without resets."""
    if first_ref is None:
        return None
    return (first_ref[rows(g, size)] if first_ref.shape[0] > size else first_ref[...]) - g * size


def _with_starts(lam_ref, first_ref, *refs, kernel, **static):
    kernel(lam_ref, *refs, first_ref=first_ref, **static)


def kernel_body(kernel, resets: bool, **static):
    """The body given to ``pallas_call``: ``kernel`` as it is without resets; with them, a body that takes
    the document starts as the operand after log γ and hands them to ``kernel`` as ``first_ref``."""
    if not resets:  # exactly the kernel without documents
        return functools.partial(kernel, **static)
    return functools.partial(_with_starts, kernel=kernel, **static)


def masked(a, b, d: Decays, precision):
    """(a bᵀ) ⊙ D [C, S] in a's dtype: the decayed in-chunk scores of (q, k) or of (dO, v)."""
    return (dot(a, b, (1, 1), precision) * d.mask).astype(a.dtype)


def rows(g, size: int):
    """The rows of chunk g in a [T, ·] ref."""
    return pl.ds(pl.multiple_of(g * size, size), size)


def columns(t, tile: int):
    """Columns t·tile … (t+1)·tile − 1 of a [·, width] ref."""
    return pl.ds(pl.multiple_of(t * tile, tile), tile)


def head_decays(log_decay, size: int):
    """log γ per head as the [H, C] float32 operand every kernel takes."""
    return jnp.broadcast_to(log_decay.astype(jnp.float32)[:, None], (log_decay.shape[0], size))


def launch(kernel, grid, in_specs, out_shapes, out_specs, *, num_warps, num_stages, interpret):
    """``pallas_call`` with Triton launch parameters (none in interpret mode)."""
    params = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages))
    return pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        **params,
    )


def log_decay_gradient(q, k, dq, dk, h0, dh0, ht, dht, length: int):
    """∂L/∂log γ [H] from the other gradients (the moment identity, docs/kernels.md):

        Σ_n (n − c)(q_n · dq_n) − Σ_m (m − c)(k_m · dk_m) + (c + 1)⟨S_0, dS_0⟩ + (T − 1 − c)⟨S_T, dS_T⟩

    for any c; c = (T − 1)/2 keeps the terms small. Rows past ``length`` (padding) must be zero.

    Args:
        q, k, dq, dk: [B, T', H, K] (T' >= T); h0, dh0, ht, dht: [B, H, K, V].
    """
    centre = 0.5 * (length - 1)
    centred = jnp.arange(q.shape[1], dtype=jnp.float32) - centre
    moment = jnp.einsum("BTHK,BTHK->BTH", q, dq, preferred_element_type=jnp.float32)
    moment = moment - jnp.einsum("BTHK,BTHK->BTH", k, dk, preferred_element_type=jnp.float32)
    states = (centre + 1.0) * jnp.einsum("BHKV,BHKV->H", h0, dh0)
    states = states + (length - 1.0 - centre) * jnp.einsum("BHKV,BHKV->H", ht, dht)
    return jnp.einsum("T,BTH->H", centred, moment) + states
