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

Packed documents (``segment_ids``): where a document starts the state is emptied. Per chunk the kernels
read four masks (``_Documents``): D is multiplied by [i and j in one document]; the state term γ^(i+1)
reaches only the rows still in the document carried into the chunk; the update sums only the keys of the
document open at the chunk's end; and γ^(e_g) becomes 0 when the chunk holds a start. Every mask enters
as an exponent of −inf before the exp (or a 0 in D), the formulas above are otherwise unchanged, in the
backward passes too, and every exponent remains a difference of indices in the call, so the positions
restart by themselves. The documents arrive as two int32 blocks per chunk (``_document_blocks``).

The gradient of log γ needs no kernel: scaling q_n by e^(εn), k_m by e^(−εm) and S_0 by e^ε shifts log γ
by ε in every output, and the final state by e^(ε(T−1)), which gives for any centre c

    ∂L/∂log γ = Σ_n (n − c)(q_n·dq_n − k_n·dk_n) + (c + 1)⟨S_0, dS_0⟩ + (T − 1 − c)⟨S_T, dS_T⟩,

evaluated in XLA with c = (T − 1)/2 to keep the terms small. Document masks do not depend on γ, so
the identity holds with resets as well.

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
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from retnet_jax.ops import documents
from retnet_jax.ops.retention import KERNEL_STATE_NAME

__all__ = ["AUTO_CHUNK", "LANES", "chunk_retention", "supported"]

LANES = 128  # lane width of a vreg: every block's last dim is a multiple of it
SUBLANES = 8  # sublanes of a 32-bit vreg: the rows of the key-side document block

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
    resets: bool = False  # document blocks follow the state inputs (see _document_blocks)


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


class _Documents(NamedTuple):
    """Where the chunk's documents begin and end, as masks (all True for a chunk inside one document)."""

    same: jax.Array  # [C, C]: query i and key j lie in one document
    continues: jax.Array  # [C, 1]: token i lies in the document open before the chunk (the carried state's)
    last: jax.Array  # [C, 1]: token j lies in the document open at the chunk's end (the state passed on)
    carried: jax.Array  # [1, 1]: the chunk holds no start, so the carried state passes through it


