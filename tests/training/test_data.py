"""Corpora and the grain pipeline: splits, shards, packing, resumption and errors, all offline."""

import itertools
import json
import pathlib
import sys

import numpy as np
import pytest

from retnet_jax.configs.default import get_config
from retnet_jax.training import corpus, data
from retnet_jax.training import tokenizers as tokenizer_lib

BYTES = tokenizer_lib.ByteTokenizer()


def _config(**overrides):
    """The default experiment config (so these tests use its real keys), with overrides."""
    config = get_config()
    config.update(overrides)
    return config


def _write_corpus(root: pathlib.Path) -> list[str]:
    """120 .txt files in nested directories and a .jsonl of 30 lines; returns every document."""
    docs = []
    for i in range(120):
        path = root / f"part{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"document {i}: " + "héllo wörld " * (i % 7 + 1)
        path.write_text(text, encoding="utf-8")
        docs.append(text)
    lines = [f"line {j} of the jsonl " * (j % 4 + 1) for j in range(30)]
    with open(root / "more.jsonl", "w", encoding="utf-8") as f:
        for j, line in enumerate(lines):
            f.write(json.dumps({"text": line, "id": j}) + "\n")
            if j == 10:
                f.write("\n")  # blank lines are skipped
    (root / "notes.md").write_text("not a corpus file")
    return docs + lines


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = _write_corpus(root)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return f"text:{root}", docs, data_dir


def _all_docs(dataset, data_dir):
    splits = ("train", "validation")
    return {split: list(corpus.text_source(dataset, split, data_dir=data_dir)) for split in splits}


def test_text_split_is_disjoint_complete_and_deterministic(text_corpus, tmp_path):
    dataset, docs, data_dir = text_corpus
    splits = _all_docs(dataset, data_dir)
    assert splits["validation"] and splits["train"]
    assert sorted(splits["train"] + splits["validation"]) == sorted(docs)
    # A second build, elsewhere, holds the same documents in the same order.
    assert _all_docs(dataset, str(tmp_path / "other")) == splits


def test_text_glob_and_rebuild_on_new_files(tmp_path):
    root = tmp_path / "corpus"
    docs = _write_corpus(root)
    jsonl = [d for d in docs if d.startswith("line")]
    data_dir = str(tmp_path / "tfds")
    glob_docs = _all_docs(f"text:{root}/*.jsonl", data_dir)
    assert sorted(glob_docs["train"] + glob_docs["validation"]) == sorted(jsonl)
    # A new file changes the fingerprint: a fresh build, not the stale one.
    (root / "late.txt").write_text("a late document")
    after = _all_docs(f"text:{root}", data_dir)
    assert sorted(after["train"] + after["validation"]) == sorted(docs + ["a late document"])


def test_two_documents_make_two_splits(tmp_path):
    # Too few documents for the 5% rule: one still goes to each split, the same one every time.
    for name in ("a", "b"):
        (tmp_path / "two" / name).mkdir(parents=True)
        (tmp_path / "two" / name / "doc.txt").write_text(f"document {name}")
    splits = _all_docs(f"text:{tmp_path / 'two'}", str(tmp_path / "tfds"))
    assert sorted(len(docs) for docs in splits.values()) == [1, 1]
    assert _all_docs(f"text:{tmp_path / 'two'}", str(tmp_path / "again")) == splits


def test_default_corpus(tmp_path):
    splits = _all_docs("default", str(tmp_path))
    train, validation = splits["train"], splits["validation"]
    assert len(validation) / (len(train) + len(validation)) < 0.2
    assert set(train).isdisjoint(validation)
    assert any("def " in doc for doc in train)
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow


def test_corpus_errors(tmp_path, text_corpus):
    dataset, _, data_dir = text_corpus
    with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_corpus'.*'default'.*'text:"):
        corpus.text_source("no_such_corpus", "train", data_dir=data_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"text:.*empty' matched no \.txt or \.jsonl files"):
        corpus.text_source(f"text:{tmp_path / 'empty'}", "train", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
        corpus.text_source(dataset, "test", data_dir=data_dir)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: .*field \"text\""):
        corpus.text_source(f"text:{tmp_path / 'bad'}", "train", data_dir=data_dir)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.txt").write_text("a single document")
    with pytest.raises(ValueError, match="found 1 document.*at least 2"):
        corpus.text_source(f"text:{tmp_path / 'one'}", "train", data_dir=data_dir)


