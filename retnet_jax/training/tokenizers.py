"""Tokenizers behind one small interface: bytes, SentencePiece or a Hugging Face tokenizer.json.

Every tokenizer has ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``encode(text)`` (no special
ids added: the data pipeline frames each document with BOS/EOS itself), ``decode(ids)`` (special and
out-of-range ids are skipped, broken UTF-8 becomes U+FFFD, so sampling never crashes on decode) and
``to_dict()``: a JSON-serializable, self-contained description (model files embedded) that a
checkpoint can carry and ``tokenizer_from_dict`` turns back into an identical tokenizer.

    tok = build_tokenizer("byte", texts=None, vocab_size=0)
    tok = build_tokenizer("sentencepiece", texts=lambda: corpus_docs, vocab_size=4096)
    tok = build_tokenizer("/path/spm.model", texts=None, vocab_size=0)
    tok = build_tokenizer("/path/tokenizer.json", texts=None, vocab_size=0)
"""

from __future__ import annotations

import abc
import base64
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm
import tokenizers

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "tokenizer_from_dict",
    "train_sentencepiece",
]


class Tokenizer(abc.ABC):
    """The interface the data pipeline, training and sampling rely on."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the token ids of ``text``, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of ``ids``; special and out-of-range ids are skipped, never an error."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serializable description that ``tokenizer_from_dict`` restores."""

    def __reduce__(self):
        # Pickle through to_dict: grain worker processes receive the tokenizer this way, and the
        # native SentencePiece / HF objects are rebuilt from the embedded model in each worker.
        return tokenizer_from_dict, (self.to_dict(),)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then PAD = 256, BOS = 257, EOS = 258.

    Needs no training and no file, handles every string, and keeps the vocabulary tiny: the default.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "byte"}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, given as the bytes of its ``.model`` file.

    Args:
        model_proto: the serialized model (the content of a ``.model`` file).
        bos_token, eos_token, pad_token: pieces to use as BOS / EOS / PAD instead of the model's own
            (``None``: the model's).

    Raises:
        ValueError: the model has no BOS or EOS piece (both are needed to frame documents), or a
            given piece is not in the model.
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self._model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self._spellings = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self.bos_id = self._piece_id("BOS", bos_token, self._sp.bos_id())
        self.eos_id = self._piece_id("EOS", eos_token, self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model has bos_id={self.bos_id}, eos_id={self.eos_id}; both must "
                "exist (>= 0) to frame documents. Train it with bos_id and eos_id set (e.g. with "
                "train_sentencepiece), or name pieces to use with --config.tokenizer_bos / _eos."
            )
        # Packing never pads; a model without a pad piece pads (e.g. batched prompts) with EOS.
        pad_id = self._piece_id("PAD", pad_token, self._sp.pad_id())
        self.pad_id = pad_id if pad_id >= 0 else self.eos_id
        # Unknown never comes out of a byte-fallback model, but other models decode it as " ⁇ ".
        self._specials = {self.pad_id, self.bos_id, self.eos_id, self._sp.unk_id()}

    def _piece_id(self, what: str, piece: str | None, default: int) -> int:
        if piece is None:
            return default
        index = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(index) != piece:  # unknown pieces map to the unknown id
            raise ValueError(
                f"SentencePiece model has no piece {piece!r} to use as {what}; set "
                f"--config.tokenizer_{what.lower()} to one of its pieces, or '' for the model's own."
            )
        return index

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: str | None) -> SentencePieceTokenizer:
        """Loads a ``.model`` file; ``kwargs`` as in the constructor."""
        with open(path, "rb") as f:
            return cls(f.read(), **kwargs)

    @property
    def model_proto(self) -> bytes:
        """The serialized model (what a ``.model`` file holds)."""
        return self._model_proto

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        # SentencePiece raises on out-of-range ids; a half-trained model may sample any id.
        kept = [int(i) for i in ids if 0 <= i < self.vocab_size and i not in self._specials]
        return self._sp.decode(kept)

    def to_dict(self) -> dict[str, Any]:
        spellings = {name: value for name, value in self._spellings.items() if value is not None}
        return {
            "kind": "sentencepiece",
            "model": base64.b64encode(self._model_proto).decode("ascii"),
            **spellings,
        }


