"""Retention (Sun et al. 2023, §2) in its three forms, as pure functions of arrays.

Axis letters, used in einsum strings, shape comments and logical axis names throughout the package:

    B batch · T query time · S key time · H heads · D model width · K key/query head dim ·
    V value head dim · C chunk length · G chunk index · F feed-forward width · N vocabulary.

Per head, with decay γ = exp(log_decay[h]) and absolute positions n, m (the state's ``count`` plus the
index inside the call), every form computes

    o_n = Σ_{m ≤ n} γ^(n−m) (q_n · k_m) v_m / sqrt(c_n),    c_n = Σ_{j=0..n} γ^j = (1 − γ^(n+1)) / (1 − γ)

(``normalize=False`` drops the division: the unnormalized retention of fla). q and k arrive already
projected, rotated and scaled; this module holds no parameters.

* ``parallel``: ((Q Kᵀ) ⊙ D) V with the decay mask D, O(T²) work, no state in or out.
* ``recurrent`` / ``recurrent_step``: S_n = γ S_{n−1} + k_nᵀ v_n, o_n = q_n S_n / sqrt(c_n); O(1) per token.
* ``chunkwise``: parallel inside chunks of C tokens, recurrent across chunks (a state carried between them).

The forms agree to rounding for every length, chunk size and state, so a prompt can be prefilled by one
form and continued by another. Numerics (docs/retention.md §2, §10): decay and state are float32
(float64 for float64 inputs); every decay factor is exp of a non-positive exponent, masks are built from
exponents with −inf above the diagonal *before* the exp, so nothing overflows and γ is never rounded to 1
by a low-precision dtype. Matrix products take their operands in the input dtype and accumulate in
float32. Chunk states come from one matrix product for up to ``MATRIX_CARRY_MAX_CHUNKS`` chunks, from a
``lax.scan`` beyond.

Packed documents: every form takes ``segment_ids`` [B, T] (integers; where the value changes between t − 1
and t a new document starts at t; see ``ops.documents``). At a document start the state is emptied and the
positions, hence c_n, restart at 0, so each packed document computes exactly what it would alone. Position 0
of a call never counts as a start: the call's first document continues the incoming state (its ``count``
included); to start a new document there, empty the row's state first (``reset_rows``). ``recurrent_step``
takes a per-row ``reset`` flag instead. The positions are ``document_positions(segment_ids, state.count)``,
which the model uses for its rotation too. ``segment_ids=None`` traces exactly the program without resets.

Padding: a state whose ``count`` is negative (−p) announces p pad tokens before the first real one. Those
positions get normalizer c_0; their k (or v) must be zero (the model masks them) so that they leave the
state untouched, and the count reaches the number of real tokens when they are consumed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.ops import documents
from retnet_jax.ops.documents import document_positions

__all__ = [
    "KERNEL_STATE_NAME",
    "RetentionState",
    "StackedState",
    "chunkwise",
    "document_positions",
    "forward_flops",
    "init_state",
    "log_decays",
    "parallel",
    "recurrent",
    "recurrent_step",
    "reset_rows",
    "update_state",
]

DECAY_SCHEDULES = ("paper", "linspace")

# The ``jax.ad_checkpoint.checkpoint_name`` under which the fused kernels (GPU and TPU) keep, for their
# backward, the one residual their forward computes: the final state. Inside a remat'ed block the kernel's
# forward reruns in the backward pass unless the remat policy saves this name (and whatever needs the
# kernel's output is saved too): ``nn.remat``'s "mixer" policy does.
KERNEL_STATE_NAME = "retention_kernel_state"


class RetentionState(NamedTuple):
    """Recurrent state of retention; every array is batch-major so rows can be selected or reordered.

    Attributes:
        kv: [B, H, K, V] float32 (float64 for float64 inputs): S = Σ_m γ^(n−m) k_mᵀ v_m.
        count: [B] int32: tokens seen so far (the absolute position of the next token).
    """

    kv: jax.Array
    count: jax.Array


class StackedState(NamedTuple):
    """One layer's state seen inside the array of every layer's state (a decoding state's), so that a
    step can update it there in place (``dispatch.recurrent_step``) instead of in a copy of its slice.

    Attributes:
        kv: [L, B, H, K, V] float32 (or bfloat16, or float64): every layer's S.
        layer: int32 scalar (traced or not): the layer this view is of.
        count: [B] int32: tokens seen so far.
    """

    kv: jax.Array
    layer: jax.Array
    count: jax.Array

    def current(self) -> RetentionState:
        """The layer's own state (its slice of ``kv``)."""
        kv = jax.lax.dynamic_index_in_dim(self.kv, self.layer, 0, keepdims=False)
        return RetentionState(kv, self.count)

    def put(self, new: RetentionState) -> StackedState:
        """The view with the layer's slice replaced by ``new.kv`` (rounded to the storage dtype)."""
        kv = jax.lax.dynamic_update_index_in_dim(self.kv, new.kv.astype(self.kv.dtype), self.layer, 0)
        return StackedState(kv, self.layer, new.count)


def init_state(batch: int, heads: int, key_dim: int, value_dim: int, dtype=jnp.float32):
    """The empty state: no tokens seen. Returns a ``RetentionState`` of zeros."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(
            f"init_state: dtype must be float32 or float64 (the state is never held in low precision); "
            f"got {jnp.dtype(dtype).name}."
        )
    return RetentionState(
        kv=jnp.zeros((batch, heads, key_dim, value_dim), dtype),
        count=jnp.zeros((batch,), jnp.int32),
    )


def reset_rows(state: RetentionState, reset) -> RetentionState:
    """The state with the rows where ``reset`` [B] bool is True emptied (kv 0, count 0).

    How a call that carries a state starts a new document at its position 0 in some rows.
    """
    kv = jnp.where(reset[:, None, None, None], jnp.zeros((), state.kv.dtype), state.kv)
    return RetentionState(kv, jnp.where(reset, 0, state.count).astype(state.count.dtype))


def log_decays(num_heads: int, schedule: str = "paper") -> jax.Array:
    """log γ_h per head, float32 [H].

    ``"paper"``: γ_h = 1 − 2^(−5−h) (the paper and torchscale). ``"linspace"``: γ = 1 − exp(x) with x
    evenly spaced from log(1/32) to log(1/512). Computed in float64 and rounded once to float32.
    """
    if num_heads < 1:
        raise ValueError(f"log_decays: num_heads must be >= 1; got {num_heads}.")
    if schedule == "paper":
        one_minus_gamma = 2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))
    elif schedule == "linspace":
        one_minus_gamma = np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), num_heads))
    else:
        raise ValueError(f"log_decays: unknown schedule {schedule!r}; expected one of {DECAY_SCHEDULES}.")
    return jnp.asarray(np.log1p(-one_minus_gamma), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Checks: run at trace time on static shapes, so they cost nothing inside jit.


def accumulator(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def check_inputs(fn: str, q, k, v, log_decay, state, *, step: bool = False):
    lead = "[B, H" if step else "[B, T, H"
    rank = 3 if step else 4
    for name, x, last in (("q", q, "K"), ("k", k, "K"), ("v", v, "V")):
        if x.ndim != rank:
            raise ValueError(
                f"{fn}: {name} must have shape {lead}, {last}] (rank {rank}); got shape {tuple(x.shape)}."
            )
    if k.shape != q.shape:
        raise ValueError(f"{fn}: k must have the shape of q {tuple(q.shape)}; got {tuple(k.shape)}.")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"{fn}: v must share q's leading axes {tuple(q.shape[:-1])} ({lead}]); "
            f"got v of shape {tuple(v.shape)}."
        )
    if not step and q.shape[1] < 1:
        raise ValueError(f"{fn}: the sequence is empty (T = 0); pass at least one token.")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(
            f"{fn}: q, k and v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    heads = q.shape[-2]
    if log_decay.shape != (heads,):
        raise ValueError(
            f"{fn}: log_decay must have shape [H] = ({heads},), one decay per head; "
            f"got {tuple(log_decay.shape)}."
        )
    if jnp.dtype(log_decay.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(
            f"{fn}: log_decay must be float32 (or float64); got {log_decay.dtype}. In bfloat16/float16 "
            f"γ rounds to 1 and the decay disappears; build it with retention.log_decays()."
        )
    if state is not None:
        batch, _, key_dim = q.shape[0], heads, q.shape[-1]
        expected = (batch, heads, key_dim, v.shape[-1])
        if not isinstance(state, RetentionState):
            raise ValueError(f"{fn}: state must be a RetentionState; got {type(state).__name__}.")
        if state.kv.shape != expected or state.count.shape != (batch,):
            raise ValueError(
                f"{fn}: state does not fit these inputs: expected kv {expected} and count ({batch},), "
                f"got kv {tuple(state.kv.shape)} and count {tuple(state.count.shape)}. Was it made "
                f"for another batch size or model config? Build one with init_state({batch}, {heads}, "
                f"{key_dim}, {v.shape[-1]})."
            )


def check_chunk_size(fn: str, chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise ValueError(f"{fn}: chunk_size must be a Python int >= 1; got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1; got {chunk_size}.")
    return int(chunk_size)


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def row_factors(positions, log_decay):
    """1/sqrt(c_n) for positions [...] → [..., H], from exponents only (no γ^n subtraction near 1).

    c_n = (1 − γ^(n+1)) / (1 − γ) = expm1((n+1)·log γ) / expm1(log γ); negative positions (pads) get c_0.
    """
    n = jnp.maximum(positions, 0).astype(log_decay.dtype)[..., None]
    log_c = jnp.log(-jnp.expm1((n + 1) * log_decay)) - jnp.log(-jnp.expm1(log_decay))
    return jnp.exp(-0.5 * log_c)


def _powers(exponents, log_decay):
    """γ^e for integer exponents e >= 0 [...] → [..., H]."""
    return jnp.exp(exponents.astype(log_decay.dtype)[..., None] * log_decay)


def _decayed_scores(q, k, log_decay, row_scale, acc, starts=None):
    """W_ij = (q_i · k_j) γ^(i−j) s_i for j ≤ i, else 0, inside each chunk: [B, G, C, H, K] → [B, G, H, C, S].

    s_i is the row factor (1/sqrt(c_n), or None). Low-precision inputs keep the raw scores in their own
    dtype (accumulated in float32 by the product) to halve the largest intermediate; the decay and row
    factors are applied in float32 and the result is returned in ``acc``. With ``starts`` [B, G, C] (the
    document starts inside each chunk) W_ij is also 0 where j lies before the start of i's document.
    """
    i = jnp.arange(q.shape[2])
    rel = i[:, None] - i[None, :]  # [C, S]
    if starts is None:
        exponent = jnp.where(rel >= 0, rel * log_decay[:, None, None], -jnp.inf)  # [H, C, S]
    else:
        # Keys of an earlier document are masked like future keys: −inf in the exponent, before the exp.
        seen = (rel >= 0) & (i >= documents.first_index(starts)[..., None])  # [B, G, C, S]
        exponent = jnp.where(seen[:, :, None], rel * log_decay[:, None, None], -jnp.inf)  # [B, G, H, C, S]
    scores = jnp.einsum("BGCHK,BGSHK->BGHCS", q, k, preferred_element_type=_intermediate(q.dtype, acc))
    weights = scores.astype(acc) * jnp.exp(exponent)
    if row_scale is not None:  # [B, G, C, H]
        weights = weights * jnp.moveaxis(row_scale, -1, 2)[..., None]
    return weights


def _intermediate(dtype, acc):
    """Dtype of the large intermediates: the input's own if it is below 32 bits, else the accumulator."""
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits < 32 else acc


def _chunk_updates(k, v, log_decay, acc, starts=None):
    """Σ_j γ^(C−1−j) k_jᵀ v_j for each chunk: [B, G, C, H, K|V] → [B, G, H, K, V] (acc).

    With ``starts`` [B, G, C] the sum runs over the chunk's last document only (j from its start on).
    """
    size = k.shape[2]
    if starts is None:
        k_decayed = (k * _powers(size - 1 - jnp.arange(size), log_decay)[..., None]).astype(k.dtype)
    else:
        j = jnp.arange(size)
        exponent = (size - 1 - j)[:, None] * log_decay  # [C, H]
        last = j >= documents.first_index(starts)[..., -1:]  # [B, G, C]: in the document open at the end
        exponent = jnp.where(last[..., None], exponent, -jnp.inf)  # [B, G, C, H]
        k_decayed = (k * jnp.exp(exponent)[..., None]).astype(k.dtype)
    return jnp.einsum("BGSHK,BGSHV->BGHKV", k_decayed, v, preferred_element_type=acc)


# Up to this many chunks, the states entering the chunks come from one product with a [G+1, G] decay
# matrix per head (no sequential loop); beyond it the O(G²) product costs more than a scan.
MATRIX_CARRY_MAX_CHUNKS = 64


def _carry_states(updates, kv, log_decay, size, resets=None):
    """States entering each chunk and after the last: S_g = γ^(C·g) S_0 + Σ_{f<g} γ^(C(g−1−f)) U_f.

    Args:
        updates: U [B, G, H, K, V]; kv: S_0 [B, H, K, V]; size: C.
        resets: [B, G] bool or None: chunk g holds a document start, so nothing that entered it reaches
            the state after it (that state is U_g alone).

    Returns:
        (states entering the chunks [B, G, H, K, V], final state [B, H, K, V]).
    """
    if resets is not None:
        return _carry_states_with_resets(updates, kv, log_decay, size, resets)
    groups = updates.shape[1]
    if groups > MATRIX_CARRY_MAX_CHUNKS:
        chunk_decay = jnp.exp(size * log_decay)[:, None, None]  # [H, 1, 1]

        def step(state, update):
            return chunk_decay * state + update, state

        final, before = jax.lax.scan(step, kv, jnp.moveaxis(updates, 1, 0))
        return jnp.moveaxis(before, 0, 1), final
    g = jnp.arange(groups + 1)
    rel = g[:, None] - 1 - jnp.arange(groups)[None, :]  # [G+1, F]
    exponent = jnp.where(rel >= 0, (rel * size) * log_decay[:, None, None], -jnp.inf)  # [H, G+1, F]
    states = jnp.einsum("HGF,BFHKV->BGHKV", jnp.exp(exponent), updates)
    states = states + _powers(g * size, log_decay)[None, :, :, None, None] * kv[:, None]
    return states[:, :groups], states[:, groups]


def _carry_states_with_resets(updates, kv, log_decay, size, resets):
    """``_carry_states`` where a chunk holding a document start cuts the carried state (the decay is 0)."""
    batch, groups = resets.shape
    if groups > MATRIX_CARRY_MAX_CHUNKS:

        def step(state, xs):
            update, reset = xs  # [B, H, K, V], [B]
            decay = jnp.exp(jnp.where(reset[:, None], -jnp.inf, size * log_decay))  # [B, H]
            return decay[..., None, None] * state + update, state

        final, before = jax.lax.scan(step, kv, (jnp.moveaxis(updates, 1, 0), jnp.moveaxis(resets, 1, 0)))
        return jnp.moveaxis(before, 0, 1), final
    g = jnp.arange(groups + 1)
    rel = g[:, None] - 1 - jnp.arange(groups)[None, :]  # [G+1, F]
    # Starts in chunks f+1 .. g−1 cut U_f off from S_g; a start in chunks 0 .. g−1 cuts S_0 off.
    counted = jnp.cumsum(resets.astype(jnp.int32), axis=1)  # [B, G]: chunks 0..g holding a start
    earlier = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), counted], axis=1)  # [B, G+1]: chunks < g
    reaches = (rel >= 0) & (earlier[:, :, None] == earlier[:, None, 1:])  # [B, G+1, F]
    exponent = (rel * size) * log_decay[:, None, None]  # [H, G+1, F]
    exponent = jnp.where(reaches[:, None], exponent, -jnp.inf)  # [B, H, G+1, F]
    states = jnp.einsum("BHGF,BFHKV->BGHKV", jnp.exp(exponent), updates)
    initial = jnp.where((earlier == 0)[..., None], (g * size)[:, None] * log_decay, -jnp.inf)  # [B, G+1, H]
    states = states + jnp.exp(initial)[..., None, None] * kv[:, None]
    return states[:, :groups], states[:, groups]


