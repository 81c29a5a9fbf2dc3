"""The LM contract, for both LMs (the RetNet and the Transformer baseline) through the one skeleton:

* decoding token by token (with the state) equals the full pass; a prefilled prompt continues exactly;
* every retention form gives the same logits and state (attention has one form: modes change nothing);
* left pads change nothing; rows taken from a state decode as if alone;
* sharded over a device mesh equals one device; scan, remat and unrolling change nothing;
* bf16 compute keeps parameters (and RetNet's state) in float32; dropout only when asked;
* every parameter has logical axes; bad calls are named.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.models import DecoderLM, RetNetConfig, RetNetLM, TransformerConfig, TransformerLM
from retnet_jax.models.lm import decode_step, prefill
from retnet_jax.training.sharding import LOGICAL_RULES, make_mesh, shardings_of
from tests.helpers import assert_logical_axes, relative_error

# Logits of two forms of the float32 model; measured ≈ 5e-7 normwise (XLA CPU).
LOGITS_RTOL = 1e-5
MAX_LENGTH = 32  # the KV cache's capacity in these tests
BATCH = 3  # differs from L = 2 and H, so a mixed-up axis cannot pass

RETNET = RetNetConfig.preset("tiny")
TRANSFORMER = TransformerConfig.matching(RETNET)  # D 64, H 2, K 32, swish GLU F 256
# Every non-default option at once: rotate-half, LayerNorm head norm, paper MLP, tied head, ...
RETNET_OPTIONS = RETNET.replace(
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
    num_heads=4,
    value_dim=64,
)
RETNET_UNNORMALIZED = RETNET.replace(normalize=False, head_norm="rms_weight")
TRANSFORMER_OPTIONS = TRANSFORMER.replace(
    norm="layernorm",
    ffn_type="mlp",
    activation="gelu",
    use_bias=True,
    tie_embeddings=True,
    embed_scale=True,
    embed_norm=True,
    num_heads=4,
)
CONFIGS = {
    "retnet": RETNET,
    "retnet-options": RETNET_OPTIONS,
    "retnet-unnormalized": RETNET_UNNORMALIZED,
    "transformer": TRANSFORMER,
    "transformer-options": TRANSFORMER_OPTIONS,
}
BOTH = ["retnet", "transformer"]


def _init(name):
    # The parameters depend on the config and the key, not on the tokens' shape.
    return jax.jit(DecoderLM(CONFIGS[name]).init)(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))


@functools.cache
def _variables(name):
    """One initialization per config, shared (read only) by the tests."""
    return _init(name)


def _setup(name, batch=BATCH, length=12, seed=0):
    config = CONFIGS[name]
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)
    return DecoderLM(config), _variables(name), tokens


def _empty(model, batch=BATCH):
    return model.config.init_state(batch, max_length=MAX_LENGTH)


# Module-level jits with the model static: tests that share shapes share compiled programs.
@functools.partial(jax.jit, static_argnames=("model", "mode", "chunk_size", "return_state"))
def _apply(model, variables, tokens, state=None, mode=None, chunk_size=None, return_state=False):
    return model.apply(
        variables, tokens, state=state, mode=mode, chunk_size=chunk_size, return_state=return_state
    )


@functools.partial(jax.jit, static_argnames="model")
def _step(model, variables, tokens, state):
    return decode_step(model, variables, tokens, state)


def _decode_all(model, variables, tokens, state):
    logits = []
    for t in range(tokens.shape[1]):
        out, state = _step(model, variables, tokens[:, t], state)
        logits.append(out)
    return jnp.stack(logits, 1), state


def _arrays(state):
    """The state's arrays other than the position (kv, or the cache's k and v)."""
    return [a for name, a in state._asdict().items() if name != "position"]


def _assert_states_equal(a, b):
    np.testing.assert_array_equal(a.position, b.position)
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        assert relative_error(x, y) < LOGITS_RTOL


def test_lms_are_the_one_skeleton():
    assert isinstance(RetNetLM(RETNET), DecoderLM) and isinstance(TransformerLM(TRANSFORMER), DecoderLM)
    with pytest.raises(ValueError, match="RetNetLM takes a RetNetConfig; got TransformerConfig"):
        RetNetLM(TRANSFORMER)
    with pytest.raises(ValueError, match="TransformerLM takes a TransformerConfig; got RetNetConfig"):
        TransformerLM(RETNET)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_equals_the_full_pass(name):
    """One-token steps with the state give the full pass's logits at every position."""
    model, variables, tokens = _setup(name, length=13)
    full, _ = _apply(model, variables, tokens)
    assert full.dtype == jnp.float32
    stepped, state = _decode_all(model, variables, tokens, _empty(model))
    assert relative_error(stepped, full) < LOGITS_RTOL
    np.testing.assert_array_equal(state.position, [13] * BATCH)


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize(
    "mode,prompt,chunk", [("chunkwise", 5, 2), ("chunkwise", 16, 16), ("parallel", 9, 4)]
)
def test_prefill_then_decode_equals_one_pass(name, mode, prompt, chunk):
    """A prompt run without a state (returning one) or through an empty state, then continued token by
    token or in one call, equals one full pass."""
    model, variables, tokens = _setup(name, length=prompt + 6, seed=prompt)
    full, _ = _apply(model, variables, tokens)
    run_prefill = jax.jit(prefill, static_argnames=("model", "max_length", "mode"))
    first, state = run_prefill(model, variables, tokens[:, :prompt], max_length=MAX_LENGTH, mode=mode)
    decoded, _ = _decode_all(model, variables, tokens[:, prompt:], state)
    assert relative_error(jnp.concatenate([first, decoded], 1), full) < LOGITS_RTOL
    first, state = _apply(model, variables, tokens[:, :prompt], _empty(model), mode=mode, chunk_size=chunk)
    rest, state = _apply(model, variables, tokens[:, prompt:], state, mode=mode, chunk_size=chunk)
    assert relative_error(jnp.concatenate([first, rest], 1), full) < LOGITS_RTOL
    np.testing.assert_array_equal(state.position, [prompt + 6] * BATCH)


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("length", [1, 7, 24])
def test_every_mode_gives_the_same_logits_and_state(name, length):
    model, variables, tokens = _setup(name, length=length, seed=length)
    parallel, state_p = _apply(model, variables, tokens, mode="parallel", return_state=True)
    results = {"recurrent": _apply(model, variables, tokens, mode="recurrent", return_state=True)}
    for chunk in (1, 4, 8, 32):
        results[f"chunkwise C={chunk}"] = _apply(
            model, variables, tokens, mode="chunkwise", chunk_size=chunk, return_state=True
        )
    for label, (logits, state) in results.items():
        assert relative_error(logits, parallel) < LOGITS_RTOL, label
        _assert_states_equal(state, state_p)


