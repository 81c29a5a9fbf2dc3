"""The few-row kernel on a weight stored transposed (``ops.gpu.skinny_nd``: Wᵀ [N, D]) and its dispatch
(``ops.products.project(transposed=True)``), on the CPU.

Tolerances as ``test_skinny``'s: float32 against a float64 product 1e-6 relative to the largest output
(float32 accumulation, here of up to 2048 terms); bfloat16 4e-3 (the output's rounding, 2^-8, against the
float64 product of the same rounded inputs). With the norm prologue against the float64 product of XLA's
norm (cast to the compute dtype); with an epilogue against XLA's float32 product, the same epilogue
(``skinny.epilogue``) and one cast. Gradients (XLA's either way) 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.ops import norms, products
from retnet_jax.ops.gpu import skinny, skinny_nd
from tests.ops.test_skinny import _head_inputs, _normal, head_gated

TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 4e-3}


def _inputs(rows, d, n, dtype, seed=0):
    """x [rows, d] and w [n, d] (stored transposed), drawn by NumPy (op by op, JAX compiles every operation
    for every new shape)."""
    rng = np.random.default_rng(seed)
    return _normal(rng, (rows, d), dtype), _normal(rng, (n, d), dtype)


def _close(y, want, dtype):
    want = np.asarray(want, np.float64)
    assert np.abs(np.asarray(y, np.float64) - want).max() <= TOLERANCE[dtype] * np.abs(want).max()


@pytest.mark.parametrize(
    "rows, d, n, tiles, dtype",
    [
        (1, 256, 64, None, jnp.float32),
        (1, 2048, 8, skinny_nd.Plan(256, 8), jnp.bfloat16),  # D in 8 steps of 256, one program
        (3, 128, 96, None, jnp.bfloat16),
        (16, 512, 64, skinny_nd.Plan(64, 16), jnp.float32),
        (1, 1024, 64, skinny_nd.Plan(256, 32, 8, 2, reduce=1), jnp.bfloat16),  # summed each step, 4 steps
        (1, 512, 16, skinny_nd.Plan(128, 8, reduce=1), jnp.float32),
    ],
)
def test_kernel_equals_the_float64_product(rows, d, n, tiles, dtype):
    x, w = _inputs(rows, d, n, dtype)
    y = skinny_nd.matmul(x, w, tiles=tiles, interpret=True)
    assert y.shape == (rows, n) and y.dtype == dtype
    _close(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T, dtype)


def _norm_inputs(kind, rows, d, n, dtype, seed=0):
    """x with a mean far from 0 (LayerNorm must centre it), scale ≈ 1 and bias ≈ 0 in float32."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray((3 * rng.standard_normal((rows, d), np.float32) + 5).astype(dtype))
    w = _normal(rng, (n, d), dtype)
    scale = 1 + 0.2 * _normal(rng, (d,))
    bias = 0.2 * _normal(rng, (d,)) if kind == "layernorm" else None
    return x, w, scale, bias


EPILOGUES = [(False, None, False), (True, "gelu", False), (False, "swish", True), (True, "gelu", True)]


@pytest.mark.parametrize(
    "rows, norm, dtype, finish",
    [
        (1, "layernorm", jnp.float32, EPILOGUES[0]),
        (1, None, jnp.bfloat16, EPILOGUES[1]),
        (1, "rmsnorm", jnp.bfloat16, EPILOGUES[3]),
        (3, "layernorm", jnp.bfloat16, EPILOGUES[2]),
        (16, "rmsnorm", jnp.float32, EPILOGUES[3]),
    ],
)
def test_prologue_and_epilogue_equal_xlas(rows, norm, dtype, finish):
    """act(normalize(x) Wᵀ + b) + r in one kernel: equal to XLA's norm, float32 product, the same epilogue,
    one cast; nothing of the epilogue runs outside the kernel (one row: not even a padding)."""
    d, n = 256, 64
    if norm is None:
        (x, w), scale, norm_bias = _inputs(rows, d, n, dtype), None, None
    else:
        x, w, scale, norm_bias = _norm_inputs(norm, rows, d, n, dtype)
    has_bias, activation, has_residual = finish
    rng = np.random.default_rng(3)
    b = _normal(rng, (n,)) if has_bias else None
    r = _normal(rng, (rows, n), dtype) if has_residual else None

    def product(x, w, b, r):
        return skinny_nd.matmul(
            x, w, norm=norm, scale=scale, bias=norm_bias, eps=1e-5, output_bias=b, activation=activation,
            residual=r, tiles=skinny_nd.Plan(64, 16), interpret=True,
        )  # fmt: skip

    y = product(x, w, b, r)
    normed = x if norm is None else norms.normalize(x, norm, 1e-5, scale, norm_bias, dtype)
    acc = jnp.dot(normed, w.T, precision="highest", preferred_element_type=jnp.float32)
    assert y.shape == (rows, n) and y.dtype == dtype
    _close(y, skinny.epilogue(acc, b, activation, r).astype(dtype), dtype)
    outside = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                continue
            outside.add(eqn.primitive.name)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(product)(x, w, b, r).jaxpr)
    assert not {"add", "tanh", "logistic", "reduce_sum", "rsqrt"} & outside, outside


