"""Packed documents through the fused GPU kernels (Pallas interpreter on the CPU), in float32.

Both kernel families with document starts against the reference, which runs each document alone:
outputs, final states and the gradients of q, k, v, log γ and the incoming state, at C = 16 over rows
that hold documents shorter than a chunk, of one token, of exactly a chunk, spanning chunks, several
starts in one chunk, starts on chunk boundaries, a partial last chunk, a row without starts and a row
reset at position 0. Then ``chunkwise(implementation="pallas", segment_ids=...)`` against the XLA form
(normalized and not, with an incoming state), what "auto" takes, a device mesh, and the lowering to
Triton. Tolerances: tests/helpers.py (float32: forms 1e-5, gradients 2e-5 relative).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from retnet_jax import retention
from retnet_jax.ops import dispatch, documents, reference
from retnet_jax.ops.gpu import chunk_retention, fused, split_retention
from retnet_jax.ops.gpu import plan as plan_lib
from tests.helpers import FORM_RTOL, GRAD_RTOL, random_inputs, relative_error

CHUNK = 16


def _ids(*lengths):
    """Segment ids of documents of these lengths, back to back (ids 1, 2, ...)."""
    return np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])


# T = 40 at C = 16: chunks 0..15, 16..31 and a partial last chunk 32..39.
# Row 0: a document of exactly one chunk, then starts at 16 (a chunk boundary), 19 (a one-token
#        document) and 20 inside chunk 1, and at 32 (a boundary: the partial chunk is a document).
# Row 1: the carried document ends at 4; a document spanning all three chunks; a start in the partial one.
# Row 2: no start: the incoming state flows through the whole row.
# Row 3: starts at 2, 3, 4, 5 (documents of one and two tokens) and, given as ``starts`` to the kernels,
#        a reset at position 0 too (the incoming state is not seen).
LAYOUTS = np.stack([_ids(16, 3, 1, 12, 8), _ids(5, 30, 5), np.full(40, 3, np.int32), _ids(2, 1, 1, 1, 35)])
RESET_AT_ZERO = np.array([False, False, False, True])


def _inputs(seed, batch, heads, key_dim, value_dim, length=40):
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(x) for x in random_inputs(rng, batch, length, heads, key_dim, value_dim, "float32")
    )
    kv = jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32)
    return q, k, v, kv, rng


# (family, K, V, tiles): the register family with the whole state in one program (one dk-dv pass) and
# in tiles (separate dq, dk, dv passes); the split family with K, V padded to its tiles, its scores
# recomputed per tile or stored once (then 2 key and 2 value tiles: every scores pass loops).
CASES = [
    ("register", 16, 24, None),
    ("register", 32, 32, chunk_retention.Tiles(key=16, value=16)),
    ("split", 16, 24, split_retention.Tiles(16, 16)),
    ("split", 32, 24, split_retention.Tiles(16, 16, stored_scores=True)),
]


def _case_id(case):
    family, key_dim, value_dim, tiles = case
    kind = "stored" if getattr(tiles, "stored_scores", False) else "tiled" if tiles else "whole"
    return f"{family}-K{key_dim}V{value_dim}-{kind}"


@jax.jit
def _reference_outputs_and_grads(q, k, v, log_decay, h0, do, dht):
    """The reference's (o, final state) over LAYOUTS, each document alone, and the gradients of <o, do> +
    <final state, dht>, compiled once per shape (op by op, its gradient compiles every operation anew)."""
    keep = jnp.asarray(~RESET_AT_ZERO, jnp.float32)[:, None, None, None]

    def loss(q, k, v, log_decay, h0):
        # A reset at position 0 is the same row from an empty state (h0 gets no gradient there).
        o, ht = reference.retention(q, k, v, log_decay, kv=h0 * keep, normalize=False, segment_ids=LAYOUTS)
        return jnp.vdot(o, do) + jnp.vdot(ht, dht), (o, ht)

    (_, outputs), grads = jax.value_and_grad(loss, range(5), has_aux=True)(q, k, v, log_decay, h0)
    return outputs, grads


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels_with_resets_equal_each_document_alone(case):
    family, key_dim, value_dim, tiles = case
    batch, heads = LAYOUTS.shape[0], 2
    q, k, v, h0, rng = _inputs(key_dim + value_dim, batch, heads, key_dim, value_dim)
    do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    dht = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    log_decay = retention.log_decays(heads, "linspace")
    plan = plan_lib.make(key_dim, value_dim, CHUNK, jnp.float32, family=family, tiles=tiles)
    assert isinstance(plan, plan_lib.Plan) and plan.family == family and plan.tiles == (tiles or plan.tiles)
    starts = np.array(documents.document_starts(jnp.asarray(LAYOUTS)))
    starts[:, 0] = RESET_AT_ZERO

    def fused_loss(*args):
        o, ht = fused.chunk_retention(*args, starts=jnp.asarray(starts), plan=plan, interpret=True)
        return jnp.vdot(o, do) + jnp.vdot(ht, dht), (o, ht)

    args = (q, k, v, log_decay, h0)
    (_, got), grads = jax.jit(jax.value_and_grad(fused_loss, range(5), has_aux=True))(*args)
    want, expected = _reference_outputs_and_grads(*args, do, dht)
    for name, g, e in zip(("o", "final state"), got, want, strict=True):
        assert relative_error(g, e) < FORM_RTOL["float32"], name
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay", "dh0"), grads, expected, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name
    assert not np.any(grads[4][RESET_AT_ZERO])  # the row reset at position 0 never saw h0


@pytest.mark.parametrize("family, normalize", [("register", True), ("split", False)])
def test_chunkwise_pallas_with_segment_ids_equals_xla(family, normalize, monkeypatch):
    """implementation="pallas" with segment ids and a carried state (its count restarts at each start)
    equals the XLA form: outputs, final states and counts, gradients; and the reference's outputs. The
    toy heads take the register kernels; for "split" the register family's size limit is lowered."""
    if family == "split":
        monkeypatch.setattr(chunk_retention, "STATE_TILE_ENTRIES", 8)
    batch, heads, key_dim, value_dim = LAYOUTS.shape[0], 2, 16, 24
    assert dispatch.kernel_plan("f", "pallas", key_dim, value_dim, CHUNK, jnp.float32).family == family
    q, k, v, kv, rng = _inputs(7, batch, heads, key_dim, value_dim)
    start = 6
    count = jnp.full((batch,), start, jnp.int32)
    log_decay = retention.log_decays(heads)
    do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    ids = jnp.asarray(LAYOUTS)

    def run(impl):
        def loss(q, k, v, kv):
            o, new = retention.chunkwise(
                q,
                k,
                v,
                log_decay,
                chunk_size=CHUNK,
                state=retention.RetentionState(kv, count),
                normalize=normalize,
                implementation=impl,
                segment_ids=ids,
            )
            return jnp.vdot(o, do) + jnp.sum(new.kv**2), (o, new)

        return jax.jit(jax.value_and_grad(loss, range(4), has_aux=True))(q, k, v, kv)

    (_, (o_x, s_x)), g_x = run("xla")
    (_, (o_p, s_p)), g_p = run("pallas")
    packed_reference = functools.partial(
        reference.retention, start=start, normalize=normalize, segment_ids=LAYOUTS
    )
    o_ref, kv_ref = jax.jit(packed_reference)(q, k, v, log_decay, kv=kv)  # one program, not one a document
    assert relative_error(o_p, o_ref) < FORM_RTOL["float32"]
    assert relative_error(s_p.kv, kv_ref) < FORM_RTOL["float32"]
    assert relative_error(o_p, o_x) < FORM_RTOL["float32"]
    assert relative_error(s_p.kv, s_x.kv) < FORM_RTOL["float32"]
    np.testing.assert_array_equal(s_p.count, [8, 5, 40 + start, 35])
    np.testing.assert_array_equal(s_p.count, s_x.count)
    for name, a, b in zip(("dq", "dk", "dv", "dkv"), g_p, g_x, strict=True):
        assert relative_error(a, b) < GRAD_RTOL["float32"], name


