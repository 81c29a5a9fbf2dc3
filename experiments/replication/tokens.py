"""The corpus tokenized once, before any run's clock starts, and the packed batches the runs read from it.

At 40% of an H200's bf16 rate a size-s run would step through 2.2–2.8M tokens a second (142 and 112
MFLOP a token). The library's pipeline tokenizes while training, in grain worker processes that make
about 0.4M tokens per CPU-second each (measured with the study's BPE on an EPYC core), so 12 workers
would have to scale perfectly on the machine's 16 cores, beside the process that drives the GPU, to
keep up; the same cores counted the corpus at 2.0M tokens/s. Instead each call tokenizes both splits
once with the Rust tokenizer's batch call on every core (the corpus part counted the same 99M tokens
in 49 s there) into flat arrays, and a run cuts its batches from them with numpy at tens of millions of
tokens a second. The data order then depends on the seed alone, not on a number of worker processes.

    split/tokens.bin     [N_tokens] uint16 (int32 for vocabularies past 65536): every document as
                         [BOS] + ids + [EOS], one after another in the corpus's order
    split/offsets.npy    [N_docs + 1] int64: document i is tokens[offsets[i]:offsets[i + 1]]
    manifest.json        the corpus fingerprint and tokenizer digest the arrays were made from

Batches (``PackedBatches``) follow the library's pipeline (``retnet_jax.training.data``): documents
shuffled with the seed, a new permutation each epoch, repeated forever (training), or in order for one
pass (evaluation); concatenated and cut into rows of T + 1 tokens; ``inputs = row[:-1]``,
``targets = row[1:]``, ``segment_ids`` numbering a row's documents 1, 2, … (the inputs'); evaluation drops
the last, partial row. A finished build is reused by later parts of the same call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tokenizers

from retnet_jax.training import code_corpus

MANIFEST = "manifest.json"
ENCODE_BATCH_CHARS = 32_000_000  # characters per batch call: enough that no long file idles the cores


@dataclasses.dataclass(frozen=True)
class TokenArray:
    """One split: ``tokens`` [N_tokens] (a read-only memory map) and ``offsets`` [N_docs + 1]."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> np.ndarray:
        """[L + 2]: [BOS] + ids + [EOS] of document ``index``."""
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


def tokens_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "tokens")


def _encode_batches(tokenizer, texts: Iterable[str]) -> Iterator[list[list[int]]]:
    """Token ids of ``texts``, a batch call (all cores) per ~``ENCODE_BATCH_CHARS`` characters."""
    description = tokenizer.to_dict()
    if description.get("kind") == "huggingface":
        fast = tokenizers.Tokenizer.from_str(description["tokenizer_json"])

        def encode(batch):
            return [e.ids for e in fast.encode_batch(batch, add_special_tokens=False)]
    else:

        def encode(batch):
            return [tokenizer.encode(t) for t in batch]

    pending, chars = [], 0
    for text in texts:
        pending.append(text)
        chars += len(text)
        if chars >= ENCODE_BATCH_CHARS:
            yield encode(pending)
            pending, chars = [], 0
    if pending:
        yield encode(pending)


