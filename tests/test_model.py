"""The RetNet LM: the three modes and step-by-step decoding give the same logits; config checks; sizes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.models import retnet as model_lib
from retnet_jax.models.config import PRESETS, RetNetConfig
from retnet_jax.models.retnet import RetNetLM, decode_step, init_state
from tests.helpers import assert_logical_axes, relative_error

# Logits of two modes of the float32 model; measured ≈ 5e-7 normwise.
LOGITS_RTOL = 1e-5

TINY = RetNetConfig.preset("tiny")
# Every non-default option at once: rotate-half, LayerNorm head norm, paper MLP, tied head, ...
OPTIONS = TINY.replace(
    rotation="rotate_half",
    head_norm="layernorm",
    norm="layernorm",
    ffn_type="mlp",
    activation="gelu",
    tie_embeddings=True,
    embed_scale=True,
    embed_norm=True,
    use_bias=True,
    decay="linspace",
    scan_layers=False,
    num_heads=4,
    value_dim=64,
)
UNNORMALIZED = TINY.replace(normalize=False, head_norm="rms_weight")


def _setup(config, batch=2, length=12, seed=0):
    model = RetNetLM(config)
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)
    variables = model.init(jax.random.key(1), tokens)
    return model, variables, tokens


def _apply(model, **static):
    return jax.jit(lambda v, t, s=None: model.apply(v, t, state=s, **static))


def _decode_all(model, variables, tokens, state):
    step = jax.jit(lambda v, t, s: decode_step(model, v, t, s))
    logits = []
    for t in range(tokens.shape[1]):
        out, state = step(variables, tokens[:, t], state)
        logits.append(out)
    return jnp.stack(logits, 1), state


@pytest.mark.parametrize("config", [TINY, OPTIONS, UNNORMALIZED], ids=["tiny", "options", "unnorm"])
def test_decoding_equals_parallel_logits(config):
    """Logits from one-token recurrent steps equal the parallel logits at every position."""
    model, variables, tokens = _setup(config, length=13)
    parallel, state_p = _apply(model, mode="parallel", return_state=True)(variables, tokens)
    stepped, state_s = _decode_all(model, variables, tokens, init_state(config, 2))
    assert relative_error(stepped, parallel) < LOGITS_RTOL
    assert relative_error(state_s.kv, state_p.kv) < LOGITS_RTOL
    np.testing.assert_array_equal(state_s.count, np.full((config.num_layers, 2), 13))


@pytest.mark.parametrize("length", [1, 7, 24])
def test_modes_equal(length):
    model, variables, tokens = _setup(TINY, length=length, seed=length)
    parallel, state_p = _apply(model, mode="parallel", return_state=True)(variables, tokens)
    results = {"recurrent": _apply(model, mode="recurrent", return_state=True)(variables, tokens)}
    for chunk in (1, 4, 8, 32):
        results[f"chunkwise C={chunk}"] = _apply(
            model, mode="chunkwise", chunk_size=chunk, return_state=True
        )(variables, tokens)
    for name, (logits, state) in results.items():
        assert logits.dtype == jnp.float32
        assert relative_error(logits, parallel) < LOGITS_RTOL, name
        assert relative_error(state.kv, state_p.kv) < LOGITS_RTOL, name


@pytest.mark.parametrize(
    "mode,prompt,chunk", [("chunkwise", 5, 2), ("chunkwise", 16, 16), ("parallel", 9, 4)]
)
def test_prefill_then_decode_equals_one_pass(mode, prompt, chunk):
    """A prompt prefilled (chunkwise or parallel), then decoded token by token, equals one full pass."""
    model, variables, tokens = _setup(TINY, length=prompt + 6, seed=prompt)
    full, _ = _apply(model, mode="parallel")(variables, tokens)
    prefill, state = _apply(model, mode=mode, chunk_size=chunk, return_state=True)(
        variables, tokens[:, :prompt]
    )
    decoded, _ = _decode_all(model, variables, tokens[:, prompt:], state)
    assert relative_error(jnp.concatenate([prefill, decoded], 1), full) < LOGITS_RTOL
    # Continuing a state with a multi-token call in any mode equals the full pass too.
    rest, _ = _apply(model, mode=mode, chunk_size=chunk)(variables, tokens[:, prompt:], state)
    assert relative_error(jnp.concatenate([prefill, rest], 1), full) < LOGITS_RTOL


def test_left_padding_leaves_rows_unchanged():
    """Left pads announced by a negative count: the padded row's logits equal the unpadded row's."""
    model, variables, tokens = _setup(TINY, batch=1, length=9)
    plain, _ = _apply(model, mode="chunkwise", chunk_size=4)(variables, tokens)
    pads = 3
    padded = jnp.concatenate([jnp.zeros((1, pads), tokens.dtype), tokens], 1)
    state = init_state(TINY, 1)._replace(count=jnp.full((TINY.num_layers, 1), -pads, jnp.int32))
    logits, state = _apply(model, mode="chunkwise", chunk_size=4)(variables, padded, state)
    assert relative_error(logits[:, pads:], plain) < LOGITS_RTOL
    np.testing.assert_array_equal(state.count, [[9], [9]])


def test_remat_and_scan_do_not_change_the_function():
    model, variables, tokens = _setup(TINY)
    remat = RetNetLM(TINY.replace(remat=True))
    loss = lambda m: jax.jit(jax.value_and_grad(lambda v: jnp.mean(m.apply(v, tokens)[0] ** 2)))
    (l0, g0), (l1, g1) = loss(model)(variables), loss(remat)(variables)
    assert abs(float(l0 - l1)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        assert relative_error(a, b) < 1e-5

    # Unstacked layers with the same weights compute the same logits.
    loop = RetNetLM(TINY.replace(scan_layers=False))
    params = nn.unbox(variables)["params"]
    layers = params.pop("layers")
    for i in range(TINY.num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
    logits_scan, _ = model.apply(variables, tokens)
    logits_loop, _ = loop.apply({"params": params}, tokens)
    assert relative_error(logits_loop, logits_scan) < 1e-6


def test_bf16_compute_keeps_params_and_state_in_float32():
    config = TINY.replace(dtype="bfloat16")
    model, variables, tokens = _setup(config, length=20)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
    logits, state = _apply(model, mode="chunkwise", chunk_size=8, return_state=True)(variables, tokens)
    assert logits.dtype == jnp.float32 and state.kv.dtype == jnp.float32
    reference, _ = RetNetLM(TINY).apply(variables, tokens)
    # bf16 activations through 2 blocks: measured ≈ 1e-2 normwise against float32.
    assert relative_error(logits, reference) < 5e-2


def test_dropout_is_active_only_when_asked():
    config = TINY.replace(dropout=0.5)
    model, variables, tokens = _setup(config)
    a, _ = model.apply(variables, tokens)
    b, _ = model.apply(variables, tokens)
    np.testing.assert_array_equal(a, b)
    c, _ = model.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert float(jnp.max(jnp.abs(c - a))) > 1e-3


def test_every_parameter_has_logical_axes():
    for config in (TINY, OPTIONS):
        assert_logical_axes(jax.eval_shape(lambda c=config: _setup(c)[1]))


def _count(config):
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda t: RetNetLM(config).init(jax.random.key(0), t), tokens)
    return nn.unbox(shapes)["params"]


@pytest.mark.parametrize("name", ["paper-1.3b", "paper-2.7b", "paper-6.7b", "paper-13b"])
def test_paper_parameter_counts(name):
    """12·D²·L plus embedding and head (N·D each) plus the norms' scales and biases; no memory used."""
    config = RetNetConfig.preset(name)
    params = _count(config)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    d, layers, n = config.d_model, config.num_layers, config.vocab_size
    norms = 2 * d * (2 * layers + 1)  # LayerNorm scale + bias: two per block and the final one
    assert total == 12 * d * d * layers + 2 * n * d + norms
    expected_billions = {"paper-1.3b": 1.3, "paper-2.7b": 2.7, "paper-6.7b": 6.7, "paper-13b": 13}
    assert abs(total / 1e9 - expected_billions[name]) / expected_billions[name] < 0.1


