"""Multi-query associative recall runs: small RetNets and Transformers trained and tested on MQAR.

The data are ``retnet_jax.training.mqar``'s: a fixed training set mixing several key counts (the same
rows, in the same order, for every model), reshuffled each epoch, and a test set per key count drawn
from another seed. The step is the library's ``Trainer`` with its loss taken on the answers only
(the batches' ``weights`` leave out the positions whose target is ``mqar.IGNORE``). Reported per key count:
accuracy (the answer is the argmax) and cross-entropy on the answers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.replication import recipe
from retnet_jax.training import mqar
from retnet_jax.training.sharding import make_mesh
from retnet_jax.training.trainer import Trainer


def answer_losses(logits, targets):
    """Cross-entropy at the answers: logits [B, T, N], targets [B, T] (IGNORE elsewhere) → (loss [B, T]
    float32, zero off the answers; mask [B, T] float32)."""
    logits = logits.astype(jnp.float32)
    mask = (targets != mqar.IGNORE).astype(jnp.float32)
    safe = jnp.where(targets == mqar.IGNORE, 0, targets)
    target_logits = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return (jax.nn.logsumexp(logits, axis=-1) - target_logits) * mask, mask


def _dataset(setup: recipe.MQARSetup, pairs, examples: int, seed: int) -> dict[str, np.ndarray]:
    """``examples`` rows split evenly over ``pairs`` (each key count from its own stream), concatenated."""
    parts = []
    for index, count in enumerate(pairs):
        rows = max(1, examples // len(pairs))
        stream = mqar.MQARBatches(
            batch_size=rows,
            seq_len=setup.seq_len,
            num_pairs=count,
            vocab_size=setup.vocab_size,
            power_a=setup.power_a,
            seed=seed * 1000 + index,
        )
        parts.append(next(stream))
    return {k: np.concatenate([p[k] for p in parts]) for k in ("inputs", "targets", "weights")}


def datasets(setup: recipe.MQARSetup, seed: int = 0):
    """(the training set, {key count: test set})."""
    train = _dataset(setup, setup.train_pairs, setup.train_examples, seed)
    tests = {p: _dataset(setup, (p,), setup.eval_examples, seed + 1) for p in setup.eval_pairs}
    return train, tests


def _batches(train: dict[str, np.ndarray], batch_size: int, seed: int):
    rows = len(train["inputs"])
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(rows)
        for start in range(0, rows - batch_size + 1, batch_size):
            picked = order[start : start + batch_size]
            yield {k: v[picked] for k, v in train.items()}
        epoch += 1


def _metrics_fn(trainer: Trainer):
    @jax.jit
    def metrics(params, inputs, targets):
        logits, _ = trainer.model.apply({"params": params}, inputs)
        losses, mask = answer_losses(logits, targets)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
        return losses.sum(), correct.sum(), mask.sum()

    return metrics


def test(
    trainer: Trainer, params, tests: dict[int, dict[str, np.ndarray]], batch_size: int
) -> dict[str, Any]:
    metrics = _metrics_fn(trainer)
    results = {}
    with trainer.context():
        for pairs, data in tests.items():
            loss = correct = count = 0.0
            for start in range(0, len(data["inputs"]), batch_size):
                part = {k: jnp.asarray(v[start : start + batch_size]) for k, v in data.items()}
                values = jax.device_get(metrics(params, part["inputs"], part["targets"]))
                loss, correct, count = loss + values[0], correct + values[1], count + values[2]
            results[str(pairs)] = dict(accuracy=float(correct / count), loss=float(loss / count))
    return results


def run(
    size: recipe.MQARSize,
    arch: str,
    setup: recipe.MQARSetup,
    learning_rate: float,
    train: dict[str, np.ndarray],
    tests: dict[int, dict[str, np.ndarray]],
    *,
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Trains one model at one learning rate; returns its curve and test results."""
    start = time.perf_counter()
    config = recipe.mqar_config(setup, learning_rate, seed)
    architecture = recipe.mqar_architecture(size, arch, setup)
    trainer = Trainer(config, architecture, make_mesh(config.mesh))  # the loss counts answers: weights
    state = trainer.init(seed)
    batches = _batches(train, setup.batch_size, seed)
    curve, pending, log_every = [], [], max(1, setup.steps // 50)
    for step in range(1, setup.steps + 1):
        batch = next(batches)
        state, metrics = trainer.train_step(state, trainer.global_batch(batch))
        pending.append((step, metrics["loss"]))
        if step % log_every == 0 or step == setup.steps:
            curve += [dict(step=s, loss=float(v)) for s, v in jax.device_get(pending)]
            pending = []
            if not math.isfinite(curve[-1]["loss"]):
                break
    train_s = time.perf_counter() - start
    results = test(trainer, state.params, tests, setup.batch_size)
    log(
        f"  {arch} d{size.d_model} lr {learning_rate:g}: "
        + ", ".join(f"{p} keys {r['accuracy']:.3f}" for p, r in results.items())
        + f" ({train_s:.0f}s)"
    )
    return dict(
        learning_rate=learning_rate,
        params=trainer.num_params,
        curve=curve,
        test=results,
        train_s=train_s,
        final_train_loss=curve[-1]["loss"] if curve else None,
    )