@pytest.mark.parametrize("norm", [None, "layernorm"])
def test_gradients_are_xlas(norm):
    x, w, scale, norm_bias = _norm_inputs(norm or "rmsnorm", 2, 128, 32, jnp.float32, seed=1)
    if norm is None:
        scale = norm_bias = None
    b = jax.random.normal(jax.random.PRNGKey(4), (32,))
    r = jax.random.normal(jax.random.PRNGKey(5), (2, 32))
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 32))

    def ours(x, w, b, r):
        return skinny_nd.matmul(
            x, w, norm=norm, scale=scale, bias=norm_bias, eps=1e-5, output_bias=b, activation="gelu",
            residual=r, interpret=True,
        )  # fmt: skip

    def xlas(x, w, b, r):
        normed = x if norm is None else norms.normalize(x, norm, 1e-5, scale, norm_bias, w.dtype)
        acc = jnp.dot(normed, w.T, precision="highest")
        return skinny.epilogue(acc, b, "gelu", r)

    def loss(product):
        return lambda *args: jnp.sum(product(*args) * cotangent)

    got = jax.jit(jax.grad(loss(ours), (0, 1, 2, 3)))(x, w, b, r)
    want = jax.jit(jax.grad(loss(xlas), (0, 1, 2, 3)))(x, w, b, r)
    for a, b_ in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5 * np.abs(b_).max())


def test_plans():
    """BN so that the grid has about ``PROGRAMS`` (264) programs; BD so that a step's tile is ~4096
    elements; candidates are plans ``check`` accepts, the default first."""
    bf16 = jnp.bfloat16
    assert skinny_nd.plan(1, 4096, 2048, bf16) == skinny_nd.Plan(512, 8)  # 256 programs
    assert skinny_nd.plan(1, 2048, 4096, bf16) == skinny_nd.Plan(256, 16)  # 256 programs
    assert skinny_nd.plan(1, 2048, 12288, bf16) == skinny_nd.Plan(64, 64)  # 192 (384 is farther)
    assert skinny_nd.plan(8, 4096, 2048, bf16) == skinny_nd.Plan(256, 16)  # products: BN ≥ 16
    for rows, d, n in ((1, 2048, 12288), (8, 4096, 2048), (1, 64, 8)):
        listed = skinny_nd.candidates(rows, d, n, bf16)
        assert listed[0] == skinny_nd.plan(rows, d, n, bf16)
        assert 1 <= len(listed) <= skinny_nd.MAX_CANDIDATES and len(set(listed)) == len(listed)
        assert all(skinny_nd.check(p, rows, d, n, bf16) is None for p in listed)
        assert rows == 1 or not any(p.reduce for p in listed)
    # one row: the reduce plans right after the default, tiles of 16384 and 32768 elements
    assert skinny_nd.candidates(1, 2048, 12288, bf16)[1:5] == [
        skinny_nd.Plan(256, 64, 8, 3, 1), skinny_nd.Plan(512, 64, 8, 3, 1),
        skinny_nd.Plan(512, 32, 8, 3, 1), skinny_nd.Plan(1024, 32, 8, 3, 1),
    ]  # fmt: skip
    assert skinny_nd.candidates(17, 64, 64, bf16) == []


