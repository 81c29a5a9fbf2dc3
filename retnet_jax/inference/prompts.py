"""Prompts at the boundary: checked before any tracing, framed as the training data is, bucketed.

A batch of prompts of any lengths becomes one left-padded array whose width is a power of two (at least
``MIN_BUCKET``), so prompts of different lengths share a handful of compiled programs. Each prompt is
framed as [BOS] + ids (an empty prompt starts from BOS). Row b gets p_b pads; its decoding state starts at
position −p_b, so the pads never enter the state and the first real token sits at position 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MIN_BUCKET", "bucket", "check_id", "check_prompts", "prepare_prompts"]

# Prompt buckets are powers of two from this length up, so at most log2(longest prompt) programs compile.
MIN_BUCKET = 16


def check_id(name: str, value, vocab_size: int) -> int:
    """``value`` as an int; ValueError if it is not a token id of a vocabulary of ``vocab_size``."""
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


def bucket(length: int) -> int:
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
        (tokens [B, P + 1] int32 with P = ``bucket(longest framed prompt − 1)``, pads [B] int32: the
        number of pad tokens at the start of each row).
    """
    framed = [[bos_id, *p] for p in prompts]
    width = bucket(max(len(p) for p in framed) - 1) + 1
    tokens = np.full((len(framed), width), pad_id, np.int32)
    pads = np.empty(len(framed), np.int32)
    for b, row in enumerate(framed):
        pads[b] = width - len(row)
        tokens[b, pads[b] :] = row
    return tokens, pads