def _chunks(texts: Iterable[str], max_chars: int, chunk_chars: int) -> Iterator[str]:
    """Cuts documents into runs of whole lines of about ``chunk_chars`` characters.

    SentencePiece trains on "sentences" of bounded length; whole-line chunks keep the newlines
    inside them, so pieces like ``"):\\n"`` can be learned (per-line input never shows a newline).
    """
    seen = 0
    for text in texts:
        buffer = ""
        for line in text.splitlines(keepends=True):
            if buffer and len(buffer) + len(line) > chunk_chars:
                yield buffer
                buffer = ""
            buffer += line
        if buffer:
            yield buffer
        seen += len(text)
        if seen >= max_chars:
            return


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    *,
    max_chars: int = 50_000_000,
    num_threads: int = 4,
) -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE SentencePiece model in memory on ``texts``.

    Deterministic: the same texts give a byte-identical model on every machine. BPE (not unigram)
    because its pieces do not depend on the thread count and it trains several times faster.
    Normalization is off and whitespace is kept as is, so code and indentation round-trip exactly;
    byte fallback makes every string encodable. Ids: pad 0, unk 1, bos 2, eos 3.

    Args:
        texts: documents to learn from; read in order until ``max_chars`` characters.
        vocab_size: pieces in the model, including the 256 byte pieces and 4 specials.
        max_chars: stop reading ``texts`` after this many characters (bounds time and memory).
        num_threads: trainer threads; fixed rather than the machine's core count because it is
            recorded in the model file.

    Returns:
        The trained tokenizer.

    Raises:
        ValueError: ``vocab_size`` is too small for the byte pieces, or ``texts`` is empty.
    """
    min_vocab = 256 + 4 + 1
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-fallback SentencePiece model: it "
            f"needs the 256 byte pieces and 4 specials; use at least {min_vocab} (e.g. 4096)."
        )
    chunks = list(_chunks(texts, max_chars, chunk_chars=4000))
    if not chunks:
        raise ValueError("train_sentencepiece got no text: `texts` yielded nothing non-empty.")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=16384,  # bytes; chunks are ~4000 characters of up to 4 bytes
        # A small corpus may not support `vocab_size` pieces; take what it has instead of failing.
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model.getvalue())


# Special-token spellings tried in order when a tokenizer.json does not say which is which.
_BOS_NAMES = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|padding|>", "<|pad|>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (the JSON a ``tokenizer.json`` file holds).

    Args:
        tokenizer_json: the serialized tokenizer.
        bos_token, eos_token, pad_token: the special tokens' spellings; ``None`` picks the first
            of the usual spellings (``<s>``, ``</s>``, ``<pad>``, ``<|endoftext|>``, ...) found in
            the vocabulary. Without a pad token, padding uses EOS.

    Raises:
        ValueError: no BOS or EOS token can be found.
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self._json = tokenizer_json
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = self._find("BOS", bos_token, _BOS_NAMES)
        self.eos_token = self._find("EOS", eos_token, _EOS_NAMES)
        self.bos_id = self._tok.token_to_id(self.bos_token)
        self.eos_id = self._tok.token_to_id(self.eos_token)
        try:
            self.pad_token = self._find("PAD", pad_token, _PAD_NAMES)
        except ValueError:
            if pad_token is not None:
                raise
            self.pad_token = self.eos_token
        self.pad_id = self._tok.token_to_id(self.pad_token)

    def _find(self, what: str, given: str | None, names: Sequence[str]) -> str:
        candidates = (given,) if given is not None else names
        for name in candidates:
            if self._tok.token_to_id(name) is not None:
                return name
        raise ValueError(
            f"tokenizer.json has no {what} token among {list(candidates)}. Pass its spelling "
            f"(--config.tokenizer_{what.lower()}=..., or HFTokenizer(json, {what.lower()}_token=...)), "
            "or add one to the tokenizer."
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: str | None) -> HFTokenizer:
        """Loads a ``tokenizer.json`` file; ``kwargs`` as in the constructor."""
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), **kwargs)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        kept = [int(i) for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(kept, skip_special_tokens=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "huggingface",
            "tokenizer_json": self._json,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuilds a tokenizer from ``Tokenizer.to_dict()``.

    Raises:
        ValueError: ``d`` is not a tokenizer description.
    """
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        spellings = {name: d.get(name) for name in ("bos_token", "eos_token", "pad_token")}
        return SentencePieceTokenizer(base64.b64decode(d["model"]), **spellings)
    if kind == "huggingface":
        return HFTokenizer(
            d["tokenizer_json"],
            bos_token=d["bos_token"],
            eos_token=d["eos_token"],
            pad_token=d["pad_token"],
        )
    raise ValueError(
        f"Not a tokenizer description (kind={kind!r}); expected the dict of Tokenizer.to_dict() "
        "with kind 'byte', 'sentencepiece' or 'huggingface'."
    )


