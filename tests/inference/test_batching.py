"""Continuous batching, for both LMs: each request generates what it would alone, whatever shares the batch.

* greedy: a request's tokens equal ``generate`` on that request alone (each token an argmax of the
  parallel model on the request's own tokens; compared exactly up to a near-tie), with prompts of
  different lengths, max lengths and stop tokens, more requests than rows, rows freed and refilled, and
  in static batches too;
* sampled: each token is the Gumbel-max draw of its request's key (``token_keys``) under the parallel
  model's logits, whatever else shares the batch;
* the per-row sampler keeps what ``Sample``'s filters keep; ``state.put`` writes rows; bad input is named.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.inference.batching import Request, Scheduler, token_keys
from retnet_jax.inference.generate import generate
from retnet_jax.inference.sampling import PerRow, gumbel_noise, top_k_filter, top_p_filter
from retnet_jax.models import DecoderLM, KVCache, RecurrentState, RetNetConfig, TransformerConfig
from retnet_jax.training.tokenizers import ByteTokenizer

TINY = RetNetConfig.preset("tiny")
CONFIGS = {"retnet": TINY, "transformer": TransformerConfig.matching(TINY)}
IDS = dict(bos_id=ByteTokenizer.bos_id, pad_id=ByteTokenizer.pad_id)
MAX_LENGTH = 48  # the Transformer's cache: the longest request below needs 21 + 1 + 12 slots
ROWS = 3
BLOCK = 4  # decoding steps per program: a request of 12 tokens streams in several events
SEED = 7
# (prompt, max_new_tokens): prompt lengths in two buckets (16, 32), the empty prompt, max lengths 1..12.
SHAPES = [
    ([], 8),
    ([10, 20, 30, 40], 3),
    (list(range(50, 61)), 12),
    (list(range(100, 121)), 6),
    ([7], 1),
    ([1, 2, 3, 4, 5, 6, 7], 10),
    (list(range(200, 214)), 9),
]
# A greedy token's logit may fall short of the parallel model's maximum by the two programs' rounding
# (float32 logits agree to ~1e-6 here); a top-2 gap below this is a near-tie, which either program may
# break its own way.
GREEDY_ATOL = 1e-4
# Sampled draws: the same tolerance on the perturbed scores, and on the nucleus' cumulative probability.
PROB_ATOL = 1e-4
# Sampling settings per request: greedy, temperature alone, top-k alone, top-p alone (one filter each).
SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 5, 1.0), (1.3, 0, 0.8)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm(request):
    model = DecoderLM(CONFIGS[request.param])
    return model, jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))


def _alone(lm, prompt, max_new, stops=()):
    model, variables = lm
    result = generate(model, variables, [prompt], max_new_tokens=max_new, stop_tokens=stops, **IDS)
    return result.to_lists()[0]


def _serve(lm, requests, rows=ROWS, **kwargs):
    """Serves ``requests``; returns ({id: tokens}, {id: reason}, the events, the scheduler)."""
    model, variables = lm
    scheduler = Scheduler(
        model, variables, rows=rows, max_length=MAX_LENGTH, block_size=BLOCK, seed=SEED, **IDS, **kwargs
    )
    tokens, reasons, events = {}, {}, []
    for event in scheduler.serve(requests):
        assert event.id not in reasons, "an event after the request finished"
        tokens.setdefault(event.id, []).extend(event.tokens)
        events.append(event)
        if event.finished:
            reasons[event.id] = event.reason
    assert sorted(reasons) == sorted(r.id for r in requests)
    return tokens, reasons, events, scheduler


@pytest.fixture(scope="module")
def greedy_requests(lm):
    """The requests, with stop tokens taken from their greedy continuations alone so that they end early."""
    requests = []
    for i, (prompt, max_new) in enumerate(SHAPES):
        stops = ()
        if i in (0, 5):  # stop at the 3rd (request 0) or 6th (request 5) token, if it is not earlier
            stops = (_alone(lm, prompt, max_new)[2 if i == 0 else 5],)
        requests.append(Request(100 + i, prompt, max_new, stop_tokens=stops))
    return requests


_FORWARDS = {}


def _parallel(lm):
    """seq → the parallel model's logits [N] after it (one compiled program per model)."""
    model, variables = lm
    if model not in _FORWARDS:
        _FORWARDS[model] = jax.jit(lambda v, t: model.apply(v, t, mode="parallel")[0])
    forward = _FORWARDS[model]
    return lambda seq: np.asarray(forward(variables, _padded(seq)))[0, len(seq) - 1]


