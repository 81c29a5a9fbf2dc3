"""Writing converted weights as a checkpoint of this library (what ``retnet-convert`` produces).

One function, ``write_checkpoint``, is the only place that knows the checkpoint format: a step-0
checkpoint holding the parameters (no optimizer state: fine-tuning starts a fresh optimizer), the
resolved model config and the tokenizer, with an experiment config that names the import
(``imported_from``), so ``retnet-train`` fine-tunes it and ``retnet-generate`` serves it. The workdir
appears complete or not at all.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from retnet_jax.convert import files
from retnet_jax.models import RetNetConfig

__all__ = ["NO_TOKENIZER", "convert_checkpoint", "find_tokenizer", "write_checkpoint"]

# Stored when the source has no tokenizer: generation needs one given later.
NO_TOKENIZER = {"kind": "none"}


class _NoDataPosition:
    """Converted weights have consumed no training data: the saved data position is empty."""

    def get_state(self) -> None:
        return None


def write_checkpoint(
    workdir: str, model_config: RetNetConfig, params: Any, tokenizer, *, imported_from: str = "weights"
) -> str:
    """Writes ``params`` as step 0 of a new workdir; returns the workdir's absolute path.

    Args:
        workdir: a directory that does not exist yet or is empty.
        model_config: the resolved model config (every architecture field), stored as a dict.
        params: the parameter tree (``variables["params"]``).
        tokenizer: a ``training.tokenizers.Tokenizer``, or None when the source has none.
        imported_from: where the weights came from (e.g. "fla:PATH"), recorded in the checkpoint.

    Raises:
        ValueError: ``workdir`` is not empty or cannot be written.
    """
    from retnet_jax.configs.default import get_config
    from retnet_jax.training.checkpoints import Checkpoints
    from retnet_jax.training.trainer import TrainState

    workdir = os.path.abspath(os.path.expanduser(workdir))
    experiment = get_config().to_dict()
    experiment["imported_from"] = imported_from
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.asarray, params), opt_state=None
    )
    with files.atomic_directory(workdir) as tmp:
        checkpoints = Checkpoints(tmp, every=1, keep=1, async_save=False)
        try:
            checkpoints.save(
                0,
                state,
                data_iterator=_NoDataPosition(),
                config=experiment,
                model=model_config.to_dict(),
                tokenizer=NO_TOKENIZER if tokenizer is None else tokenizer.to_dict(),
                force=True,
            )
            checkpoints.wait()
        finally:
            checkpoints.close()
    return workdir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # looked for beside the weights, in this order
SOURCES = ("fla", "torchscale")
_DOWNLOAD = ["*.json", "*.safetensors", "tokenizer.model"]


def find_tokenizer(directory: str) -> str | None:
    """The first of ``TOKENIZER_FILES`` in ``directory``, or None."""
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def convert_checkpoint(
    source: str,
    src: str,
    workdir: str,
    *,
    dtype=None,
    config: dict[str, Any] | None = None,
    tokenizer: str | None = None,
):
    """Converts an fla or torchscale checkpoint into a new workdir (what ``retnet-convert`` does).

    Args:
        source: "fla" or "torchscale".
        src: fla: a Hugging Face-format directory or hub id; torchscale: a state dict file.
        workdir: a new (or empty) directory for the checkpoint.
        dtype: fla: the parameter dtype (None: the checkpoint's).
        config: torchscale: RetNetConfig fields the state dict cannot tell (see ``load_torchscale``).
        tokenizer: a tokenizer.json or SentencePiece .model; None looks for ``TOKENIZER_FILES`` beside
            the weights.

    Returns:
        (workdir, model, tokenizer or None).

    Raises:
        ValueError: a bad source, a tokenizer larger than the model's vocabulary, or a workdir that is
            not new or not writable (checked before any weight is read).
    """
    from retnet_jax.convert.fla import load_fla
    from retnet_jax.convert.torchscale import load_torchscale
    from retnet_jax.training import tokenizers

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}.")
    workdir = files.check_new_directory(workdir)
    if source == "fla":
        if config:
            raise ValueError("A config override is for torchscale state dicts; fla's config.json says all.")
        src = files.resolve_source(src, _DOWNLOAD)
        model, variables = load_fla(src, dtype=dtype)
        beside = src
    else:
        if dtype is not None:
            config = {**(config or {}), "dtype": dtype, "param_dtype": dtype}
        model, variables = load_torchscale(src, config=config)
        beside = os.path.dirname(os.path.abspath(os.path.expanduser(src)))
    tokenizer = tokenizer or find_tokenizer(beside)
    tok = None
    if tokenizer is not None:
        tok = tokenizers.build_tokenizer(tokenizer, texts=None, vocab_size=0)
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer {tokenizer} has {tok.vocab_size} tokens but the model only "
                f"{model.config.vocab_size} embeddings: it is not this model's tokenizer."
            )
    write_checkpoint(workdir, model.config, variables["params"], tok, imported_from=f"{source}:{src}")
    return workdir, model, tok
