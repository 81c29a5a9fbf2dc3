"""Generation: a batch of prompts of any lengths, prefilled in parallel, then decoded at O(1) cost per token.

    result = generate(model, variables, [[72, 105], []], max_new_tokens=64,
                      bos_id=tok.bos_id, pad_id=tok.pad_id, stop_tokens=(tok.eos_id,))
    result.tokens   # [B, 64] int32; pad_id after a row's end
    result.lengths  # [B] tokens generated per row, the stop token included

    for pieces in decode_text(stream(model, variables, prompts, ...), tok):
        print(pieces[0], end="", flush=True)

How a call runs:

1. **Prompts** are checked (ids in [0, vocab_size)), framed as the training data is ([BOS] + ids, so an
   empty prompt starts from BOS) and left-padded with ``pad_id`` to a bucket length P + 1, where P is a
   power of two >= 16: prompts of different lengths share a handful of compiled programs. Row b gets
   p_b pads and starts from a state whose ``count`` is −p_b in every layer; the model zeroes the pads' k,
   so pads never enter the state and the first real token sits at position 0 (``retention``'s docstring).
2. **Prefill** runs the first P tokens through the chunkwise (or parallel) form, which returns the
   recurrent state, and the last one through a recurrent step, which gives the logits of the next token
   (the output head is never applied to the other P positions).
3. **Decoding** samples a token, feeds it to the recurrent step and repeats inside one jitted
   ``lax.while_loop`` that ends after ``max_new_tokens`` tokens or as soon as every row has emitted a
   stop token. The state has the same shapes at every position: memory does not grow with the context.
   ``stream`` runs the same loop ``block_size`` tokens at a time, carrying the state between calls.

The loop sees the model only through a ``Decoder`` (``init_state``, ``prefill``, ``step``), so any model
with a recurrent state or a KV cache can use it through ``generate_with`` / ``stream_with``;
``RetNetDecoder`` is RetNet's. Randomness: token i of a call is drawn with ``fold_in(key(seed), i)``,
so a streamed call draws exactly the tokens of the one-shot call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.models import retnet as model_lib
from retnet_jax.models.config import MODES
from retnet_jax.models.retnet import RetNetLM

__all__ = [
    "Decoder",
    "Generation",
    "RetNetDecoder",
    "check_prompts",
    "check_sampling",
    "decode_text",
    "generate",
    "generate_with",
    "prepare_prompts",
    "sample_logits",
    "stream",
    "stream_with",
    "top_k_filter",
    "top_p_filter",
]

# Prompt buckets are powers of two from this length up, so at most log2(longest prompt) programs compile.
MIN_BUCKET = 16


# ----------------------------------------------------------------------------------------------
# Checks at the boundary (before any tracing): the CLI maps each named argument to a flag.


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


def _check_id(name: str, value, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < vocab_size:
        raise ValueError(
            f"{name} = {value!r} is not a token id of this model: ids lie in [0, {vocab_size}) "
            f"(vocab_size {vocab_size}). Is the tokenizer the one the model was trained with?"
        )
    return int(value)


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """Returns the prompts as lists of ints; raises ValueError for a bad batch or an id outside the vocab.

    Inside jit an out-of-range id would silently read a clamped embedding row, so ids are checked here.
    """
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | np.ndarray):
        raise ValueError(
            f"prompts must be a list of token-id lists (encode text with the tokenizer first); "
            f"got {type(prompts).__name__}."
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (an empty list [] starts from BOS).")
    rows = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence | np.ndarray):
            raise ValueError(
                f"prompts[{b}] must be a list of token ids (encode text with the tokenizer first); "
                f"got {type(prompt).__name__}."
            )
        ids = np.asarray(prompt)
        if ids.size and (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(
                f"prompts[{b}] must be a flat list of integer token ids; got {ids.dtype} {ids.shape}."
            )
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size)) if ids.size else []
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"prompts[{b}] has token id {int(ids[i])} at position {i}, outside the vocabulary "
                f"[0, {vocab_size}) (vocab_size {vocab_size}). Is the tokenizer the one the model was "
                f"trained with?"
            )
        rows.append([int(t) for t in ids])
    return rows


def _bucket(length: int) -> int:
    """The smallest power of two >= length, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())


