"""The training loop around the step: data, evaluation, checkpoints, logs, preemption, the final sample.

``train_and_evaluate(config, workdir)`` runs a whole experiment and resumes from the latest checkpoint in
``workdir``: the losses after a restart equal those of an uninterrupted run bit for bit (same data
position, same parameters, a step's dropout key derived from the step number).
"""

from __future__ import annotations

import math
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from retnet_jax.models.config import from_dict as model_from_dict
from retnet_jax.training import checkpoints as checkpoint_lib
from retnet_jax.training import data as data_lib
from retnet_jax.training import flops as flops_lib
from retnet_jax.training import reporting
from retnet_jax.training import tokenizers as tokenizer_lib
from retnet_jax.training.sharding import make_mesh
from retnet_jax.training.trainer import Trainer, TrainState, model_config, model_vocab_size

__all__ = ["evaluate", "train_and_evaluate", "validate"]


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """Errors that name the flag, before any compute."""
    for name in ("steps", "seq_len", "batch_size", "log_every", "eval_every", "checkpoint_every"):
        if config[name] < 1:
            raise ValueError(f"--config.{name} must be >= 1; got {config[name]}.")
    if config.grad_accum_steps < 1:
        raise ValueError(f"--config.grad_accum_steps must be >= 1; got {config.grad_accum_steps}.")
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = data_parallel * config.grad_accum_steps
    if config.batch_size % rows:
        raise ValueError(
            f"--config.batch_size={config.batch_size} is not divisible by the data-parallel size "
            f"{data_parallel} (mesh data × fsdp = {mesh.shape['data']} × {mesh.shape['fsdp']})"
            + (f" times grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else "")
            + f"; use a multiple of {rows}."
        )


def _preemption_check(checkpoints: checkpoint_lib.Checkpoints):
    """A function step → whether to save and stop now.

    One process: SIGTERM sets a flag the loop reads after each step. Several processes: they must stop
    at the same step, so the signal is left to JAX's preemption service and every process asks the
    checkpoint manager whether the common sync point is reached.
    """
    if jax.process_count() > 1:
        return checkpoints.reached_preemption
    flag = {"preempted": False}

    def handler(signum, frame):
        flag["preempted"] = True

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the default handler
        pass
    return lambda step: flag["preempted"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the experiment ``config`` in ``workdir``; returns the final state (its step is
    below ``config.steps`` when the run was preempted: it saved and stopped early)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    checkpoints = checkpoint_lib.Checkpoints(
        workdir, every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    try:
        return _train(config, workdir, checkpoints)
    finally:
        checkpoints.close()


def _train(config, workdir, checkpoints):
    """The loop; returns the last state."""
    config_dict = config.to_dict()
    mesh = make_mesh(config.mesh)
    validate(config, mesh)
    resumed = checkpoints.latest_step()
    # A workdir written by retnet-convert holds imported weights: fine-tune them (their architecture and
    # tokenizer come from the checkpoint; the optimizer starts fresh). Its later checkpoints say so too.
    imported = checkpoints.restore_config().get("imported_from") if resumed is not None else None
    fresh_import = imported is not None and resumed == 0
    if not fresh_import:
        checkpoints.check_compatible(config_dict)
    if resumed is None:
        tokenizer = data_lib.make_tokenizer(config)
    else:
        tokenizer = _restore_tokenizer(checkpoints)
    if imported is None:
        architecture = model_config(config, model_vocab_size(tokenizer))
    else:
        _check_no_overrides(config, imported)
        architecture = model_from_dict(checkpoints.restore_model_config())
        config_dict["imported_from"] = imported
    vocab_size = architecture.vocab_size
    if not fresh_import:
        checkpoints.check_compatible(config_dict, model=architecture.to_dict())
    trainer = Trainer(config, architecture, mesh)
    train_data = data_lib.make_dataset(
        config, tokenizer, config.train_split, train=True, vocab_size=vocab_size
    )
    if resumed is None:
        state, start = trainer.init(config.seed), 0
    elif fresh_import:
        params = checkpoints.restore_params(trainer.abstract_state.params, step=0)
        state, start = trainer.init_from_params(params), 0
    else:
        state = checkpoints.restore(trainer.abstract_state, data_iterator=train_data)
        start = int(state.step)

    reporter = reporting.Reporter(workdir, total_steps=config.steps, start_step=start)
    name = f"imported from {imported}" if imported else f"'{config.model}'"
    reporter.message(
        f"{architecture.arch} {name}: {trainer.num_params / 1e6:.2f}M parameters, vocab {vocab_size} "
        f"({type(tokenizer).__name__}); mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); "
        + (
            "fine-tuning the imported weights with a fresh optimizer"
            if fresh_import
            else f"resumed at step {start}"
            if resumed is not None
            else "starting from scratch"
        )
    )
    preempted = _preemption_check(checkpoints)
    tokens_per_step = config.batch_size * config.seq_len
    peak = flops_lib.device_peak_flops()
    flops_per_step = trainer.train_flops_per_token() * tokens_per_step
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_good = resumed
    clock, steps_timed = time.perf_counter(), 0

    def flush() -> dict[str, float] | None:
        """Fetches the buffered step metrics (one sync), stopping on a non-finite loss."""
        nonlocal pending
        fetched = jax.device_get(pending)
        pending = []
        for step, metrics in fetched:
            if not math.isfinite(float(metrics["loss"])):
                checkpoints.wait()
                raise FloatingPointError(
                    f"Training stopped: the loss became {float(metrics['loss'])} at step {step}. "
                    f"The last good checkpoint is step {last_good} in {checkpoints.directory} "
                    f"(nothing later was saved). Lower --config.learning_rate or set --config.z_loss "
                    f"and run again to resume from it."
                )
        return {k: float(v) for k, v in fetched[-1][1].items()} if fetched else None

    step = start
    try:
        if resumed is None:  # the starting point of the validation curve
            reporter.eval(0, evaluate(trainer, state.params, tokenizer, config, vocab_size))
            clock = time.perf_counter()
        while step < config.steps:
            batch = trainer.global_batch(next(train_data))
            state, metrics = trainer.train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            reporter.advance()
            if steps_timed == 0 and step == start + 1:
                jax.block_until_ready(metrics)
                reporter.message(
                    f"First step (compilation included) took {time.perf_counter() - clock:.1f}s."
                )
                clock = time.perf_counter()
            else:
                steps_timed += 1
            stop = preempted(step)
            save = step == config.steps or stop or checkpoints.should_save(step)
            evaluate_now = step % config.eval_every == 0 or step == config.steps
            if step % config.log_every == 0 or save or evaluate_now:
                latest = flush()
                elapsed = time.perf_counter() - clock
                if steps_timed:
                    latest["tokens_per_sec"] = tokens_per_step * steps_timed / elapsed
                    if peak:
                        latest["mfu"] = flops_per_step * steps_timed / elapsed / (peak * jax.device_count())
                reporter.train(step, latest)
            if evaluate_now:
                reporter.eval(step, evaluate(trainer, state.params, tokenizer, config, vocab_size))
            if save:
                checkpoints.save(
                    step,
                    state,
                    data_iterator=train_data,
                    config=config_dict,
                    model=architecture.to_dict(),
                    tokenizer=tokenizer.to_dict(),
                    force=True,
                )
                last_good = step
            if stop:
                checkpoints.wait()
                reporter.message(f"Preempted: saved step {step}; run again to resume.")
                return state
            if step % config.log_every == 0 or save or evaluate_now:
                clock, steps_timed = time.perf_counter(), 0
        checkpoints.wait()
    finally:
        reporter.close()
        train_data.close()
    return state


def _restore_tokenizer(checkpoints: checkpoint_lib.Checkpoints) -> tokenizer_lib.Tokenizer:
    saved = checkpoints.restore_tokenizer()
    if saved.get("kind") == "none":
        raise ValueError(
            f"The model in {checkpoints.directory} was imported without a tokenizer; convert it again with "
            "retnet-convert --tokenizer=PATH (its tokenizer.json or .model)."
        )
    return tokenizer_lib.tokenizer_from_dict(saved)


def _check_no_overrides(config: ml_collections.ConfigDict, imported: str):
    """Imported weights fix the architecture: a field asked of it would be silently ignored."""
    asked = sorted(name for name, value in config.model_overrides.items() if value is not None)
    if asked:
        raise ValueError(
            f"This workdir fine-tunes a model imported from {imported}: its architecture comes from the "
            f"checkpoint, so --config.model_overrides ({', '.join(asked)}) cannot apply. Drop them."
        )


def evaluate(trainer: Trainer, params, tokenizer, config, vocab_size: int) -> float:
    """Mean cross-entropy over the first ``eval_batches`` batches of the validation split."""
    eval_data = data_lib.make_dataset(
        config, tokenizer, config.eval_split, train=False, vocab_size=vocab_size
    )
    losses = []
    try:
        for _ in range(config.eval_batches):
            try:
                local = next(eval_data)
            except StopIteration:
                if jax.process_count() > 1:
                    raise ValueError(
                        f"The validation split has fewer than --config.eval_batches="
                        f"{config.eval_batches} batches on process {jax.process_index()}; lower it."
                    ) from None
                break
            losses.append(trainer.eval_step(params, trainer.global_batch(local)))
    finally:
        eval_data.close()
    if not losses:
        raise ValueError(
            f"The validation split '{config.eval_split}' gives no full batch of "
            f"{config.batch_size}×{config.seq_len} tokens; lower --config.batch_size or seq_len."
        )
    return float(np.mean(jax.device_get(losses)))
