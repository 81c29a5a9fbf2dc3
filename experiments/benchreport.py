"""The report of a benchmark script: its files (``Report``: markdown, JSON, PNG named with the device,
date and tag), table cells and markdown tables, the ceilings paragraph, and the plot helpers."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

OUT_DIR = flags.DEFINE_string("out_dir", "experiments/results", "Where the .md, .json and .png results go.")
TAG = flags.DEFINE_string("tag", "", "Appended to the result file names (e.g. the subset run).")
PLOTS = flags.DEFINE_bool("plots", True, "Write a PNG of the results (matplotlib).")


def fmt(value, scale: float = 1.0, spec: str = ".3g") -> str:
    """A number for a table cell; "–" for None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value * scale, spec)


def fmt_count(n) -> str:
    """1414205440 → '1.41B', 5.6e6 → '5.6M'."""
    if not n:
        return "–"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def when_ok(cell: Callable[[dict], str]) -> Callable[[dict], str]:
    """A table cell that shows the row's status (OOM, error, skipped, n/a) when it did not run."""
    return lambda row: cell(row) if row.get("status") == "ok" else row.get("status", "?")


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict], str]]]
) -> str:
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def ceilings_markdown(device: dict[str, Any], ceilings: dict[str, Any] | None) -> str:
    lines = [
        f"Device: {device.get('device_kind')} ({device.get('platform')}), jax {device.get('jax_version')}."
    ]
    if device.get("datasheet_flops"):
        lines.append(f"Datasheet bf16 dense peak: {device['datasheet_flops'] / 1e12:.0f} TFLOP/s.")
    if ceilings:
        lines.append(
            f"Measured: bf16 matmul {ceilings['matmul_n']}³ at {ceilings['matmul_flops'] / 1e12:.4g} TFLOP/s "
            f"(iqr {ceilings['matmul_timing']['iqr_pct']:.1f}%); device-to-device pass over "
            f"{ceilings['copy_bytes'] / 2**20:.0f} MiB at {ceilings['bandwidth'] / 1e9:.4g} GB/s "
            f"(read + write)."
        )
    return " ".join(lines)


class Report:
    """Writes ``{out_dir}/{name}_{device}_{date}[_{tag}].{md,json,png}``; rewritten after every config."""

    def __init__(self, name: str, device_short: str):
        stem = f"{name}_{device_short}_{datetime.date.today().isoformat()}"
        stem += f"_{TAG.value}" if TAG.value else ""
        out_dir = OUT_DIR.value
        self.dir = out_dir if os.path.isabs(out_dir) else os.path.join(os.getcwd(), out_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.stem = os.path.join(self.dir, stem)
        self.command = "python -m " + " ".join([_module_name(), *sys.argv[1:]])

    @property
    def png(self) -> str:
        return self.stem + ".png"

    def write(self, title: str, sections: Sequence[str], raw: dict[str, Any]):
        text = "\n\n".join([f"# {title}", f"`{self.command}`", *sections]) + "\n"
        with open(self.stem + ".md", "w") as f:
            f.write(text)
        with open(self.stem + ".json", "w") as f:
            json.dump({"command": self.command, **raw}, f, indent=1, default=json_default)
        return text

    def paths(self) -> list[str]:
        return [p for p in (self.stem + ".md", self.stem + ".json", self.png) if os.path.exists(p)]


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def json_default(value):
    """JSON for what ``json.dump`` cannot write itself: NumPy scalars and arrays, else the text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def figure(rows: int, cols: int, size=(5.0, 3.6)):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return fig, axes


def log2_xaxis(ax, values):
    """A base-2 log x axis with a plain tick at each value (1K, 2K, ... for powers of two >= 1024)."""
    values = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v) for v in values])
    ax.minorticks_off()


def save_figure(fig, path: str):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