def _starts(fn, segment_ids, q):
    """Document starts [B, T] bool from segment ids, after checking them against q; None for None."""
    if segment_ids is None:
        return None
    documents.check_segment_ids(fn, segment_ids, q.shape[0], q.shape[1])
    return documents.document_starts(segment_ids)


def update_state(k, v, log_decay, state: RetentionState, *, segment_ids=None) -> RetentionState:
    """The state after consuming k, v [B, T, H, K|V] in one step: S ← γ^T S + Σ_j γ^(T−1−j) k_jᵀ v_j.

    This is how the parallel form hands a prompt over to recurrent decoding. With ``segment_ids`` [B, T]
    a row holding a document start keeps its last document only, and the count restarts with it.
    """
    check_inputs("update_state", k, k, v, log_decay, state)
    starts = _starts("update_state", segment_ids, k)
    acc = accumulator(k.dtype)
    log_decay = log_decay.astype(acc)
    size = k.shape[1]
    if starts is not None:
        update = _chunk_updates(k[:, None], v[:, None], log_decay, acc, starts[:, None])[:, 0]
        reset = jnp.any(starts, axis=1)  # [B]
        decay = jnp.exp(jnp.where(reset[:, None], -jnp.inf, size * log_decay))  # [B, H]
        kv = decay[..., None, None] * state.kv.astype(acc) + update
        return RetentionState(kv, documents.positions_from_starts(starts, state.count)[:, -1] + 1)
    update = _chunk_updates(k[:, None], v[:, None], log_decay, acc)[:, 0]
    kv = jnp.exp(size * log_decay)[:, None, None] * state.kv.astype(acc) + update
    return RetentionState(kv, state.count + size)