def _padded(seq, width=64):
    # Right padding: the model is causal, so what follows a position never changes its logits.
    out = np.full((1, width), IDS["pad_id"], np.int32)
    out[0, : len(seq)] = seq
    return out


def _check_ending(request, tokens, reason):
    """A request ends at its first stop token or at max_new_tokens, and says which."""
    stops = set(request.stop_tokens)
    assert 1 <= len(tokens) <= request.max_new_tokens
    assert not stops & set(tokens[:-1])
    if tokens[-1] in stops:
        assert reason == "stop"
    else:
        assert reason == "length" and len(tokens) == request.max_new_tokens


def _assert_equals_alone(lm, request, tokens, alone):
    """Each token is a greedy choice of the parallel model on the request's own tokens (within rounding);
    the tokens equal ``alone`` up to the first near-tie of the parallel model, and wholly without one."""
    logits_at = _parallel(lm)
    seq = [IDS["bos_id"], *request.prompt]
    for i, token in enumerate(tokens):
        logits = logits_at(seq)
        assert logits[token] >= logits.max() - GREEDY_ATOL, (request.id, i)
        first, second = np.sort(logits)[-2:][::-1]
        if first - second < GREEDY_ATOL:
            return  # a near-tie: from here the two programs may follow different, equally greedy paths
        assert i < len(alone) and token == alone[i], (request.id, i, tokens, alone)
        seq.append(token)
    assert tokens == alone, (request.id, tokens, alone)


def test_greedy_requests_equal_generate_alone(lm, greedy_requests):
    """7 requests through 3 rows, in blocks of 4 steps: each request's tokens are generate's for it alone."""
    tokens, reasons, events, scheduler = _serve(lm, greedy_requests)
    alone = {r.id: _alone(lm, r.prompt, r.max_new_tokens, r.stop_tokens) for r in greedy_requests}
    for request in greedy_requests:
        _check_ending(request, tokens[request.id], reasons[request.id])
        _assert_equals_alone(lm, request, tokens[request.id], alone[request.id])
    assert reasons[100] == reasons[105] == "stop"  # the stop tokens ended these early
    # Tokens streamed as they came: the first alone at admission, then in blocks of at most 4.
    firsts = {}
    for event in events:
        firsts.setdefault(event.id, event)
        assert len(event.tokens) <= BLOCK
    assert all(len(event.tokens) == 1 for event in firsts.values())
    assert sum(1 for event in events if event.id == 102) >= 12 // BLOCK
    stats = scheduler.stats
    assert stats.requests == len(greedy_requests) and stats.generated == sum(map(len, tokens.values()))

    # The same requests in another order (other neighbours, other rows), and in static batches.
    for kwargs, order in ((dict(), greedy_requests[::-1]), (dict(static=True), greedy_requests)):
        again, reasons_again, _, other = _serve(lm, order, **kwargs)
        for request in greedy_requests:
            _check_ending(request, again[request.id], reasons_again[request.id])
            _assert_equals_alone(lm, request, again[request.id], alone[request.id])
        if kwargs.get("static"):
            # Static batches wait for each batch's longest request; refilled rows do not.
            assert other.stats.steps > stats.steps


