"""Loading a trained model for generation: the architecture, the parameters and the tokenizer of a checkpoint.

    model, variables, tokenizer = load(workdir)                      # its latest checkpoint
    model, variables, tokenizer = load(checkpoint="WORKDIR/checkpoints/300")

A checkpoint holds the resolved model config, so the model is rebuilt from it alone (no experiment
config, no optimizer); only the parameters are read. Nothing is written: the workdir may be read-only.
A damaged checkpoint raises ``CorruptCheckpointError`` naming the file and the earlier step to load
instead.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.models import config as config_lib
from retnet_jax.models.lm import DecoderLM
from retnet_jax.training import checkpoints as checkpoint_lib
from retnet_jax.training import tokenizers as tokenizer_lib

__all__ = ["load"]


def _locate(workdir: str | None, checkpoint: str | None) -> tuple[str, int | None]:
    if checkpoint is not None:
        path = os.path.abspath(os.path.expanduser(checkpoint)).rstrip("/")
        step_name = os.path.basename(path)
        if not step_name.isdigit():
            raise ValueError(
                f"--checkpoint must be a step directory such as WORKDIR/checkpoints/300; got {checkpoint}."
            )
        return os.path.dirname(os.path.dirname(path)), int(step_name)
    if workdir is not None:
        return os.path.abspath(os.path.expanduser(workdir)), None
    raise ValueError("Pass --workdir (latest checkpoint) or --checkpoint=WORKDIR/checkpoints/STEP.")


def load(workdir: str | None = None, *, checkpoint: str | None = None, dtype=None, **run_options):
    """Loads a trained model for generation.

    Args:
        workdir: a training workdir (its latest checkpoint is used), or
        checkpoint: a checkpoint step directory, e.g. ``WORKDIR/checkpoints/300``.
        dtype: the parameters' dtype; default the model's compute dtype when it is below 32 bits (bf16
            training → bf16 serving: half the bytes each decoding step reads), float32 otherwise.
        **run_options: ``DecoderLM`` attributes (mode, chunk_size, implementation, ...).

    Returns:
        (model, variables, tokenizer): the tokenizer is None for weights imported without one.

    Raises:
        FileNotFoundError: no checkpoint there. CorruptCheckpointError (a ValueError): a file of the
        checkpoint is damaged; the message names it and the previous step that reads. ValueError: a bad
        path or a checkpoint without a model config.
    """
    workdir, step = _locate(workdir, checkpoint)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"No checkpoints in {workdir}: train first with `retnet-train --workdir={workdir}`."
        )
    checkpoints = checkpoint_lib.Checkpoints(workdir, read_only=True)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoints in {workdir}: train first with `retnet-train --workdir={workdir}`."
            )
        if step is not None and step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {checkpoints.directory}; its steps are {steps}. "
                f"Pass --checkpoint={checkpoints.directory}/{steps[-1]} (the latest) or another of them."
            )
        step = steps[-1] if step is None else step
        try:
            return _load_step(checkpoints, step, dtype, run_options)
        except checkpoint_lib.CorruptCheckpointError as err:
            earlier = [s for s in reversed(steps) if s < step and checkpoints.readable(s) is None]
            if earlier:
                previous = checkpoints.step_directory(earlier[0])
                hint = f"Step {earlier[0]}, the previous one, reads: pass --checkpoint={previous}"
            else:
                hint = f"No earlier step reads; train again with `retnet-train --workdir={workdir}`."
            raise err.with_hint(hint) from None
    finally:
        checkpoints.close()


def _load_step(checkpoints: checkpoint_lib.Checkpoints, step: int, dtype, run_options):
    architecture = config_lib.from_dict(checkpoints.restore_model_config(step))
    saved_tokenizer = checkpoints.restore_tokenizer(step)
    # Weights imported without a tokenizer (retnet-convert) serve token ids only.
    tokenizer = (
        None if saved_tokenizer.get("kind") == "none" else tokenizer_lib.tokenizer_from_dict(saved_tokenizer)
    )
    model = DecoderLM(architecture, **run_options)
    dtype = jnp.dtype(
        dtype or (architecture.compute_dtype if architecture.compute_dtype.itemsize < 4 else jnp.float32)
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=device
        ),
        abstract,
    )
    params = checkpoints.restore_params(abstract, step=step)
    return model, {"params": params}, tokenizer