def _load_documents(refs, size: int) -> _Documents:
    """The masks of this chunk from its two document blocks (``_document_blocks``)."""
    column_ref, row_ref = refs
    column = column_ref[...]  # [C, 128]: document number of token i, the same in every lane
    row = row_ref[...]  # [8, C]: row 0 document of token j; rows 1, 2 the documents before and at the end
    doc = column[:, :1]  # [C, 1]
    before, last = row[1:2, :1], row[2:3, :1]  # [1, 1]
    # The lane copies tile to [C, C] and meet the key-side row broadcast over the sublanes: no transpose.
    same = jnp.tile(column, (1, size // LANES)) == row[:1, :]
    return _Documents(same=same, continues=doc == before, last=doc == last, carried=last == before)


def _document_decays(lam, size: int, valid, docs: _Documents) -> _Decays:
    """``_decays`` with document starts: a factor cut off by a start (its token's or chunk's) is exp(−inf)."""
    pos = jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    query_exponent = jnp.where(docs.continues, (pos + 1).astype(jnp.float32) * lam, -jnp.inf)
    key_exponent = jnp.where((pos < valid) & docs.last, (valid - 1 - pos).astype(jnp.float32) * lam, -jnp.inf)
    chunk_exponent = jnp.full((1, 1), valid, jnp.int32).astype(jnp.float32) * lam
    return _Decays(
        query=jnp.exp(query_exponent),
        key=jnp.exp(key_exponent),
        chunk=jnp.exp(jnp.where(docs.carried, chunk_exponent, -jnp.inf)),
    )


def _same_document(mask, docs: _Documents | None):
    """D, with the pairs (i, j) split by a document start set to 0 when there are starts."""
    return mask if docs is None else jnp.where(docs.same, mask, 0.0)


def _split_refs(refs, static: _Static):
    """(the document block refs or None, the remaining refs): the document blocks are the last inputs."""
    return (refs[:2], refs[2:]) if static.resets else (None, refs)


def _fill_mask(mask_ref, lam, size: int):
    """D [C, C]: γ^(i−j) on and below the diagonal, 0 above (exp of −inf)."""
    i = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    mask_ref[...] = jnp.exp(jnp.where(i >= j, (i - j).astype(jnp.float32) * lam, -jnp.inf))


def _masked(a, b, mask, precision):
    """(a bᵀ) ⊙ D [C, S] in a's dtype: the decayed in-chunk scores (q, k) or (dO, v)."""
    return (_dot(a, b, (1, 1), precision) * mask).astype(a.dtype)


def _step(static: _Static, lam_ref, mask_ref, state_ref, init_ref, doc_refs=None, *, reverse: bool):
    """Per-step set-up shared by the kernels: on a program's first step, the mask and the carried state
    (from ``init_ref``); returns this chunk's decay factors and its document masks (None without
    ``doc_refs``)."""
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
    if doc_refs is None:
        return _decays(lam, static.size, valid), None
    docs = _load_documents(doc_refs, static.size)
    return _document_decays(lam, static.size, valid, docs), docs


def _forward_kernel(lam_ref, q_ref, k_ref, v_ref, kv_ref, *refs, static):
    doc_refs, (o_ref, kv_out_ref, state_ref, mask_ref) = _split_refs(refs, static)
    d, docs = _step(static, lam_ref, mask_ref, state_ref, kv_ref, doc_refs, reverse=False)
    precision = _precision(q_ref.dtype)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    state = state_ref[...]  # S_g [K, V] float32
    o = _dot(_masked(q, k, _same_document(mask_ref[...], docs), precision), v, (1, 0), precision)
    o = o + _dot((q * d.query).astype(q.dtype), state.astype(q.dtype), (1, 0), precision)
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = d.chunk * state + _dot((k * d.key).astype(k.dtype), v, (0, 0), precision)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        kv_out_ref[...] = state_ref[...]


def _dq_kernel(lam_ref, k_ref, v_ref, do_ref, kv_ref, *refs, static):
    doc_refs, (dq_ref, state_ref, mask_ref) = _split_refs(refs, static)
    d, docs = _step(static, lam_ref, mask_ref, state_ref, kv_ref, doc_refs, reverse=False)
    precision = _precision(k_ref.dtype)
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    state = state_ref[...]  # S_g [K, V] float32
    dq = _dot(_masked(do, v, _same_document(mask_ref[...], docs), precision), k, (1, 0), precision)
    dq = dq + _dot(do, state.astype(do.dtype), (1, 1), precision) * d.query
    dq_ref[...] = dq.astype(dq_ref.dtype)
    state_ref[...] = d.chunk * state + _dot((k * d.key).astype(k.dtype), v, (0, 0), precision)


def _dkdv_kernel(lam_ref, q_ref, k_ref, v_ref, do_ref, dkv_ref, *refs, static):
    doc_refs, (dk_ref, dv_ref, dkv_out_ref, state_ref, mask_ref) = _split_refs(refs, static)
    d, docs = _step(static, lam_ref, mask_ref, state_ref, dkv_ref, doc_refs, reverse=True)
    precision = _precision(q_ref.dtype)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    mask = _same_document(mask_ref[...], docs)
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


# Scoped VMEM the kernels with document blocks may use. Compiled for v5p (default limit 16 MiB), the dk-dv
# kernel at K = 256, V = 512, C = 256 with float32 inputs needs 16.5 MiB. v5e and v6e have 128 MiB of
# VMEM, v5p 64 MiB; v4 has 16 MiB, and its compiler holds the kernels to that (every preset head shape
# compiles there). The kernels without documents keep the default limit.
DOCUMENTS_VMEM_LIMIT = 32 * 1024 * 1024


def _vmem_limit(static: _Static) -> dict:
    return {"vmem_limit_bytes": DOCUMENTS_VMEM_LIMIT} if static.resets else {}


def _launch(kernel, rows, states, outs, log_decay, static: _Static, docs=None, *, reverse: bool = False):
    """Runs ``kernel`` over the grid (B, H, G).

    Args:
        rows: arrays [B, T, H·W]: each step gets the [C, W] block of chunk g of head h.
        states: arrays [B, H, K, V]: each program gets its (b, h) block, fetched once.
        outs: (shape, dtype, "rows" | "state") of each output, blocked like the inputs.
        docs: None, or the document blocks ([B, T, 128], [B, 8, T] int32 from ``_document_blocks``):
            each step gets the [C, 128] and [8, C] blocks of chunk g, after the state inputs.
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

    doc_specs = []
    if docs is not None:
        doc_specs = [
            pl.BlockSpec((None, static.size, LANES), lambda b, h, t, lam: (b, chunk(t), 0)),
            pl.BlockSpec((None, SUBLANES, static.size), lambda b, h, t, lam: (b, 0, chunk(t))),
        ]

    call = pl.pallas_call(
        functools.partial(kernel, static=static),
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _ in outs],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, static.heads, groups),
            in_specs=[spec(x.shape, "rows") for x in rows] + [state_spec] * len(states) + doc_specs,
            out_specs=[spec(shape, kind) for shape, _, kind in outs],
            scratch_shapes=[
                pltpu.VMEM((key_dim, value_dim), jnp.float32),  # the carried state (or its cotangent)
                pltpu.VMEM((static.size, static.size), jnp.float32),  # D
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"), **_vmem_limit(static)
        ),
        interpret=_interpret_mode(static.interpret),
        name=kernel.__name__.strip("_"),
    )
    return call(log_decay, *rows, *states, *(docs or ()))


def _forward(q, k, v, log_decay, kv, docs, static):
    return _launch(
        _forward_kernel,
        [q, k, v],
        [kv],
        [(v.shape, v.dtype, "rows"), (kv.shape, jnp.float32, "state")],
        log_decay,
        static,
        docs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _retention(q, k, v, log_decay, kv, docs, static):
    return tuple(_forward(q, k, v, log_decay, kv, docs, static))


def _retention_fwd(q, k, v, log_decay, kv, docs, static):
    # Through the custom_vjp itself (not ``_forward``): where nothing needs its outputs, e.g. in a remat'ed
    # block whose policy keeps them, the call is dropped whole (Pallas never drops a kernel launch).
    o, kv_final = _retention(q, k, v, log_decay, kv, docs, static)
    # Named so that a remat policy can keep it: then the forward kernel need not rerun for the backward.
    return (o, kv_final), (q, k, v, log_decay, kv, checkpoint_name(kv_final, KERNEL_STATE_NAME), docs)


def _retention_bwd(static, residuals, cotangents):
    q, k, v, log_decay, kv, kv_final, docs = residuals
    do, dkv_final = cotangents
    do = do.astype(v.dtype)
    dkv_final = dkv_final.astype(jnp.float32)
    (dq,) = _launch(_dq_kernel, [k, v, do], [kv], [(q.shape, q.dtype, "rows")], log_decay, static, docs)
    dk, dv, dkv = _launch(
        _dkdv_kernel,
        [q, k, v, do],
        [dkv_final],
        [(k.shape, k.dtype, "rows"), (v.shape, v.dtype, "rows"), (kv.shape, jnp.float32, "state")],
        log_decay,
        static,
        docs,
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
    return dq, dk, dv, dlog_decay.astype(log_decay.dtype), dkv, None  # no cotangent for the documents


_retention.defvjp(_retention_fwd, _retention_bwd)


def _rows(x, length: int, width: int):
    """[B, T, H, W] → [B, T', H·W']: zero rows to T' and zero columns to W' (a reshape if none)."""
    batch, steps, heads, columns = x.shape
    if (steps, columns) != (length, width):
        x = jnp.pad(x, [(0, 0), (0, length - steps), (0, 0), (0, width - columns)])
    return x.reshape(batch, length, heads * width)


def _document_blocks(segment_ids, length: int, size: int):
    """The kernels' view of the documents: [B, T] ids → ([B, T', 128], [B, 8, T']) int32, T' = ``length``.

    Documents are numbered by the starts before and at each token (``ops.documents``: a change of id
    starts one; position 0 never does), so the numbers only grow along a row and two tokens share a
    document exactly when they share its number, even where ids come back ([1, 2, 1]). The padded tokens
    repeat the last number (no start). Per token, the first array holds its number in all 128 lanes (the
    query side: a column of the [C, C] mask after tiling); the second holds in row 0 its number (the key
    side: a row of that mask), in row 1 the number of the token before its chunk (0 for the first chunk:
    the carried state's document) and in row 2 the number of its chunk's last token; rows 3-7 are 0.
    Mosaic lays a [C, 128] and an [8, C] int32 block out without transposes.
    """
    batch, steps = segment_ids.shape
    number = jnp.cumsum(documents.document_starts(segment_ids).astype(jnp.int32), axis=1)  # [B, T]
    number = jnp.pad(number, [(0, 0), (0, length - steps)], mode="edge")  # [B, T']
    per_chunk = number.reshape(batch, length // size, size)
    last = per_chunk[:, :, -1]  # [B, G]
    before = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), last[:, :-1]], axis=1)  # [B, G]
    rows = [number, jnp.repeat(before, size, axis=1), jnp.repeat(last, size, axis=1)]
    rows += [jnp.zeros_like(number)] * (SUBLANES - len(rows))
    return jnp.broadcast_to(number[..., None], (batch, length, LANES)), jnp.stack(rows, axis=1)


def chunk_retention(
    q, k, v, log_decay, kv=None, *, chunk_size: int, segment_ids=None, interpret: bool = False
):
    """Unnormalized retention with a state in and out, positions from 0, through the TPU kernels.

    o_n = Σ_{m ≤ n} γ^(n−m) (q_n · k_m) v_m + γ^(n+1) q_n S_0;  S_T = γ^T S_0 + Σ_m γ^(T−1−m) k_mᵀ v_m.

    With ``segment_ids`` the sums run inside each token's document only: the S_0 term reaches the call's
    first document (position 0 is never a start), and S_T holds the last document alone. The exponents
    stay differences of indices in the call; positions inside documents (for c_n) are the caller's.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (bfloat16 or float32); log_decay: [H] float32.
        kv: the incoming state S_0 [B, H, K, V] (float32), or None for zeros.
        chunk_size: C, a multiple of 128; T is padded with zeros to a multiple of C, K and V to multiples
            of 128.
        segment_ids: [B, T] integers or None: a change between t − 1 and t starts a document at t.
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
    docs = None
    if segment_ids is not None:
        documents.check_segment_ids("chunk_retention", segment_ids, batch, length)
        docs = _document_blocks(segment_ids, padded, chunk_size)
    static = _Static(heads, chunk_size, length, bool(interpret), resets=docs is not None)
    o, kv_final = _retention(q2, k2, v2, log_decay.astype(jnp.float32), kv2, docs, static)
    o = o.reshape(batch, padded, heads, value_width)[:, :length, :, :value_dim]
    return o, kv_final[:, :, :key_dim, :value_dim]
