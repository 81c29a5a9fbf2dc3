"""The decode kernel's step from a layer's joined q/k/v/g projection (``dispatch.joined_step``, the kernel
run through the Pallas interpreter on the CPU) against XLA's split, scale, mask and rotation followed by
``ops.retention.recurrent_step``: every rotation, float32 and bf16 inputs, float32 and bf16 states,
normalized and not, pad rows, reset rows, the product's float32 partials (S = 1 and S > 1), the layer
updated inside a stack of layers; what the kernel refuses; its lowering through Triton; and a RetNet's
prepared decoding loop through it against XLA's, with no XLA kernel left between the product and the step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from retnet_jax.inference.decoding import LMDecoder
from retnet_jax.inference.generate import generate
from retnet_jax.models import DecoderLM, RetNetConfig
from retnet_jax.ops import dispatch, retention, rotation
from retnet_jax.ops.gpu import common
from retnet_jax.ops.gpu import decode_step as decode_lib
from retnet_jax.training.tokenizers import ByteTokenizer
from tests.helpers import relative_error

# Relative error (Frobenius) of the kernel's step against XLA's on the same inputs and state.
# float32: the two differ in the order of float32 sums and where k's scale is applied (measured ~1e-7).
# bf16 inputs: XLA rounds k·K^-1/2 and the rotated q and k to bf16 (2^-9 relative per element) before its
# step, the kernel keeps them in float32, and o is rounded to bf16 on the way out (measured <= 2.5e-3);
# γS dominates the new state, so the rounded k moves it less (measured <= 5e-4). A bf16 state: the
# kernel's is rounded to bf16 once, XLA's RetentionState is float32 (2^-9 per element, measured ~2e-3).
O_RTOL = {"float32": 1e-5, "bfloat16": 6e-3}
STATE_RTOL = {("float32", "float32"): 1e-5, ("bfloat16", "float32"): 2e-3}
BF16_STATE_RTOL = 4e-3


def _xla_step(joined, log_decay, state, key_dim, value_dim, rotation_kind, normalize, reset, dtype):
    """What the layer does in XLA before the step, then ``ops.retention.recurrent_step``."""
    if joined.ndim == 4:
        joined = joined.sum(0)
    joined = joined.astype(dtype)
    q, k = joined[..., :key_dim], joined[..., key_dim : 2 * key_dim] * key_dim**-0.5
    v = joined[..., 2 * key_dim : 2 * key_dim + value_dim]
    positions = state.count if reset is None else jnp.where(reset, 0, state.count)
    k = jnp.where((positions >= 0)[:, None, None], k, 0)
    if rotation_kind != "none":
        q = rotation.rotate(q[:, None], positions[:, None], rotation_kind)[:, 0]
        k = rotation.rotate(k[:, None], positions[:, None], rotation_kind)[:, 0]
    return retention.recurrent_step(q, k, v, log_decay, state, normalize=normalize, reset=reset)


CASES = [  # (B, H, K, V, dtype, state dtype, normalize, rotation, S: None = the product itself)
    (3, 2, 16, 64, "float32", "float32", True, "interleaved", None),
    (3, 2, 16, 48, "float32", "float32", False, "rotate_half", None),  # V = 48: tiles of 16
    (3, 2, 16, 32, "float32", "float32", True, "none", None),
    (3, 2, 32, 40, "bfloat16", "float32", True, "interleaved", None),  # V = 40: tiles of 8
    (3, 2, 16, 64, "float32", "bfloat16", False, "interleaved", None),
    (3, 2, 16, 32, "bfloat16", "float32", True, "interleaved", 1),
    (3, 2, 16, 32, "float32", "float32", False, "rotate_half", 3),
    (1, 2, 16, 32, "bfloat16", "bfloat16", True, "interleaved", 2),  # B = 1
]


def _ids(case):
    b, h, k, v, dtype, state_dtype, normalize, rot, splits = case
    norm = "norm" if normalize else "unnorm"
    return f"B{b}H{h}K{k}V{v}-{dtype}-state_{state_dtype}-{norm}-{rot}-S{splits}"


def _joined(rng, splits, batch, heads, width, dtype):
    if splits is None:
        return jnp.asarray(rng.standard_normal((batch, heads, width)), dtype)
    return jnp.asarray(rng.standard_normal((splits, batch, heads, width)) / splits**0.5, jnp.float32)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_joined_step_equals_xlas(case):
    """Three chained steps from a random state: row 0 a pad in the first step (position −1), row 1 at a
    large position (the rotation's angles matter), a reset of the last row in the second step."""
    batch, heads, key_dim, value_dim, dtype, state_dtype, normalize, rot, splits = case
    rng = np.random.default_rng(batch * 1000 + value_dim * 10 + key_dim)
    log_decay = retention.log_decays(heads, "linspace")
    width = 2 * key_dim + 2 * value_dim
    kv = jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), state_dtype)
    count = jnp.asarray([-1, 1000, 7][:batch], jnp.int32)
    states = {impl: retention.RetentionState(kv, count) for impl in ("xla", "pallas")}
    options = dict(key_dim=key_dim, value_dim=value_dim, rotation_kind=rot, normalize=normalize, dtype=dtype)
    # Compiled once for the three steps (the reset step's signature once more).
    joined_step = {
        impl: jax.jit(
            lambda j, s, r, impl=impl: dispatch.joined_step(
                j, log_decay, s, reset=r, implementation=impl, **options
            )
        )
        for impl in ("xla", "pallas")
    }
    xla_step = jax.jit(
        lambda j, s, r: _xla_step(j, log_decay, s, key_dim, value_dim, rot, normalize, r, dtype)
    )
    for step in range(3):
        joined = _joined(rng, splits, batch, heads, width, dtype)
        reset = jnp.asarray(np.arange(batch) == batch - 1) if step == 1 else None
        out = {}
        for impl in ("xla", "pallas"):
            o, new = joined_step[impl](joined, states[impl], reset)
            assert o.dtype == jnp.dtype(dtype) and o.shape == (batch, heads, value_dim)
            out[impl] = o, new
        want_o, want = xla_step(joined, states["pallas"], reset)
        # XLA's joined_step is the layer's XLA path (compiled apart: equal up to XLA's fusion choices).
        assert relative_error(out["xla"][0].astype(jnp.float32), want_o.astype(jnp.float32)) < 1e-6
        o, new = out["pallas"]
        assert new.kv.dtype == kv.dtype
        assert relative_error(o.astype(jnp.float32), want_o.astype(jnp.float32)) < O_RTOL[dtype], step
        state_rtol = STATE_RTOL[dtype, state_dtype] if state_dtype == "float32" else BF16_STATE_RTOL
        assert relative_error(new.kv.astype(jnp.float32), want.kv) < state_rtol, step
        np.testing.assert_array_equal(new.count, want.count)
        # Both continue from the kernel's state (its rounding is not an error to accumulate).
        states = {impl: retention.RetentionState(new.kv, new.count) for impl in ("xla", "pallas")}


