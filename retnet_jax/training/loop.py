"""The training loop around the step: data, evaluation, checkpoints, logs, stopping early, the summary.

``train_and_evaluate(config, workdir)`` runs a whole experiment and resumes from the newest checkpoint in
``workdir`` that restores: the losses after a restart equal those of an uninterrupted run bit for bit (same
data position, same parameters, a step's dropout key derived from the step number). A damaged checkpoint
is set aside as ``checkpoints/STEP.corrupt-ITEM`` (kept, never deleted) and the one before it is used, with
a line saying which step was skipped and why.

Everything that can be refused is checked before the workdir is touched: config values and run options,
the mesh, the dataset (a catalog dataset that would need a download with no network fails in seconds),
the tokenizer, a resumed run's compatibility and learning-rate schedule, and the first evaluation. A
refused run leaves no folder behind.

SIGTERM (preemption) and a first Ctrl-C (SIGINT) save a checkpoint after the current step and return the
state early; a second Ctrl-C exits at once with status 130, without saving.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from retnet_jax.models.config import from_dict as model_from_dict
from retnet_jax.nn import attention as attention_lib
from retnet_jax.nn import remat as remat_lib
from retnet_jax.ops import dispatch
from retnet_jax.training import checkpoints as checkpoint_lib
from retnet_jax.training import corpus, optim, reporting, stopping
from retnet_jax.training import data as data_lib
from retnet_jax.training import flops as flops_lib
from retnet_jax.training import tokenizers as tokenizer_lib
from retnet_jax.training.sharding import make_mesh
from retnet_jax.training.trainer import ARCHS, Trainer, TrainState, model_config, model_vocab_size

__all__ = ["SCHEDULE_KEYS", "TRAINING_MODES", "evaluate", "train_and_evaluate", "validate", "vocabulary_note"]

TRAINING_MODES = ("parallel", "chunkwise")
# Fields that shape the learning-rate schedule: a resumed run must keep them (allow_schedule_change).
SCHEDULE_KEYS = ("schedule", "learning_rate", "warmup_steps", "end_learning_rate_factor", "steps")


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """Errors that name the flag, before any compute: sizes, run options, model, optimizer, batch split."""
    for name in (
        "steps",
        "seq_len",
        "batch_size",
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_checkpoints",
        "grad_accum_steps",
    ):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--config.{name} must be an integer >= 1; got {value!r}.")
    _validate_run_options(config)
    model_config(config, vocab_size=256)  # the preset and overrides (the tokenizer fixes the vocabulary)
    optim.make_optimizer(config)  # the schedule and its numbers
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = data_parallel * config.grad_accum_steps
    if config.batch_size % rows:
        raise ValueError(
            f"--config.batch_size={config.batch_size} is not divisible by the data-parallel size "
            f"{data_parallel} (mesh data × fsdp = {mesh.shape['data']} × {mesh.shape['fsdp']})"
            + (f" times grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else "")
            + f"; use a multiple of {rows}."
        )


def _validate_run_options(config: ml_collections.ConfigDict):
    if config.arch not in ARCHS:
        raise ValueError(f"--config.arch must be one of {ARCHS}; got {config.arch!r}.")
    if config.mode not in TRAINING_MODES:
        raise ValueError(f"--config.mode must be one of {TRAINING_MODES} for training; got {config.mode!r}.")
    chunk = config.chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"--config.chunk_size must be an integer >= 1 (e.g. 64); got {chunk!r}.")
    choices = dispatch.IMPLEMENTATIONS if config.arch == "retnet" else attention_lib.IMPLEMENTATIONS
    if config.implementation not in choices:
        raise ValueError(
            f"--config.implementation must be one of {choices} for arch={config.arch!r}; "
            f"got {config.implementation!r}."
        )
    if config.remat != "auto":  # "auto": the Trainer compiles the policies and picks (training.remat_choice)
        remat_lib.resolve(config.remat, "--config.remat")
    for name in ("scan_layers", "allow_schedule_change"):
        if not isinstance(config.get(name, False), bool):
            raise ValueError(f"--config.{name} must be True or False; got {config[name]!r}.")


@dataclasses.dataclass
class _Setup:
    """What training starts from: a restored checkpoint (``resumed``), imported weights (``imported``,
    step 0 of a ``retnet-convert`` workdir: a fresh optimizer), or a fresh initialization."""

    tokenizer: tokenizer_lib.Tokenizer
    trainer: Trainer
    train_data: Any
    state: TrainState
    config_dict: dict[str, Any]  # the experiment config saved with each checkpoint
    resumed: int | None
    imported: str | None
    skipped: list[checkpoint_lib.CorruptCheckpointError]
    notes: list[str]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the experiment ``config`` in ``workdir``; returns the final state (its step is
    below ``config.steps`` when the run was stopped early by SIGTERM or Ctrl-C: it saved and returned).

    A workdir written by ``retnet-convert`` holds imported weights at step 0: they are fine-tuned (their
    architecture and tokenizer come from the checkpoint; the optimizer starts fresh).

    Raises:
        ValueError: a refused config, dataset or workdir (nothing is created then).
        ConnectionError: a catalog dataset to download with no network.
        FloatingPointError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    started = time.perf_counter()
    workdir = os.path.abspath(os.path.expandvars(os.path.expanduser(workdir)))
    mesh = make_mesh(config.mesh)
    validate(config, mesh)
    checkpoint_lib.check_can_write(workdir)
    notes = corpus.check(config.dataset, data_dir=config.data_dir or None)
    with contextlib.closing(checkpoint_lib.Checkpoints(workdir, read_only=True)) as reader:
        setup = _setup(config, mesh, reader, notes)
    try:
        return _train(config, workdir, setup, started)
    finally:
        setup.train_data.close()


def _make_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
    """The tokenizer ``config.tokenizer`` names; special-token spellings apply to tokenizer files."""
    specials = {"bos": config.tokenizer_bos, "eos": config.tokenizer_eos, "pad": config.tokenizer_pad}
    if config.tokenizer not in ("byte", "sentencepiece"):
        return tokenizer_lib.build_tokenizer(config.tokenizer, texts=None, vocab_size=0, **specials)
    if any(specials.values()):  # refused: these tokenizers have fixed special tokens
        tokenizer_lib.build_tokenizer(config.tokenizer, texts=None, vocab_size=0, **specials)
    return data_lib.make_tokenizer(config)


def vocabulary_note(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer) -> str | None:
    """A line saying that a SentencePiece model trained on the corpus has fewer pieces than asked.

    A corpus supports only so many merges, so a small one gives fewer pieces than asked. The run goes on
    with what the corpus gives (refusing would make every small corpus fail) and says so.
    """
    if config.tokenizer != "sentencepiece" or tokenizer.vocab_size >= config.tokenizer_vocab_size:
        return None
    return (
        f"SentencePiece: the corpus yields {tokenizer.vocab_size} pieces, fewer than "
        f"--config.tokenizer_vocab_size={config.tokenizer_vocab_size}; training with {tokenizer.vocab_size} "
        "(a larger corpus gives more)."
    )


def _setup(config, mesh, reader: checkpoint_lib.Checkpoints, notes: list[str]) -> _Setup:
    """Restores the newest checkpoint that reads (skipping damaged ones) or initializes a new state."""
    config_dict = config.to_dict()
    skipped: list[checkpoint_lib.CorruptCheckpointError] = []
    tokenizer = trainer = train_data = None
    try:
        for step in reversed(reader.all_steps()):
            try:
                saved = reader.restore_config(step)
                imported = saved.get("imported_from")
                fresh_import = imported is not None and step == 0
                if imported is not None:
                    _check_no_overrides(config, imported)
                    config_dict["imported_from"] = imported
                else:
                    reader.check_compatible(config_dict, step=step)
                if trainer is None:
                    tokenizer = _restore_tokenizer(reader, step)
                    architecture = (
                        model_from_dict(reader.restore_model_config(step))
                        if imported is not None
                        else model_config(config, model_vocab_size(tokenizer))
                    )
                    trainer = Trainer(config, architecture, mesh, log=_say)
                    train_data = _train_data(config, tokenizer, trainer)
                if fresh_import:
                    params = reader.restore_params(trainer.abstract_state.params, step=0)
                    state = trainer.init_from_params(params)
                else:
                    reader.check_compatible(config_dict, model=trainer.model_config.to_dict(), step=step)
                    note = _check_schedule(saved, config, step)
                    notes += [note] if note else []
                    state = reader.restore(trainer.abstract_state, step=step, data_iterator=train_data)
                return _Setup(
                    tokenizer, trainer, train_data, state, config_dict, step, imported, skipped, notes
                )
            except checkpoint_lib.CorruptCheckpointError as err:
                skipped.append(err)
        if tokenizer is None:
            tokenizer = _make_tokenizer(config)
            note = vocabulary_note(config, tokenizer)
            notes += [note] if note else []
        if trainer is None:
            trainer = Trainer(config, model_config(config, model_vocab_size(tokenizer)), mesh, log=_say)
            train_data = _train_data(config, tokenizer, trainer)
        state = trainer.init(config.seed)
        return _Setup(tokenizer, trainer, train_data, state, config_dict, None, None, skipped, notes)
    except BaseException:
        if train_data is not None:
            train_data.close()
        raise


def _restore_tokenizer(reader: checkpoint_lib.Checkpoints, step: int) -> tokenizer_lib.Tokenizer:
    saved = reader.restore_tokenizer(step)
    if saved.get("kind") == "none":
        raise ValueError(
            f"The model in {reader.directory} was imported without a tokenizer; convert it again with "
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


def _train_data(config, tokenizer, trainer):
    vocab = trainer.model_config.vocab_size
    return data_lib.make_dataset(config, tokenizer, config.train_split, train=True, vocab_size=vocab)


def _check_schedule(saved: dict[str, Any], config: ml_collections.ConfigDict, step: int) -> str | None:
    """Refuses a resumed run whose learning rate from ``step`` on would differ from the checkpoint's
    schedule (its length and shape are part of the run: raising ``steps`` re-stretches a cosine upward);
    with allow_schedule_change, returns a line saying what changes instead."""
    keys = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != config[k]]
    if not keys:
        return None
    before = optim.learning_rate_schedule(ml_collections.ConfigDict({**config.to_dict(), **saved}))
    after = optim.learning_rate_schedule(config)
    steps = np.arange(step, max(saved.get("steps", step), config.steps, step) + 1)
    old, new = np.asarray(before(steps)), np.asarray(after(steps))
    differ = np.flatnonzero(~np.isclose(old, new, rtol=1e-6, atol=0.0))
    if differ.size == 0:  # e.g. a longer constant schedule: the same learning rates
        return None
    first = differ[0]
    change = ", ".join(f"{k}={saved[k]!r} → {config[k]!r}" for k in keys)
    jump = f"the learning rate at step {steps[first]} would be {new[first]:.3g} instead of {old[first]:.3g}"
    if not config.allow_schedule_change:
        raise ValueError(
            f"Resuming step {step} with another learning-rate schedule ({change}): {jump}.\n"
            "The schedule is part of the run: resume with the checkpoint's values, or pass "
            "--config.allow_schedule_change=True to continue on the new schedule."
        )
    return f"Schedule changed on resume ({change}): {jump}."


def _agree_across_processes(setup: _Setup):
    """Every process must resume from the same step."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    steps = multihost_utils.process_allgather(np.asarray(setup.resumed or 0))
    if len(set(np.asarray(steps).tolist())) > 1:
        raise ValueError(
            f"The processes restored different checkpoints (steps {sorted(set(steps.tolist()))}): some "
            "cannot read a step that others can. Check that every host sees the same checkpoints folder."
        )


