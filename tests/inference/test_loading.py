"""Loading a trained model for generation: the model from the checkpoint's own config, the parameters
alone, no Trainer."""

import os

import jax
import numpy as np
import pytest

from retnet_jax.inference import loading
from retnet_jax.models import DecoderLM, RetNetConfig


def test_load_restores_the_trained_params(trained):
    workdir, config, state = trained
    model, variables, tokenizer = loading.load(workdir)
    assert isinstance(model, DecoderLM) and model.config == RetNetConfig.preset("tiny", vocab_size=264)
    assert tokenizer.vocab_size == 259
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # An earlier step, and run options for the served model.
    model, variables, _ = loading.load(checkpoint=os.path.join(workdir, "checkpoints", "6"), mode="chunkwise")
    assert model.mode == "chunkwise"
    assert not all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state.params), strict=True)
    )


def test_bad_places_are_named(trained):
    workdir, _, _ = trained
    with pytest.raises(FileNotFoundError, match="No checkpoints in"):
        loading.load(os.path.join(workdir, "tensorboard"))
    with pytest.raises(ValueError, match="--checkpoint must be a step directory"):
        loading.load(checkpoint=os.path.join(workdir, "checkpoints"))
    with pytest.raises(ValueError, match="Pass --workdir"):
        loading.load()