def _write_split(tokenizer, corpus_path: str, split: str, folder: str, vocab_size: int) -> dict[str, int]:
    dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    lengths, count, high = [], 0, 0
    os.makedirs(folder)
    with open(os.path.join(folder, "tokens.bin"), "wb") as f:
        for ids_batch in _encode_batches(tokenizer, code_corpus.read_documents(corpus_path, split)):
            for ids in ids_batch:
                row = np.empty(len(ids) + 2, np.int64)
                row[0], row[1:-1], row[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
                high = max(high, int(row.max()))
                if row.min() < 0 or high >= vocab_size:
                    raise ValueError(
                        f"Token id {high if high >= vocab_size else int(row.min())} is outside the "
                        f"vocabulary [0, {vocab_size}): the tokenizer and the model do not match."
                    )
                f.write(row.astype(dtype).tobytes())
                lengths.append(len(row))
                count += len(row)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(os.path.join(folder, "offsets.npy"), offsets)
    return dict(tokens=count, documents=len(lengths), dtype=np.dtype(dtype).name)


def _open_split(folder: str, dtype: str) -> TokenArray:
    offsets = np.load(os.path.join(folder, "offsets.npy"))
    path = os.path.join(folder, "tokens.bin")
    tokens = (
        np.memmap(path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    )  # numpy refuses to map an empty file
    if len(tokens) != offsets[-1]:
        raise ValueError(f"{path} holds {len(tokens)} tokens, its offsets say {offsets[-1]}: rebuild it.")
    return TokenArray(tokens=tokens, offsets=offsets)


def ensure_tokens(
    work_dir: str,
    corpus_path: str,
    fingerprint: str,
    tokenizer,
    digest: str,
    vocab_size: int,
    log=print,
) -> tuple[dict[str, TokenArray], dict[str, Any]]:
    """Both splits of the corpus at ``corpus_path`` as token arrays in ``work_dir``, made unless the ones
    there come from the same corpus (``fingerprint``) and tokenizer (``digest``).

    Args:
        vocab_size: the model's vocabulary; every id must fall below it.

    Returns:
        ({split: TokenArray}, the manifest: tokens and documents per split, seconds spent, reused or not).

    Raises:
        ValueError: an id outside ``[0, vocab_size)``.
    """
    folder = tokens_dir(work_dir)
    manifest_path = os.path.join(folder, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest["fingerprint"] == fingerprint and manifest["tokenizer_digest"] == digest:
            log(f"tokens: reusing {folder}")
            arrays = {s: _open_split(os.path.join(folder, s), manifest["dtype"]) for s in code_corpus.SPLITS}
            return arrays, dict(manifest, seconds=0.0, reused=True)
    start = time.perf_counter()
    log(f"tokens: tokenizing {corpus_path} into {folder}")
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    splits = {
        s: _write_split(tokenizer, corpus_path, s, os.path.join(partial, s), vocab_size)
        for s in code_corpus.SPLITS
    }
    manifest = dict(
        fingerprint=fingerprint,
        tokenizer_digest=digest,
        dtype=splits["train"]["dtype"],
        tokens={s: v["tokens"] for s, v in splits.items()},
        documents={s: v["documents"] for s, v in splits.items()},
    )
    with open(os.path.join(partial, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(partial, folder)  # all or nothing: a failed build leaves no manifest behind
    seconds = time.perf_counter() - start
    log(
        f"tokens: train {manifest['tokens']['train']:,}, validation {manifest['tokens']['validation']:,} "
        f"in {seconds:.1f}s ({sum(manifest['tokens'].values()) / seconds / 1e6:.2f}M tokens/s)"
    )
    arrays = {s: _open_split(os.path.join(folder, s), manifest["dtype"]) for s in code_corpus.SPLITS}
    return arrays, dict(manifest, seconds=seconds, reused=False)


class PackedBatches:
    """Next-token batches ``{"inputs", "targets", "segment_ids"}``, int32 [B, T] each, cut from ``data``.

    Args:
        data: the split's documents.
        batch_size, seq_len: B and T.
        train: documents shuffled with ``seed`` (a new permutation each epoch) and repeated forever;
            otherwise one pass in order, the last partial row and batch dropped.
        seed: shuffling seed.
    """

    def __init__(self, data: TokenArray, *, batch_size: int, seq_len: int, train: bool, seed: int = 0):
        if data.num_documents == 0:
            raise ValueError("The split holds no documents.")
        self._data, self._train, self._seed = data, train, seed
        self._batch, self._row = batch_size, seq_len + 1
        self._epoch, self._order, self._next_doc, self._within = 0, self._permutation(0), 0, 0
        self._piece = 0  # a running number per document piece, to tell documents apart in a row

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self._train:
            return np.arange(self._data.num_documents)
        return np.random.default_rng([self._seed, epoch]).permutation(self._data.num_documents)

    @property
    def epoch(self) -> int:
        """Epochs begun (0 during the first pass)."""
        return self._epoch

    def __iter__(self) -> PackedBatches:
        return self

    def _take(self, count: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The next ``count`` tokens of the stream and their pieces' numbers; None at the end of a pass."""
        tokens, pieces, have = [], [], 0
        while have < count:
            if self._next_doc == len(self._order):
                if not self._train:
                    return None
                self._epoch += 1
                self._order, self._next_doc = self._permutation(self._epoch), 0
            doc = self._data.document(self._order[self._next_doc])
            part = doc[self._within : self._within + count - have]
            tokens.append(part)
            pieces.append(np.full(len(part), self._piece, np.int64))
            have += len(part)
            self._within += len(part)
            if self._within == len(doc):
                self._next_doc, self._within, self._piece = self._next_doc + 1, 0, self._piece + 1
        return np.concatenate(tokens), np.concatenate(pieces)

    def __next__(self) -> dict[str, np.ndarray]:
        taken = self._take(self._batch * self._row)
        if taken is None:
            raise StopIteration
        rows = taken[0].astype(np.int32).reshape(self._batch, self._row)  # [B, T + 1]
        pieces = taken[1].reshape(self._batch, self._row)
        segments = np.ones(rows.shape, np.int32)
        segments[:, 1:] += np.cumsum(pieces[:, 1:] != pieces[:, :-1], axis=1, dtype=np.int32)
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": segments[:, :-1]}

    def close(self) -> None:
        """Nothing to release (the same call as the library's iterators)."""


def long_documents(data: TokenArray, length: int, rows: int) -> np.ndarray:
    """[n <= rows, length + 1] int32: [BOS] + the first ``length`` ids of each document that has that many,
    in the split's order."""
    sizes = np.diff(data.offsets) - 2  # ids a document holds, without BOS and EOS
    found = np.flatnonzero(sizes >= length)[:rows]
    out = (
        np.stack([data.document(i)[: length + 1] for i in found]) if len(found) else np.zeros((0, length + 1))
    )
    return out.astype(np.int32).reshape(len(found), length + 1)