# ----------------------------------------------------------------------------------------------
# The three forms.


def parallel(q, k, v, log_decay, *, normalize: bool = True, segment_ids=None):
    """Parallel retention: O = ((Q Kᵀ) ⊙ D) V, positions counted from 0.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] float32.
        normalize: divide row n by sqrt(c_n) (normalized retention) or not.
        segment_ids: [B, T] integers or None; D is 0 across document starts and positions restart there.

    Returns:
        o: [B, T, H, V] in the input dtype.
    """
    check_inputs("parallel", q, k, v, log_decay, None)
    starts = _starts("parallel", segment_ids, q)
    acc = accumulator(q.dtype)
    log_decay = log_decay.astype(acc)
    if starts is not None:
        row_scale = None
        if normalize:  # [B, 1, T, H]: positions restart at each document start
            positions = documents.positions_from_starts(starts)  # [B, T]
            row_scale = row_factors(positions, log_decay)[:, None]
        weights = _decayed_scores(q[:, None], k[:, None], log_decay, row_scale, acc, starts[:, None])[:, 0]
        o = jnp.einsum("BHTS,BSHV->BTHV", weights.astype(v.dtype), v, preferred_element_type=acc)
        return o.astype(v.dtype)
    row_scale = row_factors(jnp.arange(q.shape[1]), log_decay)[None, None] if normalize else None
    weights = _decayed_scores(q[:, None], k[:, None], log_decay, row_scale, acc)[:, 0]  # [B, H, T, S]
    o = jnp.einsum("BHTS,BSHV->BTHV", weights.astype(v.dtype), v, preferred_element_type=acc)
    return o.astype(v.dtype)


