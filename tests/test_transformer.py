"""The Transformer baseline: cached decoding equals the full causal pass; its size matches the RetNet's."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.models.config import RetNetConfig
from retnet_jax.models.retnet import RetNetLM
from retnet_jax.models.transformer import (
    TransformerConfig,
    TransformerDecoder,
    TransformerLM,
    attention_implementation,
    decode_step,
    init_cache,
    prefill,
)
from tests.helpers import assert_logical_axes, relative_error

# Logits of the float32 model, cached against uncached; measured ≈ 3e-7 normwise (2 cores, XLA CPU).
LOGITS_RTOL = 1e-5

TINY = TransformerConfig.matching(RetNetConfig.preset("tiny"))  # D 64, H 2, K 32, swish GLU F 256
# Every non-default option at once: LayerNorm, GELU MLP, biases, tied head, unstacked layers, remat, ...
OPTIONS = TINY.replace(
    norm="layernorm",
    ffn_type="mlp",
    activation="gelu",
    use_bias=True,
    tie_embeddings=True,
    embed_scale=True,
    embed_norm=True,
    scan_layers=False,
    remat=True,
    num_heads=4,
)
MAX_LENGTH = 16
BATCH = 3  # differs from L = 2 and H, so a mixed-up axis cannot pass


def _setup(config, batch=BATCH, length=12, seed=0):
    model = TransformerLM(config)
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)
    variables = model.init(jax.random.key(1), tokens)
    return model, variables, tokens


# Module-level jits with the model static: tests that share shapes share compiled programs.
@functools.partial(jax.jit, static_argnames="model")
def _apply(model, variables, tokens, cache=None):
    return model.apply(variables, tokens, state=cache)


@functools.partial(jax.jit, static_argnames="model")
def _step(model, variables, tokens, cache):
    return decode_step(model, variables, tokens, cache)


def _decode_all(model, variables, tokens, cache):
    logits = []
    for t in range(tokens.shape[1]):
        out, cache = _step(model, variables, tokens[:, t], cache)
        logits.append(out)
    return jnp.stack(logits, 1), cache


@pytest.mark.parametrize("config", [TINY, OPTIONS], ids=["tiny", "options"])
def test_decoding_equals_full_forward(config):
    """One-token steps over a KV cache give the full causal pass's logits at every position."""
    model, variables, tokens = _setup(config)
    full, _ = _apply(model, variables, tokens)
    assert full.dtype == jnp.float32
    stepped, cache = _decode_all(model, variables, tokens, init_cache(config, BATCH, MAX_LENGTH))
    assert relative_error(stepped, full) < LOGITS_RTOL
    np.testing.assert_array_equal(cache.length, [12] * BATCH)
    assert cache.k.shape == (config.num_layers, BATCH, config.num_heads, MAX_LENGTH, config.head_dim)


def test_prefill_then_decode_equals_full_forward():
    """A prompt prefilled (causal pass, or through the cache), then continued, equals one full pass."""
    model, variables, tokens = _setup(TINY)
    full, _ = _apply(model, variables, tokens)
    prompt = 5
    run_prefill = jax.jit(prefill, static_argnames=("model", "max_length"))
    logits, cache = run_prefill(model, variables, tokens[:, :prompt], max_length=MAX_LENGTH)
    assert cache.max_length == MAX_LENGTH
    decoded, _ = _decode_all(model, variables, tokens[:, prompt:], cache)
    assert relative_error(jnp.concatenate([logits, decoded], 1), full) < LOGITS_RTOL
    # Rows reordered (as beam search does) decode as their own rows.
    perm = jnp.array([2, 0, 1])
    decoded, _ = _decode_all(model, variables, tokens[perm, prompt:], cache.take(perm))
    assert relative_error(decoded, full[perm, prompt:]) < LOGITS_RTOL

    # Multi-token calls through the cache: the prompt, then the rest in one call.
    first, cache = _apply(model, variables, tokens[:, :prompt], init_cache(TINY, BATCH, MAX_LENGTH))
    rest, cache = _apply(model, variables, tokens[:, prompt:], cache)
    assert relative_error(jnp.concatenate([first, rest], 1), full) < LOGITS_RTOL
    np.testing.assert_array_equal(cache.length, [12] * BATCH)


def test_left_pads_are_neither_cached_nor_attended():
    """The generation loop's decoder: a left-padded row's next-token logits equal the unpadded row's."""
    model, variables, tokens = _setup(TINY)
    full, _ = _apply(model, variables, tokens)
    pads = 3
    padded = tokens.at[0].set(jnp.concatenate([jnp.zeros((pads,), tokens.dtype), tokens[0, : 12 - pads]]))
    decoder = TransformerDecoder(model)
    cache = decoder.init_state(jnp.array([pads, 0, 0]), MAX_LENGTH)
    logits, cache = jax.jit(TransformerDecoder.prefill, static_argnums=0)(decoder, variables, padded, cache)
    assert relative_error(logits[0], full[0, 12 - pads - 1]) < LOGITS_RTOL
    assert relative_error(logits[1:], full[1:, -1]) < LOGITS_RTOL
    np.testing.assert_array_equal(cache.length, [12 - pads, 12, 12])