def _say(text: str):
    """Prints on the first process (before the progress bar exists)."""
    if jax.process_index() == 0:
        print(text, flush=True)


def _train(config, workdir: str, setup: _Setup, started: float) -> TrainState:
    """Sets damaged checkpoints aside, evaluates step 0 (a new run), creates the workdir's outputs and
    runs the steps."""
    trainer = setup.trainer
    _agree_across_processes(setup)
    if jax.process_index() == 0:
        for err in setup.skipped:
            moved = checkpoint_lib.set_aside(err)
            _say(
                f"Skipped checkpoint step {err.step}: {err.file}: {err.reason}; kept as "
                f"{os.path.relpath(moved, workdir)}."
            )
    if setup.skipped and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("retnet_jax: damaged checkpoints set aside")
    for note in setup.notes:
        _say(note)
    if setup.imported is not None and setup.resumed == 0:
        how = "fine-tuning the imported weights with a fresh optimizer"
    else:
        how = f"resumed at step {setup.resumed}" if setup.resumed is not None else "starting from scratch"
    name = f"imported from {setup.imported}" if setup.imported else f"'{config.model}'"
    _say(
        f"{trainer.model_config.arch} {name}: {trainer.num_params / 1e6:.2f}M parameters, vocab "
        f"{trainer.model_config.vocab_size} ({type(setup.tokenizer).__name__}); "
        f"mesh {dict(trainer.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s) in {jax.process_count()} process(es); {how}"
    )
    stop = stopping.StopRequests()
    try:
        first_eval = None
        if setup.resumed is None:  # the starting point of the validation curve
            _say("evaluating step 0…")
            first_eval = evaluate(
                trainer, setup.state.params, setup.tokenizer, config, trainer.model_config.vocab_size
            )
            if stop.reason is not None:
                _say(f"Stopped before the first step ({stop.reason}); nothing was trained or saved.")
                return setup.state
        checkpoints = checkpoint_lib.Checkpoints(
            workdir, every=config.checkpoint_every, keep=config.keep_checkpoints
        )
        try:
            return _loop(config, workdir, setup, checkpoints, stop, first_eval, started)
        finally:
            checkpoints.close()
    finally:
        stop.close()