def recurrent_step(q, k, v, log_decay, state: RetentionState, *, normalize: bool = True, reset=None):
    """One token of recurrent retention.

    Args:
        q, k: [B, H, K]; v: [B, H, V]; log_decay: [H] float32; state: ``RetentionState``.
        reset: [B] bool or None: in the rows where True this token starts a new document (the state is
            emptied before it, so it sits at position 0). One token has no segment ids to compare.

    Returns:
        (o [B, H, V] in the input dtype, the new state).
    """
    check_inputs("recurrent_step", q, k, v, log_decay, state, step=True)
    if reset is not None:
        if tuple(reset.shape) != (q.shape[0],):
            raise ValueError(
                f"recurrent_step: reset must have shape [B] = ({q.shape[0]},), one flag per row; "
                f"got shape {tuple(reset.shape)}."
            )
        state = reset_rows(state, reset.astype(bool))
    acc = accumulator(q.dtype)
    log_decay = log_decay.astype(acc)
    kv = jnp.exp(log_decay)[:, None, None] * state.kv.astype(acc)
    kv = kv + jnp.einsum("BHK,BHV->BHKV", k.astype(acc), v.astype(acc))
    o = jnp.einsum("BHK,BHKV->BHV", q.astype(acc), kv)
    if normalize:
        o = o * row_factors(state.count, log_decay)[..., None]
    return o.astype(v.dtype), RetentionState(kv, state.count + 1)


