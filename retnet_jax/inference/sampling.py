"""Sampling: how the next token is drawn from float32 logits [B, N].

A sampler is a small dataclass called as ``sampler(key, logits) → tokens [B] int32``:

* ``Greedy()``: the argmax (ties go to the lower id).
* ``Sample(temperature, top_k, top_p)``: from softmax(logits / temperature) restricted to the top-k ids,
  then to the nucleus whose probability reaches top_p.

Samplers are pytrees: ``temperature`` and ``top_p`` are traced, so changing them reuses compiled
programs; ``top_k`` and whether the nucleus filter runs are static. ``sampler(temperature=, top_k=,
top_p=)`` checks the values and picks the sampler (temperature 0 is greedy).

``PerRow(temperature [B], top_k [B], top_p [B])`` gives each row its own settings and its own key, all
traced (one compiled program serves any mix of requests), called as ``sampler(keys [B], logits [B, N])``.
A row keeps exactly the ids ``Sample``'s filters keep and draws by the Gumbel-max rule
``argmax(filtered logits + gumbel_noise(key))``, so its draw depends on its own key and logits alone.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "Greedy",
    "PerRow",
    "Sample",
    "check_sampling",
    "gumbel_noise",
    "sampler",
    "top_k_filter",
    "top_p_filter",
]


def check_sampling(*, temperature: float, top_k: int, top_p: float, max_new_tokens: int | None = None):
    """Raises ValueError naming the first sampling argument that is out of range."""
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy decoding); got {temperature!r}."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filtering); got {top_k!r}.")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus filtering); got {top_p!r}.")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int | np.integer)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}.")


def top_k_filter(logits, k: int):
    """Keeps the k largest logits of each row and sets the rest to −inf (ties go to the lower id).

    Args:
        logits: [..., N]. k: a Python int; 0, or k >= N, keeps every logit.

    Returns:
        float32 logits of the same shape.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    _, top = jax.lax.top_k(logits, k)  # [..., k]
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), top, True, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def top_p_filter(logits, p):
    """Nucleus filtering: keeps the most probable tokens until their probability reaches p, the rest −inf.

    A token is kept when the probability of the tokens ranked above it is below p, so the most probable
    token is always kept and a tiny p is greedy decoding (ties rank the lower id first, as argmax does).

    Args:
        logits: [..., N]. p: in (0, 1], a float or a traced scalar.

    Returns:
        float32 logits of the same shape.
    """
    logits = jnp.asarray(logits, jnp.float32)
    order = jnp.argsort(logits, axis=-1, descending=True, stable=True)  # [..., N]
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs  # probability ranked strictly above each token
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), order, above < p, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


@struct.dataclass
class Greedy:
    """The most probable token."""

    def __call__(self, key, logits):
        del key
        return jnp.argmax(jnp.asarray(logits, jnp.float32), axis=-1).astype(jnp.int32)


@struct.dataclass
class Sample:
    """A draw from softmax(logits / temperature), restricted by top-k (0 = off), then by top-p.

    Build it with ``sampler(...)``, which checks the values.
    """

    temperature: jax.Array  # [] float32, > 0
    top_p: jax.Array  # [] float32 in (0, 1]
    top_k: int = struct.field(pytree_node=False, default=0)
    nucleus: bool = struct.field(pytree_node=False, default=False)  # whether top_p < 1

    def __call__(self, key, logits):
        logits = top_k_filter(jnp.asarray(logits, jnp.float32) / self.temperature, self.top_k)
        if self.nucleus:  # temperature first, as in the usual order
            logits = top_p_filter(logits, self.top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sampler(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, vocab_size: int | None = None):
    """``Greedy()`` for temperature 0, else a checked ``Sample``.

    A filter that cannot change the draw (top_k >= vocab_size, top_p = 1) is switched off, so such calls
    share one program.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return Greedy()
    top_k = int(top_k)
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0
    return Sample(np.float32(temperature), np.float32(top_p), top_k=top_k, nucleus=bool(top_p < 1))


def gumbel_noise(keys, vocab_size: int):
    """Standard Gumbel noise [B, N] float32, row b from ``keys[b]`` alone (the noise of ``PerRow``'s draw)."""
    return jax.vmap(lambda key: jax.random.gumbel(key, (vocab_size,), jnp.float32))(keys)


@struct.dataclass
class PerRow:
    """Per-row settings: row b draws from softmax(logits_b / temperature_b) restricted to its top_k_b ids,
    then to the nucleus of mass top_p_b, with its own key; temperature 0 is greedy (the argmax).

    Every field is a traced [B] array, so one compiled program serves any mix of settings; the filters
    (a sort of each row) run only when some sampled row asks for one. Build it with ``PerRow.of``.
    """

    temperature: jax.Array  # [B] float32 >= 0; 0 = greedy
    top_k: jax.Array  # [B] int32 >= 0; 0 = off
    top_p: jax.Array  # [B] float32 in (0, 1]; 1 = off

    @classmethod
    def of(cls, settings, vocab_size: int | None = None) -> PerRow:
        """From B (temperature, top_k, top_p) triples, checked; a top_k >= vocab_size is switched off."""
        for temperature, top_k, top_p in settings:
            check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        temperature, top_k, top_p = (np.asarray(column) for column in zip(*settings, strict=True))
        if vocab_size is not None:
            top_k = np.where(top_k >= vocab_size, 0, top_k)
        return cls(temperature.astype(np.float32), top_k.astype(np.int32), top_p.astype(np.float32))

    def filter(self, logits):
        """Logits [B, N] → float32 [B, N]: sampled rows divided by their temperature, the ids outside their
        top-k and nucleus set to −inf (as ``top_p_filter(top_k_filter(logits / T, k), p)``); greedy rows
        unchanged."""
        logits = jnp.asarray(logits, jnp.float32)
        sampled = self.temperature > 0
        scaled = logits / jnp.where(sampled, self.temperature, 1.0)[:, None]
        top_k, top_p = self.top_k[:, None], self.top_p[:, None]

        def restrict(scaled):
            # One stable descending sort ranks the ids (ties: the lower id first, as top_k_filter's).
            order = jnp.argsort(scaled, axis=-1, descending=True, stable=True)  # [B, N]
            ranked = jnp.take_along_axis(scaled, order, axis=-1)
            rank = jnp.arange(scaled.shape[-1])[None]
            in_top_k = (top_k <= 0) | (rank < top_k)
            probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
            above = jnp.cumsum(probs, axis=-1) - probs  # probability ranked strictly above each id
            # top_p = 1 keeps every id (a float32 cumulative sum may pass 1 in the tail).
            keep = in_top_k & ((top_p >= 1) | (above < top_p))
            keep = jnp.put_along_axis(jnp.zeros(scaled.shape, bool), order, keep, axis=-1, inplace=False)
            return jnp.where(keep | ~sampled[:, None], scaled, -jnp.inf)

        filtering = jnp.any(sampled & ((self.top_k > 0) | (self.top_p < 1)))
        return jax.lax.cond(filtering, restrict, lambda scaled: scaled, scaled)

    def __call__(self, keys, logits):
        """keys [B] (typed PRNG keys), logits [B, N] → tokens [B] int32."""
        logits = jnp.asarray(logits, jnp.float32)
        sampled = self.temperature > 0
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

        def draw(logits):
            scores = self.filter(logits) + gumbel_noise(keys, logits.shape[-1])
            return jnp.argmax(scores, axis=-1).astype(jnp.int32)

        drawn = jax.lax.cond(jnp.any(sampled), draw, lambda logits: greedy, logits)
        return jnp.where(sampled, drawn, greedy)
