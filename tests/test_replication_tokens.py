"""The replication study's pre-tokenized corpus: arrays built once, batches packed as the library packs."""

import os

import numpy as np
import pytest

from experiments.replication import tokens
from retnet_jax.configs.default import get_config
from retnet_jax.training import code_corpus
from retnet_jax.training import data as data_lib
from retnet_jax.training import tokenizers as tokenizer_lib
from tests.training.test_code_corpus import fake_site_packages

BOS, EOS = tokenizer_lib.ByteTokenizer.bos_id, tokenizer_lib.ByteTokenizer.eos_id


def _array(docs):
    """A TokenArray of framed documents (lists of ids)."""
    framed = [np.asarray([BOS, *d, EOS], np.uint16) for d in docs]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in framed])]).astype(np.int64)
    return tokens.TokenArray(tokens=np.concatenate(framed), offsets=offsets)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    site = fake_site_packages(str(root / "site"), packages=6, modules=2)
    path = str(root / "corpus")
    stats = code_corpus.build_code_corpus([site], path, validation_fraction=0.3)
    return path, stats


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_arrays_hold_every_document_framed(corpus, tmp_path, kind):
    path, stats = corpus
    if kind == "byte":
        tokenizer = tokenizer_lib.ByteTokenizer()
    else:  # the Rust batch call: must give what one-by-one encoding gives
        texts = list(code_corpus.read_documents(path, "train"))
        tokenizer = tokenizer_lib.train_bpe(texts, 300)
    arrays, manifest = tokens.ensure_tokens(
        str(tmp_path), path, stats.fingerprint, tokenizer, "d1", tokenizer.vocab_size, log=lambda _: None
    )
    assert not manifest["reused"]
    for split in code_corpus.SPLITS:
        texts = list(code_corpus.read_documents(path, split))
        array = arrays[split]
        assert array.num_documents == len(texts) == manifest["documents"][split] > 0
        assert len(array.tokens) == manifest["tokens"][split]
        for i, text in enumerate(texts):
            expected = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
            np.testing.assert_array_equal(array.document(i), expected)
    # Reused for the same corpus and tokenizer, rebuilt for another tokenizer.
    _, again = tokens.ensure_tokens(
        str(tmp_path), path, stats.fingerprint, tokenizer, "d1", tokenizer.vocab_size, log=lambda _: None
    )
    assert again["reused"] and again["tokens"] == manifest["tokens"]
    _, other = tokens.ensure_tokens(
        str(tmp_path), path, stats.fingerprint, tokenizer, "d2", tokenizer.vocab_size, log=lambda _: None
    )
    assert not other["reused"]
    assert not os.path.exists(tokens.tokens_dir(str(tmp_path)) + ".partial")


def test_ids_outside_the_vocabulary_are_refused(corpus, tmp_path):
    path, stats = corpus
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokens.ensure_tokens(
            str(tmp_path),
            path,
            stats.fingerprint,
            tokenizer_lib.ByteTokenizer(),
            "d",
            200,
            log=lambda _: None,
        )
    assert not os.path.exists(tokens.tokens_dir(str(tmp_path)))  # nothing half-written


def test_evaluation_batches_equal_the_library_pipeline(monkeypatch):
    # The library's grain pipeline over the same documents, in order (no shuffle), without workers.
    rng = np.random.default_rng(0)
    texts = ["".join(chr(97 + c) for c in rng.integers(0, 26, n)) for n in rng.integers(1, 40, 30)]
    monkeypatch.setattr(data_lib.corpus, "text_source", lambda *args, **kwargs: texts)
    config = get_config()
    config.seq_len, config.batch_size, config.grain_workers, config.prefetch = 16, 3, 0, 0
    tokenizer = tokenizer_lib.ByteTokenizer()
    expected = list(data_lib.make_dataset(config, tokenizer, "validation", train=False))
    got = list(
        tokens.PackedBatches(
            _array([tokenizer.encode(t) for t in texts]), batch_size=3, seq_len=16, train=False
        )
    )
    assert len(got) == len(expected) >= 2
    for g, e in zip(got, expected, strict=True):
        assert set(g) == set(e)
        for key in e:
            assert g[key].dtype == np.int32 and g[key].shape == (3, 16)
            np.testing.assert_array_equal(g[key], e[key], err_msg=key)


def test_training_batches_cover_each_epoch_in_a_seeded_order():
    docs = [list(range(1 + i, 1 + i + n)) for i, n in enumerate([5, 9, 3, 12, 7, 1, 8])]
    array = _array(docs)
    row, batch = 9, 2  # T = 8
    per_epoch = len(array.tokens)  # 59 tokens: not a multiple of a batch's 18, so epochs straddle batches

    def stream(seed, batches):
        it = tokens.PackedBatches(array, batch_size=batch, seq_len=row - 1, train=True, seed=seed)
        out = [next(it) for _ in range(batches)]
        return out, it.epoch

    out, epochs = stream(seed=3, batches=2 * per_epoch // (batch * row) + 2)
    assert epochs >= 2
    # The rows, rebuilt as one stream, are the documents of each epoch in some order, each exactly once.
    flat = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).ravel() for b in out])
    for epoch in range(2):
        part = flat[epoch * per_epoch : (epoch + 1) * per_epoch]
        starts = np.flatnonzero(part == BOS)
        pieces = sorted(tuple(part[s:e]) for s, e in zip(starts, [*starts[1:], len(part)], strict=True))
        assert pieces == sorted(tuple(array.document(i)) for i in range(array.num_documents))
    # Segment ids number a row's documents from 1, changing exactly where an input is BOS.
    for b in out:
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        seg = b["segment_ids"]
        assert (seg[:, 0] == 1).all()
        np.testing.assert_array_equal(np.diff(seg, axis=1) != 0, b["inputs"][:, 1:] == BOS)
    # The same seed gives the same batches; another seed another order.
    again, _ = stream(seed=3, batches=len(out))
    other, _ = stream(seed=4, batches=len(out))
    assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(out, again, strict=True))
    assert not all((a["inputs"] == b["inputs"]).all() for a, b in zip(out, other, strict=True))


def test_long_documents():
    array = _array([[7] * 3, [8] * 10, [9] * 6, [10] * 12])
    rows = tokens.long_documents(array, 6, rows=5)
    np.testing.assert_array_equal(rows, [[BOS] + [8] * 6, [BOS] + [9] * 6, [BOS] + [10] * 6])
    assert rows.dtype == np.int32
    assert tokens.long_documents(array, 6, rows=1).shape == (1, 7)
    assert tokens.long_documents(array, 20, rows=4).shape == (0, 21)
