"""A RetNet's decoding state is updated in place: the compiled programs that carry it (a decoding loop of
one-token steps, a single step, a prompt continuing a state) hold no copy of the whole state, at any batch
size, with the layer loop unrolled or not. (XLA copies a buffer it cannot prove is read before it is
overwritten; at B = 1 the decoding loop once copied the state three times per step.)"""

import re

import jax
import jax.numpy as jnp
import pytest

from retnet_jax.models import DecoderLM, RetNetConfig, decode_step

TINY = RetNetConfig.preset("tiny")


def _state_copies(text: str, shape: tuple[int, ...]) -> list[str]:
    """The copy instructions of a compiled program's text whose result has the state's shape."""
    dims = ",".join(map(str, shape))
    return [
        line.strip() for line in text.splitlines() if re.search(rf"= f32\[{dims}\]\{{[^}}]*\}} copy\(", line)
    ]


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn, donate_argnums=(2,)).lower(*args).compile().as_text()


@pytest.fixture(scope="module")
def variables():
    model = DecoderLM(TINY)
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_loop_updates_the_state_in_place(variables, unroll, batch):
    model = DecoderLM(TINY, unroll_decode=unroll)
    state = TINY.init_state(batch)

    def loop(variables, token, state):
        def body(_, carry):
            token, state = carry
            logits, state = decode_step(model, variables, token, state)
            return jnp.argmax(logits, -1).astype(jnp.int32), state

        return jax.lax.fori_loop(0, 4, body, (token, state))

    text = _compiled_text(loop, variables, jnp.zeros((batch,), jnp.int32), state)
    assert not _state_copies(text, state.kv.shape)


@pytest.mark.parametrize(("mode", "length"), [("recurrent", 1), ("chunkwise", 7)])
def test_a_call_continuing_a_state_updates_it_in_place(variables, mode, length):
    """One step returning only the state, and a prompt continuing a state through the layer loop."""
    model = DecoderLM(TINY)
    state = TINY.init_state(1)

    def call(variables, tokens, state):
        return model.apply(variables, tokens, state=state, mode=mode)[1]

    text = _compiled_text(call, variables, jnp.zeros((1, length), jnp.int32), state)
    assert not _state_copies(text, state.kv.shape)