def _assert_drawn(lm, request, tokens):
    """Each token is the draw of its key under the parallel model: greedy rows the argmax, sampled rows
    the Gumbel-max of (filtered logits / temperature + gumbel_noise(token_keys(SEED, id, i))), within
    rounding (a token near a filter's boundary counts as kept, and scores within tolerance as tied)."""
    logits_at = _parallel(lm)
    seq = [IDS["bos_id"], *request.prompt]
    keys = token_keys(SEED, [request.id] * len(tokens), np.arange(len(tokens)))
    noise = np.asarray(gumbel_noise(keys, CONFIGS["retnet"].vocab_size), np.float64)
    for i, token in enumerate(tokens):
        logits = np.asarray(logits_at(seq), np.float64)
        if request.temperature == 0:
            assert logits[token] >= logits.max() - GREEDY_ATOL, (request.id, i)
        else:
            scores = logits / request.temperature
            order = np.argsort(-scores, kind="stable")
            kept = certain = np.ones_like(scores, bool)
            if request.top_k:
                kth, next_ = scores[order[request.top_k - 1]], scores[order[request.top_k]]
                kept, certain = scores >= kth - GREEDY_ATOL, scores > next_ + GREEDY_ATOL
            if request.top_p < 1:
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                above = np.empty_like(probs)
                above[order] = np.cumsum(probs[order]) - probs[order]
                kept = above < request.top_p + PROB_ATOL
                certain = above < request.top_p - PROB_ATOL
            perturbed = scores + noise[i]
            assert kept[token], (request.id, i)
            assert perturbed[token] >= perturbed[certain].max() - GREEDY_ATOL, (request.id, i)
        seq.append(token)


def test_sampled_requests_draw_from_their_own_keys(lm):
    """Mixed settings in one batch: every request's draws follow its key rule, whatever else shares the
    batch (two schedules: different neighbours and order)."""
    requests = [
        Request(300 + i, prompt, max_new, *SETTINGS[i % len(SETTINGS)])
        for i, (prompt, max_new) in enumerate(SHAPES)
    ]
    tokens, _, _, _ = _serve(lm, requests)
    for request in requests:
        _assert_drawn(lm, request, tokens[request.id])
    mixed = [r for i, r in enumerate(requests) if i % 2] + [
        Request(900 + i, p, 5, temperature=1.0) for i, (p, _) in enumerate(SHAPES[:3])
    ]
    again, _, _, _ = _serve(lm, mixed[::-1])
    for request in mixed:
        _assert_drawn(lm, request, again[request.id])
    # The draws do depend on the seed (the test could tell a key that ignored it).
    model, variables = lm
    scheduler = Scheduler(model, variables, rows=ROWS, max_length=MAX_LENGTH, block_size=BLOCK, seed=8, **IDS)
    reseeded = {}
    for event in scheduler.serve(requests):
        reseeded.setdefault(event.id, []).extend(event.tokens)
    sampled = [r.id for r in requests if r.temperature > 0]
    assert any(reseeded[i] != tokens[i] for i in sampled)


def test_per_row_sampler_keeps_what_sample_keeps():
    """Row by row, ``PerRow.filter`` equals top_p_filter(top_k_filter(logits / T, k), p); greedy rows are
    the argmax and a row's draw depends only on its key and logits."""
    logits = jax.random.normal(jax.random.key(0), (6, 40)) * 3
    settings = [(0.0, 3, 0.5), (1.0, 0, 1.0), (0.7, 4, 1.0), (1.5, 0, 0.6), (0.9, 6, 0.7), (1.0, 40, 1.0)]
    per_row = PerRow.of(settings, vocab_size=40)
    filtered = np.asarray(per_row.filter(logits))
    for b, (temperature, top_k, top_p) in enumerate(settings):
        if temperature == 0:
            np.testing.assert_array_equal(filtered[b], logits[b])
            continue
        expected = top_k_filter(logits[b : b + 1] / temperature, top_k % 40)
        if top_p < 1:
            expected = top_p_filter(expected, top_p)
        np.testing.assert_array_equal(filtered[b], expected[0])
    keys = token_keys(0, np.arange(6), np.zeros(6, np.int32))
    tokens = np.asarray(jax.jit(lambda s, k, x: s(k, x))(per_row, keys, logits))
    assert tokens[0] == int(jnp.argmax(logits[0]))
    for b in range(6):  # each row alone, with its own key: the same draw
        alone = PerRow.of([settings[b]], vocab_size=40)
        assert int(alone(keys[b : b + 1], logits[b : b + 1])[0]) == tokens[b]


