"""The Pallas TPU kernels, run on the CPU through the Pallas TPU interpreter, and the TPU dispatch.

The interpreter runs the kernel bodies as Mosaic would schedule them (grid steps in order, VMEM scratch
carried across the "arbitrary" chunk axis, scalar prefetch in SMEM, uninitialized scratch filled with
NaN). Checked against the reference in float32: outputs, final states and the gradients of q, k, v,
log γ and the incoming state, for T at and not a multiple of C, C = 128 and 256, and head dims padded to
the lane width (K = 64, V = 96; the torchscale-v2 head K = 256, V = 432); bfloat16 inputs against the
float32 reference. Then ``chunkwise`` through the
dispatch (normalized and not, a carried state with a left-padded row, under a device mesh), the choice of
"auto" on a (pretended) TPU, the errors and the fallback of a JAX without Pallas TPU, and the lowering
for the TPU platform, which this jaxlib does without a TPU (Mosaic's own compilation needs one).

Document resets (``segment_ids``): the kernels against the reference run document by document (outputs,
states and all gradients), with documents shorter than a chunk, several starts in one chunk, starts on a
chunk boundary, documents spanning chunks, ids that come back, a carried state, C = 128 and 256; through
the dispatch with normalization and restarting positions, on a pretended TPU and under a mesh.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from retnet_jax import retention
from retnet_jax.ops import reference, tpu
from retnet_jax.ops.tpu import chunk_retention
from tests.helpers import FORM_RTOL, GRAD_RTOL, random_inputs, relative_error

# bf16 inputs against the float32 reference (measured ≈ 3e-3; the XLA form the same).
BF16_RTOL = 1.5e-2

# (B, H, K, V, T, C): two whole chunks; K, V and T padded (a last partial chunk); the torchscale-v2 head
# at C = 256 with a partial second chunk.
CASES = [
    (1, 2, 128, 128, 256, 128),
    (2, 1, 64, 96, 200, 128),
    (1, 1, 256, 432, 300, 256),
]


def _inputs(rng, batch, heads, key_dim, value_dim, length):
    q, k, v = (
        jnp.asarray(x) for x in random_inputs(rng, batch, length, heads, key_dim, value_dim, "float32")
    )
    kv = jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32)
    return q, k, v, retention.log_decays(heads, "linspace"), kv


def _outputs_and_grads(fn, args, do, dkv):
    """fn(*args) = (o, final state), and the gradients of <o, do> + <final state, dkv> (each form traced
    once: the kernels run once forward)."""

    def loss(*a):
        o, kv = fn(*a)
        return jnp.vdot(o, do) + jnp.vdot(kv, dkv), (o, kv)

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, range(5), has_aux=True))(*args)
    return outputs, grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}K{}V{}T{}C{}".format(*c))
def test_kernels_equal_reference(case):
    batch, heads, key_dim, value_dim, length, chunk = case
    rng = np.random.default_rng(length)
    args = _inputs(rng, batch, heads, key_dim, value_dim, length)
    do = jnp.asarray(rng.standard_normal((batch, length, heads, value_dim)), jnp.float32)
    dkv = jnp.asarray(rng.standard_normal(args[-1].shape), jnp.float32)

    def kernel(q, k, v, log_decay, kv):
        return chunk_retention.chunk_retention(q, k, v, log_decay, kv, chunk_size=chunk, interpret=True)

    def ref(q, k, v, log_decay, kv):
        return reference.retention(q, k, v, log_decay, kv=kv, normalize=False)

    def outputs_and_grads(fn):  # both outputs get a cotangent: the final state's backward path is checked
        return _outputs_and_grads(fn, args, do, dkv)

    (o, kv_final), grads = outputs_and_grads(kernel)
    (expected_o, expected_kv), expected = outputs_and_grads(ref)
    assert relative_error(o, expected_o) < FORM_RTOL["float32"]
    assert relative_error(kv_final, expected_kv) < FORM_RTOL["float32"]
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay", "dkv"), grads, expected, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name


def test_bf16_inputs_stay_close_to_float32():
    """bfloat16 q, k, v (the TPU training dtype): the kernels round the decayed scores and the state to
    bfloat16 before each product, as the XLA form does (both measured ≈ 3e-3 here)."""
    rng = np.random.default_rng(7)
    q, k, v, log_decay, kv = _inputs(rng, 1, 2, 128, 128, 256)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    exact = [x.astype(jnp.float32) for x in low]  # the same inputs, computed in float32
    expected_o, expected_kv = reference.retention(*exact, log_decay, kv=kv, normalize=False)
    o, kv_final = jax.jit(lambda *a: chunk_retention.chunk_retention(*a, chunk_size=128, interpret=True))(
        *low, log_decay, kv
    )
    assert o.dtype == jnp.bfloat16 and kv_final.dtype == jnp.float32
    assert relative_error(o, expected_o) < BF16_RTOL
    assert relative_error(kv_final, expected_kv) < BF16_RTOL


def _state_inputs(seed, batch=2, heads=2, key_dim=64, value_dim=128, length=150):
    """Inputs with a carried state: row 0 at position 5, row 1 announcing two left pads (count −2)."""
    rng = np.random.default_rng(seed)
    q, k, v, log_decay, kv = _inputs(rng, batch, heads, key_dim, value_dim, length)
    k = k.at[1, :2].set(0.0)  # the pads carry no key, as the model guarantees
    return q, k, v, log_decay, retention.RetentionState(kv, jnp.array([5, -2], jnp.int32))


@pytest.mark.parametrize("normalize", [True, False])
def test_chunkwise_pallas_tpu_equals_xla(normalize):
    q, k, v, log_decay, state = _state_inputs(normalize)
    do = jnp.asarray(np.random.default_rng(9).standard_normal(v.shape), jnp.float32)

    def run(implementation):
        def f(q, k, v, log_decay, kv):
            o, out = retention.chunkwise(
                q,
                k,
                v,
                log_decay,
                chunk_size=128,
                state=retention.RetentionState(kv, state.count),
                normalize=normalize,
                implementation=implementation,
            )
            return jnp.vdot(o, do), (o, out)

        (_, (o, out)), grads = jax.jit(jax.value_and_grad(f, range(5), has_aux=True))(
            q, k, v, log_decay, state.kv
        )
        return o, out, grads

    o, out, grads = run("pallas_tpu")
    o_x, out_x, grads_x = run("xla")
    assert relative_error(o, o_x) < FORM_RTOL["float32"]
    assert relative_error(out.kv, out_x.kv) < FORM_RTOL["float32"]
    np.testing.assert_array_equal(out.count, out_x.count)
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay", "dkv"), grads, grads_x, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name


def test_chunkwise_under_a_mesh_splits_the_batch():
    """Under a (data, fsdp, tensor) = (1, 2, 1) mesh the kernels run in shard_map with the batch split over
    fsdp (the axis larger than one); outputs and gradients (log γ summed over the shards) equal XLA's.
    Two devices: the interpreter's per-device callbacks can starve the CPU client's threads with eight."""
    mesh = jax.make_mesh(
        (1, 2, 1), ("data", "fsdp", "tensor"), (jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:2]
    )
    q, k, v, log_decay, state = _state_inputs(3, length=130)

    def loss(implementation):
        def f(q, k, v, log_decay, kv):
            o, out = retention.chunkwise(
                q,
                k,
                v,
                log_decay,
                chunk_size=128,
                state=retention.RetentionState(kv, state.count),
                implementation=implementation,
            )
            return jnp.sum(jnp.sin(o)) + jnp.sum(out.kv**2)

        return jax.jit(jax.value_and_grad(f, range(5)))

    with jax.set_mesh(mesh):
        assert tpu._batch_axes(2) == ("fsdp",)
        value, grads = loss("pallas_tpu")(q, k, v, log_decay, state.kv)
    expected_value, expected = loss("xla")(q, k, v, log_decay, state.kv)
    assert abs(float(value) - float(expected_value)) < FORM_RTOL["float32"] * abs(float(expected_value))
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay", "dkv"), grads, expected, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name


# ----------------------------------------------------------------------------------------------
# Dispatch.


@pytest.fixture
def on_tpu(monkeypatch):
    """A pretended TPU backend; kernels the dispatch compiles for it run in the TPU interpreter."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        yield


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the chunk size of every call of the TPU kernels."""
    calls = []
    original = chunk_retention.chunk_retention

    def spy(*args, chunk_size, **kwargs):
        calls.append(chunk_size)
        return original(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(chunk_retention, "chunk_retention", spy)
    return calls


def test_auto_takes_the_tpu_kernels_on_a_tpu(on_tpu, kernel_calls):
    q, k, v, log_decay, state = _state_inputs(5, length=100)

    @jax.jit
    def both(q, k, v, log_decay, state):
        return [
            retention.chunkwise(q, k, v, log_decay, chunk_size=64, state=state, implementation=name)
            for name in ("auto", "xla")
        ]

    (o, out), (o_x, out_x) = both(q, k, v, log_decay, state)
    assert kernel_calls == [chunk_retention.AUTO_CHUNK]  # whatever C the caller named
    assert relative_error(o, o_x) < FORM_RTOL["float32"]
    assert relative_error(out.kv, out_x.kv) < FORM_RTOL["float32"]


def test_auto_keeps_xla_elsewhere(monkeypatch, kernel_calls):
    q = jnp.zeros((3, 8, 2, 16), jnp.float32)
    log_decay = retention.log_decays(2)

    def auto(x):  # traced only: which implementation runs is decided while tracing
        return jax.eval_shape(
            lambda x: retention.chunkwise(x, x, x, log_decay, chunk_size=4, implementation="auto"), x
        )

    auto(q)  # the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    auto(q.astype(jnp.float16))  # a dtype the kernels do not take
    assert kernel_calls == []
    mesh = jax.make_mesh((2, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):  # a batch of 3 does not split over 2 devices
        assert tpu.select("chunkwise", "auto", q, q, 4) is None
        assert tpu.select("chunkwise", "auto", q[:2], q[:2], 4) == chunk_retention.AUTO_CHUNK


def test_forcing_the_tpu_kernels_where_they_cannot_run_is_an_error(monkeypatch):
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    log_decay = retention.log_decays(2)

    def force(x=q, chunk_size=128):
        return retention.chunkwise(x, x, x, log_decay, chunk_size=chunk_size, implementation="pallas_tpu")

    with pytest.raises(ValueError, match=r"chunk_size = 64 \(the TPU kernel needs a multiple of 128\)"):
        force(chunk_size=64)
    with pytest.raises(ValueError, match="dtype float16"):
        force(q.astype(jnp.float16))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="not on backend 'gpu'"):
        force()
    monkeypatch.setattr(tpu, "chunk_retention", None)
    monkeypatch.setattr(tpu, "MISSING", "jax.experimental.pallas.tpu does not import here")
    with pytest.raises(ValueError, match="cannot run: jax.experimental.pallas.tpu does not import"):
        force()


def test_a_jax_without_pallas_tpu_falls_back_to_xla_with_one_warning(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(tpu, "chunk_retention", None)
    monkeypatch.setattr(tpu, "MISSING", "jax.experimental.pallas.tpu does not import here")
    monkeypatch.setattr(tpu, "_warned", False)
    q, k, v, log_decay, state = _state_inputs(6, length=20)

    def run(implementation):
        return jax.jit(
            lambda *a: retention.chunkwise(*a, chunk_size=8, state=state, implementation=implementation)
        )(q, k, v, log_decay)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = [run("auto") for _ in range(2)]  # two traces
    assert [str(w.message).split(";")[0] for w in caught] == [
        "chunkwise(implementation='auto'): jax.experimental.pallas.tpu does not import here"
    ]
    np.testing.assert_array_equal(auto[1][0], run("xla")[0])


# ----------------------------------------------------------------------------------------------
# Lowering for the TPU platform, without a TPU.


def test_kernels_and_xla_form_lower_for_tpu():
    """Forward and backward of the paper's head (K = 256, V = 512) in bfloat16 lower to three Mosaic
    kernels (forward, dq, dk-dv); the XLA form lowers too. What Mosaic then compiles is not checked."""
    b, t, h, key_dim, value_dim = 2, 384, 2, 256, 512
    shapes = [(b, t, h, key_dim), (b, t, h, key_dim), (b, t, h, value_dim)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args += [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((h,), (b, h, key_dim, value_dim))]

    def loss(kernel):
        def f(q, k, v, log_decay, kv):
            if kernel:
                o, kv = chunk_retention.chunk_retention(q, k, v, log_decay, kv, chunk_size=128)
            else:
                state = retention.RetentionState(kv, jnp.zeros((b,), jnp.int32))
                o, state = retention.chunkwise(q, k, v, log_decay, chunk_size=128, state=state)
                kv = state.kv
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(kv)

        return jax.jit(jax.grad(f, range(5)))

    text = loss(True).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3
    text = loss(False).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in text


def test_kernels_with_documents_lower_for_tpu():
    """The reset kernels of the paper's head in bfloat16, at C = 128 and 256 (the mask tiled from two
    lane blocks), lower to three Mosaic kernels each."""
    b, t, h, key_dim, value_dim = 2, 384, 2, 256, 512
    shapes = [(b, t, h, key_dim), (b, t, h, key_dim), (b, t, h, value_dim)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args += [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((h,), (b, h, key_dim, value_dim))]
    args += [jax.ShapeDtypeStruct((b, t), jnp.int32)]
    for chunk in (128, 256):

        def f(q, k, v, log_decay, kv, segment_ids, chunk=chunk):
            o, kv = chunk_retention.chunk_retention(
                q, k, v, log_decay, kv, chunk_size=chunk, segment_ids=segment_ids
            )
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(kv)

        lowered = jax.jit(jax.grad(f, range(5))).trace(*args).lower(lowering_platforms=("tpu",))
        assert lowered.as_text().count("tpu_custom_call") == 3


# ----------------------------------------------------------------------------------------------
# Document resets (segment ids).


def _ids(*lengths):
    """Segment ids of documents of these lengths, back to back (ids 1, 2, ...)."""
    return np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])


# (H, K, V, C, segment ids [B, T]). C = 128, T = 300 (a partial last chunk): row 0 holds documents
# shorter than a chunk, several starts in chunk 0 (at 50, 60, 61: a one-token document, then the first
# id back again), a start on the chunk boundary 128, a document spanning chunks 1 and 2 and one inside
# the partial chunk; row 1 continues the incoming state up to 200 (spanning chunks 0 and 1). C = 256 (the
# [C, C] mask tiled from two lane blocks), T = 300: starts at 5, at 255 (a one-token document ending
# chunk 0), at the boundary 256 and at 290.
DOCUMENT_CASES = [
    (
        2,
        64,
        96,
        128,
        np.stack([np.concatenate([_ids(50, 10, 1), np.full(67, 1), _ids(142, 30) + 4]), _ids(200, 100)]),
    ),
    (1, 128, 128, 256, _ids(5, 250, 1, 34, 10)[None]),
]


@pytest.mark.parametrize("case", DOCUMENT_CASES, ids=lambda c: "K{}V{}C{}".format(*c[1:4]))
def test_kernels_with_documents_equal_reference(case):
    """Each document alone in the reference; the kernels reset inside chunks and on their boundaries."""
    heads, key_dim, value_dim, chunk, segment_ids = case
    batch, length = segment_ids.shape
    rng = np.random.default_rng(chunk)
    args = _inputs(rng, batch, heads, key_dim, value_dim, length)
    do = jnp.asarray(rng.standard_normal((batch, length, heads, value_dim)), jnp.float32)
    dkv = jnp.asarray(rng.standard_normal(args[-1].shape), jnp.float32)
    ids = jnp.asarray(segment_ids)

    def kernel(q, k, v, log_decay, kv):
        return chunk_retention.chunk_retention(
            q, k, v, log_decay, kv, chunk_size=chunk, segment_ids=ids, interpret=True
        )

    def ref(q, k, v, log_decay, kv):
        return reference.retention(q, k, v, log_decay, kv=kv, normalize=False, segment_ids=segment_ids)

    def outputs_and_grads(fn):
        return _outputs_and_grads(fn, args, do, dkv)

    (o, kv_final), grads = outputs_and_grads(kernel)
    (expected_o, expected_kv), expected = outputs_and_grads(ref)
    assert relative_error(o, expected_o) < FORM_RTOL["float32"]
    assert relative_error(kv_final, expected_kv) < FORM_RTOL["float32"]
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay", "dkv"), grads, expected, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name


def _documents_loss(q, k, v, log_decay, state, segment_ids, implementation):
    """A loss of the outputs and the final state of ``chunkwise`` with resets, and that state."""

    def f(q, k, v, log_decay, kv):
        o, out = retention.chunkwise(
            q,
            k,
            v,
            log_decay,
            chunk_size=128,
            state=retention.RetentionState(kv, state.count),
            implementation=implementation,
            segment_ids=segment_ids,
        )
        return jnp.sum(jnp.sin(o)) + jnp.sum(out.kv**2), out

    return jax.jit(jax.value_and_grad(f, range(5), has_aux=True))(q, k, v, log_decay, state.kv)


def _assert_same_run(got, want):
    (value, out), grads = got
    (expected_value, expected_out), expected = want
    assert abs(float(value) - float(expected_value)) < FORM_RTOL["float32"] * abs(float(expected_value))
    assert relative_error(out.kv, expected_out.kv) < FORM_RTOL["float32"]
    np.testing.assert_array_equal(out.count, expected_out.count)
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay", "dkv"), grads, expected, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name


# T = 150 with a carried state (row 0 at position 5, row 1 after two left pads): row 0 starts documents
# at 30 and on the chunk boundary 128 (its count ends at 22), row 1 at 100 (50).
DOCUMENT_ROWS = np.stack([_ids(30, 98, 22), _ids(100, 50)])


def test_auto_with_documents_on_a_tpu_equals_xla(on_tpu, kernel_calls):
    """Normalized, with a carried state: positions (hence c_n) and the count restart at each start."""
    q, k, v, log_decay, state = _state_inputs(11)
    ids = jnp.asarray(DOCUMENT_ROWS)
    got = _documents_loss(q, k, v, log_decay, state, ids, "auto")
    assert kernel_calls == [chunk_retention.AUTO_CHUNK]
    want = _documents_loss(q, k, v, log_decay, state, ids, "xla")
    np.testing.assert_array_equal(want[0][1].count, [22, 50])
    _assert_same_run(got, want)


def test_documents_under_a_mesh():
    """The kernels with resets inside shard_map (batch split over fsdp): equal to the XLA form."""
    mesh = jax.make_mesh(
        (1, 2, 1), ("data", "fsdp", "tensor"), (jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:2]
    )
    q, k, v, log_decay, state = _state_inputs(12)
    ids = jnp.asarray(DOCUMENT_ROWS)
    with jax.set_mesh(mesh):
        got = _documents_loss(q, k, v, log_decay, state, ids, "pallas_tpu")
    _assert_same_run(got, _documents_loss(q, k, v, log_decay, state, ids, "xla"))


def test_pallas_tpu_takes_segment_ids_and_names_bad_ones(kernel_calls):
    q = jnp.zeros((2, 8, 2, 16), jnp.float32)
    log_decay = retention.log_decays(2)

    def force(segment_ids):  # traced only
        return jax.eval_shape(
            lambda x: retention.chunkwise(
                x, x, x, log_decay, chunk_size=128, implementation="pallas_tpu", segment_ids=segment_ids
            ),
            q,
        )

    force(jnp.zeros((2, 8), jnp.int32))
    assert kernel_calls == [128]
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\] = \(2, 8\)"):
        force(jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        force(jnp.zeros((2, 8), jnp.float32))