def prepare_prompts(
    prompts: Sequence[Sequence[int]], *, bos_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames each prompt as [BOS] + ids and left-pads the batch to a bucket length.

    Args:
        prompts: B lists of token ids (already checked), of any lengths, possibly empty.
        bos_id, pad_id: the tokenizer's ids.

    Returns:
        (tokens [B, P + 1] int32 with P = ``_bucket(longest framed prompt − 1)``, pads [B] int32: the
        number of pad tokens at the start of each row).
    """
    framed = [[bos_id, *p] for p in prompts]
    width = _bucket(max(len(p) for p in framed) - 1) + 1
    tokens = np.full((len(framed), width), pad_id, np.int32)
    pads = np.empty(len(framed), np.int32)
    for b, row in enumerate(framed):
        pads[b] = width - len(row)
        tokens[b, pads[b] :] = row
    return tokens, pads


# ----------------------------------------------------------------------------------------------
# Sampling: pure functions of float32 logits [..., N].


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


def _sample(key, logits, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """tokens [...] int32 from logits [..., N]; temperature and top_p may be traced."""
    logits = jnp.asarray(logits, jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_k_filter(logits / temperature, top_k)  # temperature first, as in the usual order
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_logits(key, logits, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Draws one token per row: argmax when temperature is 0, else from softmax(logits / temperature)
    restricted by top-k, then by top-p.

    Args:
        key: a JAX PRNG key. logits: [..., N].
        temperature: >= 0. top_k: >= 0 (0 = off). top_p: in (0, 1] (1 = off).

    Returns:
        tokens [...] int32.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return _sample(
        key,
        logits,
        jnp.float32(temperature),
        jnp.float32(top_p),
        greedy=temperature == 0,
        top_k=int(top_k),
        use_top_p=top_p < 1,
    )


# ----------------------------------------------------------------------------------------------
# The model behind the loop.


class Decoder(Protocol):
    """What the sampling loop needs from a model. Implementations must be hashable (frozen dataclasses):
    they are static arguments of the jitted loop, and equal decoders share compiled programs.
    """

    @property
    def vocab_size(self) -> int: ...

    def init_state(self, pads: jax.Array, max_length: int) -> Any:
        """The empty state for rows whose first ``pads`` [B] tokens are padding; ``max_length`` bounds the
        positions the call will reach (a KV cache needs it; a recurrent state does not)."""

    def prefill(self, variables, tokens: jax.Array, state) -> tuple[jax.Array, Any]:
        """Consumes tokens [B, T] → (logits [B, N] float32 of the next token, the new state)."""

    def step(self, variables, tokens: jax.Array, state) -> tuple[jax.Array, Any]:
        """Consumes tokens [B] → (logits [B, N] float32 of the next token, the new state)."""


@dataclasses.dataclass(frozen=True)
class RetNetDecoder:
    """RetNet as a ``Decoder``: chunkwise (or parallel) prefill, recurrent steps.

    Attributes:
        model: the RetNet LM.
        prefill_mode: the form that consumes the prompt: "chunkwise", "parallel" or "recurrent".
        chunk_size: C for the chunkwise prefill (default: the model config's).
    """

    model: RetNetLM
    prefill_mode: str = "chunkwise"
    chunk_size: int | None = None

    def __post_init__(self):
        if self.prefill_mode not in MODES:
            raise ValueError(f"prefill_mode must be one of {MODES}; got {self.prefill_mode!r}.")
        chunk = self.chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None (the config's); got {chunk!r}.")

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def init_state(self, pads, max_length):
        del max_length  # the recurrent state's size does not depend on the length
        state = model_lib.init_state(self.model.config, pads.shape[0])  # kv [L, B, H, K, V], count [L, B]
        count = jnp.broadcast_to(-pads[None, :], state.count.shape).astype(jnp.int32)
        return state._replace(count=count)

    def prefill(self, variables, tokens, state):
        # All but the last token go through the parallel/chunkwise form; their logits are unused, so jit
        # drops the output head for them (B·T·N floats). The last token's step gives the logits we need.
        if tokens.shape[1] > 1:
            _, state = self.model.apply(
                variables, tokens[:, :-1], state=state, mode=self.prefill_mode, chunk_size=self.chunk_size
            )
        return self.step(variables, tokens[:, -1], state)

    def step(self, variables, tokens, state):
        return model_lib.decode_step(self.model, variables, tokens, state)


# ----------------------------------------------------------------------------------------------
# The jitted loop.


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static choices of a call (each distinct value compiles once)."""

    greedy: bool
    top_k: int
    use_top_p: bool
    pad_id: int
    logprobs: bool


class _Carry(NamedTuple):
    index: jax.Array  # [] int32: tokens emitted so far (the next token's index)
    token: jax.Array  # [B] int32: the last emitted token, not yet consumed by the state
    state: Any  # the decoder's state
    done: jax.Array  # [B] bool: the row has emitted a stop token
    lengths: jax.Array  # [B] int32: tokens emitted per row, the stop token included


class _Buffers(NamedTuple):
    tokens: jax.Array  # [B, W] int32
    logprobs: jax.Array | None  # [B, W] float32


def _emit(carry: _Carry, logits, buffers: _Buffers, offset, key, temperature, top_p, stops, spec: _Spec):
    """Samples token ``carry.index`` from logits [B, N] and writes it at column index − offset."""
    i = carry.index
    token = _sample(
        jax.random.fold_in(key, i),
        logits,
        temperature,
        top_p,
        greedy=spec.greedy,
        top_k=spec.top_k,
        use_top_p=spec.use_top_p,
    )
    token = jnp.where(carry.done, spec.pad_id, token)
    column = (0, i - offset)
    out_tokens = jax.lax.dynamic_update_slice(buffers.tokens, token[:, None], column)
    out_logprobs = buffers.logprobs
    if spec.logprobs:
        # Under the model's distribution, before temperature and filtering.
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        logprob = jnp.where(carry.done, 0.0, logprob)
        out_logprobs = jax.lax.dynamic_update_slice(out_logprobs, logprob[:, None], column)
    lengths = carry.lengths + (~carry.done).astype(jnp.int32)
    done = carry.done | jnp.isin(token, stops) if stops.shape[0] else carry.done
    carry = carry._replace(index=i + 1, token=token, done=done, lengths=lengths)
    return carry, _Buffers(out_tokens, out_logprobs)


def _empty_buffers(batch: int, width: int, spec: _Spec) -> _Buffers:
    tokens = jnp.full((batch, width), spec.pad_id, jnp.int32)
    return _Buffers(tokens, jnp.zeros((batch, width), jnp.float32) if spec.logprobs else None)


def _loop(decoder, variables, carry, buffers, offset, key, limit, temperature, top_p, stops, spec):
    """Emits tokens until index == limit or every row is done; each iteration is one decoder step."""

    def cond(loop):
        carry, _ = loop
        return (carry.index < limit) & ~jnp.all(carry.done)

    def body(loop):
        carry, buffers = loop
        logits, state = decoder.step(variables, carry.token, carry.state)
        carry = carry._replace(state=state)
        return _emit(carry, logits, buffers, offset, key, temperature, top_p, stops, spec)

    return jax.lax.while_loop(cond, body, (carry, buffers))


@functools.partial(jax.jit, static_argnames=("decoder", "width", "max_length", "spec"))
def _prefill_and_decode(
    decoder, variables, tokens, pads, key, limit, temperature, top_p, stops, *, width, max_length, spec
):
    """Prefills tokens [B, T] and emits tokens 0 .. limit−1 into a [B, width] buffer."""
    batch = tokens.shape[0]
    state = decoder.init_state(pads, max_length)
    logits, state = decoder.prefill(variables, tokens, state)
    carry = _Carry(
        index=jnp.zeros((), jnp.int32),
        token=jnp.zeros((batch,), jnp.int32),
        state=state,
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
    )
    buffers = _empty_buffers(batch, width, spec)
    carry, buffers = _emit(carry, logits, buffers, 0, key, temperature, top_p, stops, spec)
    return _loop(decoder, variables, carry, buffers, 0, key, limit, temperature, top_p, stops, spec)


@functools.partial(jax.jit, static_argnames=("decoder", "width", "spec"), donate_argnames=("carry",))
def _decode(decoder, variables, carry, key, limit, temperature, top_p, stops, *, width, spec):
    """Continues from ``carry``: emits tokens carry.index .. limit−1 into a [B, width] buffer."""
    buffers = _empty_buffers(carry.token.shape[0], width, spec)
    return _loop(decoder, variables, carry, buffers, carry.index, key, limit, temperature, top_p, stops, spec)


# ----------------------------------------------------------------------------------------------
# Public entry points.


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated tokens of a batch (or, from ``stream``, of one block of a batch).

    Attributes:
        tokens: [B, M] int32: the generated ids; ``pad_id`` after a row's end.
        lengths: [B] int32: ids generated per row, a stop token that ended the row included.
        logprobs: [B, M] float32 log-probabilities of the chosen ids under the model (before temperature
            and filtering), 0 after a row's end; None unless asked for.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray | None = None

    def to_lists(self) -> list[list[int]]:
        """The generated ids of each row, without the padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


class _Call(NamedTuple):
    tokens: np.ndarray
    pads: np.ndarray
    key: jax.Array
    stops: np.ndarray
    temperature: np.float32
    top_p: np.float32
    spec: _Spec
    max_length: int


def _prepare(
    decoder,
    prompts,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    stop_tokens,
    seed,
    bos_id,
    pad_id,
    logprobs,
):
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    vocab = decoder.vocab_size
    bos_id = _check_id("bos_id", bos_id, vocab)
    pad_id = _check_id("pad_id", pad_id, vocab)
    if isinstance(stop_tokens, int | np.integer):
        stop_tokens = (stop_tokens,)
    stops = np.asarray(sorted({_check_id("stop token", t, vocab) for t in stop_tokens}), np.int32)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    tokens, pads = prepare_prompts(check_prompts(prompts, vocab), bos_id=bos_id, pad_id=pad_id)
    greedy = temperature == 0
    spec = _Spec(
        greedy=greedy,
        # Off when it cannot change the draw, so such calls share one program.
        top_k=0 if greedy or top_k >= vocab else int(top_k),
        use_top_p=not greedy and top_p < 1,
        pad_id=pad_id,
        logprobs=bool(logprobs),
    )
    return _Call(
        tokens=tokens,
        pads=pads,
        key=jax.random.key(seed),
        stops=stops,
        temperature=np.float32(temperature if not greedy else 1.0),
        top_p=np.float32(top_p),
        spec=spec,
        max_length=tokens.shape[1] + _bucket(max_new_tokens),
    )


def generate_with(
    decoder: Decoder,
    variables,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    bos_id: int,
    pad_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int = 0,
    return_logprobs: bool = False,
) -> Generation:
    """Generates up to ``max_new_tokens`` ids after each prompt with any ``Decoder``.

    Args:
        decoder: the model behind the loop (``RetNetDecoder`` for RetNet).
        variables: the model's variables.
        prompts: B lists of token ids, of any lengths (empty = start from BOS).
        max_new_tokens: >= 1; ids generated per row at most.
        bos_id, pad_id: the tokenizer's ids; BOS is prepended to every prompt, pads fill on the left.
        temperature: 0 = greedy (argmax); else the softmax temperature.
        top_k: sample among the k most probable ids (0 = all).
        top_p: sample among the most probable ids whose probability reaches top_p (1 = all).
        stop_tokens: ids that end a row (e.g. EOS); the loop stops once every row has ended.
        seed: the PRNG seed of the draws.
        return_logprobs: also return the log-probabilities of the chosen ids.

    Returns:
        A ``Generation`` with tokens [B, max_new_tokens].

    Raises:
        ValueError: a sampling argument is out of range, or an id lies outside [0, vocab_size).
    """
    call = _prepare(
        decoder,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        seed=seed,
        bos_id=bos_id,
        pad_id=pad_id,
        logprobs=return_logprobs,
    )
    # The buffer width is bucketed too; the loop bound (max_new_tokens) is a traced value.
    carry, buffers = _prefill_and_decode(
        decoder,
        variables,
        call.tokens,
        call.pads,
        call.key,
        np.int32(max_new_tokens),
        call.temperature,
        call.top_p,
        call.stops,
        width=_bucket(max_new_tokens),
        max_length=call.max_length,
        spec=call.spec,
    )
    return Generation(
        tokens=np.asarray(buffers.tokens)[:, :max_new_tokens],
        lengths=np.asarray(carry.lengths),
        logprobs=None if buffers.logprobs is None else np.asarray(buffers.logprobs)[:, :max_new_tokens],
    )


def stream_with(
    decoder: Decoder,
    variables,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    bos_id: int,
    pad_id: int,
    block_size: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int = 0,
    return_logprobs: bool = False,
) -> Iterator[Generation]:
    """Like ``generate_with``, but yields the ids as they come, ``block_size`` per jitted call.

    Arguments are checked when this is called, not at the first ``next``. Each yielded ``Generation``
    holds the new ids of one block: tokens [B, n] with n <= block_size, lengths [B] the ids of each row in
    this block. Concatenated along the columns, the blocks equal ``generate_with``'s tokens up to the
    column where every row had ended.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}.")
    call = _prepare(
        decoder,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        seed=seed,
        bos_id=bos_id,
        pad_id=pad_id,
        logprobs=return_logprobs,
    )
    sampling = (call.temperature, call.top_p, call.stops)  # traced: changing them reuses the programs

    def blocks():
        emitted, lengths = 0, np.zeros(len(call.tokens), np.int32)
        carry, buffers = _prefill_and_decode(
            decoder,
            variables,
            call.tokens,
            call.pads,
            call.key,
            np.int32(min(block_size, max_new_tokens)),
            *sampling,
            width=int(block_size),
            max_length=call.max_length,
            spec=call.spec,
        )
        while True:
            index, new_lengths = int(carry.index), np.asarray(carry.lengths)
            n = index - emitted
            yield Generation(
                tokens=np.asarray(buffers.tokens)[:, :n],
                lengths=new_lengths - lengths,
                logprobs=None if buffers.logprobs is None else np.asarray(buffers.logprobs)[:, :n],
            )
            emitted, lengths = index, new_lengths
            if index >= max_new_tokens or bool(np.all(carry.done)):
                return
            limit = np.int32(min(index + block_size, max_new_tokens))
            carry, buffers = _decode(
                decoder,
                variables,
                carry,
                call.key,
                limit,
                *sampling,
                width=int(block_size),
                spec=call.spec,
            )

    return blocks()


def generate(
    model: RetNetLM,
    variables,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    bos_id: int,
    pad_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int = 0,
    prefill_mode: str = "chunkwise",
    chunk_size: int | None = None,
    return_logprobs: bool = False,
) -> Generation:
    """Generates with a RetNet: ``generate_with(RetNetDecoder(model, prefill_mode, chunk_size), ...)``."""
    return generate_with(
        RetNetDecoder(model, prefill_mode, chunk_size),
        variables,
        prompts,
        max_new_tokens=max_new_tokens,
        bos_id=bos_id,
        pad_id=pad_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        seed=seed,
        return_logprobs=return_logprobs,
    )


def stream(
    model: RetNetLM,
    variables,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    bos_id: int,
    pad_id: int,
    block_size: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int = 0,
    prefill_mode: str = "chunkwise",
    chunk_size: int | None = None,
    return_logprobs: bool = False,
) -> Iterator[Generation]:
    """Streams a RetNet's ids block by block: ``stream_with(RetNetDecoder(...), ...)``."""
    return stream_with(
        RetNetDecoder(model, prefill_mode, chunk_size),
        variables,
        prompts,
        max_new_tokens=max_new_tokens,
        bos_id=bos_id,
        pad_id=pad_id,
        block_size=block_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        seed=seed,
        return_logprobs=return_logprobs,
    )


def decode_text(blocks: Iterable[Generation], tokenizer) -> Iterator[list[str]]:
    """Turns streamed blocks into text: yields, per block, the new text of each row.

    Each row's ids so far are decoded whole and only the new suffix is yielded, so a character split
    across blocks (multi-byte UTF-8, or a piece whose spelling depends on what follows) comes out once,
    complete. Trailing U+FFFD (an incomplete character) is held back until the next block or the end.
    """
    ids: list[list[int]] | None = None
    shown: list[str] = []
    for block in blocks:
        if ids is None:
            ids, shown = [[] for _ in block.lengths], ["" for _ in block.lengths]
        pieces = []
        for b, (row, n) in enumerate(zip(block.tokens, block.lengths, strict=True)):
            ids[b].extend(int(t) for t in row[:n])
            pieces.append(_new_text(tokenizer.decode(ids[b]).rstrip("\ufffd"), shown, b))
        yield pieces
    if ids is not None:
        rest = [_new_text(tokenizer.decode(row), shown, b) for b, row in enumerate(ids)]
        if any(rest):
            yield rest


def _new_text(text: str, shown: list[str], b: int) -> str:
    # Text already shown cannot be taken back; if decoding changed it, wait until it agrees again.
    if not text.startswith(shown[b]):
        return ""
    piece, shown[b] = text[len(shown[b]) :], text
    return piece
