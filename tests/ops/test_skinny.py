"""The few-row product kernel (``ops.gpu.skinny``), its norm prologue, and its dispatch (``ops.products``),
on the CPU.

Tolerances: float32 against a float64 product 1e-6 relative to the largest output (float32 accumulation of
up to 3456 terms); bfloat16 4e-3 (the output's rounding, 2^-8, against the float64 product of the same
rounded inputs). With the norm prologue the same, against the float64 product of XLA's norm (cast to the
compute dtype as the norm layer does): the kernel's statistics differ from XLA's only in the order of a
float32 sum. With an epilogue (bias, activation, residual) the same, against XLA's float32 product followed by
the same epilogue (``skinny.epilogue``) and one cast.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.inference.decoding import LMDecoder
from retnet_jax.inference.generate import generate
from retnet_jax.models import RetNetConfig, RetNetLM
from retnet_jax.nn.norms import HeadNorm
from retnet_jax.ops import norms, products
from retnet_jax.ops.gpu import skinny
from tests.helpers import random_variables

TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 4e-3}


# The inputs are drawn by NumPy (op by op, JAX compiles every operation for every new shape).
def _normal(rng, shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))


def _inputs(rows, d, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return _normal(rng, (rows, d), dtype), _normal(rng, (d, n), dtype)


@pytest.mark.parametrize(
    "rows, d, n, dtype",
    [
        (1, 256, 128, jnp.float32),
        (3, 128, 96, jnp.bfloat16),
        (16, 64, 512, jnp.float32),
        (1, 3456, 64, jnp.bfloat16),
    ],
)
def test_kernel_equals_the_float64_product(rows, d, n, dtype):
    x, w = _inputs(rows, d, n, dtype)
    y = skinny.matmul(x, w, interpret=True)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert y.shape == (rows, n) and y.dtype == dtype
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= TOLERANCE[dtype] * np.abs(ref).max()


def test_gradients_are_xlas():
    x, w = _inputs(2, 128, 64, jnp.float32, seed=1)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 64))

    def loss(product):
        return lambda x, w: jnp.sum(product(x, w) * cotangent)

    ours = jax.jit(jax.grad(loss(lambda x, w: skinny.matmul(x, w, interpret=True)), (0, 1)))(x, w)
    theirs = jax.jit(jax.grad(loss(jnp.dot), (0, 1)))(x, w)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _norm_inputs(kind, rows, d, n, dtype, seed=0):
    """x with a mean far from 0 (LayerNorm must centre it), scale ≈ 1, bias ≈ 0 in float32 (the parameters'
    dtype), w in the compute dtype."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray((3 * rng.standard_normal((rows, d), np.float32) + 5).astype(dtype))
    w = _normal(rng, (d, n), dtype)
    scale = 1 + 0.2 * _normal(rng, (d,))
    bias = 0.2 * _normal(rng, (d,)) if kind == "layernorm" else None
    return x, w, scale, bias


@pytest.mark.parametrize(
    "kind, rows, d, dtype",
    [
        ("rmsnorm", 1, 256, jnp.float32),
        ("rmsnorm", 3, 256, jnp.bfloat16),
        ("rmsnorm", 16, 1024, jnp.float32),
        ("layernorm", 1, 256, jnp.bfloat16),
        ("layernorm", 3, 256, jnp.float32),
        ("layernorm", 16, 1024, jnp.bfloat16),
    ],
)
def test_norm_prologue_equals_xlas_norm_then_the_product(kind, rows, d, dtype):
    """The statistics run over all of D though each program multiplies one slice of it (one row: D in 4
    steps of 64 over 4 programs), in steps of up to 8192 / R elements (16 rows of 1024: 2 steps)."""
    x, w, scale, bias = _norm_inputs(kind, rows, d, 128, dtype)
    y = skinny.matmul(x, w, norm=kind, scale=scale, bias=bias, eps=1e-5, interpret=True)
    normed = norms.normalize(x, kind, 1e-5, scale, bias, dtype)  # the norm layer's output
    ref = np.asarray(normed, np.float64) @ np.asarray(w, np.float64)
    assert y.shape == (rows, 128) and y.dtype == dtype
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= TOLERANCE[dtype] * np.abs(ref).max()


