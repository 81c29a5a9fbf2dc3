"""The decode kernel (one token of recurrent retention, run through the Pallas interpreter on the CPU) against
the XLA step and the float64 reference: float32 and bf16 inputs, float32 and bf16 states, normalized and
not, several steps chained, resets, V not a multiple of the widest tile, B = 1, the layer updated inside a
stack of layers; the choice of path and its errors; a model's decoding through the kernel against XLA; and
the lowering through Triton (to Triton IR, on the CPU) at the paper's and torchscale's heads.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from retnet_jax.models import RetNetConfig, RetNetLM, decode_step
from retnet_jax.ops import dispatch, reference, retention
from retnet_jax.ops.gpu import common
from retnet_jax.ops.gpu import decode_step as decode_lib
from tests.helpers import relative_error

# Relative error (Frobenius) against the float64 reference on the same (rounded) inputs and state.
# float32: the kernel and XLA differ only in the order of the K-sum (measured ~1e-7). bf16 inputs: both
# compute in float32 from the same bf16 values, so the bound is float32's. A bf16 state: the new state is
# rounded to bf16 once (relative error ≤ 2^-9 per element, ~2e-3 in norm); o is read out of the float32
# update before that rounding, so it keeps float32's bound.
RTOL = {"float32": 1e-5, "bfloat16": 1e-5}
STATE_RTOL = {"float32": 1e-5, "bfloat16": 4e-3}


def _inputs(rng, batch, heads, key_dim, value_dim, dtype, state_dtype, layers=None):
    q = rng.standard_normal((batch, heads, key_dim))
    k = rng.standard_normal((batch, heads, key_dim)) * key_dim**-0.5
    v = rng.standard_normal((batch, heads, value_dim))
    lead = (batch,) if layers is None else (layers, batch)
    kv = rng.standard_normal((*lead, heads, key_dim, value_dim))
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v, jnp.asarray(kv, state_dtype)


# One program rather than op by op (each operation compiles apart).
_unnormalized_reference = jax.jit(functools.partial(reference.retention, normalize=False))


def _reference_step(q, k, v, log_decay, kv, count, normalize, reset=None):
    """One token through the float64 reference (its recurrent sum over one token from the state)."""
    as64 = [np.asarray(x, np.float64) for x in (q, k, v, kv)]
    count = np.asarray(count)
    if reset is not None:
        reset = np.asarray(reset)
        as64[3] = np.where(reset[:, None, None, None], 0.0, as64[3])
        count = np.where(reset, 0, count)
    with jax.enable_x64(True):
        q64, k64, v64, kv64 = (jnp.asarray(x)[:, None] if x.ndim == 3 else jnp.asarray(x) for x in as64)
        o, kv_new = _unnormalized_reference(q64, k64, v64, jnp.asarray(log_decay, jnp.float64), kv=kv64)
        o = np.asarray(o[:, 0])
        kv_new = np.asarray(kv_new)
    if normalize:
        with jax.enable_x64(True):
            factor = retention.row_factors(jnp.asarray(count), jnp.asarray(log_decay, jnp.float64))
            o = o * np.asarray(factor)[..., None]
    return o, kv_new


CASES = [  # (B, H, K, V, dtype, state dtype, normalize)
    (2, 3, 16, 64, "float32", "float32", True),
    (1, 2, 32, 48, "float32", "float32", False),  # B = 1; V = 48: tiles of 16
    (2, 2, 16, 40, "bfloat16", "float32", True),  # V = 40: tiles of 8
    (3, 2, 16, 32, "float32", "bfloat16", True),
    (2, 2, 32, 96, "bfloat16", "bfloat16", False),
]


def _ids(case):
    return "B{}H{}K{}V{}-{}-state_{}-{}".format(*case[:6], "norm" if case[6] else "unnorm")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_equals_xla_and_reference(case):
    """Three chained steps from a random state, at mixed counts, with a reset in the second."""
    batch, heads, key_dim, value_dim, dtype, state_dtype, normalize = case
    rng = np.random.default_rng(batch * 100 + value_dim)
    log_decay = retention.log_decays(heads, "linspace")
    _, _, _, kv = _inputs(rng, batch, heads, key_dim, value_dim, dtype, state_dtype)
    count = jnp.asarray(rng.integers(0, 50, batch), jnp.int32)
    state = {impl: retention.RetentionState(kv, count) for impl in ("xla", "pallas")}
    expected_kv = np.asarray(kv, np.float64)
    expected_count = np.asarray(count)
    # Compiled once for the three steps (the reset step's signature once more).
    steps = {
        impl: jax.jit(
            lambda q, k, v, s, r, impl=impl: dispatch.recurrent_step(
                q, k, v, log_decay, s, normalize=normalize, reset=r, implementation=impl
            )
        )
        for impl in ("xla", "pallas")
    }
    for step in range(3):
        q, k, v, _ = _inputs(rng, batch, heads, key_dim, value_dim, dtype, state_dtype)
        reset = jnp.asarray(np.arange(batch) == 0) if step == 1 else None
        out = {}
        for impl in ("xla", "pallas"):
            o, new = steps[impl](q, k, v, state[impl], reset)
            # The model stores the state between steps in its dtype: so do the XLA step's.
            state[impl] = retention.RetentionState(new.kv.astype(state_dtype), new.count)
            out[impl] = o
            assert o.dtype == v.dtype and new.kv.shape == kv.shape
        want_o, want_kv = _reference_step(q, k, v, log_decay, expected_kv, expected_count, normalize, reset)
        expected_count = np.where(np.asarray(reset) if reset is not None else False, 1, expected_count + 1)
        for impl in ("xla", "pallas"):
            assert relative_error(out[impl].astype(jnp.float32), want_o) < _o_rtol(dtype), (impl, step)
            assert relative_error(state[impl].kv.astype(jnp.float32), want_kv) < STATE_RTOL[state_dtype]
            np.testing.assert_array_equal(state[impl].count, expected_count)
        # Continue the reference from the kernel's stored state (the rounding of a bf16 state is the
        # kernel's, not an error to accumulate against).
        expected_kv = np.asarray(state["pallas"].kv, np.float64)
        assert relative_error(out["pallas"].astype(jnp.float32), out["xla"].astype(jnp.float32)) < _o_rtol(
            dtype
        )


def _o_rtol(dtype):
    # A bf16 o is rounded once on the way out (2^-9 relative per element).
    return 4e-3 if dtype == "bfloat16" else RTOL[dtype]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_kernel_updates_one_layer_of_a_stack(state_dtype):
    """Given every layer's state and an index (traced), the kernel updates that layer and leaves the others
    bit for bit; o and the layer equal the XLA step on the layer's slice."""
    rng = np.random.default_rng(7)
    q, k, v, stack = _inputs(rng, 2, 2, 16, 64, "float32", state_dtype, layers=3)
    log_decay = retention.log_decays(2)
    count = jnp.asarray([3, 0], jnp.int32)

    @jax.jit
    def step(q, k, v, stack, layer):
        view = retention.StackedState(stack, layer, count)
        return dispatch.recurrent_step(q, k, v, log_decay, view, implementation="pallas")

    o, new = step(q, k, v, stack, jnp.int32(1))
    o_xla, want = retention.recurrent_step(q, k, v, log_decay, retention.RetentionState(stack[1], count))
    assert isinstance(new, retention.StackedState) and new.kv.dtype == stack.dtype
    assert relative_error(o, o_xla) < RTOL["float32"]
    assert relative_error(new.kv[1].astype(jnp.float32), want.kv) < STATE_RTOL[state_dtype]
    for other in (0, 2):
        np.testing.assert_array_equal(new.kv[other], stack[other])
    np.testing.assert_array_equal(new.count, count + 1)