@pytest.mark.parametrize("name", BOTH)
def test_left_pads_leave_rows_unchanged(name):
    """Left pads announced by a negative position: a padded row's logits equal the unpadded row's."""
    model, variables, tokens = _setup(name, length=9)
    plain, _ = _apply(model, variables, tokens, mode="chunkwise", chunk_size=4)
    pads = [3, 0, 1]  # row b: p pads, then its first 9 − p tokens
    padded = jnp.stack(
        [jnp.concatenate([jnp.zeros((p,), tokens.dtype), tokens[b, : 9 - p]]) for b, p in enumerate(pads)]
    )
    state = _empty(model)._replace(position=-jnp.asarray(pads, jnp.int32))
    logits, state = _apply(model, variables, padded, state, mode="chunkwise", chunk_size=4)
    for b, p in enumerate(pads):
        assert relative_error(logits[b, p:], plain[b, : 9 - p]) < LOGITS_RTOL
    np.testing.assert_array_equal(state.position, [9 - p for p in pads])


@pytest.mark.parametrize("name", BOTH)
def test_rows_taken_from_a_state_decode_as_if_alone(name):
    """``take`` picks and reorders rows of every state array (beam search, finished rows)."""
    model, variables, tokens = _setup(name, length=6)
    _, state = _apply(model, variables, tokens, _empty(model), mode="chunkwise", chunk_size=4)
    rows = jnp.array([2, 0])
    picked = state.take(rows)
    _, alone = _apply(model, variables, tokens[rows], _empty(model, 2), mode="chunkwise", chunk_size=4)
    _assert_states_equal(picked, alone)
    a, _ = _step(model, variables, tokens[rows, -1], picked)
    b, _ = _step(model, variables, tokens[rows, -1], alone)
    assert relative_error(a, b) < LOGITS_RTOL