@pytest.mark.parametrize("kind", norms.KINDS)
def test_norm_prologue_gradients_are_xlas(kind):
    x, w, scale, bias = _norm_inputs(kind, 2, 128, 64, jnp.float32, seed=1)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 64))

    def loss(product):
        return lambda x, w, scale, bias: jnp.sum(product(x, w, scale, bias) * cotangent)

    def ours(x, w, scale, bias):
        return skinny.matmul(x, w, norm=kind, scale=scale, bias=bias, eps=1e-5, interpret=True)

    def xlas(x, w, scale, bias):
        return jnp.dot(norms.normalize(x, kind, 1e-5, scale, bias, w.dtype), w, precision="highest")

    args = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    got = jax.jit(jax.grad(loss(ours), args))(x, w, scale, bias)
    want = jax.jit(jax.grad(loss(xlas), args))(x, w, scale, bias)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_norm_prologue_refusals():
    x, w, scale, _ = _norm_inputs("rmsnorm", 1, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="norm='layernorm' takes a scale and a bias"):
        skinny.matmul(x, w, norm="layernorm", scale=scale, interpret=True)
    with pytest.raises(ValueError, match="norm='rmsnorm' takes a scale of shape"):
        skinny.matmul(x, w, norm="rmsnorm", scale=scale, bias=scale, interpret=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        skinny.matmul(x, w, norm="groupnorm", scale=scale, interpret=True)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32; got float64"):
        skinny.matmul(x, w, norm="rmsnorm", scale=np.ones(64), interpret=True)


def test_plans_and_refusals():
    """The grid reaches PROGRAMS where the slices allow it; the partials stay within W / 16; shapes the kernel
    does not take are refused with the reason."""
    one = skinny.plan(1, 2048, 4096, jnp.bfloat16)
    assert (4096 // one.block_n) * one.splits >= skinny.PROGRAMS
    eight = skinny.plan(8, 4096, 2048, jnp.bfloat16)
    assert eight.splits * 16 * 4 <= 4096 * 2 // 16
    assert "rows" in skinny.plan(17, 64, 64, jnp.bfloat16)
    assert "multiples of 16" in skinny.plan(1, 100, 64, jnp.bfloat16)
    assert "dtype" in skinny.plan(1, 64, 64, jnp.float64)
    with pytest.raises(ValueError, match="skinny.matmul cannot run"):
        skinny.matmul(*_inputs(1, 100, 64, jnp.float32))


def _outside_kernels(program) -> list:
    """The equations of a jaxpr outside its kernels, sub-jaxprs (custom_vjp's) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.append(eqn)
            if eqn.primitive.name == "pallas_call":
                continue
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                        walk(getattr(sub, "jaxpr", sub))

    walk(program.jaxpr)
    return found


@pytest.mark.parametrize(
    "kind, rows, d, n, dtype",
    [
        (None, 1, 256, 128, jnp.float32),
        (None, 3, 128, 96, jnp.bfloat16),
        (None, 16, 512, 64, jnp.bfloat16),
        ("rmsnorm", 1, 256, 128, jnp.bfloat16),
        ("layernorm", 3, 256, 64, jnp.float32),
        ("layernorm", 16, 1024, 32, jnp.bfloat16),
    ],
)
def test_one_slice_writes_the_output_itself(kind, rows, d, n, dtype):
    """S = 1: the kernel writes the output in w's dtype (no float32 partials, no sum afterwards) and equals
    the float64 product, with and without the norm prologue (16 rows of 1024: 2 statistics steps)."""
    tiles = skinny.Plan(block_d=64, block_n=32, splits=1)
    if kind is None:
        x, w = _inputs(rows, d, n, dtype)
        scale = bias = None
        product = lambda x, w: skinny.matmul(x, w, tiles=tiles, interpret=True)  # noqa: E731
        ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    else:
        x, w, scale, bias = _norm_inputs(kind, rows, d, n, dtype)
        product = lambda x, w: skinny.matmul(  # noqa: E731
            x, w, norm=kind, scale=scale, bias=bias, eps=1e-5, tiles=tiles, interpret=True
        )
        normed = norms.normalize(x, kind, 1e-5, scale, bias, dtype)
        ref = np.asarray(normed, np.float64) @ np.asarray(w, np.float64)
    y = product(x, w)
    assert y.shape == (rows, n) and y.dtype == dtype
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= TOLERANCE[dtype] * np.abs(ref).max()
    eqns = _outside_kernels(jax.make_jaxpr(product)(x, w))
    (kernel,) = [e for e in eqns if e.primitive.name == "pallas_call"]
    assert kernel.outvars[0].aval.dtype == dtype and kernel.outvars[0].aval.ndim == 2
    assert not [e for e in eqns if e.primitive.name.startswith("reduce")]
    split = skinny.Plan(block_d=64, block_n=32, splits=2)  # the same product summed from 2 partials
    eqns = _outside_kernels(
        jax.make_jaxpr(lambda x, w: skinny.matmul(x, w, tiles=split, interpret=True))(x, w)
    )
    assert [e for e in eqns if e.primitive.name == "reduce_sum"]


def test_explicit_plans_are_checked():
    """Every candidate is accepted and listed once, plan's first; plans that do not fit are refused with
    the reason, before anything runs."""
    rows, d, n = 1, 2048, 12288
    listed = skinny.candidates(rows, d, n, jnp.bfloat16)
    assert listed[0] == skinny.plan(rows, d, n, jnp.bfloat16) and len(set(listed)) == len(listed)
    assert 12 <= len(listed) <= skinny.MAX_CANDIDATES
    assert all(skinny.check(p, rows, d, n, jnp.bfloat16) is None for p in listed)
    assert any(p.splits == 1 and p.block_n == 16 for p in listed)
    assert skinny.candidates(1, 100, 64, jnp.bfloat16) == []
    x, w = _inputs(1, 256, 128, jnp.float32)
    refused = {
        "block_d = 48 (a power of two": skinny.Plan(48, 64, 1),
        "block_n = 8 (a power of two of at least 16)": skinny.Plan(64, 8, 1),
        "must divide D = 256 and N = 128": skinny.Plan(512, 64, 1),
        "splits = 3 must divide D / block_d = 4": skinny.Plan(64, 64, 3),
        "num_warps = 3": skinny.Plan(64, 64, 1, num_warps=3),
        "exceed": skinny.Plan(256, 128, 1, num_stages=4),
    }
    for reason, tiles in refused.items():
        with pytest.raises(ValueError, match=f"does not fit .* {re.escape(reason)}"):
            skinny.matmul(x, w, tiles=tiles, interpret=True)
    with pytest.raises(ValueError, match="17 rows"):
        skinny.matmul(*_inputs(17, 64, 64, jnp.float32), tiles=skinny.Plan(64, 64, 1), interpret=True)


def test_the_kernel_lowers_to_triton():
    """Without and with each norm prologue (bfloat16 x, float32 norm parameters, as a decoding step), and
    with each epilogue at S = 1 (float32 bias, bfloat16 residual)."""
    x, w = jnp.zeros((1, 2048), jnp.bfloat16), jnp.zeros((2048, 4096), jnp.bfloat16)
    ones = jnp.ones((2048,), jnp.float32)
    products_ = {
        None: skinny.matmul,
        "rmsnorm": lambda x, w: skinny.matmul(x, w, norm="rmsnorm", scale=ones),
        "layernorm": lambda x, w: skinny.matmul(x, w, norm="layernorm", scale=ones, bias=ones),
    }
    for product in products_.values():
        for rows in (1, 8):
            text = jax.jit(product).trace(x[:1].repeat(rows, 0), w).lower(lowering_platforms=("cuda",))
            assert "__gpu$xla.gpu.triton" in text.as_text()
    bias = jnp.zeros((4096,), jnp.float32)
    for activation in skinny.ACTIVATIONS:
        for rows in (1, 8):
            residual = jnp.zeros((rows, 4096), jnp.bfloat16)

            def finished(x, w, activation=activation, residual=residual):
                return skinny.matmul(
                    x, w, norm="layernorm", scale=ones, bias=ones, output_bias=bias, activation=activation,
                    residual=residual, tiles=skinny.Plan(64, 128, 1),
                )  # fmt: skip

            text = jax.jit(finished).trace(x[:1].repeat(rows, 0), w).lower(lowering_platforms=("cuda",))
            assert "__gpu$xla.gpu.triton" in text.as_text()


def test_dispatch(monkeypatch):
    f32 = jnp.float32
    assert not products.uses_kernel("auto", 1, 64, 64, f32)  # CPU: XLA
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the rule as on one GPU
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(products.common, "triton_unavailable", lambda: None)
    assert products.uses_kernel("auto", 1, 64, 64, f32)
    assert not products.uses_kernel("auto", 2, 64, 64, f32)  # measured slower at B = 8: XLA
    assert not products.uses_kernel("auto", 1, 2048, 50304, f32)  # a weight > AUTO_MAX_WEIGHT_BYTES: XLA
    monkeypatch.setattr(products, "AUTO_MAX_ROWS", 0)
    assert not products.uses_kernel("auto", 1, 64, 64, f32)
    assert not products.uses_kernel("xla", 1, 64, 64, f32)
    assert products.uses_kernel("pallas", 1, 64, 64, f32)
    assert not products.uses_kernel("pallas", 17, 64, 64, f32)  # a matmul: XLA
    assert not products.uses_kernel("pallas", 1, 100, 64, f32)  # not taken: XLA
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        products.uses_kernel("fast", 1, 64, 64, f32)


def test_auto_leaves_the_head_norm_to_the_kernel_only_where_switched_on(monkeypatch):
    """Under "auto" on a GPU, retention's head norm and gate stay XLA's until
    ``AUTO_HEAD_NORM_PROLOGUE`` (unmeasured); "pallas" takes the prologue; "xla" never does."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the rule as on one GPU
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(products.common, "triton_unavailable", lambda: None)
    o, g = jnp.ones((1, 1, 2, 64), jnp.float32), jnp.ones((1, 1, 2, 64), jnp.float32)
    deferred = {}
    for switch in (False, True):
        monkeypatch.setattr(products, "AUTO_HEAD_NORM_PROLOGUE", switch)
        for implementation in ("auto", "pallas", "xla"):
            out = HeadNorm("rms", defer=implementation).apply({}, o, g)
            deferred[switch, implementation] = isinstance(out, norms.Normed)
    assert deferred == {
        (False, "auto"): False,
        (False, "pallas"): True,
        (False, "xla"): False,
        (True, "auto"): True,
        (True, "pallas"): True,
        (True, "xla"): False,
    }, deferred


def _norms_outside_kernels(program) -> tuple[int, int]:
    """(rsqrt ops outside kernels, kernels with an rsqrt inside) of a jaxpr, sub-jaxprs included (a
    scanned block counted once). Every norm takes one rsqrt: a norm outside the kernels is one there."""
    counts = [0, 0]

    def walk(jaxpr, inside):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "rsqrt" and not inside:
                counts[0] += 1
            if eqn.primitive.name == "pallas_call" and "rsqrt" in str(eqn.params["jaxpr"]):
                counts[1] += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                        walk(getattr(sub, "jaxpr", sub), inside or eqn.primitive.name == "pallas_call")

    walk(program.jaxpr, False)
    return tuple(counts)


def _step_program(model, variables, step, state):
    return jax.make_jaxpr(lambda v: model.apply(v, step, state=state, mode="recurrent"))(variables)


def test_a_decoding_step_through_the_kernel_equals_xlas():
    """One RetNet decoding step with every projection (and the untied head) through the few-row kernel
    equals the step through XLA's products. (The Transformer's projections are the same modules.) Both
    block norms, the final norm (RMSNorm here) and retention's head norm with its gate run in the
    prologues of the kernels that take them: outside the kernels no norm remains."""
    config = RetNetConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=2, value_dim=128, ffn_dim=128)
    tokens = jnp.array([[3, 9, 27, 17]], jnp.int32)
    xla, pallas = RetNetLM(config, projections="xla"), RetNetLM(config, projections="pallas")
    variables = jax.jit(xla.init)(jax.random.PRNGKey(0), tokens)
    _, state = jax.jit(lambda v, t: xla.apply(v, t, return_state=True))(variables, tokens[:, :-1])
    step = tokens[:, -1:]
    run = lambda model: jax.jit(lambda v, s: model.apply(v, step, state=s, mode="recurrent"))
    ours, _ = run(pallas)(variables, state)
    theirs, _ = run(xla)(variables, state)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    program = _step_program(pallas, variables, step, state)
    assert str(program).count("pallas_call") >= 8  # q, k, v, g, out, fc1, fc2, head
    assert _norms_outside_kernels(_step_program(xla, variables, step, state)) == (4, 0)
    outside, fused = _norms_outside_kernels(program)
    assert outside == 0 and fused >= 4  # q/k/v/g, out (the head norm), fc1/gate and the head take the norms


def test_generation_through_the_fused_norms_equals_xlas():
    """Greedy generation of a paper-style model (LayerNorm with bias, GELU MLP, biases; every parameter
    perturbed, so that the norms' scales and biases are not 1 and 0) with the projections through the
    kernel (its prefill and its steps) gives XLA's tokens and log-probabilities; its decoding step runs
    no norm outside the kernels. Its parameters initialized through the kernel are XLA's, names
    included (the layers that take a norm's deferred output create the same parameters)."""
    config = RetNetConfig(
        vocab_size=64,
        d_model=64,
        num_layers=1,
        num_heads=2,
        value_dim=128,
        ffn_dim=128,
        norm="layernorm",
        ffn_type="mlp",
        activation="gelu",
        use_bias=True,
    )
    xla, pallas = RetNetLM(config, projections="xla"), RetNetLM(config, projections="pallas")
    one_token = jnp.zeros((1, 1), jnp.int32)
    variables = jax.jit(xla.init)(jax.random.PRNGKey(0), one_token)
    through_kernel = jax.jit(pallas.init)(jax.random.PRNGKey(0), one_token)
    assert jax.tree.structure(through_kernel) == jax.tree.structure(variables)  # partition names included
    for a, b in zip(jax.tree.leaves(through_kernel), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    perturb = jax.jit(
        lambda tree: jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), tree)
    )
    variables = perturb(variables)
    run = dict(max_new_tokens=4, bos_id=1, pad_id=0, return_logprobs=True)
    ours = generate(pallas, variables, [[3, 9, 27]], **run)
    theirs = generate(xla, variables, [[3, 9, 27]], **run)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    np.testing.assert_allclose(ours.logprobs, theirs.logprobs, rtol=1e-5, atol=1e-5)
    _, state = jax.jit(lambda v, t: xla.apply(v, t, return_state=True))(variables, ours.tokens[:, :-1])
    program = _step_program(pallas, variables, ours.tokens[:, -1:], state)
    assert _norms_outside_kernels(program)[0] == 0


