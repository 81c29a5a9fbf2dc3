"""Packed documents: a row with document resets equals each document run alone.

Every retention form (outputs, final states, gradients) against the reference, which cuts the rows into
documents and runs each alone; attention (causal and cached) against each document alone; the helpers
(document positions, starts) on worked examples. Tolerances: tests/helpers.py (float64 1e-12, float32
1e-5 relative; gradients 2e-5 in float32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import retention
from retnet_jax.ops import attention, dispatch, documents, reference, rotation
from retnet_jax.ops import retention as ops_retention
from tests.helpers import FORM_RTOL, GRAD_RTOL, random_inputs, relative_error

parallel = jax.jit(retention.parallel, static_argnames="normalize")
recurrent = jax.jit(retention.recurrent, static_argnames="normalize")
chunkwise = jax.jit(retention.chunkwise, static_argnames=("chunk_size", "normalize"))
update_state = jax.jit(retention.update_state)
recurrent_step = jax.jit(retention.recurrent_step)
causal_attention = jax.jit(attention.causal_attention, static_argnames="implementation")
cached_attention = jax.jit(attention.cached_attention)


def _reference(q, k, v, log_decay, kv=None, **options):
    """``reference.retention`` compiled as one program (op by op, every document's slices and each
    document length compile apart)."""
    return jax.jit(functools.partial(reference.retention, **options))(q, k, v, log_decay, kv=kv)


def _ids(*lengths):
    """Segment ids of documents of these lengths, back to back (ids 1, 2, ...)."""
    return np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])


# Rows of T = 16. With C = 4: row 0 has a document of exactly one chunk, then three starts inside
# chunk 1 (at its position 0, 2 and 3: documents shorter than a chunk, one of a single token), then a
# document spanning chunks 1..3. Row 1: ids that come back ([1, 2, 1]: three documents, starts at 5 and
# 11, not on chunk boundaries). Row 2: one document (no reset).
LAYOUTS = np.stack(
    [
        _ids(4, 2, 1, 9),
        np.concatenate([np.full(5, 1), np.full(6, 2), np.full(5, 1)]).astype(np.int32),
        np.full(16, 7, np.int32),
    ]
)
# C = 1 (every token a chunk), 3 (a partial last chunk), 4 (starts on chunk boundaries), T (one chunk).
CHUNKS = (1, 3, 4, 16)


@pytest.fixture(params=["float64", "float32"])
def dtype(request):
    if request.param == "float64":
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


def _last_document_length(segment_ids):
    """The count after a call without incoming state: the length of each row's last document."""
    ids = np.asarray(segment_ids)
    return [len(row) - 1 - max([0, *np.flatnonzero(row[1:] != row[:-1]) + 1]) + 1 for row in ids]


def _inputs(dtype, seed, segment_ids, heads=2, key_dim=4, value_dim=6):
    rng = np.random.default_rng(seed)
    batch, length = segment_ids.shape
    return random_inputs(rng, batch, length, heads, key_dim, value_dim, dtype), rng


@pytest.mark.parametrize("normalize", [True, False])
def test_packed_forms_equal_each_document_alone(dtype, normalize):
    (q, k, v), _ = _inputs(dtype, 0, LAYOUTS)
    log_decay = retention.log_decays(2)
    o_ref, kv_ref = _reference(q, k, v, log_decay, normalize=normalize, segment_ids=LAYOUTS)
    ids = jnp.asarray(LAYOUTS)
    counts = _last_document_length(LAYOUTS)
    assert counts == [9, 5, 16]
    tol = FORM_RTOL[dtype]

    assert relative_error(parallel(q, k, v, log_decay, normalize=normalize, segment_ids=ids), o_ref) < tol
    results = {"recurrent": recurrent(q, k, v, log_decay, normalize=normalize, segment_ids=ids)}
    for chunk in CHUNKS:
        results[f"chunkwise C={chunk}"] = chunkwise(
            q, k, v, log_decay, chunk_size=chunk, normalize=normalize, segment_ids=ids
        )
    for name, (o, s) in results.items():
        assert o.dtype == jnp.dtype(dtype) and s.kv.dtype == jnp.dtype(dtype)
        assert relative_error(o, o_ref) < tol, name
        assert relative_error(s.kv, kv_ref) < tol, name
        np.testing.assert_array_equal(s.count, counts, err_msg=name)
    empty = retention.init_state(3, 2, 4, 6, jnp.dtype(dtype))
    s = update_state(k, v, log_decay, empty, segment_ids=ids)
    assert relative_error(s.kv, kv_ref) < tol
    np.testing.assert_array_equal(s.count, counts)


