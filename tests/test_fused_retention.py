"""The fused Pallas kernels (run through the Pallas interpreter on the CPU) against the reference.

The same kernel bodies lower through Triton on a GPU; ``experiments/bench_retention.py`` checks them there
against a float64 reference. Here: outputs and gradients (q, k, v and log γ) in float32, lengths below,
at and not a multiple of the chunk, key and value widths split into tiles (partial sums), a carried
state and padding through ``chunkwise(implementation="pallas")``, bf16 inputs, the model, and the errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import retention
from retnet_jax.models import RetNetLM
from retnet_jax.models.config import RetNetConfig
from retnet_jax.ops import reference
from retnet_jax.ops.gpu import chunk_retention as fused_retention
from tests.helpers import FORM_RTOL, GRAD_RTOL, random_inputs, relative_error

# bf16 inputs against the float32 reference: the kernels round the decayed scores and the state to
# bf16 before each product, as the XLA form does (both measured ≈ 4e-3 here).
BF16_RTOL = 1.5e-2

# (B, H, K, V, T, C, tiles): T below, at, and not a multiple of C; the whole state in one tile (one
# dk-dv pass) or split into key / value tiles (separate dk and dv kernels).
CASES = [
    (1, 2, 16, 16, 7, 16, fused_retention.Tiles(16, 16)),
    (2, 2, 32, 64, 32, 16, fused_retention.Tiles(32, 64)),
    (1, 3, 32, 64, 45, 16, fused_retention.Tiles(key=16, value=32)),
]


def _fused(tiles, chunk):
    def f(q, k, v, log_decay):
        return fused_retention.fused_chunk_retention(
            q, k, v, log_decay, chunk_size=chunk, tiles=tiles, interpret=True
        )

    return jax.jit(f)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}K{}V{}T{}C{}-{}".format(*c[:6], c[6][:2]))
def test_kernels_equal_reference(case):
    batch, heads, key_dim, value_dim, length, chunk, tiles = case
    rng = np.random.default_rng(length)
    q, k, v = (
        jnp.asarray(x) for x in random_inputs(rng, batch, length, heads, key_dim, value_dim, "float32")
    )
    do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    log_decay = retention.log_decays(heads, "linspace")
    fused = _fused(tiles, chunk)

    def ref(q, k, v, log_decay):
        return reference.retention(q, k, v, log_decay, normalize=False)[0]

    assert relative_error(fused(q, k, v, log_decay), ref(q, k, v, log_decay)) < FORM_RTOL["float32"]
    grads = jax.grad(lambda *a: jnp.vdot(fused(*a), do), argnums=(0, 1, 2, 3))(q, k, v, log_decay)
    expected = jax.grad(lambda *a: jnp.vdot(ref(*a), do), argnums=(0, 1, 2, 3))(q, k, v, log_decay)
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay"), grads, expected, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name


@pytest.mark.parametrize("normalize", [True, False])
def test_chunkwise_pallas_continues_states_like_xla(normalize):
    """implementation="pallas" with a carried state (one row left-padded) equals the XLA form."""
    batch, heads, key_dim, value_dim, length = 2, 2, 16, 32, 37
    rng = np.random.default_rng(3)
    q, k, v = random_inputs(rng, batch, length, heads, key_dim, value_dim, "float32")
    k[1, :2] = 0.0  # the two pads of row 1 (count −2) carry no key, as the model guarantees
    state = retention.RetentionState(
        jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32),
        jnp.array([5, -2], jnp.int32),
    )
    log_decay = retention.log_decays(heads)
    for incoming in (None, state):
        results = [
            retention.chunkwise(
                q, k, v, log_decay, chunk_size=16, state=incoming, normalize=normalize, implementation=impl
            )
            for impl in ("xla", "pallas")
        ]
        (o_x, s_x), (o_p, s_p) = results
        assert relative_error(o_p, o_x) < FORM_RTOL["float32"]
        assert relative_error(s_p.kv, s_x.kv) < FORM_RTOL["float32"]
        np.testing.assert_array_equal(s_p.count, s_x.count)


def test_bf16_inputs_stay_close_to_float32():
    rng = np.random.default_rng(4)
    q, k, v = random_inputs(rng, 1, 96, 2, 32, 32, "float32")
    log_decay = retention.log_decays(2)
    exact = retention.parallel(q, k, v, log_decay, normalize=False)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    o = _fused(fused_retention.default_tiles(32, 32), 32)(*low, log_decay)
    assert o.dtype == jnp.bfloat16
    assert relative_error(o, exact) < BF16_RTOL


def test_model_with_pallas_retention_equals_xla():
    config = RetNetConfig.preset("tiny")
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, config.vocab_size)
    model = RetNetLM(config, mode="chunkwise", chunk_size=16)
    variables = model.init(jax.random.key(1), tokens)
    logits = {}
    for impl in ("xla", "pallas", "auto"):
        model = RetNetLM(config, mode="chunkwise", chunk_size=16, implementation=impl)
        logits[impl], _ = jax.jit(model.apply)(variables, tokens)
    assert relative_error(logits["pallas"], logits["xla"]) < 1e-5
    np.testing.assert_array_equal(logits["auto"], logits["xla"])  # auto: XLA off the GPU


def test_unsupported_sizes_and_names_are_errors():
    q = jnp.zeros((1, 8, 2, 24), jnp.float32)
    log_decay = retention.log_decays(2)
    with pytest.raises(ValueError, match="K = 24"):
        retention.chunkwise(q, q, q, log_decay, chunk_size=16, implementation="pallas")
    with pytest.raises(ValueError, match="chunk_size = 12"):
        fused_retention.fused_chunk_retention(q[..., :16], q[..., :16], q[..., :16], log_decay, chunk_size=12)
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        retention.chunkwise(q, q, q, log_decay, chunk_size=16, implementation="triton")
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        model = RetNetLM(RetNetConfig.preset("tiny"), mode="chunkwise", implementation="cuda")
        model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    # "auto" falls back to the XLA form for sizes the kernels do not take.
    o, _ = retention.chunkwise(q, q, q, log_decay, chunk_size=16, implementation="auto")
    assert o.shape == q.shape