def test_a_pad_row_leaves_the_state_decayed_only():
    """A pad's k never enters the state (its factor is 0, whatever the product holds): S' = γ S."""
    rng = np.random.default_rng(5)
    kv = jnp.asarray(rng.standard_normal((2, 2, 16, 32)), jnp.float32)
    joined = jnp.asarray(rng.standard_normal((2, 2, 2 * 16 + 2 * 32)), jnp.float32)
    state = retention.RetentionState(kv, jnp.asarray([-3, 4], jnp.int32))
    log_decay = retention.log_decays(2)
    _, new = dispatch.joined_step(joined, log_decay, state, key_dim=16, value_dim=32, implementation="pallas")
    decay = jnp.exp(log_decay)[:, None, None]
    np.testing.assert_allclose(new.kv[0], decay * kv[0], rtol=1e-6)
    assert relative_error(new.kv[1], decay * kv[1]) > 1e-3  # the real row's k did enter


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_joined_step_updates_one_layer_of_a_stack(state_dtype):
    """Given every layer's state and a traced index, the kernel updates that layer as XLA's step on its
    slice, and leaves the other layers bit for bit."""
    rng = np.random.default_rng(9)
    key_dim, value_dim = 16, 32
    stack = jnp.asarray(rng.standard_normal((3, 2, 2, key_dim, value_dim)), state_dtype)
    joined = jnp.asarray(rng.standard_normal((2, 2, 2 * key_dim + 2 * value_dim)), jnp.float32)
    log_decay = retention.log_decays(2)
    count = jnp.asarray([3, 11], jnp.int32)
    options = dict(key_dim=key_dim, value_dim=value_dim, implementation="pallas")

    @jax.jit
    def step(joined, stack, layer):
        return dispatch.joined_step(joined, log_decay, retention.StackedState(stack, layer, count), **options)

    o, new = step(joined, stack, jnp.int32(1))
    layer_state = retention.RetentionState(stack[1], count)
    want_o, want = _xla_step(
        joined, log_decay, layer_state, key_dim, value_dim, "interleaved", True, None, "float32"
    )
    assert isinstance(new, retention.StackedState) and new.kv.dtype == stack.dtype
    assert relative_error(o, want_o) < O_RTOL["float32"]
    rtol = STATE_RTOL["float32", "float32"] if state_dtype == "float32" else BF16_STATE_RTOL
    assert relative_error(new.kv[1].astype(jnp.float32), want.kv) < rtol
    for other in (0, 2):
        np.testing.assert_array_equal(new.kv[other], stack[other])
    np.testing.assert_array_equal(new.count, count + 1)


