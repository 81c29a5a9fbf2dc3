"""MQAR data: the layout of a row, the answers, the mask, the law of the query gaps, determinism."""

import numpy as np
import pytest

from retnet_jax.training import mqar


def _batch(seed=0, **overrides):
    args = dict(batch_size=64, seq_len=64, num_pairs=8, vocab_size=128, power_a=0.01)
    args.update(overrides)
    return mqar.mqar_batch(np.random.default_rng(seed), **args), args


def test_row_layout_answers_and_mask():
    batch, args = _batch()
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    B, T, P, N = args["batch_size"], args["seq_len"], args["num_pairs"], args["vocab_size"]
    assert inputs.shape == targets.shape == weights.shape == (B, T)
    assert (inputs.dtype, targets.dtype, weights.dtype) == (np.int32, np.int32, np.float32)
    assert inputs.min() >= 0 and inputs.max() < N
    for row in range(B):
        keys, values = inputs[row, 0 : 2 * P : 2], inputs[row, 1 : 2 * P : 2]
        assert keys.min() >= 1 and keys.max() < N // 2  # keys from the lower half (0 never a key)
        assert values.min() >= N // 2 and values.max() < N  # values from the upper half
        assert len(set(keys)) == len(set(values)) == P  # distinct within a row
        bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
        answers = np.flatnonzero(targets[row] != mqar.IGNORE)
        # Every key is queried once, after the pairs, at an even offset, and answered with its value.
        assert len(answers) == P and answers.min() >= 2 * P and np.all((answers - 2 * P) % 2 == 0)
        assert sorted(inputs[row, answers].tolist()) == sorted(keys.tolist())
        for position in answers:
            assert targets[row, position] == bound[int(inputs[row, position])]
    np.testing.assert_array_equal(weights, (targets != mqar.IGNORE).astype(np.float32))
    assert weights.sum() == B * P


def test_fillers_cover_the_vocabulary_and_the_ith_draw_queries_the_ith_pair():
    batch, args = _batch(num_pairs=4, batch_size=2000)
    P, N = args["num_pairs"], args["vocab_size"]
    inputs, targets = batch["inputs"], batch["targets"]
    fillers = inputs[:, 2 * P :][targets[:, 2 * P :] == mqar.IGNORE]
    assert fillers.min() == 0 and fillers.max() == N - 1  # uniform over the whole vocabulary
    # Pair i takes the i-th slot drawn: the first draws favour the likeliest (nearest) slots, so the
    # first pair's query comes sooner on average than the last pair's.
    # (Measured with this seed: 20.5, 21.6, 22.9, 23.9 for the four pairs.)
    asked = (targets != mqar.IGNORE)[:, None, :] & (inputs[:, None, :] == inputs[:, 0 : 2 * P : 2, None])
    mean_position = np.argmax(asked, axis=2).mean(axis=0)  # [P]
    assert mean_position[0] + 1.5 < mean_position[-1], mean_position  # ~7 standard errors apart


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_gap_law(power_a):
    """With one pair each row draws one slot, whose frequencies must follow the law ∝ (g + 1)^(a − 1)."""
    rows, T = 20000, 34  # 16 slots
    batch, _ = _batch(batch_size=rows, seq_len=T, num_pairs=1, power_a=power_a, seed=3)
    slot = (np.argmax(batch["targets"] != mqar.IGNORE, axis=1) - 2) // 2
    counts = np.bincount(slot, minlength=16)
    expected = mqar.gap_probabilities(16, power_a) * rows
    # Pearson's statistic over 16 slots: its 99.9% quantile for 15 degrees of freedom is 37.7.
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 37.7, (counts, expected.round())
    if power_a < 1:
        assert counts[0] > counts[1] > counts[4] > counts[15]  # falls off with the gap
    # And the law itself: a power of (g + 1), normalized.
    p = mqar.gap_probabilities(16, power_a)
    np.testing.assert_allclose(p[1:] / p[0], np.arange(2, 17) ** (power_a - 1.0), rtol=1e-12)
    assert abs(p.sum() - 1) < 1e-12


def test_slots_are_distinct_and_spread_with_many_pairs():
    batch, args = _batch(num_pairs=16, seq_len=64, batch_size=32)  # 16 slots for 16 queries: all taken
    answers = batch["targets"] != mqar.IGNORE
    assert np.all(answers[:, 32::2]) and not np.any(answers[:, 33::2]) and not np.any(answers[:, :32])


def test_batches_are_deterministic_and_resumable():
    def stream(seed):
        return mqar.MQARBatches(batch_size=4, seq_len=32, num_pairs=(2, 4, 8), vocab_size=64, seed=seed)

    first, again = stream(0), stream(0)
    batches = [next(first) for _ in range(6)]
    for batch in batches:
        expected = next(again)
        for name in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(batch[name], expected[name])
    assert {int(b["weights"].sum()) // 4 for b in batches} <= {2, 4, 8}
    assert len({int(b["weights"].sum()) for b in [next(first) for _ in range(20)]}) > 1  # a mixture
    assert not np.array_equal(next(stream(1))["inputs"], batches[0]["inputs"])

    resumed = stream(0)
    resumed.set_state({"index": 3})
    np.testing.assert_array_equal(next(resumed)["inputs"], batches[3]["inputs"])
    assert resumed.get_state() == {"index": 4}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_pairs=17, seq_len=64), "seq_len >= 4"),
        (dict(num_pairs=8, vocab_size=16), "vocab_size >="),
        (dict(power_a=0.0), "power_a"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        _batch(**overrides)
