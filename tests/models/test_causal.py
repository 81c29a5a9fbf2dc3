"""Causality of both LMs: what position s computes depends on no token after s.

For every form a full RetNet call runs in (parallel; chunkwise through XLA; chunkwise through the fused
kernels, interpreted on the CPU; recurrent) and for the Transformer, with and without packed documents
(``segment_ids``), with remat on (the backward pass reruns each block's forward):

* the logits at positions < t are bitwise unchanged when the tokens at positions >= t change;
* the gradient of a loss over positions < t with respect to the input embeddings at positions >= t is
  exactly zero (and non-zero at every position < t, so the gradient does reach the embeddings).

Exact equality holds because a later position's contribution is multiplied by an exact zero (a decay
mask entry, or exp(−inf) in the softmax), not merely by something small.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig

RETNET = RetNetConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=2, value_dim=128, ffn_dim=128)
TRANSFORMER = TransformerConfig.matching(RETNET)
BATCH, LENGTH, CHUNK = 2, 64, 16  # the fused kernels take C in [16, 128]: four chunks per row
RUNS = {
    "retnet-parallel": (RETNET, dict(mode="parallel")),
    "retnet-chunkwise-xla": (RETNET, dict(mode="chunkwise", chunk_size=CHUNK, implementation="xla")),
    "retnet-chunkwise-pallas": (RETNET, dict(mode="chunkwise", chunk_size=CHUNK, implementation="pallas")),
    "retnet-recurrent": (RETNET, dict(mode="recurrent")),
    "transformer": (TRANSFORMER, dict(implementation="xla")),
}
# First changed position: at a chunk boundary, and inside a chunk (so a chunk holds both sides of it).
CHANGED_FROM = (CHUNK, 37)
# Documents start at 0, 9, 45 (row 0) and 0, 30 (row 1): both changed positions lie inside a document
# that started earlier, so the tokens before them in that document are read.
SEGMENT_IDS = np.stack([np.repeat([0, 1, 2], [9, 36, 19]), np.repeat([5, 7], [30, 34])]).astype(np.int32)


def _tokens(seed):
    return np.asarray(jax.random.randint(jax.random.key(seed), (BATCH, LENGTH), 0, RETNET.vocab_size))


def _changed_after(tokens, t):
    """The tokens with every position >= t replaced by a different id."""
    shift = np.asarray(jax.random.randint(jax.random.key(t), (BATCH, LENGTH), 1, RETNET.vocab_size))
    changed = (tokens + shift) % RETNET.vocab_size
    return np.where(np.arange(LENGTH) < t, tokens, changed).astype(tokens.dtype)


@functools.cache
def _variables(config):
    """One set of parameters per config: the run options (form, remat) do not change them."""
    return jax.jit(DecoderLM(config).init)(jax.random.key(1), _tokens(0))


def _perturbed_embeddings(delta):
    """Adds ``delta`` [B, T, D] to the token embedding's output (not to the tied head's ``attend``)."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
            out = out + delta.astype(out.dtype)
        return out

    return nn.intercept_methods(interceptor)


def _program(model):
    """(variables, tokens, segment_ids, weights) → ((loss, logits), d loss / d embeddings [B, T, D]).

    The loss is the next-token cross-entropy weighted per position (weights [B, T]), so one compiled
    program serves every changed position t."""

    def loss(delta, variables, tokens, segment_ids, weights):
        with _perturbed_embeddings(delta):
            logits, _ = model.apply(variables, tokens, segment_ids=segment_ids)
        targets = jnp.roll(tokens, -1, axis=1)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(weights * nll), logits

    grad = jax.value_and_grad(loss, has_aux=True)

    @jax.jit
    def run(variables, tokens, segment_ids, weights):
        delta = jnp.zeros((*tokens.shape, model.config.d_model), jnp.float32)
        return grad(delta, variables, tokens, segment_ids, weights)

    return run


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
@pytest.mark.parametrize("run", RUNS)
def test_no_position_reads_a_later_token(run, packed):
    config, options = RUNS[run]
    model = DecoderLM(config, remat=True, **options)
    tokens = _tokens(0)
    variables = _variables(config)
    segment_ids = SEGMENT_IDS if packed else None
    program = _program(model)
    for t in CHANGED_FROM:
        before = np.arange(LENGTH) < t
        weights = np.broadcast_to(before, (BATCH, LENGTH)).astype(np.float32)
        (_, logits), grads = program(variables, tokens, segment_ids, weights)
        (_, changed), _ = program(variables, _changed_after(tokens, t), segment_ids, weights)
        logits, changed, grads = np.asarray(logits), np.asarray(changed), np.asarray(grads)

        np.testing.assert_array_equal(changed[:, :t], logits[:, :t], err_msg=f"{run}: t = {t}")
        assert np.any(changed[:, t:] != logits[:, t:]), f"{run}: the change at t = {t} changed nothing"
        assert np.all(grads[:, t:] == 0), (run, t, np.abs(grads[:, t:]).max())
        reached = np.linalg.norm(grads[:, :t], axis=-1)  # [B, t]
        assert np.all(reached > 0), (run, t, np.argwhere(reached == 0))