def test_sharded_equals_unsharded():
    """Under a mesh of 8 devices (batch over 4, heads over 2) the joined step runs on each shard of a
    stacked state and of the product's partials: the same output and state as on one device, nothing
    gathered."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    mesh = jax.make_mesh((4, 2), ("batch", "heads"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(13)
    partials = jnp.asarray(rng.standard_normal((2, 4, 2, 2 * 16 + 2 * 32)), jnp.float32)
    stack = jnp.asarray(rng.standard_normal((2, 4, 2, 16, 32)), jnp.float32)
    log_decay = retention.log_decays(2)

    @jax.jit
    def step(partials, stack):
        view = retention.StackedState(stack, 1, jnp.asarray([0, 3, 9, -1], jnp.int32))
        options = dict(key_dim=16, value_dim=32, implementation="pallas", dtype=jnp.float32)
        o, new = dispatch.joined_step(partials, log_decay, view, **options)
        return o, new.kv

    o, kv = step(partials, stack)
    specs = (PartitionSpec(None, "batch", "heads"), PartitionSpec(None, "batch", "heads"))
    with jax.set_mesh(mesh):
        arrays = zip((partials, stack), specs, strict=True)
        put = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in arrays]
        hlo = step.lower(*put).compile().as_text()
        o_sharded, kv_sharded = step(*put)
    assert "all-gather" not in hlo
    assert relative_error(o_sharded, o) < O_RTOL["float32"]
    assert relative_error(kv_sharded, kv) < O_RTOL["float32"]


def test_what_the_joined_kernel_refuses(monkeypatch):
    assert decode_lib.joined_unsupported(256, 512, jnp.bfloat16, jnp.float32, "interleaved") is None
    assert decode_lib.joined_unsupported(256, 432, jnp.bfloat16, jnp.bfloat16, "rotate_half") is None
    assert "rotation 'xpos'" in decode_lib.joined_unsupported(16, 32, jnp.float32, jnp.float32, "xpos")
    assert "K = 24" in decode_lib.joined_unsupported(24, 32, jnp.float32, jnp.float32, "none")
    args = (16, 32, jnp.float32, jnp.float32)
    assert dispatch.joined_kernel("pallas", *args, "rotate_half", backend="cpu")
    assert not dispatch.joined_kernel("auto", *args, "interleaved", backend="cpu")
    assert not dispatch.joined_kernel("xla", *args, "interleaved", backend="gpu")
    monkeypatch.setattr(dispatch, "AUTO_DECODE_KERNEL", True)
    for flag in (True, False):  # "auto" on a GPU: where the decode kernel runs, if AUTO_JOINED_KERNEL
        monkeypatch.setattr(dispatch, "AUTO_JOINED_KERNEL", flag)
        expected = flag and common.triton_unavailable() is None
        assert dispatch.joined_kernel("auto", *args, "interleaved", backend="gpu") == expected
    with pytest.raises(ValueError, match="cannot run with rotation 'xpos'"):
        dispatch.joined_kernel("pallas", *args, "xpos", backend="cpu")
    state = retention.init_state(2, 2, 16, 32)
    with pytest.raises(ValueError, match=r"joined must have shape \[B, H, 2K \+ 2V\] = \(2, 2, 96\)"):
        dispatch.joined_step(jnp.zeros((2, 2, 95)), retention.log_decays(2), state, key_dim=16, value_dim=32)
    with pytest.raises(ValueError, match="partials .* must be float32"):
        partials = jnp.zeros((2, 2, 2, 96), jnp.bfloat16)
        dispatch.joined_step(partials, retention.log_decays(2), state, key_dim=16, value_dim=32)


def test_joined_kernel_lowers_to_triton_at_preset_heads():
    """Every rotation (strided loads and stores of the state's rows for "interleaved"), the product and
    its partials, lower through Pallas's Triton backend (to Triton IR, on the CPU) at the paper's heads
    (K256 V512, a float32 state of 24 layers) and torchscale's (V432: tiles of 16, a bf16 state)."""
    for value_dim, state_dtype, rot, splits in (
        (512, jnp.float32, "interleaved", None),
        (512, jnp.float32, "interleaved", 3),
        (432, jnp.bfloat16, "rotate_half", None),
        (432, jnp.bfloat16, "none", 2),
    ):
        width = 2 * 256 + 2 * value_dim
        shape, dtype = (
            ((1, 8, width), jnp.bfloat16) if splits is None else ((splits, 1, 8, width), jnp.float32)
        )
        joined = jnp.zeros(shape, dtype)
        kv = jnp.zeros((24, 1, 8, 256, value_dim), state_dtype)

        def step(joined, kv, layer, rot=rot):
            count = jnp.zeros((1,), jnp.int32)
            return decode_lib.joined_step(
                joined, retention.log_decays(8), kv, count, key_dim=256, rotation_kind=rot, layer=layer,
                dtype=jnp.bfloat16,
            )  # fmt: skip

        lowered = jax.jit(step, donate_argnums=(1,)).trace(joined, kv, jnp.int32(3))
        assert "__gpu$xla.gpu.triton" in lowered.lower(lowering_platforms=("cuda",)).as_text()


# ------------------------------------------------------------------------------------------------------
# The model: a RetNet's prepared decoding loop (the joined projection) through the kernel.

IDS = dict(bos_id=ByteTokenizer.bos_id, pad_id=ByteTokenizer.pad_id)


@pytest.fixture(scope="module")
def tiny():
    config = RetNetConfig.preset("tiny")
    model = DecoderLM(config)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 4), jnp.int32)))(jax.random.key(3))
    return model, variables