def test_torchscale_presets_build():
    for name in PRESETS:
        if name.startswith("torchscale-"):
            config = RetNetConfig.preset(name)
            params = _count(config)
            q = params["layers"]["retention"]["q_proj"]["kernel"].shape
            v = params["layers"]["retention"]["v_proj"]["kernel"].shape
            assert q == (config.num_layers, config.d_model, config.num_heads, config.key_dim)
            assert v[2] * v[3] == config.ffn_dim  # torchscale v2: value width = F


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            dict(value_dim=130, num_heads=4),
            r"value_dim \(130\) must be divisible by num_heads \(4\)",
        ),
        (dict(d_model=66, num_heads=4), r"d_model \(66\) must be divisible by num_heads"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(ffn_type="moe"), r"ffn_type must be one of \('glu', 'mlp'\)"),
        (dict(rotation="xpos"), "rotation must be one of"),
        (dict(head_norm="group"), "head_norm must be one of"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(dropout=1.0), r"dropout must be a rate in \[0, 1\)"),
        (dict(num_layers=0), "num_layers must be an integer >= 1"),
        (dict(d_model=4, num_heads=2, value_dim=4), "K >= 4"),
    ],
)
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)


def test_config_presets_and_round_trip():
    with pytest.raises(ValueError, match="Unknown model preset 'huge'; available"):
        RetNetConfig.preset("huge")
    config = RetNetConfig.preset("small", num_layers=3)
    assert config.num_layers == 3 and config.key_dim == 64 and config.head_value_dim == 128
    assert RetNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        RetNetConfig.from_dict({**config.to_dict(), "depth": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 4


def test_bad_calls_are_named():
    model, variables, tokens = _setup(TINY)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.apply(variables, tokens, mode="fast")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        model.apply(variables, tokens, mode="chunkwise", chunk_size=0)
    with pytest.raises(ValueError, match="tokens must be integer ids of shape"):
        model.apply(variables, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="state does not fit this model and batch"):
        model.apply(variables, tokens, state=init_state(TINY.replace(num_layers=3), 2))
    with pytest.raises(ValueError, match="state does not fit this model and batch"):
        model.apply(variables, tokens, state=init_state(TINY, 5))


def test_init_state_shapes():
    state = model_lib.init_state(TINY, 3)
    assert state.kv.shape == (2, 3, 2, 32, 64) and state.kv.dtype == jnp.float32
    assert state.count.shape == (2, 3) and state.count.dtype == jnp.int32


def test_selected_rows_decode_as_if_alone():
    """select_rows picks and reorders rows of every state array (beam search, finished rows)."""
    model, variables, tokens = _setup(TINY, batch=3, length=6)
    _, state = _apply(model, mode="chunkwise", chunk_size=4, return_state=True)(variables, tokens)
    rows = jnp.array([2, 0])
    picked = model_lib.select_rows(state, rows)
    _, alone = _apply(model, mode="chunkwise", chunk_size=4, return_state=True)(variables, tokens[rows])
    assert relative_error(picked.kv, alone.kv) < LOGITS_RTOL
    step = jax.jit(lambda v, t, s: decode_step(model, v, t, s))
    a, _ = step(variables, tokens[rows, -1], picked)
    b, _ = step(variables, tokens[rows, -1], alone)
    assert relative_error(a, b) < LOGITS_RTOL


def test_unrolled_decode_step_equals_the_layer_loop():
    """unroll_decode only changes how the one-token step is compiled, not what it computes."""
    model, variables, tokens = _setup(TINY, length=6)
    _, state = _apply(model, mode="chunkwise", return_state=True)(variables, tokens)
    results = []
    for unroll in (True, False):
        looped = RetNetLM(TINY.replace(unroll_decode=unroll))
        results.append(
            jax.jit(lambda v, t, s, m=looped: decode_step(m, v, t, s))(variables, tokens[:, 0], state)
        )
    (logits_u, state_u), (logits_l, state_l) = results
    assert relative_error(logits_u, logits_l) < LOGITS_RTOL
    assert relative_error(state_u.kv, state_l.kv) < LOGITS_RTOL
