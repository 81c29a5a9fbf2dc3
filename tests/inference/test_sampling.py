"""Samplers and filters: what they keep, and that the samplers reduce to greedy where they must."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.inference.sampling import Greedy, Sample, sampler, top_k_filter, top_p_filter


def test_filters():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.0, 1.0]])
    inf = -np.inf
    np.testing.assert_array_equal(top_k_filter(logits, 2), [[2, 1, inf, inf], [inf, 3, 3, inf]])
    np.testing.assert_array_equal(top_k_filter(logits, 0), logits)
    # Probabilities of row 0 ≈ (.64, .24, .09, .03): p = 0.7 keeps the first two.
    np.testing.assert_array_equal(top_p_filter(logits[:1], 0.7), [[2, 1, inf, inf]])
    np.testing.assert_array_equal(top_p_filter(logits, 1e-6), [[2, inf, inf, inf], [inf, 3, inf, inf]])


def test_samplers():
    logits = jax.random.normal(jax.random.key(0), (64, 50))
    key = jax.random.key(1)
    greedy = np.asarray(jnp.argmax(logits, -1))
    assert sampler(temperature=0.0) == Greedy()
    np.testing.assert_array_equal(Greedy()(key, logits), greedy)
    # top_k = 1 and a tiny nucleus keep one token: the draw is the argmax.
    np.testing.assert_array_equal(sampler(temperature=1.0, top_k=1)(key, logits), greedy)
    np.testing.assert_array_equal(sampler(temperature=1.0, top_p=1e-6)(key, logits), greedy)
    draw = sampler(temperature=1.0, top_k=5)
    tokens = np.asarray(draw(key, logits))
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    assert all(t in row for t, row in zip(tokens, top5, strict=True))
    np.testing.assert_array_equal(draw(key, logits), tokens)  # same key, same draw
    assert not np.array_equal(draw(jax.random.key(2), logits), tokens)
    # Filters that cannot change the draw are off: such samplers share one compiled program.
    assert sampler(temperature=1.0, top_k=50, vocab_size=50).top_k == 0
    assert not sampler(temperature=1.0, top_p=1.0).nucleus
    # Temperature and top_p are traced: a jitted draw does not recompile when they change.
    compiled = jax.jit(lambda s, k, x: s(k, x))
    compiled(sampler(temperature=0.5, top_p=0.9), key, logits)
    compiled(sampler(temperature=1.5, top_p=0.5), key, logits)
    assert compiled._cache_size() == 1
    assert isinstance(sampler(temperature=0.7), Sample)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler(**kwargs)