def build_tokenizer(
    spec: str,
    *,
    texts: Callable[[], Iterable[str]] | None,
    vocab_size: int,
    bos: str = "",
    eos: str = "",
    pad: str = "",
) -> Tokenizer:
    """Makes the tokenizer a config names.

    Args:
        spec: ``"byte"``; ``"sentencepiece"`` (train one on ``texts()``); or the path of a
            SentencePiece ``.model`` file or of a Hugging Face ``tokenizer.json`` (``~`` and
            ``$VARS`` expanded).
        texts: returns the training documents; only called for ``"sentencepiece"``.
        vocab_size: vocabulary of a trained SentencePiece model (other kinds fix their own).
        bos, eos, pad: spellings of the special tokens in a tokenizer file (e.g. ``"[BOS]"``);
            ``""`` finds them (a ``tokenizer.json``: the usual spellings; a ``.model``: its own).

    Returns:
        The tokenizer.

    Raises:
        ValueError: ``spec`` is none of the accepted forms, names a missing file, or special
            spellings are given for a tokenizer that has fixed ones (byte, trained SentencePiece).
    """
    spellings = {"bos_token": bos or None, "eos_token": eos or None, "pad_token": pad or None}
    if spec in ("byte", "sentencepiece") and any(spellings.values()):
        given = ", ".join(f"tokenizer_{k[:3]}={v!r}" for k, v in spellings.items() if v)
        raise ValueError(
            f"{given} names special tokens of a tokenizer file, but tokenizer={spec!r} has its own "
            "fixed ones; set them to '' or give a tokenizer.json / .model path."
        )
    spec = os.path.expandvars(os.path.expanduser(spec))
    if spec == "byte":
        return ByteTokenizer()
    if spec == "sentencepiece":
        if texts is None:
            raise ValueError(
                "tokenizer='sentencepiece' trains a model on the corpus, so build_tokenizer needs "
                "texts=<callable returning the training documents>."
            )
        return train_sentencepiece(texts(), vocab_size)
    accepted = (
        "'byte', 'sentencepiece' (train on the corpus), a path to a SentencePiece '.model' file, "
        "or a path to a Hugging Face 'tokenizer.json' (any '*.json')"
    )
    if spec.endswith((".model", ".json")):
        if not os.path.isfile(spec):
            raise ValueError(f"Tokenizer file {spec!r} does not exist. Accepted: {accepted}.")
        if spec.endswith(".model"):
            return SentencePieceTokenizer.from_file(spec, **spellings)
        return HFTokenizer.from_file(spec, **spellings)
    raise ValueError(f"Unknown tokenizer {spec!r}. Accepted: {accepted}.")


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    max_chars: int = 200_000_000,
) -> HFTokenizer:
    """Trains a byte-level BPE tokenizer (Hugging Face ``tokenizers``) on ``texts``.

    Byte-level: every string encodes (the 256 bytes are in the vocabulary) and decodes back exactly, with
    whitespace, indentation and newlines kept. The pre-tokenizer splits words, numbers, punctuation and
    runs of whitespace as GPT-2's does, so no piece spans two words. Specials: ``<pad>`` 0, ``<s>`` 1
    (BOS), ``</s>`` 2 (EOS); ``encode`` adds none of them (the data pipeline frames documents itself).

    Args:
        texts: documents to learn from, read in order until ``max_chars`` characters.
        vocab_size: entries of the vocabulary, the 256 bytes and 3 specials included (e.g. 8192).
        min_frequency: a merge must occur at least this often.
        max_chars: stop reading ``texts`` after this many characters (bounds time and memory).

    Returns:
        The trained tokenizer; ``to_dict()["tokenizer_json"]`` is the content of a ``tokenizer.json``.

    Raises:
        ValueError: ``vocab_size`` is too small for the bytes and specials, or ``texts`` is empty.
    """
    specials = ["<pad>", "<s>", "</s>"]
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs the {len(alphabet)} bytes "
            f"and {len(specials)} specials; use at least {len(alphabet) + len(specials) + 1} (e.g. 8192)."
        )

    read = {"chars": 0}

    def limited() -> Iterator[str]:
        for text in texts:
            if read["chars"] >= max_chars:
                return
            if text:
                read["chars"] += len(text)
                yield text

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(limited(), trainer)
    if not read["chars"]:
        raise ValueError("train_bpe got no text: `texts` yielded nothing non-empty.")
    return HFTokenizer(tok.to_str(), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