def test_reference_split_equals_fast_forms_run_per_document():
    """The reference's cutting itself: the packed forms equal the unpacked forms called per document."""
    (q, k, v), _ = _inputs("float32", 1, LAYOUTS[:1])
    log_decay = retention.log_decays(2)
    o, s = chunkwise(q, k, v, log_decay, chunk_size=4, segment_ids=jnp.asarray(LAYOUTS[:1]))
    begin = 0
    for length in (4, 2, 1, 9):
        piece = slice(begin, begin + length)
        o_alone, s_alone = chunkwise(q[:, piece], k[:, piece], v[:, piece], log_decay, chunk_size=4)
        assert relative_error(o[:, piece], o_alone) < FORM_RTOL["float32"]
        begin += length
    assert relative_error(s.kv, s_alone.kv) < FORM_RTOL["float32"]


def test_many_chunks_carry_resets_through_the_scan(dtype):
    """More chunks than MATRIX_CARRY_MAX_CHUNKS: the state is carried by the scan, with resets."""
    ids = np.stack([_ids(3, 30, 1, 36), _ids(64, 6)])
    (q, k, v), _ = _inputs(dtype, 2, ids)
    log_decay = retention.log_decays(2)
    o_ref, kv_ref = _reference(q, k, v, log_decay, segment_ids=ids)
    assert ids.shape[1] > ops_retention.MATRIX_CARRY_MAX_CHUNKS
    o, s = chunkwise(q, k, v, log_decay, chunk_size=1, segment_ids=jnp.asarray(ids))
    assert relative_error(o, o_ref) < FORM_RTOL[dtype]
    assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype]
    np.testing.assert_array_equal(s.count, [36, 6])


@pytest.mark.parametrize("normalize", [True, False])
def test_incoming_state_continues_the_first_document(dtype, normalize):
    """With a state at position 6: the first document continues it, later ones start empty at 0."""
    (q, k, v), rng = _inputs(dtype, 3, LAYOUTS)
    kv0 = np.asarray(rng.standard_normal((3, 2, 4, 6)), dtype)
    start = 6
    log_decay = retention.log_decays(2)
    o_ref, kv_ref = _reference(
        q, k, v, log_decay, kv=kv0, start=start, normalize=normalize, segment_ids=LAYOUTS
    )
    state = retention.RetentionState(jnp.asarray(kv0), jnp.full((3,), start, jnp.int32))
    ids = jnp.asarray(LAYOUTS)
    counts = [9, 5, 16 + start]
    results = {"recurrent": recurrent(q, k, v, log_decay, state=state, normalize=normalize, segment_ids=ids)}
    for chunk in CHUNKS:
        results[f"chunkwise C={chunk}"] = chunkwise(
            q, k, v, log_decay, chunk_size=chunk, state=state, normalize=normalize, segment_ids=ids
        )
    for name, (o, s) in results.items():
        assert relative_error(o, o_ref) < FORM_RTOL[dtype], name
        assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype], name
        np.testing.assert_array_equal(s.count, counts, err_msg=name)
    s = update_state(k, v, log_decay, state, segment_ids=ids)
    assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype]
    np.testing.assert_array_equal(s.count, counts)


