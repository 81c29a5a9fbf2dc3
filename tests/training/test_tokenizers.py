"""Tokenizers: exact round trips, special ids, serialization and the errors people will meet."""

import json
import pickle
import random

import pytest
import tokenizers

from retnet_jax.training import tokenizers as tokenizer_lib

# Code-like text with indentation, tabs, newlines, accents and characters outside any training text.
SAMPLE = "def f(x):\n    return  x ** 2  # héllo\n\tz = 'ünïcode ✓ 中文 🙂'\n"


def _corpus(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "theta", "return", "def"]
    return [
        "\n".join(
            "    " * rng.randrange(3) + " ".join(rng.choice(words) for _ in range(8)) for _ in range(10)
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def sentencepiece() -> tokenizer_lib.SentencePieceTokenizer:
    return tokenizer_lib.train_sentencepiece(_corpus(), vocab_size=320)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> str:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_byte_tokenizer_ids_and_round_trip():
    tok = tokenizer_lib.ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    # Specials and ids the model may sample outside the vocabulary are skipped.
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id, 9999, -1]) == "hi"
    # Half a UTF-8 character decodes to U+FFFD instead of failing.
    assert tok.decode([104, 0xC3]) == "h\ufffd"


def test_sentencepiece_round_trip_and_specials(sentencepiece):
    tok = sentencepiece
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 261 < tok.vocab_size <= 320
    ids = tok.encode(SAMPLE)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == SAMPLE  # whitespace kept, unseen characters through byte fallback
    assert len(tok.encode("alpha beta gamma")) < len("alpha beta gamma")  # it learned pieces
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, 1, 10**6, -3]) == SAMPLE
    first_byte = tok.encode("中")[-3]  # unseen in training: three byte-fallback pieces
    assert tok.decode([first_byte]) == "\ufffd"


def test_sentencepiece_training_is_deterministic(sentencepiece):
    again = tokenizer_lib.train_sentencepiece(_corpus(), vocab_size=320)
    assert again.model_proto == sentencepiece.model_proto


def test_sentencepiece_model_file(sentencepiece, tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(sentencepiece.model_proto)
    loaded = tokenizer_lib.build_tokenizer(str(path), texts=None, vocab_size=0)
    assert isinstance(loaded, tokenizer_lib.SentencePieceTokenizer)
    assert loaded.encode(SAMPLE) == sentencepiece.encode(SAMPLE)


def test_hf_tokenizer(hf_json):
    tok = tokenizer_lib.build_tokenizer(hf_json, texts=None, vocab_size=0)
    assert isinstance(tok, tokenizer_lib.HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode(SAMPLE)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # no specials added
    assert tok.decode(ids) == SAMPLE  # byte-level BPE is lossless
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, 10**6]) == SAMPLE


def test_hf_tokenizer_without_bos_names_the_fix(hf_json):
    with open(hf_json) as f:
        text = f.read()
    with pytest.raises(ValueError, match=r"no BOS token among \['<bos>'\].*bos_token="):
        tokenizer_lib.HFTokenizer(text, bos_token="<bos>")


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "huggingface"])
def test_to_dict_round_trip(kind, sentencepiece, hf_json):
    tok = {
        "byte": tokenizer_lib.ByteTokenizer(),
        "sentencepiece": sentencepiece,
        "huggingface": tokenizer_lib.build_tokenizer(hf_json, texts=None, vocab_size=0),
    }[kind]
    # Through JSON, as a checkpoint stores it, and through pickle, as grain workers receive it.
    for restored in (
        tokenizer_lib.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))),
        pickle.loads(pickle.dumps(tok)),
    ):
        assert type(restored) is type(tok)
        assert restored.encode(SAMPLE) == tok.encode(SAMPLE)
        assert (restored.vocab_size, restored.pad_id, restored.bos_id, restored.eos_id) == (
            tok.vocab_size,
            tok.pad_id,
            tok.bos_id,
            tok.eos_id,
        )


