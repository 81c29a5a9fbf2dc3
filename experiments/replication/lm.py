"""Language-model runs of the study: calibration of the step time, and a training run with its measurements.

A run is the library's ``Trainer`` (the jitted step) fed with batches cut from the corpus tokenized once
before the clock starts (``tokens.PackedBatches``, packed as the library's ``data.make_dataset`` packs),
driven here rather than by ``loop.train_and_evaluate``
because a run is bounded by a token budget and a wall-clock deadline, keeps no checkpoint (nothing but
metrics leaves the device) and ends with measurements of the trained parameters still in memory:

* validation loss every ``steps / evaluations`` steps on a fixed set of batches (the first
  ``eval_batches`` of the validation split, tokenized once);
* at the end, the loss by position up to 4× the training length and the decoding speed (``evals``).

A run that reaches its deadline stops training early, says so (``truncated``) and still measures.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Any

import jax
import numpy as np

from experiments.replication import data, evals, recipe, tokens
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
    """Compiles a run's step, times ``calibration_steps`` steps on the training data, and measures the input
    pipeline's own rate; a run can go no faster than the slower of the two."""
    start = time.perf_counter()
    trainer = build(size, arch, model_vocab_size(tokenizer), options, steps=1000)
    train_data = _batches(size, options, "train", train=True)
    try:
        state = trainer.init(options.seed)
        state, metrics = trainer.train_step(state, trainer.global_batch(next(train_data)))
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        state, metrics = trainer.train_step(state, trainer.global_batch(next(train_data)))
        jax.block_until_ready(metrics)
        clock = time.perf_counter()
        for _ in range(size.calibration_steps):
            state, metrics = trainer.train_step(state, trainer.global_batch(next(train_data)))
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - clock) / size.calibration_steps
        data_tokens_per_s = _data_rate(train_data, size.step_tokens)
    finally:
        train_data.close()
    result = dict(
        status="ok",
        arch=arch,
        params=_parameter_counts(trainer),
        step_s=step_s,
        step_tokens_per_s=size.step_tokens / step_s,
        data_tokens_per_s=data_tokens_per_s,
        tokens_per_s=min(size.step_tokens / step_s, data_tokens_per_s),
        setup_and_compile_s=compile_s,
        flops_per_token=trainer.train_flops_per_token(),
        loss=float(metrics["loss"]),
        **_utilization(trainer.train_flops_per_token() * size.step_tokens / step_s),
        peak_memory_bytes=_peak_memory(),
    )
    del state
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
    eval_every = max(1, steps // size.evaluations)
    log_every = max(1, min(eval_every, steps // 100))
    train_curve: list[dict[str, float]] = []
    eval_curve: list[dict[str, float]] = []
    pending: list[tuple[int, Any]] = []
    state = trainer.init(options.seed)
    eval_curve.append(dict(step=0, tokens=0, loss=_evaluate(trainer, state.params, eval_batches)))
    phases["setup_s"] = time.perf_counter() - clock

    train_s, eval_s, timed_steps, step, truncated, diverged = 0.0, 0.0, 0, 0, False, False
    clock = time.perf_counter()
    try:
        while step < steps:
            state, metrics = trainer.train_step(state, trainer.global_batch(next(train_data)))
            step += 1
            pending.append((step, metrics))
            if step == 1:
                jax.block_until_ready(metrics)
                phases["compile_and_first_step_s"] = time.perf_counter() - clock
                clock = time.perf_counter()
            evaluate_now = step % eval_every == 0 or step == steps
            if step % log_every == 0 or evaluate_now:
                for number, values in jax.device_get(pending):
                    train_curve.append(dict(step=number, tokens=number * size.step_tokens, **_floats(values)))
                if step > 1:
                    timed_steps += len(pending) - (1 if pending[0][0] == 1 else 0)
                    train_s += time.perf_counter() - clock
                pending = []
                if not math.isfinite(train_curve[-1]["loss"]):
                    diverged = True
                    log(f"  loss became {train_curve[-1]['loss']} at step {step}: stopping")
                    break
                truncated = time.perf_counter() > options.deadline and step < steps
                if evaluate_now or truncated:
                    start = time.perf_counter()
                    loss = _evaluate(trainer, state.params, eval_batches)
                    eval_s += time.perf_counter() - start
                    eval_curve.append(dict(step=step, tokens=step * size.step_tokens, loss=loss))
                    log(f"  step {step}/{steps}: train {train_curve[-1]['loss']:.4f}, validation {loss:.4f}")
                if truncated:
                    log(f"  deadline reached at step {step} of {steps}: stopping early")
                    break
                clock = time.perf_counter()
    finally:
        train_data.close()
    phases["train_s"], phases["eval_s"] = train_s, eval_s
    tokens_per_s = timed_steps * size.step_tokens / train_s if train_s > 0 else None

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
        train_curve=_thin(train_curve, 200),
        eval_curve=eval_curve,
        final_eval_loss=eval_curve[-1]["loss"],
        tokens_per_s=tokens_per_s,
        flops_per_token=trainer.train_flops_per_token(),
        **(_utilization(trainer.train_flops_per_token() * tokens_per_s) if tokens_per_s else {}),
        corpus_fingerprint=options.corpus_fingerprint,
        tokenizer_digest=options.tokenizer_digest,
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


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _thin(points: list[dict], most: int) -> list[dict]:
    """At most about ``most`` points, evenly spaced, the last one kept."""
    stride = max(1, math.ceil(len(points) / most))
    kept = points[::stride]
    return kept if not points or kept[-1] is points[-1] else [*kept, points[-1]]


def _config_summary(config) -> dict[str, Any]:
    names = (
        "seq_len batch_size learning_rate schedule warmup_steps end_learning_rate_factor b1 b2 eps "
        "weight_decay grad_clip steps mode chunk_size implementation seed"
    ).split()
    return {name: config[name] for name in names}