@pytest.mark.parametrize("kind", ["recurrent", "kv"])
def test_put_writes_rows(kind):
    """``put(rows, other)`` writes other's rows there, leaves the rest, skips indices >= B; it undoes
    nothing that ``take`` took."""
    config = CONFIGS["retnet" if kind == "recurrent" else "transformer"]

    def random_state(batch, seed):
        empty = config.init_state(batch, max_length=6)
        keys = jax.random.split(jax.random.key(seed), len(empty))
        return type(empty)(
            *(jax.random.normal(k, a.shape).astype(a.dtype) * 10 for k, a in zip(keys, empty, strict=True))
        )

    state, other = random_state(4, 0), random_state(3, 1)
    written = state.put(jnp.asarray([2, 0, 4]), other)  # index 4 >= B: skipped
    for a, b, c in zip(written, state, other, strict=True):
        axis = 1 if a.ndim > 1 else 0
        np.testing.assert_array_equal(
            jnp.take(a, jnp.asarray([2, 0]), axis), jnp.take(c, jnp.asarray([0, 1]), axis)
        )
        np.testing.assert_array_equal(
            jnp.take(a, jnp.asarray([1, 3]), axis), jnp.take(b, jnp.asarray([1, 3]), axis)
        )
    rows = jnp.asarray([3, 1])
    for a, b in zip(state.put(rows, state.take(rows)), state, strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(written, RecurrentState if kind == "recurrent" else KVCache)
    with pytest.raises(ValueError, match="other.* must have shape"):
        state.put(jnp.asarray([0, 1]), other)
    if kind == "kv":
        with pytest.raises(ValueError, match="max_length"):
            state.put(jnp.asarray([0]), config.init_state(1, max_length=7))


def test_bad_requests_and_arguments_are_named(lm):
    model, variables = lm
    transformer = not isinstance(model.config.init_state(1, max_length=2), RecurrentState)
    scheduler = Scheduler(model, variables, rows=2, max_length=MAX_LENGTH, max_stop_tokens=2, **IDS)
    for request, match in (
        (Request(1, [1, 264], 4), r"request 1: the prompt has token id 264 .*vocab_size 264"),
        (Request(1, [1], 0), "request 1: max_new_tokens must be an integer >= 1"),
        (Request(1, [1], 4, temperature=-1.0), "temperature must be"),
        (Request(1, [1], 4, top_p=0.0), "top_p must lie"),
        (Request(1, [1], 4, stop_tokens=(1, 2, 3)), "3 stop tokens, more than max_stop_tokens = 2"),
        (Request(1, [1], 4, stop_tokens=(999,)), "999"),
        (Request(-1, [1], 4), r"id must be an integer in \[0, 2\*\*31\)"),
        ("text", "must be Request objects"),
    ):
        with pytest.raises(ValueError, match=match):
            scheduler.submit(request)
    scheduler.submit(Request(5, [1], 4))
    with pytest.raises(ValueError, match="id 5 is already waiting"):
        scheduler.submit(Request(5, [2], 4))
    if transformer:
        with pytest.raises(ValueError, match="need 60 cache slots, more than max_length = 48"):
            scheduler.submit(Request(6, list(range(40)), 20))
        with pytest.raises(ValueError, match="KV cache, which needs max_length"):
            Scheduler(model, variables, rows=2, **IDS)
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        Scheduler(model, variables, rows=0, max_length=MAX_LENGTH, **IDS)
    with pytest.raises(ValueError, match="model must be a DecoderLM"):
        Scheduler(object(), variables, rows=2, **IDS)


def test_rows_through_the_decode_kernel_equal_generate_alone():
    """The rows' decoding steps through the fused decode kernel (interpreted here; what "auto" runs on a
    GPU), rows at different positions refilled as they free: each request's tokens are generate's alone."""
    model = DecoderLM(TINY)
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    kernel = (model.clone(implementation="pallas"), variables)
    requests = [Request(200 + i, prompt, max_new) for i, (prompt, max_new) in enumerate(SHAPES[1:4])]
    tokens, reasons, _, _ = _serve(kernel, requests, rows=2)
    for request in requests:
        _check_ending(request, tokens[request.id], reasons[request.id])
        alone = _alone((model, variables), request.prompt, request.max_new_tokens)
        _assert_equals_alone((model, variables), request, tokens[request.id], alone)
