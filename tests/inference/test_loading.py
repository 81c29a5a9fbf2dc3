"""Loading a trained model for generation: the model from the checkpoint's own config, the parameters
alone, no Trainer; nothing written (a read-only workdir serves); a damaged checkpoint named with the step to
load instead."""

import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from retnet_jax.inference import loading
from retnet_jax.models import DecoderLM, RetNetConfig
from retnet_jax.training.checkpoints import CorruptCheckpointError


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


def _listing(root):
    """Every path under ``root`` with its size, mode and modification time (ns)."""
    entries = {}
    for directory, folders, files in os.walk(root):
        for name in [".", *folders, *files]:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            entries[os.path.relpath(path, root)] = (info.st_size, info.st_mode, info.st_mtime_ns)
    return entries


def test_load_never_writes(trained, tmp_path):
    """From a read-only copy (chmod -R a-w; as root chmod does not stop writes, so the before/after listing
    of every path with its size, mode and mtime is the check): the latest step and a given one load."""
    workdir, _, state = trained
    copy = tmp_path / "ro"
    shutil.copytree(workdir, copy)
    subprocess.run(["chmod", "-R", "a-w", str(copy)], check=True)
    try:
        before = _listing(copy)
        _, variables, _ = loading.load(str(copy))
        for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        loading.load(checkpoint=str(copy / "checkpoints" / "6"))
        assert _listing(copy) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)


def test_a_damaged_checkpoint_names_the_file_and_the_step_to_load(trained, tmp_path):
    workdir, _, _ = trained
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "12" / "state")
    with pytest.raises(CorruptCheckpointError) as info:
        loading.load(str(copy))
    lines = str(info.value).splitlines()
    assert lines == [
        f"Checkpoint step 12 in {copy}/checkpoints is damaged: state/: missing",
        f"Step 9, the previous one, reads: pass --checkpoint={copy}/checkpoints/9",
    ]
    (copy / "checkpoints" / "9" / "model" / "metadata").write_text("{")  # step 9 too: 6 is offered
    with pytest.raises(CorruptCheckpointError, match=f"pass --checkpoint={copy}/checkpoints/6$"):
        loading.load(str(copy))
    with pytest.raises(CorruptCheckpointError, match="step 9 .* model/metadata: "):
        loading.load(checkpoint=str(copy / "checkpoints" / "9"))
    assert sorted(os.listdir(copy / "checkpoints")) == ["12", "6", "9"]  # nothing moved by a reader