def recurrent(
    q, k, v, log_decay, *, state: RetentionState | None = None, normalize: bool = True, segment_ids=None
):
    """Recurrent retention over a sequence: ``recurrent_step`` under ``lax.scan``.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] float32; state: carried in (default empty).
        segment_ids: [B, T] integers or None; each document start resets the state (``reset`` of
            ``recurrent_step``). Position 0 continues ``state``.

    Returns:
        (o [B, T, H, V] in the input dtype, the state after the last token).
    """
    check_inputs("recurrent", q, k, v, log_decay, state)
    starts = _starts("recurrent", segment_ids, q)
    acc = accumulator(q.dtype)
    if state is None:
        state = init_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], acc)
    state = RetentionState(state.kv.astype(acc), state.count)

    def step(carry, xs):
        q_t, k_t, v_t, reset = xs  # reset: [B] or None (no segment ids)
        o, carry = recurrent_step(q_t, k_t, v_t, log_decay, carry, normalize=normalize, reset=reset)
        return carry, o

    # Upcast once outside the loop (each step works in the accumulator dtype anyway).
    time_major = [jnp.moveaxis(x, 1, 0).astype(acc) for x in (q, k, v)]  # [T, B, H, K|V]
    resets = None if starts is None else jnp.moveaxis(starts, 1, 0)  # [T, B]
    state, o = jax.lax.scan(step, state, (*time_major, resets))
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), state


