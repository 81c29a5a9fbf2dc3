"""Language-model runs of the study: calibration of the step time, and a training run with its measurements.

A run is the library's ``Trainer`` (the jitted step) fed with batches cut from the corpus tokenized once
before the clock starts (``tokens.PackedBatches``, packed as the library's ``data.make_dataset`` packs),
driven here rather than by ``loop.train_and_evaluate``
because a run is bounded by a token budget and a wall-clock deadline, keeps no checkpoint (nothing but
metrics leaves the device) and ends with measurements of the trained parameters still in memory:

* validation loss every ``steps / evaluations`` steps on a fixed set of batches (the first
  ``eval_batches`` of the validation split, tokenized once);
* at the end, the loss by position up to 4× the training length and the decoding speed (``evals``).

The steps run in ``loop.training_loop``, the same function that ``calibrate`` times, so that a budget
sized from the calibration's tokens/s is what a run reaches. A run that reaches its deadline stops
training early, says so (``truncated``) and still measures; such a run never sets its size's budget.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any

import jax
import numpy as np

from experiments.replication import data, evals, loop, recipe, tokens
from retnet_jax.training import flops as flops_lib
from retnet_jax.training.sharding import make_mesh
from retnet_jax.training.trainer import Trainer, model_config, model_vocab_size


@dataclasses.dataclass
class Options:
    """What a run needs beyond its size (from the command line)."""

    work_dir: str  # corpus and tfds builds
    tokenizer_path: str
    corpus_fingerprint: str
    tokenizer_digest: str
    deadline: float  # time.perf_counter() value by which training must stop
    seed: int = 0
    corpus_tokens: dict[str, tokens.TokenArray] | None = None  # split → the tokenized corpus


def _parameter_counts(trainer: Trainer) -> dict[str, int]:
    params = trainer.abstract_state.params
    lookups = sum(
        int(np.prod(x.shape)) for k in ("embed", "head") if k in params for x in jax.tree.leaves(params[k])
    )
    return dict(total=trainer.num_params, non_embedding=trainer.num_params - lookups)


def build(size: recipe.LMSize, arch: str, vocab_size: int, options: Options, steps: int) -> Trainer:
    """The Trainer of one run (one device mesh over all devices), its model's vocabulary ``vocab_size``."""
    config = recipe.lm_config(
        size,
        arch,
        dataset=data.dataset_spec(options.work_dir),
        data_dir=data.tfds_dir(options.work_dir),
        tokenizer=options.tokenizer_path,
        steps=steps,
        seed=options.seed,
    )
    architecture = model_config(config, vocab_size)
    return Trainer(config, architecture, make_mesh(config.mesh))


def flops_per_token(size: recipe.LMSize, arch: str, vocab_size: int, options: Options) -> float:
    """Training FLOPs per token of a configuration (no compilation)."""
    return build(size, arch, vocab_size, options, steps=1).train_flops_per_token()


def non_embedding_params(size: recipe.LMSize, vocab_size: int, options: Options) -> int:
    """Weights outside the embedding and the head (the same for both architectures)."""
    return _parameter_counts(build(size, "retnet", vocab_size, options, steps=1))["non_embedding"]


def _split(options: Options, split: str) -> tokens.TokenArray:
    if options.corpus_tokens is None:
        raise ValueError("Options.corpus_tokens is unset: tokenize the corpus first (tokens.ensure_tokens).")
    return options.corpus_tokens[split]


def _batches(size: recipe.LMSize, options: Options, split: str, *, train: bool) -> tokens.PackedBatches:
    return tokens.PackedBatches(
        _split(options, split),
        batch_size=size.batch_size,
        seq_len=size.seq_len,
        train=train,
        seed=options.seed,
    )


def _fixed_batches(size: recipe.LMSize, options: Options) -> list[dict[str, np.ndarray]]:
    """The first ``size.eval_batches`` validation batches (in the split's order)."""
    iterator = _batches(size, options, "validation", train=False)
    batches = [b for _, b in zip(range(size.eval_batches), iterator, strict=False)]
    if not batches:
        raise ValueError(
            f"The validation split gives no full batch of {size.batch_size}×{size.seq_len} tokens."
        )
    return batches


def _evaluate(trainer: Trainer, params, batches) -> float:
    losses = [trainer.eval_step(params, trainer.global_batch(b)) for b in batches]
    return float(np.mean(jax.device_get(losses)))


def calibrate(size: recipe.LMSize, arch: str, tokenizer, options: Options) -> dict[str, Any]:
    """Compiles a run's step and times the runs' own loop (``loop.training_loop``, at a run's log cadence)
    for ``size.calibration_s`` seconds after its first step (at most ``calibration_steps`` steps); then
    measures the input pipeline's own rate."""
    start = time.perf_counter()
    cap = size.calibration_steps
    trainer = build(size, arch, model_vocab_size(tokenizer), options, steps=cap)
    train_data = _batches(size, options, "train", train=True)
    try:
        state = trainer.init(options.seed)
        done = loop.training_loop(
            trainer,
            state,
            train_data,
            steps=cap,
            step_tokens=size.step_tokens,
            log_every=loop.log_every(3200),
            max_train_s=size.calibration_s or None,
            log=lambda _: None,
        )
        if done.diverged or not done.tokens_per_s:
            raise RuntimeError(f"calibration: {done.steps_done} steps, diverged={done.diverged}.")
        setup_and_compile_s = time.perf_counter() - start - done.train_s
        data_tokens_per_s = _data_rate(train_data, size.step_tokens, min(1.0, 0.05 + size.calibration_s / 20))
    finally:
        train_data.close()
    step_s = done.train_s / done.timed_steps
    flops = trainer.train_flops_per_token()
    result = dict(
        status="ok",
        arch=arch,
        params=_parameter_counts(trainer),
        step_s=step_s,
        step_tokens_per_s=done.tokens_per_s,
        data_tokens_per_s=data_tokens_per_s,
        tokens_per_s=min(done.tokens_per_s, data_tokens_per_s),
        setup_and_compile_s=setup_and_compile_s,
        flops_per_token=flops,
        loss=done.train_curve[-1]["loss"],
        **_utilization(flops * done.tokens_per_s),
        peak_memory_bytes=_peak_memory(),
        loop=done.summary(),
    )
    del state, done
    gc.collect()
    return result