def test_reset_drops_a_non_finite_state():
    """A reset row's old state is dropped whatever it holds (the XLA step selects zeros too)."""
    rng = np.random.default_rng(3)
    q, k, v, kv = _inputs(rng, 2, 2, 16, 32, "float32", "float32")
    kv = kv.at[0].set(jnp.nan)
    state = retention.RetentionState(kv, jnp.asarray([9, 4], jnp.int32))
    reset = jnp.asarray([True, False])
    log_decay = retention.log_decays(2)
    o, new = dispatch.recurrent_step(q, k, v, log_decay, state, reset=reset, implementation="pallas")
    o_xla, want = retention.recurrent_step(q, k, v, log_decay, state, reset=reset)
    assert relative_error(o, o_xla) < RTOL["float32"] and relative_error(new.kv, want.kv) < RTOL["float32"]


def test_tiles_and_what_the_kernel_refuses():
    assert [decode_lib.value_tile(v) for v in (512, 432, 428, 40, 48)] == [32, 16, 4, 8, 16]
    assert decode_lib.unsupported(256, 512, jnp.bfloat16, jnp.float32) is None
    assert decode_lib.unsupported(256, 432, jnp.float32, jnp.bfloat16) is None
    assert "K = 24" in decode_lib.unsupported(24, 64, jnp.float32, jnp.float32)
    assert "V = 6" in decode_lib.unsupported(16, 6, jnp.float32, jnp.float32)
    assert "float16 state" in decode_lib.unsupported(16, 64, jnp.float32, jnp.float16)
    q = jnp.zeros((1, 2, 24), jnp.float32)
    v = jnp.zeros((1, 2, 64), jnp.float32)
    state = retention.init_state(1, 2, 24, 64)
    with pytest.raises(ValueError, match="implementation='pallas' cannot run at K = 24"):
        dispatch.recurrent_step(q, q, v, retention.log_decays(2), state, implementation="pallas")
    with pytest.raises(ValueError, match="unknown implementation"):
        dispatch.recurrent_step(q, q, v, retention.log_decays(2), state, implementation="triton")