def _loop(
    config, workdir, setup: _Setup, checkpoints, stop: stopping.StopRequests, first_eval, started
) -> TrainState:
    """The steps, with logs, evaluations and saves, then the summary."""
    trainer, tokenizer, train_data, state = setup.trainer, setup.tokenizer, setup.train_data, setup.state
    config_dict = setup.config_dict
    vocab_size = trainer.model_config.vocab_size
    start = int(state.step)
    reporter = reporting.Reporter(workdir, total_steps=config.steps, start_step=start)
    tokens_per_step = config.batch_size * config.seq_len
    peak = flops_lib.device_peak_flops()
    flops_per_step = trainer.train_flops_per_token() * tokens_per_step
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_good = checkpoints.latest_step()
    clock, steps_timed = time.perf_counter(), 0
    # The summary's train loss: the mean of the last steps (one batch's loss is noisy).
    recent = collections.deque(maxlen=max(config.log_every, 10))
    last_eval: tuple[int, float] | None = None
    stopped = None

    def flush() -> tuple[dict[str, float], float] | None:
        """Fetches the buffered step metrics (one sync), stopping on a non-finite loss; returns the
        last step's metrics and the mean loss over the fetched steps."""
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
        if not fetched:
            return None
        losses = [float(metrics["loss"]) for _, metrics in fetched]
        recent.extend(losses)
        return {k: float(v) for k, v in fetched[-1][1].items()}, float(np.mean(losses))

    step = start
    try:
        if first_eval is not None:
            reporter.eval(0, first_eval)
            last_eval = (0, first_eval)
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
            stopped = stop.requested(step, checkpoints)
            save = step == config.steps or stopped is not None or checkpoints.should_save(step)
            evaluate_now = step % config.eval_every == 0 or step == config.steps
            if step % config.log_every == 0 or save or evaluate_now:
                latest, mean_loss = flush()
                elapsed = time.perf_counter() - clock
                if steps_timed:
                    latest["tokens_per_sec"] = tokens_per_step * steps_timed / elapsed
                    if peak:
                        latest["mfu"] = flops_per_step * steps_timed / elapsed / (peak * jax.device_count())
                reporter.train(step, latest, mean_loss=mean_loss)
            if evaluate_now:
                with reporter.evaluating():
                    loss = evaluate(trainer, state.params, tokenizer, config, vocab_size)
                reporter.eval(step, loss)
                last_eval = (step, loss)
            if save:
                checkpoints.save(
                    step,
                    state,
                    data_iterator=train_data,
                    config=config_dict,
                    model=trainer.model_config.to_dict(),
                    tokenizer=tokenizer.to_dict(),
                    force=True,
                )
                last_good = step
            if stopped is not None:
                break
            if step % config.log_every == 0 or save or evaluate_now:
                clock, steps_timed = time.perf_counter(), 0
        checkpoints.wait()
    finally:
        reporter.close()
    if jax.process_index() == 0:
        print(
            reporting.summary(
                workdir,
                step=step,
                total_steps=config.steps,
                tokens=(step - start) * tokens_per_step,
                seconds=time.perf_counter() - started,
                train_loss=(float(np.mean(recent)), len(recent)) if recent else None,
                eval_loss=last_eval,
                checkpoint_steps=checkpoints.all_steps(),
                sample_prompt=config.sample_prompt,
                stopped=stopped if step < config.steps else None,
            ),
            flush=True,
        )
    return state


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