def test_refusals():
    f32 = jnp.float32
    assert "17 rows" in skinny_nd.plan(17, 64, 64, f32)
    assert "float64" in skinny_nd.plan(1, 64, 64, jnp.float64)
    assert "N of 16" in skinny_nd.plan(2, 64, 8, f32)  # one row takes N = 8, a product 16
    assert skinny_nd.plan(1, 64, 8, f32) == skinny_nd.Plan(64, 8)
    cases = [
        (skinny_nd.Plan(48, 16), "block_d = 48"),
        (skinny_nd.Plan(64, 8), "block_n = 8 (a power of two of at least 16 at 2 rows)"),
        (skinny_nd.Plan(128, 16), "must divide D = 64"),
        (skinny_nd.Plan(64, 16, num_warps=3), "num_warps = 3"),
    ]
    x, w = _inputs(2, 64, 32, f32)
    for tiles, message in cases:
        assert message in skinny_nd.check(tiles, 2, 64, 32, f32)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            skinny_nd.matmul(x, w, tiles=tiles, interpret=True)
    assert "accumulator exceeds" in skinny_nd.check(skinny_nd.Plan(1024, 32, 4, 1), 1, 1024, 32, f32)
    assert skinny_nd.check(skinny_nd.Plan(1024, 32, 4, 1, reduce=1), 1, 1024, 32, f32) is None
    assert "reduce = 1 (0, or 1 at one row; got 2 rows)" in skinny_nd.check(
        skinny_nd.Plan(64, 16, reduce=1), 2, 64, 32, f32
    )
    assert "reduce = 2" in skinny_nd.check(skinny_nd.Plan(64, 16, reduce=2), 1, 64, 32, f32)
    bf16 = jnp.bfloat16
    assert "tile exceeds 32768" in skinny_nd.check(skinny_nd.Plan(1024, 64, 8, 1, 1), 1, 1024, 64, bf16)
    with pytest.raises(ValueError, match=r"x \[M, D\] and w \[N, D\]"):
        skinny_nd.matmul(x, w.T, interpret=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        skinny_nd.matmul(x, w, activation="relu", interpret=True)


def test_the_kernel_lowers_to_triton():
    """One row and 8, without and with the norm prologue and a full epilogue (float32 bias, bfloat16
    residual), at paper-1.3b's fc2 shape."""
    x, w = jnp.zeros((1, 4096), jnp.bfloat16), jnp.zeros((2048, 4096), jnp.bfloat16)
    ones, bias = jnp.ones((4096,), jnp.float32), jnp.zeros((2048,), jnp.float32)
    for rows in (1, 8):
        residual = jnp.zeros((rows, 2048), jnp.bfloat16)

        def finished(x, w, residual=residual):
            return skinny_nd.matmul(
                x, w, norm="layernorm", scale=ones, bias=ones, output_bias=bias, activation="gelu",
                residual=residual,
            )  # fmt: skip

        summed = functools.partial(skinny_nd.matmul, tiles=skinny_nd.Plan(512, 32, 8, 3, reduce=1))
        for product in (skinny_nd.matmul, finished) + ((summed,) if rows == 1 else ()):
            text = jax.jit(product).trace(x[:1].repeat(rows, 0), w).lower(lowering_platforms=("cuda",))
            assert "__gpu$xla.gpu.triton" in text.as_text()


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_project_on_a_transposed_kernel(implementation):
    """``project(transposed=True)`` on [*out, *in] equals ``project`` on [*in, *out]: a kernel of two
    contracted axes (an output projection [H, V, D]) and one of two output axes ([D, H, K]), with an
    epilogue; float32 (the kernel's sums in another order: 1e-5)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(7), 4)
    o = jax.random.normal(k1, (1, 1, 2, 32))  # [B, T, H, V]
    w_out = jax.random.normal(k2, (2, 32, 64))  # [H, V, D]
    x = jax.random.normal(k3, (1, 1, 64))
    w_in = jax.random.normal(k4, (64, 2, 48))  # [D, H, K]
    cases = [
        (o, w_out, 2, jnp.transpose(w_out, (2, 0, 1)), dict(residual=x)),
        (x, w_in, 1, jnp.transpose(w_in, (1, 2, 0)), dict(bias=jnp.ones((2, 48)), activation="swish")),
    ]
    for inputs, kernel, in_axes, transposed, finish in cases:
        want = products.project(inputs, kernel, in_axes, implementation="xla", **finish)
        got = products.project(
            inputs, transposed, in_axes, implementation=implementation, transposed=True, **finish
        )
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert products.uses_kernel("pallas", 1, 64, 8, jnp.float32, transposed=True)  # [D, N] needs N ≥ 16
    assert not products.uses_kernel("pallas", 1, 64, 8, jnp.float32)
    assert not products.uses_kernel("xla", 1, 64, 64, jnp.float32, transposed=True)


@pytest.mark.parametrize(
    "head_norm, rows, v, tiles, dtype",
    [
        ("rms", 1, 64, None, jnp.bfloat16),  # BD narrowed from 256 to V: a group a step
        ("layernorm", 3, 128, skinny_nd.Plan(64, 16), jnp.float32),  # two steps a group
        ("rms_weight", 3, 64, None, jnp.bfloat16),
        ("layernorm", 1, 128, skinny_nd.Plan(128, 8), jnp.float32),
        ("layernorm", 3, 64, "joined", jnp.bfloat16),  # the gate read in place, as ``skinny``'s test
    ],
)
def test_head_norm_and_gate_prologue_equals_xlas(head_norm, rows, v, tiles, dtype):
    """Retention's head norm over each head's V columns times swish(g), as ``skinny``'s (its test's
    inputs and XLA's computation), on W stored [N, D]."""
    kind, o, g, w, scale = _head_inputs(head_norm, rows, 256 // v, v, 64, dtype)
    w = w.T  # [N, D]
    options, g_given = dict(tiles=tiles), g
    if tiles == "joined":
        wide = jnp.pad(g.reshape(rows, -1, v), ((0, 0), (0, 0), (32, 16)), constant_values=7.0)
        options, g_given = dict(gate_offset=32), wide.reshape(rows, -1)
    y = skinny_nd.matmul(
        o, w, norm=kind, scale=scale, eps=1e-5, gate=g_given, group=v, **options, interpret=True
    )
    assert y.shape == (rows, 64) and y.dtype == dtype
    _close(
        y,
        np.asarray(head_gated(o, g, kind, scale, v, dtype), np.float64) @ np.asarray(w, np.float64).T,
        dtype,
    )


@pytest.mark.parametrize("head_norm, in_place", [("rms", False), ("layernorm", True)])
def test_head_norm_and_gate_prologue_gradients_are_xlas(head_norm, in_place):
    """In place: the gate's gradient is that of the wider array it is read from (zero off the gate)."""
    kind, o, g, w, _ = _head_inputs(head_norm, 2, 2, 64, 32, jnp.float32, seed=1)
    w = w.T
    offset = 16 if in_place else 0
    if in_place:  # each head's gate at [16, 80) of 96 columns
        g = jnp.pad(g.reshape(2, 2, 64), ((0, 0), (0, 0), (16, 16)), constant_values=0.5).reshape(2, -1)
    r = jax.random.normal(jax.random.PRNGKey(5), (2, 32))
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 32))

    def ours(o, g, w, r):
        return skinny_nd.matmul(
            o, w, norm=kind, eps=1e-5, gate=g, group=64, gate_offset=offset, residual=r, interpret=True
        )

    def xlas(o, g, w, r):
        gate = g.reshape(2, 2, -1)[..., offset : offset + 64].reshape(2, -1)
        return jnp.dot(head_gated(o, gate, kind, None, 64, w.dtype), w.T, precision="highest") + r

    def loss(product):
        return lambda *args: jnp.sum(product(*args) * cotangent)

    got = jax.jit(jax.grad(loss(ours), (0, 1, 2, 3)))(o, g, w, r)
    want = jax.jit(jax.grad(loss(xlas), (0, 1, 2, 3)))(o, g, w, r)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_the_head_norm_and_gate_prologue_lowers_to_triton():
    """At the paper's head (H = 8, V = 512): o [R, 4096] float32, g bfloat16 (apart or in the joined
    q, k, v, g product), Wᵀ [2048, 4096] bfloat16."""
    o, g = jnp.zeros((1, 4096), jnp.float32), jnp.zeros((1, 4096), jnp.bfloat16)
    w, scale = jnp.zeros((2048, 4096), jnp.bfloat16), jnp.ones((512,), jnp.float32)
    joined = jnp.zeros((1, 8 * 1536), jnp.bfloat16)  # the joined q, k, v, g: K = 256, g at [1024, 1536)
    gates = ((g, 0), (joined, 1024))
    cases = [
        (kind, weight, *gate) for kind, weight in (("rmsnorm", scale), ("layernorm", None)) for gate in gates
    ]
    for kind, weight, g, offset in cases:
        for rows in (1, 8):

            def product(o, g, w, kind=kind, weight=weight, offset=offset):
                return skinny_nd.matmul(o, w, norm=kind, scale=weight, gate=g, group=512, gate_offset=offset)

            text = (
                jax.jit(product)
                .trace(o.repeat(rows, 0), g.repeat(rows, 0), w)
                .lower(lowering_platforms=("cuda",))
            )
            assert "__gpu$xla.gpu.triton" in text.as_text()