def test_auto_choice(monkeypatch):
    """ "auto" takes the kernel on a GPU with the Triton backend where it runs, once it is measured
    (``AUTO_DECODE_KERNEL``); XLA elsewhere, never an error; "pallas" forced on a TPU names the fix."""
    args = (256, 512, jnp.bfloat16, jnp.float32)
    assert not dispatch.decode_kernel("auto", *args, backend="cpu")
    assert not dispatch.decode_kernel("auto", *args, backend="tpu")
    assert not dispatch.decode_kernel("auto", 24, 512, jnp.bfloat16, jnp.float32, backend="gpu")
    assert not dispatch.decode_kernel("pallas_tpu", *args, backend="gpu")
    assert not dispatch.decode_kernel("auto", *args, backend="gpu") or dispatch.AUTO_DECODE_KERNEL
    monkeypatch.setattr(dispatch, "AUTO_DECODE_KERNEL", True)
    assert dispatch.decode_kernel("auto", *args, backend="gpu") == (common.triton_unavailable() is None)
    assert dispatch.decode_kernel("pallas", *args, backend="cpu")
    with pytest.raises(ValueError, match="on tpu"):
        dispatch.decode_kernel("pallas", *args, backend="tpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" off the GPU: XLA, silently
        q = jnp.zeros((1, 2, 16), jnp.float32)
        state = retention.init_state(1, 2, 16, 32)
        dispatch.recurrent_step(
            q, q, jnp.zeros((1, 2, 32)), retention.log_decays(2), state, implementation="auto"
        )


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_model_decoding_through_the_kernel_equals_xla(state_dtype):
    """Three greedy steps of a tiny RetNet after a prompt: logits and states through the kernel
    (interpreted) equal those through XLA, with the layer loop unrolled and scanned."""
    config = RetNetConfig.preset("tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 5)), jnp.int32)
    prefill_model = RetNetLM(config, mode="chunkwise", chunk_size=4, implementation="xla")
    variables = jax.jit(prefill_model.init)(jax.random.key(0), tokens)
    _, prompt_state = jax.jit(prefill_model.apply)(
        variables, tokens, state=config.init_state(2, state_dtype=state_dtype)
    )
    results = {}
    for impl, unroll in (("xla", True), ("pallas", True), ("pallas", False)):
        model = RetNetLM(config, implementation=impl, unroll_decode=unroll)
        step = jax.jit(lambda v, t, s, model=model: decode_step(model, v, t, s))
        token, state, logits = tokens[:, -1], prompt_state, []
        program = str(jax.make_jaxpr(step)(variables, token, state))
        assert ("pallas_call" in program) == (impl == "pallas"), impl
        for _ in range(3):
            out, state = step(variables, token, state)
            logits.append(out)
            token = jnp.argmax(out, -1).astype(jnp.int32)
        results[impl, unroll] = (jnp.stack(logits), state)
    want_logits, want_state = results["xla", True]
    # float32 model, the same function to rounding: ~1e-6 measured. A bf16 state: both round the same
    # float32 update to bf16, which can differ by one unit where the updates differ in their last bit.
    state_rtol = 1e-5 if state_dtype is None else 4e-3
    for key, (logits, state) in results.items():
        assert relative_error(logits, want_logits) < 1e-5 + (state_rtol if key[0] == "pallas" else 0), key
        assert state.kv.dtype == want_state.kv.dtype, key
        assert relative_error(state.kv.astype(jnp.float32), want_state.kv.astype(jnp.float32)) < state_rtol
        np.testing.assert_array_equal(state.position, want_state.position)


def test_kernel_lowers_to_triton_at_preset_heads():
    """The per-layer and stacked forms lower through Pallas's Triton backend (to Triton IR, on the CPU) at
    the paper's heads (K256 V512) and torchscale's (V432: tiles of 16), float32 and bf16 states."""
    for value_dim, state_dtype, layers in ((512, jnp.float32, None), (432, jnp.bfloat16, 24)):
        q = jnp.zeros((4, 8, 256), jnp.bfloat16)
        v = jnp.zeros((4, 8, value_dim), jnp.bfloat16)
        lead = (4,) if layers is None else (layers, 4)
        kv = jnp.zeros((*lead, 8, 256, value_dim), state_dtype)

        def step(q, k, v, kv, layer, layers=layers):
            count = jnp.zeros((4,), jnp.int32)
            layer = None if layers is None else layer
            return decode_lib.decode_step(q, k, v, retention.log_decays(8), kv, count, layer=layer)

        lowered = jax.jit(step, donate_argnums=(3,)).trace(q, q, v, kv, jnp.int32(3))
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text


def test_sharded_equals_unsharded():
    """Under a mesh of 8 devices (batch over 4, heads over 2) the kernel runs on each shard of a stacked
    state: the same output and state as on one device, and no operand is gathered."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    mesh = jax.make_mesh((4, 2), ("batch", "heads"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(11)
    q, k, v, stack = _inputs(rng, 4, 2, 16, 32, "float32", "float32", layers=2)
    log_decay = retention.log_decays(2)

    @jax.jit
    def step(q, k, v, stack):
        view = retention.StackedState(stack, 1, jnp.full((4,), 3, jnp.int32))
        o, new = dispatch.recurrent_step(q, k, v, log_decay, view, implementation="pallas")
        return o, new.kv

    o, kv = step(q, k, v, stack)
    vec, state = PartitionSpec("batch", "heads"), PartitionSpec(None, "batch", "heads")
    with jax.set_mesh(mesh):
        put = [
            jax.device_put(x, NamedSharding(mesh, s))
            for x, s in zip((q, k, v, stack), (vec, vec, vec, state), strict=True)
        ]
        hlo = step.lower(*put).compile().as_text()
        o_sharded, kv_sharded = step(*put)
    assert "all-gather" not in hlo
    assert tuple(kv_sharded.sharding.spec)[:3] == tuple(state)
    assert relative_error(o_sharded, o) < RTOL["float32"]
    assert relative_error(kv_sharded, kv) < RTOL["float32"]