def test_auto_takes_the_kernels_with_segment_ids(monkeypatch):
    """On a GPU "auto" runs the kernels for a head shape it sends there, segment ids or not; on a TPU the
    XLA form (the TPU kernels do not reset). Checked by standing in for the kernel call."""
    calls = []

    def spy(q, k, v, log_decay, plan, state, normalize, segment_ids=None):
        calls.append((plan, segment_ids))
        return jnp.zeros_like(v), retention.init_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3])

    monkeypatch.setattr(dispatch, "fused_chunkwise", spy)
    q = jnp.zeros((2, 32, 1, 128), jnp.bfloat16)
    ids = jnp.asarray(np.stack([_ids(10, 22), _ids(32)]))
    log_decay = retention.log_decays(1)

    def auto(q, segment_ids):
        return dispatch.chunkwise(
            q, q, q, log_decay, chunk_size=64, implementation="auto", segment_ids=segment_ids
        )

    assert dispatch.AUTO_CHOICES[(128, 128)].implementation == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for segment_ids in (None, ids):  # traced only: the stand-in runs nothing
        jax.eval_shape(functools.partial(auto, segment_ids=segment_ids), q)
    # B·H = 2 rows: the split kernels (plan.MIN_REGISTER_PROGRAMS).
    assert [plan for plan, _ in calls] == [plan_lib.make(128, 128, 64, jnp.bfloat16, family="split")] * 2
    assert calls[0][1] is None and calls[1][1] is not None
    calls.clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    jax.eval_shape(functools.partial(auto, segment_ids=ids), q)
    assert calls == []