def _producer_chain(jaxpr, var):
    """The primitives that make ``var`` in ``jaxpr``, walking back through single-operand equations."""
    made = {out: eqn for eqn in jaxpr.eqns for out in eqn.outvars}
    chain = []
    while not hasattr(var, "val") and var in made:  # (a literal has a value and no producer)
        eqn = made[var]
        whole = eqn.primitive.name == "split" and eqn.outvars[0].aval.shape == eqn.invars[0].aval.shape
        chain.append("split (whole)" if whole else eqn.primitive.name)  # a one-part FusedProjection's
        if eqn.primitive.name == "dot_general":
            break
        var = eqn.invars[0]
    return chain


def _nested(eqn):
    for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def _primitives(jaxpr) -> set:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for inner in _nested(eqn):
            names |= _primitives(inner)
    return names


def _kernel_calls(jaxpr):
    """(jaxpr, equation) of every call of a kernel: the ``pallas_call``, or the equation that wraps it
    with nothing but XLA's ops of the call (its partitioning rule), found in ``jaxpr`` and nested ones."""
    for eqn in jaxpr.eqns:
        inner = set().union(*(_primitives(sub) for sub in _nested(eqn)))
        if eqn.primitive.name == "pallas_call" or ("pallas_call" in inner and "dot_general" not in inner):
            yield jaxpr, eqn
        else:
            for sub in _nested(eqn):
                yield from _kernel_calls(sub)


