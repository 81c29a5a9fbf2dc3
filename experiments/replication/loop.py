"""The training loop of the study: one function for the calibration and for the runs.

The budget of a size is the tokens that the measured loop trains in ``--train_seconds``, so the loop that
is timed by ``--part=calibrate`` must be the loop the runs use, with every overhead it has. It keeps the
device busy the way an asynchronous JAX loop does:

* the next batch is cut from the token arrays and sent to the device right after a step is dispatched,
  while that step runs (double buffering: one batch in use, one on its way);
* nothing in the step path waits for the device: a step's metrics stay on the device except at log
  points (every ``log_every`` steps), where their copy to the host is only *started*; they are read one
  log point later, when the device has long finished them, so the host runs at most one log interval
  ahead and the device never drains between steps;
* the validation loss at evaluation points (a dozen a run) is the one wait: the loop drains there and
  the evaluation's time is kept out of the training time.

Besides the curves, a loop reports where the host's time went (``host``: cutting and sending batches,
dispatching steps, waiting for metrics) and the tokens/s between successive read points (``speed``), so
that a run slower than its calibration shows whether the host or the device held it back, and when.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

LOOP_VERSION = 2  # recorded with every calibration and run: speeds of other loops are not comparable
LOG_POINTS = 200  # log points of a run (metrics read on the host), whatever its steps


def log_every(steps: int) -> int:
    """The steps between log points of a run of ``steps`` steps (the calibration uses ``log_every(3200)``,
    a run of size s's cadence)."""
    return max(1, steps // LOG_POINTS)


@dataclasses.dataclass
class LoopResult:
    """What ``training_loop`` did.

    Attributes:
        state: the train state after the last step.
        steps_done: steps taken.
        first_step_s: compilation and the first step.
        train_s: wall time of steps 2.. ``steps_done``, evaluations excluded.
        eval_s: time of the evaluations.
        train_curve: the step's metrics at each log point (``step``, ``tokens``, then the metrics).
        eval_curve: ``step``, ``tokens``, ``loss`` at each evaluation point.
        speed: ``step`` and ``tokens_per_s`` since the previous read point (at most ~``LOG_POINTS``).
        host: seconds the host spent making and sending batches, dispatching steps, waiting for metrics.
        truncated: stopped by ``deadline`` or ``max_train_s`` before ``steps``.
        diverged: stopped by a non-finite loss.
    """

    state: Any
    steps_done: int
    first_step_s: float
    train_s: float
    eval_s: float
    train_curve: list[dict[str, float]]
    eval_curve: list[dict[str, float]]
    speed: list[dict[str, float]]
    host: dict[str, float]
    truncated: bool
    diverged: bool
    step_tokens: int

    @property
    def timed_steps(self) -> int:
        """Steps inside ``train_s`` (the first one compiles)."""
        return max(0, self.steps_done - 1)

    @property
    def tokens_per_s(self) -> float | None:
        return self.timed_steps * self.step_tokens / self.train_s if self.train_s > 0 else None

    def summary(self) -> dict[str, Any]:
        """The loop's own record (kept with a calibration or a run)."""
        return dict(
            version=LOOP_VERSION,
            timed_steps=self.timed_steps,
            host={k: round(v, 3) for k, v in self.host.items()},
            speed=self.speed,
        )


def _start_copy(tree) -> None:
    """Begins the device → host copy of ``tree``'s arrays without waiting for it."""
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "copy_to_host_async"):
            leaf.copy_to_host_async()


def _fetch(tree):
    """``tree`` on the host: the loop's only reads of device values (counted by the tests)."""
    return jax.device_get(tree)


def _wait(tree) -> None:
    """Waits for ``tree``'s arrays (after the first step only: its compilation is timed apart)."""
    jax.block_until_ready(tree)


def training_loop(
    trainer,
    state,
    batches: Iterator[dict[str, np.ndarray]],
    *,
    steps: int,
    step_tokens: int,
    log_every: int,
    eval_every: int = 0,
    evaluate: Callable[[Any], float] | None = None,
    deadline: float | None = None,
    max_train_s: float | None = None,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """Trains ``steps`` steps of ``trainer`` from ``state`` on ``batches`` (host batches of B × T tokens).

    Args:
        trainer: has ``train_step(state, batch) -> (state, metrics)`` and ``global_batch(host batch)``.
        steps: steps to take at most.
        step_tokens: tokens a step trains (B × T), for the curves and speeds.
        log_every: steps between log points (metrics read one log point later, without waiting).
        eval_every, evaluate: ``evaluate(params) -> loss`` every ``eval_every`` steps and after the last
            one (none when ``evaluate`` is None).
        deadline: ``time.perf_counter()`` value after which training stops (checked at log points).
        max_train_s: training seconds (after the first step) after which it stops (the calibration's).

    Returns:
        a ``LoopResult``.
    """
    if steps < 1 or log_every < 1 or (evaluate is not None and eval_every < 1):
        raise ValueError(
            f"steps, log_every and eval_every must be >= 1; got {steps}, {log_every}, {eval_every}."
        )
    clock = time.perf_counter
    host = dict(batch_s=0.0, dispatch_s=0.0, wait_s=0.0)
    train_curve: list[dict[str, float]] = []
    eval_curve: list[dict[str, float]] = []
    speed: list[dict[str, float]] = []
    in_flight: list[tuple[int, Any]] = []  # (step, metrics) whose copy to the host has begun
    start = clock()
    upcoming = trainer.global_batch(next(batches))
    host["batch_s"] += clock() - start
    step, first_step_s, eval_s, paused = 0, 0.0, 0.0, 0.0
    truncated = diverged = False
    loop_start = mark_time = start
    mark_step = 0  # the last step read, at host time mark_time: the start of the next speed window
    paused_since_mark = 0.0  # evaluation time since then

    def read(entries) -> bool:
        """Reads ``entries`` into the curve; False when a loss is not finite."""
        nonlocal mark_step, mark_time, paused_since_mark
        if not entries:
            return True
        t = clock()
        values = _fetch([m for _, m in entries])
        now = clock()
        host["wait_s"] += now - t
        finite = True
        for (number, _), metrics in zip(entries, values, strict=True):
            point = {k: float(v) for k, v in metrics.items()}
            train_curve.append(dict(step=number, tokens=number * step_tokens, **point))
            finite = finite and math.isfinite(point.get("loss", 0.0))
        number = entries[-1][0]
        if number > mark_step and mark_step >= 1:
            seconds = now - mark_time - paused_since_mark
            speed.append(dict(step=number, tokens_per_s=(number - mark_step) * step_tokens / seconds))
        mark_step, mark_time, paused_since_mark = number, now, 0.0
        return finite

    while step < steps:
        t = clock()
        state, metrics = trainer.train_step(state, upcoming)
        t2 = clock()
        host["dispatch_s"] += t2 - t
        step += 1
        if step < steps:  # the next batch is made and sent while this step runs
            upcoming = trainer.global_batch(next(batches))
            host["batch_s"] += clock() - t2
        if step == 1:
            _wait(metrics)
            first_step_s = clock() - start
            loop_start = clock()
        evaluate_now = evaluate is not None and (step % eval_every == 0 or step == steps)
        if not (step == 1 or step % log_every == 0 or evaluate_now or step == steps):
            continue
        _start_copy(metrics)
        in_flight.append((step, metrics))
        drain = evaluate_now or step == steps
        ready, in_flight = (in_flight, []) if drain else (in_flight[:-1], in_flight[-1:])
        if not read(ready):
            diverged = True
            log(f"  loss became {train_curve[-1]['loss']} by step {step}: stopping")
            break
        now = clock()
        late = deadline is not None and now > deadline
        spent_all = max_train_s is not None and now - loop_start - paused > max_train_s
        truncated = step < steps and (late or spent_all)
        if evaluate_now or (truncated and evaluate is not None):
            if not drain:
                read(in_flight)
                in_flight = []
            t = clock()
            loss = evaluate(state.params)
            spent = clock() - t
            eval_s, paused, paused_since_mark = eval_s + spent, paused + spent, paused_since_mark + spent
            eval_curve.append(dict(step=step, tokens=step * step_tokens, loss=loss))
            log(f"  step {step}/{steps}: train {train_curve[-1]['loss']:.4f}, validation {loss:.4f}")
        if truncated:
            if late:
                log(f"  deadline reached at step {step} of {steps}: stopping early")
            break
    if not diverged and in_flight:
        diverged = not read(in_flight)
    _wait(state)
    train_s = clock() - loop_start - paused if step > 1 else 0.0
    return LoopResult(
        state=state,
        steps_done=step,
        first_step_s=first_step_s,
        train_s=train_s,
        eval_s=eval_s,
        train_curve=train_curve,
        eval_curve=eval_curve,
        speed=_thin(speed, LOG_POINTS),
        host=host,
        truncated=truncated,
        diverged=diverged,
        step_tokens=step_tokens,
    )


def _thin(points: list[dict], most: int) -> list[dict]:
    """At most about ``most`` points, evenly spaced, the last one kept."""
    stride = max(1, math.ceil(len(points) / most))
    kept = points[::stride]
    return kept if not points or kept[-1] is points[-1] else [*kept, points[-1]]