def test_reset_at_position_zero(dtype):
    """A call carrying a state starts a new document at its position 0 in the rows the caller empties.

    Row 0 is reset (equal to running the call from nothing), row 1 continues its state; position 0 never
    counts as a change on its own, whatever the ids there.
    """
    ids = np.stack([_ids(5, 6), _ids(1, 10)])  # row 1: a one-token end of the carried document
    (q, k, v), rng = _inputs(dtype, 4, ids)
    kv0 = np.asarray(rng.standard_normal((2, 2, 4, 6)), dtype)
    log_decay = retention.log_decays(2)
    state = retention.RetentionState(jnp.asarray(kv0), jnp.array([9, 9], jnp.int32))
    state = retention.reset_rows(state, jnp.array([True, False]))
    np.testing.assert_array_equal(state.count, [0, 9])
    fresh = _reference(q[:1], k[:1], v[:1], log_decay, segment_ids=ids[:1])
    carried = _reference(q[1:], k[1:], v[1:], log_decay, kv=kv0[1:], start=9, segment_ids=ids[1:])
    o_ref, kv_ref = (jnp.concatenate(parts) for parts in zip(fresh, carried, strict=True))
    segment_ids = jnp.asarray(ids)
    results = {"recurrent": recurrent(q, k, v, log_decay, state=state, segment_ids=segment_ids)}
    for chunk in (1, 4, 11):
        results[f"chunkwise C={chunk}"] = chunkwise(
            q, k, v, log_decay, chunk_size=chunk, state=state, segment_ids=segment_ids
        )
    for name, (o, s) in results.items():
        assert relative_error(o, o_ref) < FORM_RTOL[dtype], name
        assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype], name
        np.testing.assert_array_equal(s.count, [6, 10], err_msg=name)

    # One token at a time: recurrent_step's reset flag, raised where the ids change (and at 0 in row 0).
    steps, s = [], retention.RetentionState(jnp.asarray(kv0), jnp.array([9, 9], jnp.int32))
    starts = np.array(documents.document_starts(segment_ids))
    starts[0, 0] = True
    for t in range(ids.shape[1]):
        o_t, s = recurrent_step(q[:, t], k[:, t], v[:, t], log_decay, s, reset=starts[:, t])
        steps.append(o_t)
    assert relative_error(jnp.stack(steps, 1), o_ref) < FORM_RTOL[dtype]
    assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype]
    np.testing.assert_array_equal(s.count, [6, 10])


def test_gradients_equal_reference(dtype):
    """Through every form with resets, an incoming state and its final state; C = 3 puts starts at
    chunk positions 0, 1 and 2 and leaves a partial last chunk."""
    chunk = 3
    (q, k, v), rng = _inputs(dtype, 5 + chunk, LAYOUTS)
    kv0 = np.asarray(rng.standard_normal((3, 2, 4, 6)), dtype)
    w_o = jnp.asarray(rng.standard_normal(v.shape), dtype)
    w_s = jnp.asarray(rng.standard_normal(kv0.shape), dtype)
    log_decay = retention.log_decays(2)
    ids = jnp.asarray(LAYOUTS)

    def grads(form, with_state):
        def loss(q, k, v, kv):
            o, kv_final = form(q, k, v, kv)
            return jnp.sum(o * w_o) + (jnp.sum(kv_final * w_s) if with_state else 0.0)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, kv0)

    def state(kv):
        return retention.RetentionState(kv, jnp.full((3,), 2, jnp.int32))

    def ref(q, k, v, kv):
        return reference.retention(q, k, v, log_decay, kv=kv, start=2, segment_ids=LAYOUTS)

    def chunked(q, k, v, kv):
        o, s = retention.chunkwise(q, k, v, log_decay, chunk_size=chunk, state=state(kv), segment_ids=ids)
        return o, s.kv

    def recurrent_form(q, k, v, kv):
        o, s = retention.recurrent(q, k, v, log_decay, state=state(kv), segment_ids=ids)
        return o, s.kv

    def parallel_form(q, k, v, kv):
        return retention.parallel(q, k, v, log_decay, segment_ids=ids), kv

    def ref_from_empty(q, k, v, kv):
        return reference.retention(q, k, v, log_decay, segment_ids=LAYOUTS)[0], kv

    want = grads(ref, True)
    for name, form in (("chunkwise", chunked), ("recurrent", recurrent_form)):
        for got, expected in zip(grads(form, True), want, strict=True):
            assert relative_error(got, expected) < GRAD_RTOL[dtype], name
    want = grads(ref_from_empty, False)[:3]
    for got, expected in zip(grads(parallel_form, False)[:3], want, strict=True):
        assert relative_error(got, expected) < GRAD_RTOL[dtype], "parallel"