def test_a_prepared_steps_head_norm_and_gate_run_in_the_out_projection():
    """A prepared decoding step (``LMDecoder``: the layers apart, q/k/v/g joined) whose out projection runs
    the kernel, with its kernels stored [D, N] and [N, D], computes retention's head norm and swish gate
    in that kernel's prologue, g read in place from the joined q, k, v, g product: outside the kernels no
    rsqrt (a norm) and no logistic (a swish) remain, where XLA's step has both (the block norms', the
    final norm's and the head norm's rsqrt; the FFN's and the gate's swish); its logits equal XLA's
    (float32, 1e-5: sums in another order). fla's head norm (with a weight [V], random here) is the one
    with a parameter in the prologue; the kinds' numerics are
    ``test_head_norm_and_gate_prologue_equals_xlas``'s."""
    config = RetNetConfig(
        vocab_size=64,
        d_model=64,
        num_layers=1,
        num_heads=2,
        value_dim=64,
        ffn_dim=128,
        head_norm="rms_weight",
    )
    model = RetNetLM(config, projections="xla")
    variables = random_variables(model, 3)  # the head norm's weight not 1
    state = config.init_state(1, max_length=8)
    tokens = jnp.array([5], jnp.int32)
    outside, logits = {}, {}
    for projections, transpose in (("pallas", False), ("pallas", True), ("xla", False)):
        decoder = LMDecoder(model.clone(projections=projections), transpose_kernels=transpose)
        prepared = jax.jit(decoder.prepare)(variables)
        program = jax.make_jaxpr(decoder.step)(prepared, tokens, state)
        eqns = _outside_kernels(program)
        names = [eqn.primitive.name for eqn in eqns]
        outside[projections, transpose] = names.count("rsqrt"), names.count("logistic")
        if projections == "pallas":  # g read in place: the joined q, k, v, g product [1, H·(2K + 2V)]
            taken = [v.aval.shape for e in eqns if e.primitive.name == "pallas_call" for v in e.invars]
            assert (1, 2 * config.d_model + 2 * config.value_dim) in taken  # H·2K = 2D, H·2V
        logits[projections, transpose] = jax.jit(decoder.step)(prepared, tokens, state)[0]
    assert outside == {("pallas", False): (0, 0), ("pallas", True): (0, 0), ("xla", False): (4, 2)}, outside
    for key in (("pallas", False), ("pallas", True)):
        np.testing.assert_allclose(logits[key], logits["xla", False], rtol=1e-5, atol=1e-5)