def _chunks(q, k, v, log_decay, state, size, normalize, starts=None):
    """Chunkwise retention over T = G·size tokens, starting from ``state``.

    Per chunk, o = [W | Q̃] · [V ; S_g]: the decayed in-chunk scores W and the decayed queries
    Q̃_i = q_i γ^(i+1) (both with the row factor folded in) meet the chunk's values and entering state
    in one product, so the inner and cross terms never exist as separate float32 arrays.

    With ``starts`` [B, T] (True at document starts, position 0 included) W is masked across starts, the
    entering state reaches only the tokens before the chunk's first start, the chunk's update holds its
    last document only, and a chunk holding a start cuts the carried state.
    """
    batch, length, heads, _ = q.shape
    groups = length // size
    acc = state.kv.dtype
    qc, kc, vc = (x.reshape(batch, groups, size, heads, x.shape[-1]) for x in (q, k, v))
    local = None if starts is None else starts.reshape(batch, groups, size)  # [B, G, C]
    if starts is not None:
        positions = documents.positions_from_starts(starts, state.count)  # [B, T]
    row_scale = None
    if normalize:
        if starts is None:
            positions = state.count[:, None] + jnp.arange(length)  # [B, T]
        row_scale = row_factors(positions, log_decay).reshape(batch, groups, size, heads)

    weights = _decayed_scores(qc, kc, log_decay, row_scale, acc, local)  # [B, G, H, C, S]
    if local is None:
        q_decayed = qc * _powers(jnp.arange(1, size + 1), log_decay)[..., None]  # [B, G, C, H, K]
    else:
        exponent = jnp.arange(1, size + 1)[:, None] * log_decay  # [C, H]
        exponent = jnp.where(documents.continues(local)[..., None], exponent, -jnp.inf)  # [B, G, C, H]
        q_decayed = qc * jnp.exp(exponent)[..., None]  # [B, G, C, H, K]
    if row_scale is not None:
        q_decayed = q_decayed * row_scale[..., None]
    updates = _chunk_updates(kc, vc, log_decay, acc, local)  # [B, G, H, K, V]
    resets = None if local is None else jnp.any(local, axis=-1)  # [B, G]
    before, kv_final = _carry_states(updates, state.kv, log_decay, size, resets)

    low = v.dtype
    lhs = jnp.concatenate([weights.astype(low), jnp.swapaxes(q_decayed, 2, 3).astype(low)], -1)
    rhs = jnp.concatenate([jnp.swapaxes(vc, 2, 3), before.astype(low)], -2)  # [B, G, H, S+K, V]
    o = jnp.einsum("BGHCX,BGHXV->BGCHV", lhs, rhs, preferred_element_type=acc)
    o = o.reshape(batch, length, heads, -1).astype(v.dtype)
    return o, RetentionState(kv_final, state.count + length if starts is None else positions[:, -1] + 1)


