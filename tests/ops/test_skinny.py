"""The few-row product kernel (``ops.gpu.skinny``) and its dispatch (``ops.products``), on the CPU.

Tolerances: float32 against a float64 product 1e-6 relative to the largest output (float32 accumulation of
up to 3456 terms); bfloat16 4e-3 (the output's rounding, 2^-8, against the float64 product of the same
rounded inputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.models import RetNetConfig, RetNetLM
from retnet_jax.ops import products
from retnet_jax.ops.gpu import skinny

TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 4e-3}


def _inputs(rows, d, n, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (rows, d), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (d, n), jnp.float32).astype(dtype)
    return x, w


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

    ours = jax.grad(loss(lambda x, w: skinny.matmul(x, w, interpret=True)), (0, 1))(x, w)
    theirs = jax.grad(loss(jnp.dot), (0, 1))(x, w)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


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


def test_the_kernel_lowers_to_triton():
    x, w = jnp.zeros((1, 2048), jnp.bfloat16), jnp.zeros((2048, 4096), jnp.bfloat16)
    for rows in (1, 8):
        text = jax.jit(skinny.matmul).trace(x[:1].repeat(rows, 0), w).lower(lowering_platforms=("cuda",))
        assert "__gpu$xla.gpu.triton" in text.as_text()


def test_dispatch(monkeypatch):
    f32 = jnp.float32
    assert not products.uses_kernel("auto", 1, 64, 64, f32)  # CPU: XLA
    monkeypatch.setattr(products, "AUTO_KERNEL", True)
    assert not products.uses_kernel("auto", 1, 64, 64, f32)  # still the CPU
    assert not products.uses_kernel("xla", 1, 64, 64, f32)
    assert products.uses_kernel("pallas", 1, 64, 64, f32)
    assert not products.uses_kernel("pallas", 17, 64, 64, f32)  # a matmul: XLA
    assert not products.uses_kernel("pallas", 1, 100, 64, f32)  # not taken: XLA
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        products.uses_kernel("fast", 1, 64, 64, f32)


def test_a_decoding_step_through_the_kernel_equals_xlas():
    """One RetNet decoding step with every projection (and the untied head) through the few-row kernel
    equals the step through XLA's products. (The Transformer's projections are the same modules.)"""
    config = RetNetConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=2, value_dim=128, ffn_dim=128)
    tokens = jnp.array([[3, 9, 27, 17]], jnp.int32)
    xla, pallas = RetNetLM(config, projections="xla"), RetNetLM(config, projections="pallas")
    variables = xla.init(jax.random.PRNGKey(0), tokens)
    _, state = xla.apply(variables, tokens[:, :-1], return_state=True)
    step = tokens[:, -1:]
    ours, _ = pallas.apply(variables, step, state=state, mode="recurrent")
    theirs, _ = xla.apply(variables, step, state=state, mode="recurrent")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    program = str(jax.make_jaxpr(lambda v: pallas.apply(v, step, state=state, mode="recurrent"))(variables))
    assert program.count("pallas_call") >= 8  # q, k, v, g, out, fc1, fc2, head
