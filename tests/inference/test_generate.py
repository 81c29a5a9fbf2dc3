"""Generation, for both LMs: greedy decoding equals the parallel model, batching and padding change
nothing, sampling options reduce to greedy where they must, streaming equals the one-shot call, the
RetNet's state stays constant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.inference.decoding import LMDecoder
from retnet_jax.inference.generate import Generation, decode_text, generate, stream
from retnet_jax.inference.prompts import prepare_prompts
from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig, decode_step
from retnet_jax.training.tokenizers import ByteTokenizer
from tests.helpers import relative_error

TINY = RetNetConfig.preset("tiny")
CONFIGS = {"retnet": TINY, "transformer": TransformerConfig.matching(TINY)}
IDS = dict(bos_id=ByteTokenizer.bos_id, pad_id=ByteTokenizer.pad_id)
# Framed ([BOS] + ids) lengths 1, 5 and 12 in one batch.
PROMPTS = [[], [10, 20, 30, 40], list(range(50, 61))]
NEW = 8
# Two forms of the float32 model (prefill vs token-by-token steps); measured ≈ 1e-6 normwise.
STATE_RTOL = 1e-5
# Log-probabilities of the loop vs log_softmax of the parallel logits (values ≈ −3).
LOGPROB_ATOL = 1e-4
# A greedy token's logit may fall short of the parallel model's maximum by the two programs' rounding
# (logits agree to ~1e-6 here; the smallest top-2 gap on these paths measured 5.8e-4).
GREEDY_ATOL = 1e-4
SAMPLING = dict(temperature=1.0, top_p=0.9)


def _lm(name):
    model = DecoderLM(CONFIGS[name])
    return model, jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))


@pytest.fixture(scope="module")
def lm():
    return _lm("retnet")


def _generate(lm, prompts=PROMPTS, **kwargs):
    # Log-probabilities always on: calls that differ only in traced values share one compiled program.
    model, variables = lm
    return generate(model, variables, prompts, max_new_tokens=NEW, return_logprobs=True, **IDS, **kwargs)


@pytest.fixture(scope="module")
def greedy(lm):
    return _generate(lm)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_parallel_reference(name):
    """Token by token in Python, on the loop's own tokens: each is an argmax of the parallel logits at the
    last position of the growing row (to within the two programs' rounding, so a near-tie cannot flip
    the test), and its log-probability is the parallel model's."""
    model, variables = lm = _lm(name)
    greedy = _generate(lm)
    _assert_greedy_under_the_parallel_model(model, variables, PROMPTS, greedy)
    np.testing.assert_array_equal(greedy.lengths, [NEW] * len(PROMPTS))


def _assert_greedy_under_the_parallel_model(model, variables, prompts, result):
    forward = jax.jit(lambda v, t: model.apply(v, t, mode="parallel")[0])
    rows = np.arange(len(prompts))
    # Right padding: the model is causal, so what follows a position never changes its logits.
    seqs = np.full((len(prompts), 32), IDS["pad_id"], np.int32)
    ends = np.array([len(p) + 1 for p in prompts])
    for b, prompt in enumerate(prompts):
        seqs[b, : ends[b]] = [IDS["bos_id"], *prompt]
    for i in range(NEW):
        logits = np.asarray(forward(variables, seqs))[rows, ends - 1]  # [B, N]
        token = result.tokens[:, i]
        assert np.all(logits[rows, token] >= logits.max(-1) - GREEDY_ATOL), i
        log_p = np.asarray(jax.nn.log_softmax(logits))[rows, token]
        np.testing.assert_allclose(result.logprobs[:, i], log_p, atol=LOGPROB_ATOL)
        seqs[rows, ends] = token
        ends += 1


def test_batched_equals_one_by_one(lm, greedy):
    """A prompt decoded alone continues as it did in the batch (each row under the parallel model, and
    the same log-probabilities: near-ties aside, the same tokens)."""
    model, variables = lm
    for b, prompt in enumerate(PROMPTS):
        alone = _generate(lm, [prompt])
        _assert_greedy_under_the_parallel_model(model, variables, [prompt], alone)
        if np.array_equal(alone.tokens[0], greedy.tokens[b]):
            np.testing.assert_allclose(alone.logprobs[0], greedy.logprobs[b], atol=LOGPROB_ATOL)


@pytest.mark.parametrize("mode,chunk", [("chunkwise", 5), ("parallel", None)])
def test_prefill_state_equals_recurrent_steps(lm, mode, chunk):
    """The padded batch's prefill state equals each unpadded prompt stepped through one token at a time."""
    model, variables = lm
    decoder = LMDecoder(model, mode, chunk)
    tokens, pads = prepare_prompts(PROMPTS, **IDS)
    logits, state = jax.jit(decoder.prefill)(variables, tokens, decoder.init_state(jnp.asarray(pads), 0))
    step = jax.jit(lambda t, s: decode_step(model, variables, t, s))
    for b, prompt in enumerate(PROMPTS):
        expected = TINY.init_state(1)
        for token in [IDS["bos_id"], *prompt]:
            expected_logits, expected = step(jnp.asarray([token]), expected)
        assert relative_error(state.kv[:, b], expected.kv[:, 0]) < STATE_RTOL
        assert relative_error(logits[b], expected_logits[0]) < STATE_RTOL
        assert int(state.position[b]) == int(expected.position[0]) == len(prompt) + 1


