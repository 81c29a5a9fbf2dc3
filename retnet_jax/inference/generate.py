"""Generation: a batch of prompts of any lengths, prefilled in parallel, then decoded token by token.

    result = generate(model, variables, [[72, 105], []], max_new_tokens=64,
                      bos_id=tok.bos_id, pad_id=tok.pad_id, stop_tokens=(tok.eos_id,))
    result.tokens   # [B, 64] int32; pad_id after a row's end
    result.lengths  # [B] tokens generated per row, the stop token included

    for pieces in decode_text(stream(model, variables, prompts, ...), tok):
        print(pieces[0], end="", flush=True)

``model`` is any ``DecoderLM`` (a RetNet decodes with its O(1) recurrent state, the Transformer with its
KV cache) or any ``decoding.Decoder``. How a call runs: the prompts are checked, framed and left-padded to
a bucket length (``prompts``); the decoder prefills them and the jitted loop samples (``sampling``) and
steps until ``max_new_tokens`` or every row has stopped (``decoding``). ``stream`` runs the same loop
``block_size`` tokens at a time, carrying the state between calls, and draws exactly the same tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np

from retnet_jax.inference import decoding, sampling
from retnet_jax.inference import prompts as prompts_lib

__all__ = ["Generation", "decode_text", "generate", "stream"]


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
    decoder: decoding.Decoder
    tokens: np.ndarray  # [B, P + 1]
    pads: np.ndarray  # [B]
    draw: decoding.Sampling
    pad_id: int
    max_length: int  # the positions the call can reach: prompt bucket + generated bucket


def _prepare(
    model,
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
    prefill_mode,
    chunk_size,
    state_dtype,
) -> _Call:
    """Checks every argument (before any tracing) and frames the prompts."""
    decoder = decoding.as_decoder(
        model, prefill_mode=prefill_mode, chunk_size=chunk_size, state_dtype=state_dtype, caller="generate"
    )
    sampling.check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    vocab = decoder.vocab_size
    bos_id = prompts_lib.check_id("bos_id", bos_id, vocab)
    pad_id = prompts_lib.check_id("pad_id", pad_id, vocab)
    if isinstance(stop_tokens, int | np.integer):
        stop_tokens = (stop_tokens,)
    stops = np.asarray(sorted({prompts_lib.check_id("stop token", t, vocab) for t in stop_tokens}), np.int32)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    tokens, pads = prompts_lib.prepare_prompts(
        prompts_lib.check_prompts(prompts, vocab), bos_id=bos_id, pad_id=pad_id
    )
    draw = decoding.Sampling(
        sampler=sampling.sampler(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab),
        key=jax.random.key(seed),
        stops=stops,
    )
    max_length = tokens.shape[1] + prompts_lib.bucket(max_new_tokens)
    return _Call(decoder, tokens, pads, draw, pad_id, max_length)


def generate(
    model,
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
    prefill_mode: str = "chunkwise",
    chunk_size: int | None = None,
    state_dtype: str | None = None,
) -> Generation:
    """Generates up to ``max_new_tokens`` ids after each prompt.

    Args:
        model: a ``DecoderLM`` (RetNet or Transformer) or a ``decoding.Decoder``.
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
        prefill_mode, chunk_size: the form that consumes a RetNet's prompt ("chunkwise", "parallel" or
            "recurrent") and its chunk size (default: the model's). Ignored for a ``Decoder``.
        state_dtype: None (the model's own decoding state) or "bfloat16": a RetNet state stored in bf16
            between steps (half its bytes; each step computes in float32; not exact: ``models.state``).

    Returns:
        A ``Generation`` with tokens [B, max_new_tokens].

    Raises:
        ValueError: a sampling argument is out of range, or an id lies outside [0, vocab_size).
    """
    call = _prepare(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        seed=seed,
        bos_id=bos_id,
        pad_id=pad_id,
        prefill_mode=prefill_mode,
        chunk_size=chunk_size,
        state_dtype=state_dtype,
    )
    # The buffer width is bucketed too; the loop bound (max_new_tokens) is a traced value.
    spec = decoding.Spec(
        width=prompts_lib.bucket(max_new_tokens), pad_id=call.pad_id, logprobs=return_logprobs
    )
    carry, buffers = decoding.prefill_and_decode(
        call.decoder,
        variables,
        call.tokens,
        call.pads,
        np.int32(max_new_tokens),
        call.draw,
        max_length=call.max_length,
        spec=spec,
    )
    return Generation(
        tokens=np.asarray(buffers.tokens)[:, :max_new_tokens],
        lengths=np.asarray(carry.lengths),
        logprobs=None if buffers.logprobs is None else np.asarray(buffers.logprobs)[:, :max_new_tokens],
    )


def stream(
    model,
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
    prefill_mode: str = "chunkwise",
    chunk_size: int | None = None,
    state_dtype: str | None = None,
) -> Iterator[Generation]:
    """Like ``generate``, but yields the ids as they come, ``block_size`` per jitted call.

    Arguments are checked when this is called, not at the first ``next``. Each yielded ``Generation``
    holds the new ids of one block: tokens [B, n] with n <= block_size, lengths [B] the ids of each row in
    this block. Concatenated along the columns, the blocks equal ``generate``'s tokens up to the column
    where every row had ended.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}.")
    call = _prepare(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        seed=seed,
        bos_id=bos_id,
        pad_id=pad_id,
        prefill_mode=prefill_mode,
        chunk_size=chunk_size,
        state_dtype=state_dtype,
    )
    spec = decoding.Spec(width=int(block_size), pad_id=call.pad_id, logprobs=return_logprobs)

    def blocks():
        emitted, lengths = 0, np.zeros(len(call.tokens), np.int32)
        carry, buffers = decoding.prefill_and_decode(
            call.decoder,
            variables,
            call.tokens,
            call.pads,
            np.int32(min(block_size, max_new_tokens)),
            call.draw,
            max_length=call.max_length,
            spec=spec,
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
            carry, buffers = decoding.decode(call.decoder, variables, carry, limit, call.draw, spec=spec)

    return blocks()


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