@pytest.mark.parametrize("name", BOTH)
def test_sharded_equals_one_device(name):
    """Parameters sharded by the logical-axis rules over 8 fake devices (data 2, fsdp 2, tensor 2):
    the same logits, full pass and decoding step."""
    model, variables, tokens = _setup(name, batch=4, length=8)
    full, _ = _apply(model, variables, tokens)
    stepped, _ = _step(model, variables, tokens[:, 0], _empty(model, 4))
    mesh = make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        sharded = jax.device_put(variables, shardings_of(variables, mesh))
        assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(nn.unbox(sharded)))
        logits, _ = jax.jit(lambda v, t: model.apply(v, t))(sharded, tokens)
        one, _ = jax.jit(lambda v, t, s: decode_step(model, v, t, s))(sharded, tokens[:, 0], _empty(model, 4))
    assert relative_error(logits, full) < LOGITS_RTOL
    assert relative_error(one, stepped) < LOGITS_RTOL


@pytest.mark.parametrize("name", BOTH)
def test_scan_remat_and_unrolling_do_not_change_the_function(name):
    model, variables, tokens = _setup(name)
    remat = DecoderLM(model.config, remat=True)
    loss = lambda m: jax.jit(jax.value_and_grad(lambda v: jnp.mean(m.apply(v, tokens)[0] ** 2)))
    (l0, g0), (l1, g1) = loss(model)(variables), loss(remat)(variables)
    assert abs(float(l0 - l1)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        assert relative_error(a, b) < 1e-5

    # Unstacked layers (with and without remat) with the same weights compute the same logits.
    params = nn.unbox(variables)["params"]
    layers = params.pop("layers")
    for i in range(model.config.num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
    full, _ = jax.jit(model.apply)(variables, tokens)
    for loop in (
        DecoderLM(model.config, scan_layers=False),
        DecoderLM(model.config, scan_layers=False, remat=True),
    ):
        assert relative_error(jax.jit(loop.apply)({"params": params}, tokens)[0], full) < 1e-6

    # The one-token step unrolled or looped over the layers.
    _, state = _apply(model, variables, tokens, _empty(model))
    results = [
        _step(DecoderLM(model.config, unroll_decode=unroll), variables, tokens[:, 0], state)
        for unroll in (True, False)
    ]
    assert relative_error(results[0][0], results[1][0]) < LOGITS_RTOL
    _assert_states_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("name", BOTH)
def test_bf16_compute_keeps_params_in_float32(name):
    config = CONFIGS[name].replace(dtype="bfloat16")
    model = DecoderLM(config)
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, config.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
    state = config.init_state(2, max_length=MAX_LENGTH)
    logits, state = _apply(model, variables, tokens, state, mode="chunkwise", chunk_size=8)
    assert logits.dtype == jnp.float32
    # The recurrent state is float32 whatever the compute dtype; a KV cache holds the compute dtype.
    expected = jnp.float32 if name == "retnet" else jnp.bfloat16
    assert all(a.dtype == expected for a in _arrays(state))
    reference, _ = jax.jit(DecoderLM(CONFIGS[name]).apply)(variables, tokens)
    # bf16 activations through 2 blocks: measured ≈ 1e-2 normwise against float32.
    assert relative_error(logits, reference) < 5e-2


@pytest.mark.parametrize("name", BOTH)
def test_dropout_is_active_only_when_asked(name):
    model = DecoderLM(CONFIGS[name].replace(dropout=0.5))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, RETNET.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    a, _ = apply(variables, tokens)
    b, _ = apply(variables, tokens)
    np.testing.assert_array_equal(a, b)
    c, _ = apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert float(jnp.max(jnp.abs(c - a))) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_has_logical_axes(name):
    assert_logical_axes(jax.eval_shape(lambda: _init(name)))


@pytest.mark.parametrize("name", BOTH)
def test_bad_calls_are_named(name):
    model, variables, tokens = _setup(name)
    config = model.config
    label = "RetNetLM" if name == "retnet" else "TransformerLM"
    with pytest.raises(ValueError, match=f"{label}: mode must be one of"):
        model.apply(variables, tokens, mode="fast")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        model.apply(variables, tokens, mode="chunkwise", chunk_size=0)
    with pytest.raises(ValueError, match="tokens must be integer ids of shape"):
        model.apply(variables, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="tokens is empty"):
        model.apply(variables, tokens[:, :0])
    with pytest.raises(ValueError, match="does not fit this model and batch"):
        model.apply(
            variables, tokens, state=config.replace(num_layers=3).init_state(BATCH, max_length=MAX_LENGTH)
        )
    with pytest.raises(ValueError, match="does not fit this model and batch"):
        model.apply(variables, tokens, state=config.init_state(BATCH + 2, max_length=MAX_LENGTH))
    other = TRANSFORMER if name == "retnet" else RETNET
    with pytest.raises(ValueError, match="state must be a"):
        model.apply(variables, tokens, state=other.init_state(BATCH, max_length=MAX_LENGTH))


def test_a_kv_cache_has_a_capacity():
    model, variables, tokens = _setup("transformer")
    cache = TRANSFORMER.init_state(BATCH, max_length=16)
    with pytest.raises(ValueError, match="17 tokens do not fit a cache of max_length 16"):
        model.apply(variables, jnp.zeros((BATCH, 17), jnp.int32), state=cache)
    with pytest.raises(ValueError, match="already holds 14 tokens, so 3 more exceed its max_length 16"):
        model.apply(variables, tokens[:, :3], state=cache._replace(position=jnp.array([14, 0, 0], jnp.int32)))
    with pytest.raises(ValueError, match="prompt has 12 tokens but max_length is 8"):
        prefill(model, variables, tokens, max_length=8)
    with pytest.raises(ValueError, match="holds bfloat16 but the model computes in float32"):
        model.apply(
            variables, tokens, state=TRANSFORMER.replace(dtype="bfloat16").init_state(BATCH, max_length=16)
        )
    with pytest.raises(ValueError, match="a KV cache needs max_length"):
        TRANSFORMER.init_state(BATCH)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
        TRANSFORMER.init_state(BATCH, max_length=0)
    # Inside jit the position is unknown when tracing: a row past its capacity gets NaN logits instead.
    full = cache._replace(position=jnp.array([16, 3, 0], jnp.int32))
    logits, _ = _step(model, variables, tokens[:, 0], full)
    assert np.all(np.isnan(logits[0])) and np.all(np.isfinite(logits[1:]))


def test_a_recurrent_state_does_not_grow():
    """Constant memory: RetNet's state has the same shapes at any position, and needs no capacity."""
    state = RETNET.init_state(BATCH)
    assert state.kv.shape == (2, BATCH, 2, 32, 64) and state.kv.dtype == jnp.float32
    assert state.position.shape == (BATCH,) and state.position.dtype == jnp.int32
    model, variables, tokens = _setup("retnet", length=40)
    _, after = _apply(model, variables, tokens, state, mode="chunkwise", chunk_size=8)
    assert jax.tree.map(jnp.shape, after) == jax.tree.map(jnp.shape, state)


# Attention has one form (mode and chunk size change nothing): the Transformer runs once.
PACKED_CASES = [("retnet", "parallel", 64), ("retnet", "chunkwise", 4), ("retnet", "recurrent", 64)]
PACKED_CASES += [("transformer", "parallel", 64)]


@pytest.mark.parametrize("name,mode,chunk", PACKED_CASES)
def test_a_packed_row_equals_each_document_alone(name, mode, chunk):
    """With segment ids, every document of a packed row gets the logits (and gradients) it gets alone:
    documents shorter than a chunk, spanning chunks, one token long, starting at position 0.

    "Alone" is a row of its own that starts with the document, without segment ids: the model is causal
    (tests/models/test_causal.py), so what follows the document in that row changes nothing of its
    logits, and all documents run as the rows of one call (one program, not one per length)."""
    model, variables, _ = _setup(name, batch=1, length=8)
    lengths = [[3, 1, 9, 5], [7, 11]]  # two rows of 18 tokens
    tokens = jax.random.randint(jax.random.key(5), (2, 18), 0, CONFIGS[name].vocab_size)
    segment_ids = jnp.asarray([np.repeat(np.arange(len(row)), row) for row in lengths], jnp.int32)
    apply = jax.jit(lambda v, t, s: model.apply(v, t, mode=mode, chunk_size=chunk, segment_ids=s)[0])
    packed = apply(variables, tokens, segment_ids)
    # Each document at the start of a row of its own, then another document's tokens (not pads).
    documents = [
        (b, start, n)
        for b, row in enumerate(lengths)
        for start, n in zip(np.cumsum([0, *row[:-1]]), row, strict=True)
    ]
    rows = jnp.stack([jnp.roll(tokens[b], -start) for b, start, _ in documents])  # [6, 18]
    alone = _apply(model, variables, rows, mode=mode, chunk_size=chunk)[0]
    for (b, start, n), logits in zip(documents, alone, strict=True):
        assert relative_error(packed[b, start : start + n], logits[:n]) < LOGITS_RTOL, (b, start, n)
    # Without resets the documents see each other: the rule is not vacuous.
    assert relative_error(apply(variables, tokens, jnp.zeros_like(segment_ids)), packed) > 1e-3

    # Gradients: the packed row's loss equals the sum of the documents' own losses (row 0's documents,
    # each alone, counted over its own positions only).
    first = [(start, n) for b, start, n in documents if b == 0]
    own = jnp.asarray([np.arange(18) < n for _, n in first], jnp.float32)  # [4, 18]

    def packed_loss(v):
        return jnp.sum(
            model.apply(v, tokens[:1], mode=mode, chunk_size=chunk, segment_ids=segment_ids[:1])[0] ** 2
        )

    def alone_loss(v):
        logits = model.apply(v, rows[: len(first)], mode=mode, chunk_size=chunk)[0]
        return jnp.sum(own[..., None] * logits**2)

    g_packed, g_alone = jax.jit(jax.grad(packed_loss))(variables), jax.jit(jax.grad(alone_loss))(variables)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_alone), strict=True):
        assert relative_error(a, b) < 1e-5


def test_segment_ids_are_for_training_rows():
    model, variables, tokens = _setup("retnet")
    ids = jnp.zeros(tokens.shape, jnp.int32)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        model.apply(variables, tokens, segment_ids=ids[:, :3])
    with pytest.raises(ValueError, match="a decoding state continues one document per row"):
        model.apply(variables, tokens, segment_ids=ids, state=_empty(model))
    with pytest.raises(ValueError, match="a decoding state continues one document per row"):
        model.apply(variables, tokens, segment_ids=ids, return_state=True)