def chunkwise(
    q,
    k,
    v,
    log_decay,
    *,
    chunk_size: int,
    state: RetentionState | None = None,
    normalize: bool = True,
    segment_ids=None,
):
    """Chunkwise recurrent retention: parallel inside chunks, a ``lax.scan`` over chunks carrying S.

    Any T >= 1 works: the whole chunks go through the scan and a last partial chunk is computed with its
    true length, so the final state equals the recurrent one exactly.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] float32.
        chunk_size: C >= 1, a Python int.
        state: carried in (default empty); its count sets the absolute positions.
        normalize: divide row n by sqrt(c_n) or not.
        segment_ids: [B, T] integers or None; the state is emptied and positions restart at each
            document start, wherever it falls in a chunk (several per chunk are fine). Position 0
            continues ``state``.

    Returns:
        (o [B, T, H, V] in the input dtype, the state after the last token).
    """
    check_inputs("chunkwise", q, k, v, log_decay, state)
    size = check_chunk_size("chunkwise", chunk_size)
    starts = _starts("chunkwise", segment_ids, q)
    acc = accumulator(q.dtype)
    if state is None:
        state = init_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], acc)
    state = RetentionState(state.kv.astype(acc), state.count)
    log_decay = log_decay.astype(acc)

    length = q.shape[1]
    whole = (length // size) * size
    outputs = []
    if whole:
        head = None if starts is None else starts[:, :whole]
        o, state = _chunks(q[:, :whole], k[:, :whole], v[:, :whole], log_decay, state, size, normalize, head)
        outputs.append(o)
    if whole < length:
        rest = length - whole
        tail = None if starts is None else starts[:, whole:]  # may start a document at its position 0
        o, state = _chunks(q[:, whole:], k[:, whole:], v[:, whole:], log_decay, state, rest, normalize, tail)
        outputs.append(o)
    o = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
    return o, state


def forward_flops(seq_len: int, heads: int, key_dim: int, value_dim: int, chunk_size: int | None) -> float:
    """Forward FLOPs per token of retention itself (the matrix products executed, 2 per multiply-add).

    Parallel (``chunk_size`` None): Q Kᵀ and (·)V over the whole T×T score matrix. Chunkwise: the same
    inside chunks of C, plus the state update and the cross-chunk product (2·K·V each).
    """
    span = seq_len if not chunk_size else min(chunk_size, seq_len)
    flops = 2 * span * heads * (key_dim + value_dim)
    if chunk_size:
        flops += 2 * 2 * heads * key_dim * value_dim
    return float(flops)
