"""A RetNet decoding state stored in bfloat16 (``state_dtype="bfloat16"``): it is stored so, every step
still computes in float32, the logits stay within a written tolerance of the float32 state's over many
steps, and the default float32 state is untouched by the option. Bad values are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.inference.decoding import LMDecoder, as_decoder
from retnet_jax.inference.generate import generate
from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig
from retnet_jax.training.tokenizers import ByteTokenizer
from tests.helpers import relative_error

TINY = RetNetConfig.preset("tiny")
PROMPT, STEPS, BATCH = 16, 64, 3
# Normwise relative error of each step's logits [B, N], bf16 state against float32 state, teacher-forced
# on the same tokens. bf16 keeps 8 significant bits of S (relative rounding up to 2^-9 per write, one
# write per layer and step); measured on this model: 1.3e-3 after one step, at most 5.2e-3 over 64 steps
# (the state itself: 7.5e-3).
BF16_STATE_RTOL = 2e-2
# ... and it is not zero: the storage really is bf16 (measured ≥ 1e-3 from the first step).
BF16_STATE_MIN_ERROR = 1e-4


@pytest.fixture(scope="module")
def lm():
    model = DecoderLM(TINY)
    return model, jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))


def _teacher_forced(lm, state_dtype):
    """Logits [STEPS, B, N] of a prefill then STEPS one-token steps on fixed random tokens; the state."""
    model, variables = lm
    decoder = LMDecoder(model, "chunkwise", None, state_dtype)
    tokens = jax.random.randint(jax.random.key(2), (BATCH, PROMPT + STEPS), 0, TINY.vocab_size)

    @jax.jit
    def run(variables):
        state = decoder.init_state(jnp.zeros((BATCH,), jnp.int32), 0)
        _, state = decoder.prefill(variables, tokens[:, :PROMPT], state)

        def body(state, token):
            logits, state = decoder.step(variables, token, state)
            return state, logits

        state, logits = jax.lax.scan(body, state, tokens[:, PROMPT:].T)
        return logits, state

    return run(variables)


def test_bf16_state_logits_within_tolerance_of_float32(lm):
    ref, ref_state = _teacher_forced(lm, None)
    out, state = _teacher_forced(lm, "bfloat16")
    assert ref_state.kv.dtype == jnp.float32 and state.kv.dtype == jnp.bfloat16
    np.testing.assert_array_equal(state.position, ref_state.position)
    errors = [relative_error(out[i], ref[i]) for i in range(STEPS)]
    assert max(errors) < BF16_STATE_RTOL, max(errors)
    assert min(errors) > BF16_STATE_MIN_ERROR, min(errors)
    # The stored state is the float32 one rounded (plus the rounding carried through the steps).
    assert relative_error(state.kv.astype(jnp.float32), ref_state.kv) < BF16_STATE_RTOL


def test_float32_state_is_the_default(lm):
    """state_dtype="float32" and None build the same state and give identical logits."""
    ref, ref_state = _teacher_forced(lm, None)
    out, state = _teacher_forced(lm, "float32")
    assert state.kv.dtype == jnp.float32
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(state.kv, ref_state.kv)


def test_generate_and_init_state_take_state_dtype(lm):
    model, variables = lm
    ids = dict(bos_id=ByteTokenizer.bos_id, pad_id=ByteTokenizer.pad_id)
    out = generate(model, variables, [[5, 6, 7], []], max_new_tokens=4, state_dtype="bfloat16", **ids)
    assert out.tokens.shape == (2, 4)
    state = TINY.init_state(2, state_dtype="bfloat16")
    assert state.kv.dtype == jnp.bfloat16 and state.kv.shape == (2, 2, 2, 32, 64)
    assert state.kv.nbytes * 2 == TINY.init_state(2).kv.nbytes


def test_bad_state_dtypes_are_refused(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        TINY.init_state(1, state_dtype="float16")
    with pytest.raises(ValueError, match="generate: .*state_dtype must be one of"):
        as_decoder(model, state_dtype="int8", caller="generate")
    transformer = DecoderLM(TransformerConfig.matching(TINY))
    with pytest.raises(ValueError, match="a KV cache holds the compute dtype"):
        LMDecoder(transformer, state_dtype="bfloat16")
    # A float16 state passed to the model directly is refused by its check.
    state = TINY.init_state(1)._replace(kv=jnp.zeros((2, 1, 2, 32, 64), jnp.float16))
    with pytest.raises(ValueError, match="a recurrent state is stored in one of"):
        model.apply(lm[1], jnp.zeros((1, 1), jnp.int32), state=state)