def _data_rate(iterator, step_tokens: int, measure_s: float = 1.0) -> float:
    """Tokens/s the input pipeline delivers on its own: batches pulled without training (it reads ahead
    nothing, so each batch is made when it is asked for)."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < measure_s:
        next(iterator)
        count += 1
    return count * step_tokens / (time.perf_counter() - start)


def _utilization(flops_per_s: float) -> dict[str, float | None]:
    peak = flops_lib.device_peak_flops()
    return dict(flops_per_s=flops_per_s, mfu=flops_per_s / (peak * jax.device_count()) if peak else None)


def _peak_memory() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def train(size: recipe.LMSize, arch: str, tokenizer, options: Options, budget: dict, log=print) -> dict:
    """One run: train on ``budget["steps"]`` steps (or until the deadline), then measure."""
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    steps = budget["steps"]
    trainer = build(size, arch, model_vocab_size(tokenizer), options, steps)
    counts = _parameter_counts(trainer)
    log(
        f"{arch} {size.d_model}x{size.num_layers}: {counts['non_embedding'] / 1e6:.2f}M non-embedding "
        f"parameters ({counts['total'] / 1e6:.2f}M in all), {steps} steps of {size.step_tokens} tokens"
    )
    eval_batches = _fixed_batches(size, options)
    train_data = _batches(size, options, "train", train=True)
    state = trainer.init(options.seed)
    eval_curve = [dict(step=0, tokens=0, loss=_evaluate(trainer, state.params, eval_batches))]
    phases["setup_s"] = time.perf_counter() - clock
    try:
        done = loop.training_loop(
            trainer,
            state,
            train_data,
            steps=steps,
            step_tokens=size.step_tokens,
            log_every=loop.log_every(steps),
            eval_every=max(1, steps // size.evaluations),
            evaluate=lambda params: _evaluate(trainer, params, eval_batches),
            deadline=options.deadline,
            log=log,
        )
    finally:
        train_data.close()
    del state  # donated to the first step
    state, step, truncated, diverged = done.state, done.steps_done, done.truncated, done.diverged
    eval_curve += done.eval_curve
    phases["compile_and_first_step_s"] = done.first_step_s
    phases["train_s"], phases["eval_s"] = done.train_s, done.eval_s
    tokens_per_s = done.tokens_per_s

    result = dict(
        status="diverged" if diverged else "ok",
        arch=arch,
        params=counts,
        architecture=trainer.model_config.to_dict(),
        config=_config_summary(trainer.config),
        budget=budget,
        steps_done=step,
        tokens_done=step * size.step_tokens,
        truncated=truncated,
        epochs_done=step * size.step_tokens / len(_split(options, "train").tokens),
        input="pre-tokenized: tokens.PackedBatches over the tokenized corpus",
        train_curve=done.train_curve,
        eval_curve=eval_curve,
        final_eval_loss=eval_curve[-1]["loss"],
        tokens_per_s=tokens_per_s,
        flops_per_token=trainer.train_flops_per_token(),
        **(_utilization(trainer.train_flops_per_token() * tokens_per_s) if tokens_per_s else {}),
        corpus_fingerprint=options.corpus_fingerprint,
        tokenizer_digest=options.tokenizer_digest,
        loop=done.summary(),
    )
    if not diverged:
        # Each measurement is guarded: a failure is recorded beside the training results, not instead.
        start = time.perf_counter()
        rows = tokens.long_documents(_split(options, "validation"), 4 * size.seq_len, size.extrapolation_rows)
        if len(rows):
            result["extrapolation"] = _guarded(
                lambda: dict(
                    documents=len(rows),
                    **evals.extrapolation(evals.loss_by_position(trainer, state.params, rows), size.seq_len),
                ),
                log,
            )
        phases["extrapolation_s"] = time.perf_counter() - start
        start = time.perf_counter()
        prompts = rows[:, 1 : 1 + size.decode_prompt] if len(rows) else eval_batches[0]["inputs"]
        result["decode"] = _guarded(
            lambda: evals.decode_speed(
                trainer,
                state.params,
                tokenizer,
                prompts[:, : size.decode_prompt],
                batches=size.decode_batches,
                new_tokens=size.decode_tokens,
            ),
            log,
        )
        phases["decode_s"] = time.perf_counter() - start
    result["peak_memory_bytes"] = _peak_memory()
    result["phases"] = phases
    return result


def _guarded(measure, log) -> dict[str, Any]:
    try:
        return {"status": "ok", **measure()}
    except Exception as error:  # noqa: BLE001 — recorded; the run's other results stand
        text = f"{type(error).__name__}: {error}"
        log(f"  measurement failed: {text[:300]}")
        return {"status": "error", "error": text[:4000]}


def _config_summary(config) -> dict[str, Any]:
    names = (
        "seq_len batch_size learning_rate schedule warmup_steps end_learning_rate_factor b1 b2 eps "
        "weight_decay grad_clip steps mode chunk_size implementation seed"
    ).split()
    return {name: config[name] for name in names}
