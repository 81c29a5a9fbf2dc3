"""The input pipeline: documents → token ids → packed rows → batches, as a resumable grain iterator.

    TextSource (random access)                                  corpus.text_source
    → this process's documents: every process_count-th from process_index
    → train: shuffled with config.seed, reshuffled each epoch, repeated forever
    → [BOS] + ids + [EOS] per document (ids checked against the vocabulary)
    → concatenated and cut into rows of T + 1 tokens          grain ConcatThenSplitIterDataset
      (eval: the final, zero-padded partial row is dropped)
    → {"inputs": row[:-1], "targets": row[1:], "segment_ids": ids[:-1]}, B_local rows a batch
    → prefetched in a thread (grain_workers == 0) or grain worker processes

Segment ids tell the packed documents apart (grain numbers a row's pieces 1, 2, ...; 0 pads a finite
stream's last row, which evaluation drops): ``segment_ids[:, t]`` belongs to ``inputs[:, t]`` and changes
exactly where an input BOS starts a document. The target of a document's last input is its EOS, the target
of its EOS the next document's BOS. A document cut at a row's end continues at the next row's start, where
it counts as the row's first document: positions restart at the row start and the model sees no state
from the previous row (as with every packer; each row is an independent sequence).

Each process reads a disjoint set of documents, so the per-process batches of one step together
form the global batch of ``config.batch_size`` rows. The iterator's ``get_state()`` is a small dict
(indices, no data); ``set_state`` on a freshly made iterator continues with exactly the batches the
original would have produced, also after the state went through JSON (as grain's and orbax's
checkpointing store it). With ``grain_workers > 0`` each worker packs its own documents, so the
batches depend on the number of workers: resume with the same ``grain_workers``. Close iterators
(``it.close()``) when done: grain's prefetch threads and processes are stopped then.

Needs grain >= 0.2.15 (tested with 0.2.15 and 0.2.18): before 0.2.12 concat-then-split never
finishes a finite (evaluation) stream, and ``DatasetIterator.close`` arrived in 0.2.15. Public API
used: ``grain.MapDataset`` (``source``, slicing, ``shuffle``, ``repeat``, ``map``,
``to_iter_dataset``), ``grain.IterDataset`` (``filter``, ``map``, ``batch``, ``mp_prefetch``),
``grain.DatasetIterator``, ``grain.ReadOptions``, ``grain.multiprocessing.MultiprocessingOptions``,
``grain.experimental.ConcatThenSplitIterDataset`` and ``.ThreadPrefetchIterDataset``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from retnet_jax.training import corpus
from retnet_jax.training import tokenizers as tokenizer_lib

__all__ = ["document_dataset", "make_dataset", "make_tokenizer"]

# Documents read ahead of packing by the reading thread. Documents are long (a stdlib module is ~30k
# byte tokens, hundreds of rows), so a few suffice; grain's default of 500 would hold ~60 MB.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


def document_dataset(
    source: corpus.TextSource,
    *,
    train: bool,
    seed: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """The documents one process reads, in the order it reads them.

    Args:
        source: all documents of the split.
        train: shuffle with ``seed`` (a new permutation each epoch) and repeat forever; otherwise
            keep the source order and stop after one pass.
        seed: shuffling seed, in [0, 2**32).
        process_index, process_count: this process's shard: documents ``process_index``,
            ``process_index + process_count``, ... of ``source``.

    Returns:
        A ``grain.MapDataset`` of strings (infinite when ``train``).

    Raises:
        ValueError: the shard is empty.
    """
    documents = grain.MapDataset.source(source)[process_index::process_count]
    if len(documents) == 0:
        raise ValueError(
            f"Process {process_index} of {process_count} gets no documents: {source!r} has only "
            f"{len(source)}. Use more documents or fewer processes."
        )
    if train:
        # Shuffle, then repeat: grain's shuffle draws a new permutation for each epoch of indices.
        documents = documents.shuffle(seed=seed).repeat()
    return documents


def _frame(text: str, *, tokenizer: tokenizer_lib.Tokenizer, vocab_size: int) -> dict[str, Any]:
    """[BOS] + ids + [EOS] as int32, refusing ids the model has no embedding for."""
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], dtype=np.int32)  # [L + 2]
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"Token id {bad} from {tokenizer!r} is outside the vocabulary [0, {vocab_size}). The "
            "tokenizer and the model do not match (e.g. a model or checkpoint made for another "
            "tokenizer): use the tokenizer the model was built with, or build the model with "
            "vocab_size = tokenizer.vocab_size."
        )
    return {"tokens": ids}


def _shift(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens, segment_ids = row["tokens"], row["tokens_segment_ids"]  # [T + 1] each
    return {
        "inputs": tokens[:-1],  # [T]
        "targets": tokens[1:],  # [T]
        "segment_ids": segment_ids[:-1].astype(np.int32),  # [T], the inputs' documents
    }


def _is_full(row: dict[str, np.ndarray]) -> bool:
    # Packing pads only the very last row of a finite stream, with segment id 0 at its end.
    return bool(row["tokens_segment_ids"][-1] != 0)


def _slices_as_tuples(state: Any) -> Any:
    """Undoes JSON's tuple → list on the concat-then-split state (see ``_JsonRestorable``)."""
    if isinstance(state, dict):
        return {
            key: (
                {name: tuple(s) for name, s in value.items()}
                if key == "remainder_slices"
                else _slices_as_tuples(value)
            )
            for key, value in state.items()
        }
    if isinstance(state, list):
        return [_slices_as_tuples(value) for value in state]
    return state


