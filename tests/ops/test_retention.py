"""The three forms of retention against the slow reference: outputs, final states, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import retention
from retnet_jax.ops import reference
from tests.helpers import FORM_RTOL, GRAD_RTOL, random_inputs, relative_error

# (B, H, K, V, T, C, normalize): T below, equal to, not a multiple of and above C; C = 1; T = 1.
CASES = [
    (1, 1, 4, 4, 1, 1, True),
    (2, 3, 4, 6, 1, 8, False),
    (2, 3, 4, 6, 5, 1, True),
    (1, 2, 8, 2, 8, 8, True),
    (3, 2, 4, 6, 13, 3, False),
    (2, 3, 4, 5, 13, 16, True),
    (2, 2, 6, 4, 32, 8, True),
    (1, 4, 4, 8, 33, 5, True),
    (1, 2, 4, 4, 70, 1, True),  # more chunks than MATRIX_CARRY_MAX_CHUNKS: the scan carries the state
]

parallel = jax.jit(retention.parallel, static_argnames="normalize")
recurrent = jax.jit(retention.recurrent, static_argnames="normalize")
chunkwise = jax.jit(retention.chunkwise, static_argnames=("chunk_size", "normalize"))
recurrent_step = jax.jit(retention.recurrent_step, static_argnames="normalize")
update_state = jax.jit(retention.update_state)


@pytest.fixture(params=["float64", "float32"])
def dtype(request):
    if request.param == "float64":
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}K{}V{}T{}C{}-norm{}".format(*c))
def test_forms_equal_reference(dtype, case):
    batch, heads, key_dim, value_dim, length, chunk, normalize = case
    rng = np.random.default_rng(length * 31 + heads)
    q, k, v = random_inputs(rng, batch, length, heads, key_dim, value_dim, dtype)
    log_decay = retention.log_decays(heads)
    o_ref, kv_ref = jax.jit(reference.retention, static_argnames="normalize")(
        q, k, v, log_decay, normalize=normalize
    )
    o_r, s_r = recurrent(q, k, v, log_decay, normalize=normalize)
    o_c, s_c = chunkwise(q, k, v, log_decay, chunk_size=chunk, normalize=normalize)
    outputs = {
        "parallel": parallel(q, k, v, log_decay, normalize=normalize),
        "recurrent": o_r,
        "chunkwise": o_c,
    }
    for name, o in outputs.items():
        assert o.dtype == jnp.dtype(dtype)
        assert relative_error(o, o_ref) < FORM_RTOL[dtype], name
    for name, s in (("recurrent", s_r), ("chunkwise", s_c)):
        assert s.kv.dtype == jnp.dtype(dtype)
        assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype], name
        np.testing.assert_array_equal(s.count, [length] * batch)


@pytest.mark.parametrize("length,chunk", [(7, 3), (16, 4)])
def test_gradients_equal_reference(dtype, length, chunk):
    rng = np.random.default_rng(length + chunk)
    batch, heads, key_dim, value_dim = 2, 2, 4, 6
    q, k, v = random_inputs(rng, batch, length, heads, key_dim, value_dim, dtype)
    log_decay = retention.log_decays(heads)
    w_o = jnp.asarray(rng.standard_normal((batch, length, heads, value_dim)), dtype)
    w_s = jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), dtype)

    def loss(form, with_state=True):
        def f(q, k, v):
            o, kv = form(q, k, v)
            return jnp.sum(o * w_o) + (jnp.sum(kv * w_s) if with_state else 0.0)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    ref = lambda q, k, v: reference.retention(q, k, v, log_decay)
    forms = {
        "parallel": lambda q, k, v: (retention.parallel(q, k, v, log_decay), None),
        "recurrent": lambda q, k, v: _with_kv(retention.recurrent(q, k, v, log_decay)),
        "chunkwise": lambda q, k, v: _with_kv(retention.chunkwise(q, k, v, log_decay, chunk_size=chunk)),
    }
    for name, form in forms.items():
        with_state = name != "parallel"
        grads = loss(form, with_state)(q, k, v)
        expected = loss(ref, with_state)(q, k, v)
        for g, g_ref, arg in zip(grads, expected, "qkv", strict=True):
            assert relative_error(g, g_ref) < GRAD_RTOL[dtype], (name, arg)


def _with_kv(out_and_state):
    o, state = out_and_state
    return o, state.kv


@pytest.mark.parametrize("split,chunk", [(1, 4), (5, 3)])
def test_continuing_a_state_equals_one_call(dtype, split, chunk):
    """chunkwise → chunkwise / recurrent_step / recurrent / update_state all equal one long call."""
    rng = np.random.default_rng(split * 7 + chunk)
    batch, length, heads, key_dim, value_dim = 2, 17, 3, 4, 5
    q, k, v = random_inputs(rng, batch, length, heads, key_dim, value_dim, dtype)
    log_decay = retention.log_decays(heads)
    o_full, s_full = chunkwise(q, k, v, log_decay, chunk_size=chunk)
    head = (q[:, :split], k[:, :split], v[:, :split])
    tail = (q[:, split:], k[:, split:], v[:, split:])
    o_head, s_head = chunkwise(*head, log_decay, chunk_size=chunk)
    tol = FORM_RTOL[dtype]

    o_tail, s = chunkwise(*tail, log_decay, chunk_size=chunk, state=s_head)
    assert relative_error(jnp.concatenate([o_head, o_tail], 1), o_full) < tol
    assert relative_error(s.kv, s_full.kv) < tol
    np.testing.assert_array_equal(s.count, [length] * batch)

    o_tail, s = recurrent(*tail, log_decay, state=s_head)
    assert relative_error(jnp.concatenate([o_head, o_tail], 1), o_full) < tol
    assert relative_error(s.kv, s_full.kv) < tol

    s, steps = s_head, []
    for t in range(length - split):
        o_t, s = recurrent_step(tail[0][:, t], tail[1][:, t], tail[2][:, t], log_decay, s)
        steps.append(o_t)
    assert relative_error(jnp.concatenate([o_head, jnp.stack(steps, 1)], 1), o_full) < tol
    assert relative_error(s.kv, s_full.kv) < tol

    s = update_state(tail[1], tail[2], log_decay, s_head)
    assert relative_error(s.kv, s_full.kv) < tol
    np.testing.assert_array_equal(s.count, [length] * batch)


def test_state_and_offset_equal_reference(dtype):
    """A non-empty incoming state at absolute position 40: every form against the reference."""
    rng = np.random.default_rng(3)
    batch, length, heads, key_dim, value_dim, start = 2, 9, 2, 4, 3, 40
    q, k, v = random_inputs(rng, batch, length, heads, key_dim, value_dim, dtype)
    kv0 = np.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), dtype)
    log_decay = retention.log_decays(heads)
    o_ref, kv_ref = jax.jit(reference.retention, static_argnames="start")(
        q, k, v, log_decay, kv=kv0, start=start
    )
    state = retention.RetentionState(jnp.asarray(kv0), jnp.full((batch,), start, jnp.int32))
    for chunk in (1, 4, 9, 20):
        o, s = chunkwise(q, k, v, log_decay, chunk_size=chunk, state=state)
        assert relative_error(o, o_ref) < FORM_RTOL[dtype]
        assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype]
    o, s = recurrent(q, k, v, log_decay, state=state)
    assert relative_error(o, o_ref) < FORM_RTOL[dtype]
    assert relative_error(s.kv, kv_ref) < FORM_RTOL[dtype]


def test_left_padding_by_negative_count():
    """p zero-key pads announced by count = −p leave outputs and state as if they were absent."""
    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, 1, 10, 2, 4, 4, "float32")
    log_decay = retention.log_decays(2)
    o_ref, s_ref = chunkwise(q, k, v, log_decay, chunk_size=4)
    pads = 3
    pad = lambda x, fill: np.concatenate([np.full((1, pads) + x.shape[2:], fill, x.dtype), x], 1)
    qp, kp, vp = pad(q, 1.0), pad(k, 0.0), pad(v, 1.0)
    state = retention.init_state(1, 2, 4, 4)._replace(count=jnp.array([-pads], jnp.int32))
    for chunk in (1, 4, 13):
        o, s = chunkwise(qp, kp, vp, log_decay, chunk_size=chunk, state=state)
        assert relative_error(o[:, pads:], o_ref) < FORM_RTOL["float32"]
        assert relative_error(s.kv, s_ref.kv) < FORM_RTOL["float32"]
        assert int(s.count[0]) == 10


def test_bf16_long_sequence_close_to_float32():
    """bf16 inputs at T = 16,384: finite, state in float32, and close to the float32 result.

    All eight paper decays (γ up to 1 − 2^−12, which bf16 would round to 1) for the chunkwise and
    recurrent forms; the O(T²) parallel form on the slowest-decaying head alone and on the first 8,192
    tokens (twice that head's span 1 / (1 − γ); causal, so the prefix's outputs are the same), to keep CPU
    time low.
    """
    rng = np.random.default_rng(0)
    length = 16384
    q, k, v = random_inputs(rng, 1, length, 8, 16, 16, "float32")
    log_decay = retention.log_decays(8)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    o32, s32 = chunkwise(q, k, v, log_decay, chunk_size=256)
    # bf16 keeps 8 significant bits (one rounding ≈ 2^-9 relative); measured ≈ 4e-3 for all forms.
    tol = 1.5e-2
    for name, (o, s) in {
        "chunkwise": chunkwise(*bf, log_decay, chunk_size=256),
        "recurrent": recurrent(*bf, log_decay),
    }.items():
        assert o.dtype == jnp.bfloat16 and s.kv.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32)))), name
        assert relative_error(o, o32) < tol, name
        assert relative_error(s.kv, s32.kv) < tol, name
    slow, prefix = slice(7, 8), 8192
    o = parallel(*(x[:, :prefix, slow] for x in bf), log_decay[slow])
    assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))
    assert relative_error(o, o32[:, :prefix, slow]) < tol


def test_log_decays():
    log_decay = retention.log_decays(8)
    assert log_decay.dtype == jnp.float32
    gamma = np.exp(np.asarray(log_decay, np.float64))
    np.testing.assert_allclose(gamma, 1 - 2.0 ** (-5 - np.arange(8)), rtol=1e-7)
    # The reason decay is never held in low precision: γ rounds to exactly 1. Checked on the exact values
    # 1 − 2^(−5−h), away from rounding ties: 1 − 2^−9 (head 4 in bf16) and 1 − 2^−12 (head 7 in fp16)
    # lie halfway between two representable numbers, so where they round is the dtype library's choice.
    exact = 1 - 2.0 ** (-5 - np.arange(12))
    as_bf16 = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
    as_fp16 = np.asarray(jnp.asarray(exact, jnp.float16), np.float64)
    assert np.all(as_bf16[5:] == 1.0) and np.all(as_bf16[:4] < 1.0)
    assert np.all(as_fp16[8:] == 1.0) and np.all(as_fp16[:7] < 1.0)
    lin = np.exp(np.asarray(retention.log_decays(4, "linspace"), np.float64))
    np.testing.assert_allclose(1 - lin, np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), 4)), rtol=1e-5)


def test_state_is_batch_major_and_selectable():
    """Selecting batch rows of the state equals running those rows alone."""
    rng = np.random.default_rng(1)
    q, k, v = random_inputs(rng, 4, 6, 2, 4, 4, "float32")
    log_decay = retention.log_decays(2)
    _, s = chunkwise(q, k, v, log_decay, chunk_size=4)
    rows = jnp.array([2, 0])
    _, s_rows = chunkwise(q[rows], k[rows], v[rows], log_decay, chunk_size=4)
    picked = jax.tree.map(lambda a: a[rows], s)
    assert relative_error(picked.kv, s_rows.kv) < FORM_RTOL["float32"]
    np.testing.assert_array_equal(picked.count, s_rows.count)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=np.zeros((2, 5, 2))), "q must have shape"),
        (dict(k=np.zeros((2, 5, 2, 3))), "k must have the shape of q"),
        (dict(v=np.zeros((2, 4, 2, 3))), "v must share q's leading axes"),
        (dict(v=np.zeros((2, 5, 2, 3), np.float16)), "share one floating dtype"),
        (dict(log_decay=np.zeros(3, np.float32)), r"log_decay must have shape \[H\] = \(2,\)"),
        (dict(log_decay=jnp.zeros(2, jnp.bfloat16)), "log_decay must be float32"),
        (dict(chunk_size=0), "chunk_size must be >= 1"),
        (dict(chunk_size=2.5), "chunk_size must be a Python int"),
        (dict(state=retention.init_state(3, 2, 4, 3)), "state does not fit these inputs"),
        (
            dict(q=np.zeros((2, 0, 2, 4)), k=np.zeros((2, 0, 2, 4)), v=np.zeros((2, 0, 2, 3))),
            "sequence is empty",
        ),
    ],
)
def test_bad_input_is_named(change, match):
    args = dict(
        q=np.zeros((2, 5, 2, 4), np.float32),
        k=np.zeros((2, 5, 2, 4), np.float32),
        v=np.zeros((2, 5, 2, 3), np.float32),
        log_decay=retention.log_decays(2),
        chunk_size=4,
        state=None,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        retention.chunkwise(
            args["q"],
            args["k"],
            args["v"],
            args["log_decay"],
            chunk_size=args["chunk_size"],
            state=args["state"],
        )