def _epilogue_inputs(rows, n, dtype, bias, residual, seed=3):
    rng = np.random.default_rng(seed)
    b = _normal(rng, (n,)) if bias else None  # a float32 parameter
    r = _normal(rng, (rows, n), dtype) if residual else None  # the stream's
    return b, r


def _xla_epilogue(x, w, norm, scale, norm_bias, b, activation, r):
    """XLA's norm (as the norm layer), float32 product, the same epilogue, one cast."""
    if norm is not None:
        x = norms.normalize(x, norm, 1e-5, scale, norm_bias, w.dtype)
    acc = jnp.dot(x, w, precision="highest", preferred_element_type=jnp.float32)
    return skinny.epilogue(acc, b, activation, r).astype(w.dtype)


EPILOGUES = [(True, None, False), (True, "gelu", False), (False, "swish", True), (True, "gelu", True)]


@pytest.mark.parametrize(
    "rows, splits, norm, dtype, finish",
    [
        (1, 1, None, jnp.float32, EPILOGUES[0]),
        (1, 1, "layernorm", jnp.float32, EPILOGUES[3]),
        (3, 1, "rmsnorm", jnp.bfloat16, EPILOGUES[2]),
        (1, 2, None, jnp.bfloat16, EPILOGUES[1]),
        (3, 2, "layernorm", jnp.float32, EPILOGUES[3]),
        (16, 1, None, jnp.float32, EPILOGUES[2]),
    ],
)
def test_epilogue_equals_xlas(rows, splits, norm, dtype, finish):
    """act(x W + b) + r (after the norm prologue where there is one) equals XLA's float32 product and the
    same epilogue. S = 1: applied in the kernel (nothing but the residual's padding to 16 rows outside it);
    S = 2: by XLA after the sum of the partials."""
    d, n = 256, 64
    has_bias, activation, has_residual = finish
    if norm is None:
        (x, w), scale, norm_bias = _inputs(rows, d, n, dtype), None, None
    else:
        x, w, scale, norm_bias = _norm_inputs(norm, rows, d, n, dtype)
    b, r = _epilogue_inputs(rows, n, dtype, has_bias, has_residual)
    tiles = skinny.Plan(block_d=64, block_n=32, splits=splits)

    def product(x, w, b, r):
        return skinny.matmul(
            x, w, norm=norm, scale=scale, bias=norm_bias, eps=1e-5, output_bias=b, activation=activation,
            residual=r, tiles=tiles, interpret=True,
        )  # fmt: skip

    y = product(x, w, b, r)
    want = _xla_epilogue(x, w, norm, scale, norm_bias, b, activation, r)
    assert y.shape == (rows, n) and y.dtype == dtype
    scale_of = np.abs(np.asarray(want, np.float64)).max()
    assert (
        np.abs(np.asarray(y, np.float64) - np.asarray(want, np.float64)).max() <= TOLERANCE[dtype] * scale_of
    )
    outside = {e.primitive.name for e in _outside_kernels(jax.make_jaxpr(product)(x, w, b, r))}
    epilogue_ops = {"add", "tanh", "logistic"} & outside
    assert not epilogue_ops if splits == 1 else epilogue_ops