def test_sharded_with_segment_ids_equals_unsharded():
    """Under a mesh of 8 devices (batch over 4, heads over 2) the segment ids are sharded like the
    batch: the same outputs, final state and gradients as on one device, and no operand is gathered."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    mesh = jax.make_mesh((4, 2), ("batch", "heads"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v, kv, _ = _inputs(5, 4, 2, 16, 32)
    ids = jnp.asarray(LAYOUTS)
    log_decay = retention.log_decays(2)

    def loss(q, k, v, kv, ids):
        state = retention.RetentionState(kv, jnp.full((4,), 3, jnp.int32))
        o, new = retention.chunkwise(
            q, k, v, log_decay, chunk_size=16, state=state, implementation="pallas", segment_ids=ids
        )
        return jnp.sum(o**2) + jnp.sum(new.kv), (o, new.kv)

    step = jax.jit(jax.value_and_grad(loss, range(4), has_aux=True))
    (_, (o, kv_final)), grads = step(q, k, v, kv, ids)
    seq, state, rows = (
        PartitionSpec("batch", None, "heads"),
        PartitionSpec("batch", "heads"),
        PartitionSpec("batch"),
    )
    with jax.set_mesh(mesh):
        put = [
            jax.device_put(x, NamedSharding(mesh, s))
            for x, s in zip((q, k, v, kv, ids), (seq, seq, seq, state, rows), strict=True)
        ]
        hlo = step.lower(*put).compile().as_text()
        (_, (o_sharded, kv_sharded)), grads_sharded = step(*put)
    assert "all-gather" not in hlo
    assert tuple(o_sharded.sharding.spec)[:3] == tuple(seq)
    assert relative_error(o_sharded, o) < FORM_RTOL["float32"]
    assert relative_error(kv_sharded, kv_final) < FORM_RTOL["float32"]
    for g, e in zip(grads_sharded, grads, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"]


def test_kernels_with_resets_lower_to_triton():
    """Forward and backward of both families (the split family in both variants) with document starts
    lower through Pallas's Triton backend (to Triton IR, on the CPU) at preset heads, bf16."""
    for heads, key_dim, value_dim, family, stored in (
        (8, 256, 512, "split", False),
        (8, 256, 512, "split", True),
        (4, 128, 128, "register", False),
    ):
        plan = plan_lib.make(key_dim, value_dim, 64, jnp.bfloat16, stored_scores=stored)
        assert plan.family == family and (family == "register" or plan.tiles.stored_scores == stored), plan
        q = jnp.zeros((1, 100, heads, key_dim), jnp.bfloat16)
        v = jnp.zeros((1, 100, heads, value_dim), jnp.bfloat16)
        h0 = jnp.zeros((1, heads, key_dim, value_dim), jnp.float32)
        starts = jnp.zeros((1, 100), bool).at[0, 30].set(True)

        def loss(q, k, v, log_decay, h0, plan=plan, starts=starts):
            o, ht = fused.chunk_retention(q, k, v, log_decay, h0, starts=starts, plan=plan)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)

        grad = jax.jit(jax.grad(loss, range(5)))
        text = (
            grad.trace(q, q, v, retention.log_decays(heads), h0).lower(lowering_platforms=("cuda",)).as_text()
        )
        assert "__gpu$xla.gpu.triton" in text


def test_bad_starts_are_named():
    q = jnp.zeros((1, 20, 1, 16), jnp.float32)
    plan = plan_lib.make(16, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"starts must have shape \[B, T\] = \(1, 20\)"):
        fused.chunk_retention(q, q, q, retention.log_decays(1), starts=jnp.zeros((1, 16), bool), plan=plan)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\] = \(1, 20\)"):
        retention.chunkwise(
            q,
            q,
            q,
            retention.log_decays(1),
            chunk_size=16,
            implementation="pallas",
            segment_ids=jnp.zeros((1, 16), jnp.int32),
        )