def test_decoding_past_max_length():
    model, variables, tokens = _setup(TINY)
    cache = init_cache(TINY, BATCH, MAX_LENGTH)
    with pytest.raises(ValueError, match="17 tokens do not fit a cache of max_length 16"):
        model.apply(variables, jnp.zeros((BATCH, 17), jnp.int32), state=cache)
    full = cache._replace(length=jnp.array([14, 0, 0], jnp.int32))
    with pytest.raises(ValueError, match="already holds 14 tokens, so 3 more exceed its max_length 16"):
        model.apply(variables, tokens[:, :3], state=full)
    with pytest.raises(ValueError, match="prompt has 12 tokens but max_length is 8"):
        prefill(model, variables, tokens, 8)
    # Inside jit the length is unknown when tracing: a row past its capacity gets NaN logits instead.
    full = cache._replace(length=jnp.array([MAX_LENGTH, 3, 0], jnp.int32))
    logits, full = _step(model, variables, tokens[:, 0], full)
    assert np.all(np.isnan(logits[0])) and np.all(np.isfinite(logits[1:]))


def test_bad_calls_are_named():
    model, variables, tokens = _setup(TINY)
    cache = init_cache(TINY, BATCH, MAX_LENGTH)
    with pytest.raises(ValueError, match="the cache does not fit this model and batch"):
        model.apply(variables, tokens, state=init_cache(TINY, BATCH + 1, MAX_LENGTH))
    with pytest.raises(ValueError, match="the cache does not fit this model and batch"):
        model.apply(variables, tokens, state=init_cache(TINY.replace(num_layers=3), BATCH, MAX_LENGTH))
    with pytest.raises(ValueError, match="the cache holds bfloat16 but the model computes in float32"):
        model.apply(variables, tokens, state=init_cache(TINY.replace(dtype="bfloat16"), BATCH, MAX_LENGTH))
    with pytest.raises(ValueError, match="mode must be one of"):
        model.apply(variables, tokens, mode="fast")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        model.apply(variables, tokens, chunk_size=0)
    with pytest.raises(ValueError, match="tokens must be integer ids of shape"):
        model.apply(variables, tokens.astype(jnp.float32), state=cache)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
        init_cache(TINY, 2, 0)
    # RetNetLM's mode and chunk_size are accepted (one training loop drives both models) and ignored.
    shapes = jax.eval_shape(lambda: model.apply(variables, tokens, mode="chunkwise", chunk_size=4))
    assert shapes[0].shape == (BATCH, 12, TINY.vocab_size) and shapes[1] is None


def test_every_parameter_has_logical_axes():
    for config in (TINY, OPTIONS):
        assert_logical_axes(jax.eval_shape(lambda c=config: _setup(c)[1]))


def _count(model):
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)["params"]))


@pytest.mark.parametrize("name,expected", [("paper-1.3b", 1_414_205_440), ("paper-2.7b", 2_774_471_680)])
def test_matching_parameter_counts(name, expected):
    """12·D²·L in both (attention 4·D² + MLP with F = 4D, against MSR 8·D² + MLP with F = 2D), plus the
    embedding and head (N·D each) and the same LayerNorms: equal counts, no memory used."""
    retnet = RetNetConfig.preset(name)
    config = TransformerConfig.preset(name)
    assert config == TransformerConfig.matching(retnet)
    d, layers, n = retnet.d_model, retnet.num_layers, retnet.vocab_size
    assert (config.ffn_dim, config.head_dim, config.num_heads) == (4 * d, 128, d // 128)
    assert (config.norm, config.ffn_type, config.dtype) == ("layernorm", "mlp", "bfloat16")
    norms = 2 * d * (2 * layers + 1)
    assert expected == 12 * d * d * layers + 2 * n * d + norms
    assert _count(TransformerLM(config)) == _count(RetNetLM(retnet)) == expected


def test_matching_glu_width_and_presets():
    # torchscale-xl (swish GLU, F = 3456, value width F): 2D² + 6·D·F per RetNet layer; the Transformer's
    # GLU takes (2D² + 6·D·F − 4D²) / 3D = 5546.7, rounded to 5504 = 43·128.
    config = TransformerConfig.preset("torchscale-xl")
    assert (config.ffn_type, config.ffn_dim, config.norm, config.num_heads) == ("glu", 5504, "rmsnorm", 16)
    assert TINY.ffn_dim == 256 and TINY.head_dim == 32  # D = 64: 128 does not divide it, K stays D / H
    with pytest.raises(ValueError, match="Unknown model preset 'huge'; available"):
        TransformerConfig.preset("huge")
    assert TransformerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        TransformerConfig.from_dict({**config.to_dict(), "depth": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 4
    # No GPU here: "auto" is XLA's attention even in bf16.
    assert attention_implementation(config) == "xla"
    assert attention_implementation(config.replace(attention_impl="cudnn")) == "cudnn"


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(d_model=66, num_heads=4), r"d_model \(66\) must be divisible by num_heads \(4\)"),
        (dict(d_model=66, num_heads=22), "K = d_model / num_heads must be even"),
        (dict(attention_impl="flash"), r"attention_impl must be one of \('auto', 'cudnn', 'xla'\)"),
        (dict(attention_impl="cudnn"), "attention_impl='cudnn' needs dtype in"),
        (dict(ffn_type="moe"), "ffn_type must be one of"),
        (dict(num_layers=0), "num_layers must be an integer >= 1"),
        (dict(dropout=1.0), r"dropout must be a rate in \[0, 1\)"),
    ],
)
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)