def test_one_document_per_row_equals_no_segment_ids():
    (q, k, v), _ = _inputs("float32", 6, LAYOUTS)
    log_decay = retention.log_decays(2)
    ids = jnp.zeros(q.shape[:2], jnp.int32)
    o, s = chunkwise(q, k, v, log_decay, chunk_size=4, segment_ids=ids)
    o_plain, s_plain = chunkwise(q, k, v, log_decay, chunk_size=4)
    assert relative_error(o, o_plain) < FORM_RTOL["float32"]
    assert relative_error(s.kv, s_plain.kv) < FORM_RTOL["float32"]
    assert relative_error(parallel(q, k, v, log_decay, segment_ids=ids), o_plain) < FORM_RTOL["float32"]


def test_document_positions():
    ids = jnp.array([[3, 3, 3, 1, 1, 4, 3, 3], [0, 5, 5, 5, 5, 5, 5, 5], [2] * 8])
    np.testing.assert_array_equal(
        retention.document_positions(ids),
        [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7]],
    )
    # The incoming count moves the first document only (negative: left pads).
    np.testing.assert_array_equal(
        retention.document_positions(ids, jnp.array([10, -2, 4], jnp.int32)),
        [[10, 11, 12, 0, 1, 0, 0, 1], [-2, 0, 1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8, 9, 10, 11]],
    )
    starts = documents.document_starts(ids)
    assert not bool(starts[:, 0].any())  # position 0 is never a start
    np.testing.assert_array_equal(starts[0], [0, 0, 0, 1, 0, 1, 1, 0])


def test_auto_off_the_accelerators_runs_the_xla_form_with_resets():
    """The kernels reset too (tests/ops/test_gpu_resets.py, test_tpu_chunk_retention.py); on a CPU
    "auto" runs the XLA form, segment ids included."""
    (q, k, v), _ = _inputs("float32", 7, LAYOUTS)
    log_decay = retention.log_decays(2)
    ids = jnp.asarray(LAYOUTS)
    through = jax.jit(dispatch.chunkwise, static_argnames=("chunk_size", "implementation"))
    o_auto, _ = through(q, k, v, log_decay, chunk_size=4, segment_ids=ids, implementation="auto")
    o_xla, _ = chunkwise(q, k, v, log_decay, chunk_size=4, segment_ids=ids)
    np.testing.assert_array_equal(o_auto, o_xla)


@pytest.mark.parametrize(
    "segment_ids,match",
    [
        (np.zeros((3, 15), np.int32), r"segment_ids must have shape \[B, T\] = \(3, 16\)"),
        (np.zeros((3, 16), np.float32), "segment_ids must be integers"),
    ],
)
def test_bad_segment_ids_are_named(segment_ids, match):
    (q, k, v), _ = _inputs("float32", 8, LAYOUTS)
    log_decay = retention.log_decays(2)
    with pytest.raises(ValueError, match=match):
        retention.chunkwise(q, k, v, log_decay, chunk_size=4, segment_ids=segment_ids)
    with pytest.raises(ValueError, match=match):
        retention.parallel(q, k, v, log_decay, segment_ids=segment_ids)
    with pytest.raises(ValueError, match=match):
        causal_attention(q, k, q, "xla", segment_ids=segment_ids)
    state = retention.init_state(3, 2, 4, 6)
    with pytest.raises(ValueError, match=r"reset must have shape \[B\] = \(3,\)"):
        retention.recurrent_step(q[:, 0], k[:, 0], v[:, 0], log_decay, state, reset=jnp.zeros((2,), bool))


# ----------------------------------------------------------------------------------------------
# Attention: packed with segment ids and rotated by document positions = each document alone.


