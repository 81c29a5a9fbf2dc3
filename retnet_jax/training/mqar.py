"""Multi-query associative recall (MQAR): synthetic sequences that measure how much a model can recall.

A row of T tokens starts with P key-value pairs, then queries every key once, scattered among random
tokens; the model must answer each query with the value bound to that key earlier in the row:

    position:  0   1   2   3   ... 2P-2 2P-1 | 2P  2P+1 2P+2 ...            T-1
    inputs:    k1  v1  k2  v2  ...  kP   vP  | x   x    k2   x   x   k1  x ...
    targets:   -1  -1  -1  -1  ...  -1   -1  | -1  -1   v2   -1  -1  v1  -1 ...

* Keys are drawn from [1, N/2) and values from [N/2, N), distinct within a row (N = ``vocab_size``).
* The query region after the pairs has S = (T − 2P) / 2 even slots; the P queries take P distinct slots
  g, drawn without replacement with probability ∝ (g + 1)^(a − 1) (``power_a`` = a): with a small (0.01)
  most queries come soon after the pairs and a few far away, as repeated bigrams do in text; a = 1 is
  uniform. The i-th slot drawn queries the i-th pair.
* Every other position holds a token drawn uniformly from [0, N).
* ``targets`` is the value at each query position (the next-token prediction there) and −1 elsewhere;
  ``weights`` is 1.0 at the answers and 0.0 elsewhere: the loss and the accuracy count only answers.

Batch ``i`` of ``MQARBatches`` is drawn from ``numpy.random.default_rng([seed, i])``, so the stream is a
function of the seed alone and resumes exactly from ``get_state()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["IGNORE", "MQARBatches", "gap_probabilities", "mqar_batch"]

IGNORE = -1  # the target of positions that are not answers


def gap_probabilities(slots: int, power_a: float) -> np.ndarray:
    """P(slot g) ∝ (g + 1)^(a − 1) for g = 0 .. slots − 1: [slots] float64, summing to 1."""
    if slots < 1 or not power_a > 0:
        raise ValueError(f"gap_probabilities needs slots >= 1 and power_a > 0; got {slots}, {power_a}.")
    p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def _check(batch_size: int, seq_len: int, num_pairs: int, vocab_size: int, power_a: float) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_pairs", num_pairs)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"MQAR {name} must be an integer >= 1; got {value!r}.")
    if 4 * num_pairs > seq_len:
        raise ValueError(
            f"MQAR: {num_pairs} pairs need seq_len >= 4 * num_pairs = {4 * num_pairs} (the pairs and a "
            f"query slot for each); got seq_len={seq_len}. Use fewer pairs or longer rows."
        )
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(
            f"MQAR: {num_pairs} distinct keys from [1, vocab_size / 2) need vocab_size >= "
            f"{2 * (num_pairs + 1)}; got {vocab_size}."
        )
    if not power_a > 0:
        raise ValueError(f"MQAR power_a must be > 0 (1 = uniform gaps, 0.01 = Zoology's); got {power_a}.")


def _distinct(rng: np.random.Generator, rows: int, low: int, high: int, count: int) -> np.ndarray:
    """[rows, count] int64: in each row ``count`` distinct values of [low, high) in random order."""
    # A loop of small draws (Floyd's algorithm inside numpy) costs O(count) a row, not O(high - low).
    return np.stack([rng.choice(high - low, count, replace=False) for _ in range(rows)]) + low


def mqar_batch(
    rng: np.random.Generator,
    *,
    batch_size: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
) -> dict[str, np.ndarray]:
    """One batch of MQAR rows (see the module doc).

    Args:
        rng: the source of randomness.
        batch_size: B rows.
        seq_len: T tokens a row, >= 4 * num_pairs.
        num_pairs: P key-value pairs a row (and P queries).
        vocab_size: N; keys come from [1, N/2), values from [N/2, N).
        power_a: the exponent a of the query slots' law (∝ (g + 1)^(a − 1)).

    Returns:
        ``{"inputs": int32 [B, T], "targets": int32 [B, T] (−1 but at answers), "weights": float32 [B, T]}``.

    Raises:
        ValueError: sizes that cannot hold the pairs and queries.
    """
    _check(batch_size, seq_len, num_pairs, vocab_size, power_a)
    half = vocab_size // 2
    keys = _distinct(rng, batch_size, 1, half, num_pairs)  # [B, P]
    values = _distinct(rng, batch_size, half, vocab_size, num_pairs)  # [B, P]

    # P distinct slots by the Gumbel top-k trick: the same law as drawing one slot at a time without
    # replacement, each draw ∝ the remaining slots' probabilities.
    slots = (seq_len - 2 * num_pairs) // 2
    gumbel = np.log(gap_probabilities(slots, power_a))[None] - np.log(
        -np.log(rng.random((batch_size, slots)))
    )
    gaps = np.argsort(-gumbel, axis=1, kind="stable")[:, :num_pairs]  # [B, P], the i-th draw first
    positions = 2 * num_pairs + 2 * gaps  # [B, P]

    inputs = rng.integers(0, vocab_size, (batch_size, seq_len))
    inputs[:, 0 : 2 * num_pairs : 2] = keys
    inputs[:, 1 : 2 * num_pairs : 2] = values
    rows = np.arange(batch_size)[:, None]
    inputs[rows, positions] = keys
    targets = np.full((batch_size, seq_len), IGNORE, np.int64)
    targets[rows, positions] = values
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "weights": (targets != IGNORE).astype(np.float32),
    }


class MQARBatches:
    """An endless, resumable iterator of MQAR batches.

    Args:
        batch_size, seq_len, vocab_size, power_a: as in ``mqar_batch``.
        num_pairs: P, or several: each batch then takes one of them, drawn uniformly (a mixture of
            difficulties, as MQAR is usually trained).
        seed: the stream's seed.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        seq_len: int,
        num_pairs: int | Sequence[int],
        vocab_size: int,
        power_a: float = 0.01,
        seed: int = 0,
    ):
        self.pairs = (num_pairs,) if isinstance(num_pairs, int | np.integer) else tuple(num_pairs)
        if not self.pairs:
            raise ValueError("MQARBatches needs at least one num_pairs.")
        for pairs in self.pairs:
            _check(batch_size, seq_len, pairs, vocab_size, power_a)
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.power_a, self.seed, self.index = power_a, seed, 0

    def __iter__(self) -> MQARBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        pairs = self.pairs[int(rng.integers(len(self.pairs)))]
        return mqar_batch(
            rng,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            num_pairs=int(pairs),
            vocab_size=self.vocab_size,
            power_a=self.power_a,
        )

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