def _after_the_product(model, variables) -> list[list[str]]:
    """For each kernel operand of a prepared step that is made from a product: the primitives between."""
    decoder = LMDecoder(model)
    state = model.config.init_state(1, max_length=16)
    prepared = jax.eval_shape(decoder.prepare, variables)  # shapes: the step is only traced
    program = jax.make_jaxpr(decoder.step)(prepared, jnp.zeros((1,), jnp.int32), state)
    chains = []
    for jaxpr, eqn in _kernel_calls(program.jaxpr):
        for var in eqn.invars:
            chain = _producer_chain(jaxpr, var)
            if chain and chain[-1] == "dot_general":
                chains.append(chain[:-1])
    return chains


# What may stand between the product and the kernel: shapes only.
RESHAPES = {"reshape", "squeeze", "split (whole)"}


def test_a_prepared_step_hands_the_product_to_the_kernel(tiny, monkeypatch):
    """In the prepared step's program each layer's decode kernel takes the joined product itself: between
    the product (dot_general) and the kernel only reshapes, no rotation, concatenation or split. The
    step through the decode kernel of separate q, k, v has the rotation there (the check can fail)."""
    model, variables = tiny
    model = model.clone(implementation="pallas")
    chains = _after_the_product(model, variables)
    assert len(chains) == model.config.num_layers, chains  # one operand a layer: the joined product
    assert all(set(chain) <= RESHAPES for chain in chains), chains
    monkeypatch.setattr(dispatch, "joined_kernel", lambda *args, **kwargs: False)
    chains = _after_the_product(model, variables)
    assert any(set(chain) - RESHAPES for chain in chains), chains


@pytest.mark.parametrize(("rot", "projections"), [("rotate_half", "auto"), ("interleaved", "pallas")])
def test_prepared_loop_through_the_joined_kernel_equals_xlas(tiny, rot, projections):
    """Greedy tokens and log-probabilities of the prepared loop with the decode kernel (interpreted)
    equal XLA's step's loop (float32, the same function up to the order of sums: 1e-5), prompts of
    different lengths (left pads); with XLA's products and with the few-row kernel (its norm prologue:
    the joined product then comes out of a kernel)."""
    model, variables = tiny
    model = model.clone(config=model.config.replace(rotation=rot), projections=projections)
    prompts = [[], [10, 20, 30, 40, 50]]
    results = [
        generate(LMDecoder(model.clone(implementation=impl)), variables, prompts, max_new_tokens=4,
                 return_logprobs=True, **IDS)
        for impl in ("pallas", "xla")
    ]  # fmt: skip
    np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
    np.testing.assert_allclose(results[0].logprobs, results[1].logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_a_prepared_step_with_a_pad_row_equals_xlas(tiny, state_dtype):
    """One prepared step with a row still in its left pads (position −2) and one at position 5: logits
    and state through the kernel equal XLA's."""
    model, variables = tiny
    config = model.config
    state = config.init_state(2, max_length=16, state_dtype=state_dtype)
    rng = np.random.default_rng(4)
    kv = jnp.asarray(rng.standard_normal(state.kv.shape) * 0.1, state.kv.dtype)
    state = state._replace(kv=kv, position=jnp.asarray([-2, 5], jnp.int32))
    tokens = jnp.asarray([7, 9], jnp.int32)
    out = {}
    for impl in ("pallas", "xla"):
        decoder = LMDecoder(model.clone(implementation=impl))
        out[impl] = jax.jit(decoder.step)(jax.jit(decoder.prepare)(variables), tokens, state)
    (logits, new), (want_logits, want) = out["pallas"], out["xla"]
    rtol = 1e-5 if state_dtype is None else BF16_STATE_RTOL
    assert relative_error(logits, want_logits) < 1e-5 + (0 if state_dtype is None else rtol)
    assert new.kv.dtype == want.kv.dtype
    assert relative_error(new.kv.astype(jnp.float32), want.kv.astype(jnp.float32)) < rtol
    np.testing.assert_array_equal(new.position, want.position)
