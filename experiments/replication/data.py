"""The study's corpus and tokenizer: built on the machine that trains, the same on every machine.

The corpus (``retnet_jax.training.code_corpus``) is rebuilt wherever a run finds none in ``work_dir``:
from the same site-packages it is byte-identical (its fingerprint says so, and each run records it).
The tokenizer is trained once, by ``--part=corpus``, and its ``tokenizer.json`` is kept with the results,
so every later run reads that file; a run that finds none trains the same one (BPE training is
deterministic) and records its digest, which the report compares across runs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers

from retnet_jax.training import code_corpus
from retnet_jax.training import tokenizers as tokenizer_lib

TOKENIZER_FILE = "tokenizer.json"
CORPUS_FILE = "corpus.json"
BPE_MAX_CHARS = 200_000_000  # characters of training text the tokenizer learns from (spread over files)


def corpus_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "corpus")


def tfds_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "tfds")


def dataset_spec(work_dir: str) -> str:
    """The library's dataset name of the corpus: the folders name the splits."""
    return f"text:{corpus_dir(work_dir)}"


def ensure_corpus(
    work_dir: str, roots: Sequence[str], validation_fraction: float, log=print
) -> tuple[code_corpus.CorpusStats, float]:
    """The corpus in ``work_dir``, built unless one from the same roots and fraction is there; returns
    (its stats, seconds spent building)."""
    path = corpus_dir(work_dir)
    wanted = [os.path.realpath(r) for r in roots]
    try:
        stats = code_corpus.read_stats(path)
        if stats.roots == wanted and stats.options["validation_fraction"] == validation_fraction:
            log(f"corpus: reusing {path} ({stats.fingerprint[:12]})")
            return stats, 0.0
    except ValueError:
        pass
    start = time.perf_counter()
    log(f"corpus: building {path} from {wanted}")
    stats = code_corpus.build_code_corpus(
        wanted, path, validation_fraction=validation_fraction, overwrite=True
    )
    seconds = time.perf_counter() - start
    log(
        f"corpus: {stats.files['train']} + {stats.files['validation']} files, "
        f"{stats.bytes['train'] / 1e6:.1f} + {stats.bytes['validation'] / 1e6:.1f} MB in {seconds:.1f}s"
    )
    return stats, seconds


def _spread(texts: Sequence[str], max_chars: int) -> Iterable[str]:
    """Documents spread evenly over ``texts`` up to about ``max_chars`` characters."""
    total = sum(len(t) for t in texts)
    stride = max(1, round(total / max_chars)) if total > max_chars else 1
    return texts[::stride]


def train_tokenizer(corpus_path: str, vocab_size: int) -> tokenizer_lib.HFTokenizer:
    """The byte-level BPE of the training split."""
    documents = list(code_corpus.read_documents(corpus_path, "train"))
    return tokenizer_lib.train_bpe(_spread(documents, BPE_MAX_CHARS), vocab_size, max_chars=BPE_MAX_CHARS)


def tokenizer_digest(tokenizer: tokenizer_lib.Tokenizer) -> str:
    text = tokenizer.to_dict().get("tokenizer_json", repr(tokenizer.to_dict()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_tokenizer(tokenizer: tokenizer_lib.HFTokenizer, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, TOKENIZER_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(tokenizer.to_dict()["tokenizer_json"])
    return path


def ensure_tokenizer(
    candidates: Sequence[str], work_dir: str, vocab_size: int, log=print
) -> tuple[tokenizer_lib.Tokenizer, str]:
    """The first existing ``tokenizer.json`` of ``candidates``, else one trained on the corpus and saved in
    ``work_dir``; returns (tokenizer, its path)."""
    for path in candidates:
        if path and os.path.isfile(path):
            log(f"tokenizer: {path}")
            return tokenizer_lib.HFTokenizer.from_file(path), path
    log(f"tokenizer: none of {list(candidates)} exists; training a BPE of {vocab_size} on the corpus")
    tokenizer = train_tokenizer(corpus_dir(work_dir), vocab_size)
    return tokenizer, save_tokenizer(tokenizer, work_dir)


def count_tokens(tokenizer: tokenizer_lib.Tokenizer, texts: Iterable[str], batch: int = 512) -> int:
    """Tokens of ``texts`` with BOS and EOS framing each (as the data pipeline feeds them)."""
    encode = _batch_encoder(tokenizer)
    total, pending = 0, []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            total += encode(pending)
            pending = []
    return total + (encode(pending) if pending else 0)


def _batch_encoder(tokenizer: tokenizer_lib.Tokenizer):
    description = tokenizer.to_dict()
    if description.get("kind") != "huggingface":
        return lambda texts: sum(len(tokenizer.encode(t)) + 2 for t in texts)
    # The Rust tokenizer's batch call encodes on every core.
    fast = tokenizers.Tokenizer.from_str(description["tokenizer_json"])
    return lambda texts: sum(len(e.ids) + 2 for e in fast.encode_batch(texts, add_special_tokens=False))


def corpus_report(
    stats: code_corpus.CorpusStats,
    tokenizer: tokenizer_lib.Tokenizer,
    corpus_path: str,
    timings: dict[str, float],
) -> dict[str, Any]:
    """What ``--part=corpus`` records: the corpus's stats, its size in tokens, the tokenizer's digest."""
    tokens = {
        split: count_tokens(tokenizer, code_corpus.read_documents(corpus_path, split))
        for split in stats.files
    }
    return dict(
        corpus=stats.to_dict(),
        tokens=tokens,
        bytes_per_token={s: stats.bytes[s] / max(tokens[s], 1) for s in tokens},
        tokenizer=dict(vocab_size=tokenizer.vocab_size, digest=tokenizer_digest(tokenizer)),
        seconds=timings,
    )
