"""Training output: a live progress bar, eval lines, TensorBoard events, ``metrics.jsonl``, a loss-curve PNG
and the closing summary.

Only the first process writes. ``metrics.jsonl`` holds one JSON object per line: train lines carry
``step`` and ``loss`` (plus learning rate, norms and throughput), eval lines ``step`` and ``eval_loss``.

On the terminal the bar shows the *train* loss averaged over the steps since the previous log line (one
batch's loss is noisy: it reads worse or better than the validation loss by chance), each evaluation
prints a line as it finishes, the bar says "evaluating…" while one runs, and ``summary`` ends the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import tqdm

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged loss prints as a huge number rather than overflowing."""
    return math.exp(min(loss, 50.0))


class Reporter:
    """Writes metrics of a run in ``workdir``; a no-op on processes other than the first."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0
        self._bar = None
        self._tb = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        _truncate_metrics(os.path.join(workdir, METRICS_FILE), start_step)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def train(self, step: int, metrics: dict[str, float], *, mean_loss: float | None = None):
        """Logs train metrics of ``step`` (after that many optimizer steps); the bar shows ``mean_loss``
        (the mean train loss since the previous log line), or ``metrics["loss"]``."""
        self._write({"step": step, **metrics}, prefix="train")
        if self._bar is not None:
            shown = [f"train loss {metrics['loss'] if mean_loss is None else mean_loss:.3f}"]
            if "tokens_per_sec" in metrics:
                shown.append(f"{metrics['tokens_per_sec']:,.0f} tok/s")
            if "mfu" in metrics:
                shown.append(f"MFU {100 * metrics['mfu']:.1f}%")
            self._bar.set_postfix_str(", ".join(shown), refresh=False)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Labels the bar "evaluating…" while the body runs (the step counter stands still then)."""
        if self._bar is not None:
            self._bar.set_description_str("evaluating…")
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.set_description_str("", refresh=False)

    def eval(self, step: int, eval_loss: float):
        """Logs a validation loss and prints it on a line of its own above the bar."""
        self._write({"step": step, "eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)}, "eval")
        self.message(eval_line(step, eval_loss))

    def advance(self, steps: int = 1):
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str):
        if self.enabled:
            if self._bar is not None:
                self._bar.write(text)
            else:
                print(text, flush=True)

    def close(self):
        if not self.enabled:
            return
        self._bar.close()
        self._bar = None
        self._tb.close()
        self._jsonl.close()
        plot_losses(self.workdir)

    def _write(self, record: dict[str, Any], prefix: str):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step":
                self._tb.add_scalar(f"{prefix}/{name}", value, record["step"])
        self._tb.flush()


def eval_line(step: int, eval_loss: float) -> str:
    return f"step {step}: validation loss {eval_loss:.3f} (perplexity {perplexity(eval_loss):,.2f})"


def summary(
    workdir: str,
    *,
    step: int,
    total_steps: int,
    tokens: int,
    seconds: float,
    train_loss: tuple[float, int] | None,
    eval_loss: tuple[int, float] | None,
    checkpoint_steps: Sequence[int],
    sample_prompt: str,
    stopped: str | None = None,
) -> str:
    """The lines that end a run: what was trained, the final losses, where everything is, what to run next.

    Args:
        step: the last step trained; total_steps: the run's length.
        tokens, seconds: tokens trained and wall-clock time of this invocation.
        train_loss: (mean train loss, over how many final steps), if any step was trained.
        eval_loss: (step, validation loss) of the latest evaluation, if any.
        checkpoint_steps: the steps kept in ``workdir/checkpoints``.
        sample_prompt: the prompt the generate command continues.
        stopped: why the run stopped before ``total_steps`` ("SIGTERM", "Ctrl-C", ...), or None.
    """
    minutes, secs = divmod(round(seconds), 60)
    took = f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
    if stopped:
        head = (
            f"Stopped at step {step} of {total_steps} ({stopped}) after {tokens:,} tokens in {took}; "
            f"step {step} is saved: run the same command again to resume."
        )
    else:
        head = f"Finished step {step} of {total_steps}: {tokens:,} tokens in {took}."
    lines = [head]
    if train_loss is not None:
        loss, over = train_loss
        ppl = perplexity(loss)
        over = f"mean of the last {over} steps" if over > 1 else "the last step"
        lines.append(f"  train loss       {loss:.3f} (perplexity {ppl:,.2f}; {over})")
    if eval_loss is not None:
        at, loss = eval_loss
        lines.append(f"  validation loss  {loss:.3f} (perplexity {perplexity(loss):,.2f}; step {at})")
    checkpoints = os.path.join(workdir, "checkpoints")
    kept = f"steps {', '.join(str(s) for s in checkpoint_steps)}" if checkpoint_steps else "none saved"
    metrics, events = os.path.join(workdir, METRICS_FILE), os.path.join(workdir, TENSORBOARD_DIR)
    lines += [
        f"  checkpoints      {checkpoints} ({kept})",
        f"  metrics          {metrics}, {events}/",
        f"  plot             {os.path.join(workdir, PLOT_FILE)}",
    ]
    if checkpoint_steps:
        command = f"retnet-generate --workdir={shlex.quote(workdir)} --prompt={shlex.quote(sample_prompt)}"
        lines.append(f"  generate         {command}")
    return "\n".join(lines)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, start_step: int):
    """On resume, drop lines of steps after the restored checkpoint: those steps run again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def plot_losses(workdir: str) -> str | None:
    """Draws train and eval loss against step into ``workdir/loss.png``; returns the path."""
    records = read_metrics(workdir)
    if not records:
        return None
    # A bare Figure, not pyplot: it needs no backend, so a notebook's inline plots keep working.
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, PLOT_FILE)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