def _stream(docs):
    """What packing should produce: every document framed by BOS/EOS, concatenated."""
    ids = []
    for doc in docs:
        ids += [BYTES.bos_id, *BYTES.encode(doc), BYTES.eos_id]
    return np.asarray(ids, np.int32)


def _check_segment_ids(batch):
    """Segment ids are int32 [B, T] and change exactly where an input BOS starts a document."""
    inputs, segment_ids = batch["inputs"], batch["segment_ids"]
    assert segment_ids.dtype == np.int32 and segment_ids.shape == inputs.shape
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]  # a change between t − 1 and t
    np.testing.assert_array_equal(starts, inputs[:, 1:] == BYTES.bos_id)
    # grain numbers a row's documents 1, 2, ... (0 is padding, never in a full row).
    expected = 1 + np.concatenate([np.zeros_like(starts[:, :1]), np.cumsum(starts, axis=1)], axis=1)
    np.testing.assert_array_equal(segment_ids, expected)


def _rows(batches):
    """Each row's T + 1 tokens, recovered from inputs and targets (which must be a shift)."""
    rows = []
    for batch in batches:
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        _check_segment_ids(batch)
        rows += list(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1))
    return np.concatenate(rows)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_packs_every_shard_in_order(text_corpus, process_count):
    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, seq_len=16, batch_size=2, prefetch=0)
    # Evaluation mode (one pass, in order) on the larger split, for more rows.
    source = corpus.text_source(dataset, "train", data_dir=data_dir)
    shards = []
    local_batch = 2 // process_count
    for index in range(process_count):
        it = data.make_dataset(
            config, BYTES, "train", train=False, process_index=index, process_count=process_count
        )
        batches = list(it)
        assert all(b["inputs"].shape == (local_batch, 16) for b in batches)
        shard = list(source)[index::process_count]
        got, expected = _rows(batches), _stream(shard)
        first = BYTES.encode(shard[0])
        np.testing.assert_array_equal(got[: len(first) + 2], [BYTES.bos_id, *first, BYTES.eos_id])
        np.testing.assert_array_equal(got, expected[: len(got)])
        # Only the final partial row and the final partial batch are dropped.
        assert len(expected) - len(got) < 17 * (local_batch + 1)
        shards.append(shard)
    assert sorted(sum(shards, [])) == sorted(source)


def test_train_shards_are_disjoint_cover_and_reshuffle(text_corpus):
    dataset, _, data_dir = text_corpus
    source = corpus.text_source(dataset, "train", data_dir=data_dir)
    first_epochs = []
    for index in range(3):
        shard = data.document_dataset(source, train=True, seed=3, process_index=index, process_count=3)
        size = len(range(index, len(source), 3))
        epoch0 = [shard[i] for i in range(size)]
        epoch1 = [shard[i] for i in range(size, 2 * size)]
        assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # a new permutation
        first_epochs.append(epoch0)
    assert sorted(sum(first_epochs, [])) == sorted(source)


def test_train_is_seeded_and_endless(text_corpus):
    dataset, _, data_dir = text_corpus
    source = corpus.text_source(dataset, "train", data_dir=data_dir)
    steps, batch, seq_len = 100, 8, 32
    assert len(_stream(source)) < steps * batch * (seq_len + 1)  # so the run spans several epochs

    def take(seed):
        config = _config(dataset=dataset, data_dir=data_dir, seq_len=seq_len, batch_size=batch)
        config.seed = seed
        it = data.make_dataset(config, BYTES, "train", train=True)
        inputs = np.stack([next(it)["inputs"] for _ in range(steps)])  # [steps, B, T]
        it.close()
        return inputs

    first = take(seed=0)
    assert first.shape == (steps, batch, seq_len)
    np.testing.assert_array_equal(first, take(seed=0))
    assert not np.array_equal(first, take(seed=1))