def test_state_shapes_do_not_depend_on_position(lm):
    """Constant memory: the step's state has the same shapes after a short and a long prompt."""
    model, variables = lm
    decoder = LMDecoder(model)
    shapes = []
    for prompts in ([[1]], [list(range(100))]):
        tokens, pads = prepare_prompts(prompts, **IDS)
        state0 = decoder.init_state(jnp.asarray(pads), 0)
        _, state = jax.eval_shape(decoder.prefill, variables, tokens, state0)
        _, after = jax.eval_shape(decoder.step, variables, jnp.zeros((1,), jnp.int32), state)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), after) == jax.tree.map(
            lambda a: (a.shape, a.dtype), state
        )
        shapes.append(jax.tree.map(lambda a: (a.shape, a.dtype), after))
    assert shapes[0] == shapes[1]


def test_sampling_is_reproducible_and_reduces_to_greedy(lm, greedy):
    a = _generate(lm, **SAMPLING, seed=3).tokens
    np.testing.assert_array_equal(a, _generate(lm, **SAMPLING, seed=3).tokens)
    assert not np.array_equal(a, _generate(lm, **SAMPLING, seed=4).tokens)
    tiny_p = _generate(lm, temperature=1.0, top_p=1e-6, seed=5)
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)
    top_1 = _generate(lm, temperature=1.0, top_k=1, seed=5)
    np.testing.assert_array_equal(top_1.tokens, greedy.tokens)


def test_stop_tokens_end_rows_and_pad_the_rest(lm, greedy):
    stops = {int(greedy.tokens[0, 2]), int(greedy.tokens[2, 5])}
    result = _generate(lm, stop_tokens=tuple(stops))
    for b, row in enumerate(greedy.tokens):
        hits = [i for i, t in enumerate(row) if t in stops]
        n = hits[0] + 1 if hits else NEW
        assert result.lengths[b] == n
        np.testing.assert_array_equal(result.tokens[b, :n], row[:n])
        assert np.all(result.tokens[b, n:] == IDS["pad_id"])
        assert np.all(result.logprobs[b, n:] == 0)
    assert result.lengths[0] <= 3 and result.lengths[2] <= 6


def test_streaming_equals_one_shot(lm):
    model, variables = lm
    one_shot = _generate(lm, **SAMPLING, seed=3)
    kwargs = dict(max_new_tokens=NEW, block_size=3, seed=3, return_logprobs=True, **SAMPLING, **IDS)
    blocks = list(stream(model, variables, PROMPTS, **kwargs))
    assert [b.tokens.shape[1] for b in blocks] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in blocks], 1), one_shot.tokens)
    np.testing.assert_array_equal(sum(b.lengths for b in blocks), one_shot.lengths)
    np.testing.assert_allclose(np.concatenate([b.logprobs for b in blocks], 1), one_shot.logprobs, atol=1e-6)


def test_decode_text_keeps_characters_whole():
    ids = list("añb€".encode())  # ñ is 2 bytes, € is 3
    blocks = [ids[:2], ids[2:4], ids[4:6], ids[6:]]
    gens = [Generation(np.asarray([b], np.int32), np.asarray([len(b)], np.int32)) for b in blocks]
    pieces = [p[0] for p in decode_text(gens, ByteTokenizer())]
    assert pieces == ["a", "ñb", "", "€"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[1, 2], [3, 264]]), r"token id 264 .*vocab_size 264"),
        (dict(prompts=[[-1]]), r"token id -1 .*vocab_size 264"),
        (dict(stop_tokens=(999,)), r"999 .*vocab_size 264"),
    ],
)
def test_bad_arguments_raise(lm, kwargs, match):
    model, variables = lm
    kwargs = {"max_new_tokens": NEW, **IDS, **kwargs}
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=match):
        generate(model, variables, prompts, **kwargs)
    with pytest.raises(ValueError, match=match):  # checked at the call, before the first block
        stream(model, variables, prompts, **kwargs)


def test_the_loop_takes_each_layers_weights_apart(lm, greedy):
    """LMDecoder's loop runs on each layer's weights copied out of the scanned stack once (``prepare``),
    its q, k, v, g joined into one projection: the same tokens and log-probabilities as a loop that reads
    the stack (and the four projections)."""
    model, variables = lm
    prepared = jax.eval_shape(LMDecoder(model).prepare, variables)["params"]  # shapes: nothing compiled
    layers = TINY.num_layers
    assert "layers" not in prepared and sorted(k for k in prepared if k.startswith("layers_")) == [
        f"layers_{i}" for i in range(layers)
    ]
    stacked = _generate((LMDecoder(model, unstack_layers=False), variables))  # generate takes a Decoder
    np.testing.assert_array_equal(stacked.tokens, greedy.tokens)
    np.testing.assert_allclose(stacked.logprobs, greedy.logprobs, atol=1e-6)