def _attention_inputs(dtype, seed, segment_ids, heads=2, head_dim=8):
    rng = np.random.default_rng(seed)
    shape = (*segment_ids.shape, heads, head_dim)
    return tuple(np.asarray(rng.standard_normal(shape), dtype) for _ in range(3))


def _documents(ids):
    """(begin, end) of each document of one row of segment ids."""
    cuts = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1), len(ids)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@jax.jit
def _rotated(x, positions):
    return rotation.rotate(x, positions, "rotate_half")


def test_causal_attention_packed_equals_each_document_alone(dtype):
    q, k, v = _attention_inputs(dtype, 9, LAYOUTS)
    ids = jnp.asarray(LAYOUTS)
    positions = retention.document_positions(ids)  # [B, T]
    o = causal_attention(_rotated(q, positions), _rotated(k, positions), v, "xla", segment_ids=ids)
    assert o.dtype == jnp.dtype(dtype)
    pieces = [
        (row, slice(begin, end)) for row in range(LAYOUTS.shape[0]) for begin, end in _documents(LAYOUTS[row])
    ]

    @jax.jit  # every document alone, in one program (op by op, each length compiles apart)
    def alone(q, k, v):
        def one(piece):
            at = np.arange(piece[1].stop - piece[1].start)
            return attention.causal_attention(
                _rotated(q[piece][None], at), _rotated(k[piece][None], at), v[piece][None], "xla"
            )

        return [one(piece) for piece in pieces]

    for piece, want in zip(pieces, alone(q, k, v), strict=True):
        assert relative_error(o[piece][None], want) < FORM_RTOL[dtype], piece


def test_cached_attention_packed_equals_each_document_alone(dtype):
    """A cache of 5 tokens; the call holds the cached document's last tokens, then new documents."""
    cached_len, length = 5, 16
    layout = LAYOUTS[:2]
    q, k, v = _attention_inputs(dtype, 10, layout)
    k_old, v_old = _attention_inputs(dtype, 11, np.zeros((2, cached_len), np.int32))[:2]
    batch, _, heads, head_dim = q.shape
    capacity = cached_len + length + 3
    k_cache = np.zeros((batch, heads, capacity, head_dim), dtype)
    v_cache = np.zeros_like(k_cache)
    k_cache[:, :, :cached_len] = np.swapaxes(_rotated(k_old, np.arange(cached_len)), 1, 2)
    v_cache[:, :, :cached_len] = np.swapaxes(v_old, 1, 2)
    ids = jnp.asarray(layout)
    slots = cached_len + jnp.broadcast_to(jnp.arange(length), (batch, length))  # cache slots
    rotate_at = retention.document_positions(ids, jnp.full((batch,), cached_len, jnp.int32))
    o = cached_attention(
        _rotated(q, rotate_at), _rotated(k, rotate_at), v, k_cache, v_cache, slots, segment_ids=ids
    )
    # (row, tokens, whether it is the row's first document)
    pieces = [
        (row, slice(begin, end), index == 0)
        for row in range(batch)
        for index, (begin, end) in enumerate(_documents(layout[row]))
    ]

    @jax.jit  # every document alone, in one program (op by op, each length compiles apart)
    def alone(q, k, v, k_cache, v_cache):
        def one(row, tokens, first):
            piece = (row, tokens)
            # The first document continues the cached one (positions 5, 6, ...); each later one is a
            # call of its own, over an empty cache from position 0.
            at = (cached_len if first else 0) + np.arange(tokens.stop - tokens.start)[None]
            cache = (k_cache, v_cache) if first else (jnp.zeros_like(k_cache), jnp.zeros_like(v_cache))
            return attention.cached_attention(
                _rotated(q[piece][None], at),
                _rotated(k[piece][None], at),
                v[piece][None],
                *(c[row : row + 1] for c in cache),
                jnp.asarray(at),
            )

        return [one(*piece) for piece in pieces]

    for (row, tokens, _), want in zip(pieces, alone(q, k, v, k_cache, v_cache), strict=True):
        assert relative_error(o[row, tokens][None], want) < FORM_RTOL[dtype], (row, tokens)