class _JsonRestorable(grain.DatasetIterator):
    """Passes elements and state through; accepts a state that went through JSON.

    grain's concat-then-split iterator (0.2.18) tells "no remainder" by comparing its slices with
    the tuple (-1, -1); after JSON they are lists, compare unequal, and the restored iterator
    skips a document. grain's CheckpointHandler and orbax both store states as JSON.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_slices_as_tuples(state))


def make_dataset(
    config: Any,
    tokenizer: tokenizer_lib.Tokenizer,
    split: str,
    *,
    train: bool,
    process_index: int | None = None,
    process_count: int | None = None,
    vocab_size: int | None = None,
) -> grain.DatasetIterator:
    """Returns this process's iterator of packed next-token batches.

    Args:
        config: the experiment config; reads dataset, text_feature, data_dir, seq_len, batch_size,
            seed, grain_workers and prefetch.
        tokenizer: turns documents into ids; its BOS/EOS frame each document.
        split: e.g. ``config.train_split`` or ``config.eval_split``.
        train: endless and shuffled (training) or one pass in order (evaluation).
        process_index, process_count: this process's place among the hosts; default
            ``jax.process_index()`` and ``jax.process_count()``.
        vocab_size: the model's vocabulary, which every id must fall in; default
            ``tokenizer.vocab_size``.

    Returns:
        A ``grain.DatasetIterator`` (``get_state`` / ``set_state``) of
        ``{"inputs": int32 [B_local, T], "targets": int32 [B_local, T], "segment_ids": int32 [B_local, T]}``
        with ``B_local = config.batch_size // process_count``, ``T = config.seq_len``,
        ``targets[:, t] == inputs[:, t + 1]`` and ``segment_ids`` changing where a document starts (see the
        module docstring). Batches are never partial.

    Raises:
        ValueError: ``batch_size`` not divisible by ``process_count``; an empty shard; ids outside
            the vocabulary (raised when the offending document is read).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} does not split evenly over {process_count} "
            "processes; set batch_size to a multiple of the process count."
        )
    local_batch = config.batch_size // process_count  # B_local
    vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size

    source = corpus.text_source(
        config.dataset, split, data_dir=config.data_dir or None, text_feature=config.text_feature
    )
    documents = document_dataset(
        source,
        train=train,
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
    )
    frame = functools.partial(_frame, tokenizer=tokenizer, vocab_size=vocab_size)
    ds = documents.map(frame).to_iter_dataset(_READ_OPTIONS)
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": config.seq_len + 1})
    if not train:
        ds = ds.filter(_is_full)
    ds = ds.map(_shift).batch(local_batch, drop_remainder=True)
    if config.grain_workers > 0:
        # grain's worker start-up reads an absl flag (0.2.18), which raises unless flags are parsed;
        # outside an absl app (tests, notebooks) take the defaults, as absl advises for notebooks.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.multiprocessing.MultiprocessingOptions(
            num_workers=config.grain_workers, per_worker_buffer_size=max(config.prefetch, 1)
        )
        ds = ds.mp_prefetch(options)
    elif config.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch)
    return _JsonRestorable(iter(ds))


def _sample_documents(source: corpus.TextSource, max_chars: int) -> Iterable[str]:
    """Documents spread evenly over ``source`` (a deterministic sample) up to ``max_chars``."""
    stride = max(1, len(source) // 10_000)  # at most ~10k documents
    total = 0
    for index in range(0, len(source), stride):
        text = source[index]
        yield text
        total += len(text)
        if total >= max_chars:
            return


def make_tokenizer(config: Any, *, max_chars: int = 20_000_000) -> tokenizer_lib.Tokenizer:
    """The tokenizer ``config.tokenizer`` names; ``"sentencepiece"`` trains on the train split.

    Args:
        config: reads tokenizer, tokenizer_vocab_size, dataset, train_split, data_dir, text_feature.
        max_chars: characters of training text for a SentencePiece model (a deterministic sample of
            documents spread over the split).

    Returns:
        The tokenizer (save ``to_dict()`` with the checkpoint to restore exactly this one).
    """

    def texts() -> Iterable[str]:
        source = corpus.text_source(
            config.dataset,
            config.train_split,
            data_dir=config.data_dir or None,
            text_feature=config.text_feature,
        )
        return _sample_documents(source, max_chars)

    return tokenizer_lib.build_tokenizer(
        config.tokenizer, texts=texts, vocab_size=config.tokenizer_vocab_size
    )