@pytest.mark.parametrize("norm, activation", [(None, "swish"), ("layernorm", "gelu")])
def test_epilogue_gradients_are_xlas(norm, activation):
    """Through x, w, the norm's parameters, the bias and the residual, at S = 1 and the default plan."""
    rows, d, n = 2, 128, 64
    if norm is None:
        (x, w), scale, norm_bias = _inputs(rows, d, n, jnp.float32, seed=1), None, None
    else:
        x, w, scale, norm_bias = _norm_inputs(norm, rows, d, n, jnp.float32, seed=1)
    b, r = _epilogue_inputs(rows, n, jnp.float32, True, True)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (rows, n))

    def ours(tiles):
        def product(x, w, scale, norm_bias, b, r):
            return skinny.matmul(
                x, w, norm=norm, scale=scale, bias=norm_bias, eps=1e-5, output_bias=b,
                activation=activation, residual=r, tiles=tiles, interpret=True,
            )  # fmt: skip

        return product

    def xlas(x, w, scale, norm_bias, b, r):
        return _xla_epilogue(x, w, norm, scale, norm_bias, b, activation, r)

    args = (x, w, scale, norm_bias, b, r)
    wrt = tuple(i for i, a in enumerate(args) if a is not None)

    def grads(product):
        return jax.jit(jax.grad(lambda *a: jnp.sum(product(*a) * cotangent), wrt))(*args)

    want = grads(xlas)
    for tiles in (skinny.Plan(64, 32, 1), None):
        for a, b_ in zip(grads(ours(tiles)), want, strict=True):
            np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5 * np.abs(b_).max())


