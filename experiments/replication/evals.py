"""Measurements of a trained language model: loss by position past the training length, decoding speed.

Loss by position: validation documents of at least 4T + 1 tokens, each read from its start ([BOS] + its
first 4T tokens), run in one call of 4T tokens (the training form: chunkwise for a RetNet); the loss at
each position, averaged over the documents. A causal model's loss at position p depends only on the
tokens up to p, so this one call gives the loss at 1×, 2× and 4× the training length T alike: the means
over positions [0, T), [T, 2T) and [2T, 4T) are reported, with the curve in bins.

Decoding: ``inference.generate`` (prefill, then the jitted loop: the RetNet's recurrent state, the
Transformer's KV cache), greedy, with the parameters in the compute dtype; the first call compiles and
is timed apart, then the median of ``repeats`` calls gives tokens/s = batch × new tokens / seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.inference.generate import generate
from retnet_jax.models.lm import cast_params
from retnet_jax.training.trainer import Trainer


def loss_by_position(trainer: Trainer, params, rows: np.ndarray, *, batch: int = 8) -> np.ndarray:
    """[L] float64: the mean next-token loss at each position of ``rows`` [n, L + 1]."""
    model = trainer.model

    @jax.jit
    def token_losses(params, tokens):  # tokens [B, L + 1] → [B, L]
        logits, _ = model.apply({"params": params}, tokens[:, :-1])
        logits = logits.astype(jnp.float32)
        target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - target

    total = np.zeros(rows.shape[1] - 1, np.float64)
    with trainer.context():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            total += np.asarray(jax.device_get(token_losses(params, jnp.asarray(chunk))), np.float64).sum(0)
    return total / len(rows)


def extrapolation(losses: np.ndarray, seq_len: int, bins: int = 32) -> dict[str, Any]:
    """Means over [0, T), [T, 2T), [2T, 4T), cumulative means at 1×, 2×, 4×, the curve in bins of T/bins."""
    width = max(1, seq_len // bins)
    usable = len(losses) // width * width
    return dict(
        seq_len=seq_len,
        window_mean={
            "0-1x": float(losses[:seq_len].mean()),
            "1-2x": float(losses[seq_len : 2 * seq_len].mean()),
            "2-4x": float(losses[2 * seq_len : 4 * seq_len].mean()),
        },
        cumulative_mean={f"{k}x": float(losses[: k * seq_len].mean()) for k in (1, 2, 4)},
        bin_width=width,
        binned=[float(x) for x in losses[:usable].reshape(-1, width).mean(axis=1)],
    )


def decode_speed(
    trainer: Trainer,
    params,
    tokenizer,
    prompts: np.ndarray,
    *,
    batches: Sequence[int],
    new_tokens: int,
    repeats: int = 3,
) -> dict[str, Any]:
    """Greedy decoding throughput at each batch size; prompts [n, P] are cycled over the rows."""
    cfg = trainer.model_config
    dtype = cfg.compute_dtype if cfg.compute_dtype.itemsize < 4 else jnp.float32
    variables = {"params": jax.device_put(cast_params(params, dtype), jax.local_devices()[0])}
    results, sample = {}, None
    for batch in batches:
        rows = [prompts[i % len(prompts)].tolist() for i in range(batch)]

        def call(rows=rows):
            return generate(
                trainer.model,
                variables,
                rows,
                max_new_tokens=new_tokens,
                bos_id=tokenizer.bos_id,
                pad_id=tokenizer.pad_id,
            )

        start = time.perf_counter()
        first = call()
        first_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()  # returns host arrays: the work is done when it returns
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        results[str(batch)] = dict(
            seconds=seconds,
            tokens_per_s=batch * new_tokens / seconds,
            ms_per_step=1e3 * seconds / new_tokens,
            first_call_s=first_s,
        )
        if sample is None:
            sample = dict(
                prompt=tokenizer.decode(rows[0]), continuation=tokenizer.decode(first.to_lists()[0])
            )
    return dict(
        prompt_tokens=int(prompts.shape[1]),
        new_tokens=new_tokens,
        dtype=jnp.dtype(dtype).name,
        by_batch=results,
        sample=sample,
    )