def test_build_tokenizer_trains_sentencepiece_on_texts():
    tok = tokenizer_lib.build_tokenizer("sentencepiece", texts=_corpus, vocab_size=300)
    assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown tokenizer 'bpe'.*'byte', 'sentencepiece'"):
        tokenizer_lib.build_tokenizer("bpe", texts=None, vocab_size=0)
    missing = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=r"missing\.model' does not exist"):
        tokenizer_lib.build_tokenizer(missing, texts=None, vocab_size=0)
    with pytest.raises(ValueError, match="needs texts="):
        tokenizer_lib.build_tokenizer("sentencepiece", texts=None, vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 261"):
        tokenizer_lib.train_sentencepiece(_corpus(), vocab_size=100)
    with pytest.raises(ValueError, match="got no text"):
        tokenizer_lib.train_sentencepiece([], vocab_size=300)
    with pytest.raises(ValueError, match="kind='wordpiece'"):
        tokenizer_lib.tokenizer_from_dict({"kind": "wordpiece"})


def _hf_file(tmp_path, specials, name="tokenizer.json") -> str:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    path = tmp_path / name
    tok.save(str(path))
    return str(path)


def test_special_token_spellings_can_be_configured(tmp_path, monkeypatch):
    """[BOS]/[EOS]/[PAD] are found; other spellings are named in the config (tokenizer_bos/_eos/_pad), also
    for a path with ~; they travel with the tokenizer through to_dict."""
    from retnet_jax.training import loop
    from tests.conftest import small_config

    brackets = tokenizer_lib.build_tokenizer(
        _hf_file(tmp_path, ["[PAD]", "[BOS]", "[EOS]"]), texts=None, vocab_size=0
    )
    assert (brackets.pad_id, brackets.bos_id, brackets.eos_id) == (0, 1, 2)

    monkeypatch.setenv("HOME", str(tmp_path))
    _hf_file(tmp_path, ["<|pad|>", "<|start|>", "<|end|>"], name="odd.json")
    with pytest.raises(ValueError, match=r"no BOS token among .*--config.tokenizer_bos="):
        tokenizer_lib.build_tokenizer("~/odd.json", texts=None, vocab_size=0)
    config = small_config(tokenizer="~/odd.json", tokenizer_bos="<|start|>", tokenizer_eos="<|end|>")
    tok = loop._make_tokenizer(config)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # PAD found among the usual spellings
    again = tokenizer_lib.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
    with pytest.raises(ValueError, match="no EOS token among \\['</e>'\\]"):
        loop._make_tokenizer(
            small_config(tokenizer="~/odd.json", tokenizer_bos="<|start|>", tokenizer_eos="</e>")
        )
    with pytest.raises(ValueError, match="tokenizer_eos='<e>' names special tokens of a tokenizer file"):
        loop._make_tokenizer(small_config(tokenizer_eos="<e>"))  # the byte tokenizer has fixed ones


def test_sentencepiece_special_pieces_can_be_configured(sentencepiece, tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(sentencepiece.model_proto)
    piece = sentencepiece._sp.id_to_piece(300)
    tok = tokenizer_lib.build_tokenizer(str(path), texts=None, vocab_size=0, bos=piece)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (300, 3, 0)
    assert tokenizer_lib.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))).bos_id == 300
    with pytest.raises(ValueError, match="no piece '<nope>' to use as EOS; set --config.tokenizer_eos"):
        tokenizer_lib.build_tokenizer(str(path), texts=None, vocab_size=0, eos="<nope>")


def test_a_smaller_sentencepiece_vocabulary_than_asked_is_announced():
    """The corpus supports fewer pieces than asked: training goes on with them and the run says so."""
    from retnet_jax.training import loop
    from tests.conftest import small_config

    tok = tokenizer_lib.build_tokenizer("sentencepiece", texts=_corpus, vocab_size=2000)
    assert tok.vocab_size < 2000
    note = loop.vocabulary_note(small_config(tokenizer="sentencepiece", tokenizer_vocab_size=2000), tok)
    assert note == (
        f"SentencePiece: the corpus yields {tok.vocab_size} pieces, fewer than "
        f"--config.tokenizer_vocab_size=2000; training with {tok.vocab_size} (a larger corpus gives more)."
    )
    assert (
        loop.vocabulary_note(
            small_config(tokenizer="sentencepiece", tokenizer_vocab_size=tok.vocab_size), tok
        )
        is None
    )


def test_the_loop_trains_a_sentencepiece_tokenizer_on_the_corpus(tmp_path):
    from retnet_jax.training import loop
    from tests.conftest import small_config

    for i, text in enumerate(_corpus(40)):
        (tmp_path / f"doc{i}.txt").write_text(text)
    config = small_config(
        tokenizer="sentencepiece",
        tokenizer_vocab_size=300,
        dataset=f"text:{tmp_path}",
        data_dir=str(tmp_path / "tfds"),
    )
    tok = loop._make_tokenizer(config)
    assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer) and tok.decode(tok.encode(SAMPLE)) == SAMPLE
