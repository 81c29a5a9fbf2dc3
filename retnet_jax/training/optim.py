"""The optimizer: AdamW with the paper's defaults, global-norm clipping, warm-up then decay.

Weight decay applies to matrices only (not to norm scales or biases), as is usual for language models.
All numbers come from the experiment config (``retnet_jax/configs/default.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "polynomial", "constant")


def learning_rate_schedule(config: Any) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then the chosen decay.

    Decays end at ``learning_rate * end_learning_rate_factor`` at ``steps``; "polynomial" is the
    paper's (power 1 from the peak, as fairseq), "constant" keeps the peak.
    """
    if config.schedule not in SCHEDULES:
        raise ValueError(f"--config.schedule must be one of {SCHEDULES}; got {config.schedule!r}.")
    if config.warmup_steps < 0:
        raise ValueError(f"--config.warmup_steps must be >= 0; got {config.warmup_steps}.")
    peak = config.learning_rate
    end = peak * config.end_learning_rate_factor
    warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
    decay_steps = max(config.steps - config.warmup_steps, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate_factor)
    elif config.schedule in ("linear", "polynomial"):
        power = 1.0 if config.schedule == "linear" else 2.0
        decay = optax.polynomial_schedule(peak, end, power, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


DECAYED = ("kernel", "embedding")  # matrices; norm scales and biases are not decayed


def _decay_mask(params):
    def decayed(path, _):
        return any(getattr(key, "key", None) in DECAYED for key in path)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW(β1, β2, eps, weight decay) after global-norm clipping; returns (optimizer, schedule)."""
    if config.learning_rate <= 0:
        raise ValueError(f"--config.learning_rate must be > 0; got {config.learning_rate}.")
    schedule = learning_rate_schedule(config)
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
