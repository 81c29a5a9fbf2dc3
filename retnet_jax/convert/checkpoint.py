"""Writing converted weights as a checkpoint of this library (what ``retnet-convert`` produces).

One function, ``write_checkpoint``, is the only place that knows the checkpoint format: a step-0
checkpoint holding the parameters (no optimizer state: fine-tuning starts a fresh optimizer), the
resolved model config and the tokenizer. The workdir appears complete or not at all.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from retnet_jax.convert import files
from retnet_jax.models import RetNetConfig

__all__ = ["NO_TOKENIZER", "write_checkpoint"]

# Stored when the source has no tokenizer: generation needs one given later.
NO_TOKENIZER = {"kind": "none"}


class _NoDataPosition:
    """Converted weights have consumed no training data: the saved data position is empty."""

    def get_state(self) -> None:
        return None


def write_checkpoint(workdir: str, model_config: RetNetConfig, params: Any, tokenizer) -> str:
    """Writes ``params`` as step 0 of a new workdir; returns the workdir's absolute path.

    Args:
        workdir: a directory that does not exist yet or is empty.
        model_config: the resolved model config (every architecture field), stored as a dict.
        params: the parameter tree (``variables["params"]``).
        tokenizer: a ``training.tokenizers.Tokenizer``, or None when the source has none.

    Raises:
        ValueError: ``workdir`` is not empty or cannot be written.
    """
    from retnet_jax.training.checkpoints import Checkpoints
    from retnet_jax.training.trainer import TrainState, default_config

    workdir = os.path.abspath(os.path.expanduser(workdir))
    experiment = default_config().to_dict()
    experiment.update(model="converted", model_config=model_config.to_dict(), dtype=model_config.dtype)
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
                tokenizer=NO_TOKENIZER if tokenizer is None else tokenizer.to_dict(),
                force=True,
            )
            checkpoints.wait()
        finally:
            checkpoints.close()
    return workdir