def test_epilogue_refusals():
    x, w = _inputs(2, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        skinny.matmul(x, w, activation="relu", interpret=True)
    with pytest.raises(ValueError, match=r"residual must be \[2, 32\]"):
        skinny.matmul(x, w, residual=jnp.zeros((1, 32)), interpret=True)
    with pytest.raises(ValueError, match=r"output_bias must be \[32\] in bfloat16, float16 or float32"):
        skinny.matmul(x, w, output_bias=np.zeros(32), interpret=True)


# Retention's head norm and gate in the prologue: x = o [M, H·V] (float32, as the decode step returns it),
# g [M, H·V] and w in the compute dtype; the norm over each head's V columns. Against XLA's head norm
# (``ops.norms.normalize`` on [M, H, V], the layer's computation), gate and cast, then the float64 product.
HEAD_NORMS = {"rms": ("rmsnorm", False), "layernorm": ("layernorm", False), "rms_weight": ("rmsnorm", True)}


def _head_inputs(head_norm, rows, heads, v, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    o = jnp.asarray(3 * rng.standard_normal((rows, heads * v), np.float32) + 5)  # LayerNorm must centre it
    g = _normal(rng, (rows, heads * v), dtype)
    w = _normal(rng, (heads * v, n), dtype)
    kind, weighted = HEAD_NORMS[head_norm]
    scale = 1 + 0.2 * _normal(rng, (v,)) if weighted else None
    return kind, o, g, w, scale


def head_gated(o, g, kind, scale, v, dtype):
    """The layer's swish(g) ⊙ HeadNorm(o) on [M, H·V] in ``dtype``."""
    grouped = (o.shape[0], -1, v)
    y = norms.normalize(o.reshape(grouped), kind, 1e-5, scale, None, dtype, g.reshape(grouped))
    return y.reshape(o.shape)


@pytest.mark.parametrize(
    "head_norm, rows, v, tiles, dtype",
    [
        ("rms", 1, 64, None, jnp.bfloat16),  # BD = V: one group a step, S = 4 programs a column tile
        ("layernorm", 3, 128, None, jnp.float32),  # two steps a group, one a program: traced group starts
        ("rms_weight", 1, 128, skinny.Plan(64, 128, 1), jnp.float32),  # one program, two groups in a loop
        ("layernorm", 1, 32, skinny.Plan(32, 64, 2), jnp.bfloat16),  # BD = V = 32, two slices of 4 groups
        ("rms", 3, 64, "joined", jnp.float32),  # the gate read in place from a wider product
        ("rms_weight", 1, 128, "joined", jnp.bfloat16),
    ],
)
def test_head_norm_and_gate_prologue_equals_xlas(head_norm, rows, v, tiles, dtype):
    """With tiles "joined": the gate is read in place from each head's W = V + 48 columns of another array
    (at columns 32 … 32 + V, as retention's joined q, k, v, g product holds g)."""
    kind, o, g, w, scale = _head_inputs(head_norm, rows, 256 // v, v, 128, dtype)
    options = dict(tiles=tiles)
    if tiles == "joined":
        wide = jnp.pad(g.reshape(rows, -1, v), ((0, 0), (0, 0), (32, 16)), constant_values=7.0)
        options = dict(gate_offset=32)
        g_given = wide.reshape(rows, -1)
    else:
        g_given = g
    y = skinny.matmul(
        o, w, norm=kind, scale=scale, eps=1e-5, gate=g_given, group=v, **options, interpret=True
    )
    ref = np.asarray(head_gated(o, g, kind, scale, v, dtype), np.float64) @ np.asarray(w, np.float64)
    assert y.shape == (rows, 128) and y.dtype == dtype
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= TOLERANCE[dtype] * np.abs(ref).max()


@pytest.mark.parametrize("head_norm", ["layernorm", "rms_weight"])
def test_head_norm_and_gate_prologue_gradients_are_xlas(head_norm):
    kind, o, g, w, scale = _head_inputs(head_norm, 2, 2, 64, 64, jnp.float32, seed=1)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 64))

    def ours(o, g, w, scale):
        return skinny.matmul(o, w, norm=kind, scale=scale, eps=1e-5, gate=g, group=64, interpret=True)

    def xlas(o, g, w, scale):
        return jnp.dot(head_gated(o, g, kind, scale, 64, w.dtype), w, precision="highest")

    def loss(product):
        return lambda *args: jnp.sum(product(*args) * cotangent)

    args = (0, 1, 2) if scale is None else (0, 1, 2, 3)  # the weight's gradient too where there is one
    got = jax.jit(jax.grad(loss(ours), args))(o, g, w, scale)
    want = jax.jit(jax.grad(loss(xlas), args))(o, g, w, scale)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_head_norm_and_gate_prologue_refusals():
    _, o, g, w, _ = _head_inputs("rms", 1, 4, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="group = 48 must be a multiple of 16 dividing D = 256"):
        skinny.matmul(o, w, norm="rmsnorm", gate=g, group=48, interpret=True)
    with pytest.raises(ValueError, match="block_d = 64 must divide the norm's group of 32 columns"):
        skinny.matmul(o, w, norm="rmsnorm", gate=g, group=32, tiles=skinny.Plan(64, 64, 1), interpret=True)
    with pytest.raises(ValueError, match=r"the gate must be \[M, D / group · W\]"):
        skinny.matmul(o, w, norm="rmsnorm", gate=g[:, :64], group=64, interpret=True)
    with pytest.raises(ValueError, match="gate and group belong to a norm prologue"):
        skinny.matmul(o, w, gate=g, interpret=True)


def test_the_head_norm_and_gate_prologue_lowers_to_triton():
    """At the paper's head (H = 8, V = 512: x [R, 4096], the out projection's W [4096, 2048]): float32 o,
    bfloat16 g and W, one row and 8, each norm kind, with the residual epilogue of a decoding step; g apart
    and read in place from the joined q, k, v, g product."""
    o, g = jnp.zeros((1, 4096), jnp.float32), jnp.zeros((1, 4096), jnp.bfloat16)
    w, scale = jnp.zeros((4096, 2048), jnp.bfloat16), jnp.ones((512,), jnp.float32)
    joined = jnp.zeros((1, 8 * 1536), jnp.bfloat16)  # the joined q, k, v, g: K = 256, g at [1024, 1536)
    gates = ((g, 0), (joined, 1024))
    cases = [
        (kind, weight, *gate) for kind, weight in (("rmsnorm", scale), ("layernorm", None)) for gate in gates
    ]
    for kind, weight, g, offset in cases:
        for rows in (1, 8):
            residual = jnp.zeros((rows, 2048), jnp.bfloat16)

            def product(o, g, w, kind=kind, weight=weight, offset=offset, residual=residual):
                return skinny.matmul(
                    o, w, norm=kind, scale=weight, gate=g, group=512, gate_offset=offset, residual=residual
                )

            args = (o.repeat(rows, 0), g.repeat(rows, 0), w)
            text = jax.jit(product).trace(*args).lower(lowering_platforms=("cuda",))
            assert "__gpu$xla.gpu.triton" in text.as_text()