@pytest.mark.parametrize("train", [True, False])
def test_resumption_is_exact(text_corpus, train):
    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, seq_len=8, batch_size=2, prefetch=2)

    def fresh():
        return data.make_dataset(config, BYTES, "train", train=train)

    # The uninterrupted run, with the state before each batch, stored as grain and orbax store it.
    reference, states, batches = fresh(), [], []
    for _ in range(16):
        states.append(json.loads(json.dumps(reference.get_state())))
        try:
            batches.append(next(reference))
        except StopIteration:
            break
    reference.close()
    assert len(batches) >= 8
    # Every stopping point: some fall where no document is half-packed, some mid-document.
    for step, state in enumerate(states):
        resumed = fresh()
        resumed.set_state(state)
        want = batches[step : step + 3]
        got = list(itertools.islice(resumed, len(want)))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys() == {"inputs", "targets", "segment_ids"}
            for key in w:
                np.testing.assert_array_equal(g[key], w[key])
        if not train and step == len(batches):
            assert not got  # a finished evaluation stays finished
        resumed.close()


def test_segment_ids_mark_document_starts(text_corpus):
    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, seq_len=64, batch_size=4, prefetch=0)
    it = data.make_dataset(config, BYTES, "train", train=True)
    batches = [next(it) for _ in range(6)]
    it.close()
    for batch in batches:
        _check_segment_ids(batch)
    inputs = np.concatenate([b["inputs"] for b in batches])
    segment_ids = np.concatenate([b["segment_ids"] for b in batches])
    # The sample holds rows with several documents, rows that start mid-document and rows starting at a BOS.
    assert (segment_ids[:, -1] >= 3).any()
    assert (inputs[:, 0] != BYTES.bos_id).any() and (inputs[:, 0] == BYTES.bos_id).any()


def test_segment_ids_go_through_the_global_batch(text_corpus):
    from retnet_jax.training import trainer as train
    from retnet_jax.training.sharding import make_mesh
    from tests.conftest import small_config

    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, seq_len=16, batch_size=8, prefetch=0)
    it = data.make_dataset(config, BYTES, "train", train=True)
    local = next(it)
    it.close()
    experiment = small_config(model="tiny", batch_size=8, seq_len=16)
    trainer = train.Trainer(experiment, train.model_config(experiment, 264), make_mesh((2, 2, 2)))
    batch = trainer.global_batch(local)
    assert batch.keys() == local.keys()
    for key, value in local.items():
        assert batch[key].sharding == trainer.batch_sharding
        np.testing.assert_array_equal(np.asarray(batch[key]), value)
    # The compiled step takes the batch with its new key.
    assert np.isfinite(float(trainer.eval_step(trainer.init(0).params, batch)))


def test_batch_must_split_over_processes(text_corpus):
    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, batch_size=6)
    with pytest.raises(ValueError, match=r"batch_size=6 does not split evenly over 4 processes"):
        data.make_dataset(config, BYTES, "train", train=True, process_index=0, process_count=4)


def test_ids_outside_the_vocabulary_are_refused(text_corpus):
    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, prefetch=0)
    it = data.make_dataset(config, BYTES, "validation", train=False, vocab_size=200)
    message = r"Token id 258 .* outside the vocabulary \[0, 200\).*tokenizer and the model do not"
    with pytest.raises(ValueError, match=message):
        next(it)


def test_make_tokenizer_trains_on_the_train_split(text_corpus):
    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, tokenizer="sentencepiece", tokenizer_vocab_size=300)
    tok = data.make_tokenizer(config)
    assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
    assert tok.decode(tok.encode("document 7: héllo wörld")) == "document 7: héllo wörld"
    assert isinstance(data.make_tokenizer(_config()), tokenizer_lib.ByteTokenizer)


@pytest.mark.slow
def test_resumption_with_worker_processes(text_corpus):
    dataset, _, data_dir = text_corpus
    config = _config(dataset=dataset, data_dir=data_dir, seq_len=8, batch_size=2, grain_workers=2)
    reference = data.make_dataset(config, BYTES, "train", train=True)
    for _ in range(5):
        next(reference)
    state = json.loads(json.dumps(reference.get_state()))
    upcoming = [next(reference)["inputs"].copy() for _ in range(4)]
    reference.close()
    resumed = data.make_dataset(config, BYTES, "train", train=True)
    resumed.set_state(state)
    for want in upcoming:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)
    resumed.close()
