"""Training output: a live progress bar, TensorBoard events, ``metrics.jsonl`` and a loss-curve PNG.

Only the first process writes. ``metrics.jsonl`` holds one JSON object per line: train lines carry
``step`` and ``loss`` (plus learning rate, norms and throughput), eval lines ``step`` and ``eval_loss``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import tqdm

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


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
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def train(self, step: int, metrics: dict[str, float]):
        """Logs train metrics of ``step`` (after that many optimizer steps)."""
        self._write({"step": step, **metrics}, prefix="train")
        if self._bar is not None:
            shown = {"loss": f"{metrics['loss']:.3f}"}
            if "tokens_per_sec" in metrics:
                shown["tok/s"] = f"{metrics['tokens_per_sec']:,.0f}"
            if "mfu" in metrics:
                shown["mfu"] = f"{100 * metrics['mfu']:.1f}%"
            self._bar.set_postfix(shown, refresh=False)

    def eval(self, step: int, eval_loss: float):
        self._write(
            {"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))},
            prefix="eval",
        )

    def advance(self, steps: int = 1):
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str):
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self):
        if not self.enabled:
            return
        self._bar.close()
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
