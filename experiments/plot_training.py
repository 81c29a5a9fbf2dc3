"""Training throughput against sequence length, from the tables of several ``bench_training`` runs.

    python -m experiments.plot_training --device=H100 --date=2026-11-22

Reads every ``results/bench_training_{device}_{date}*.md`` table (the markdown is the record: a run's
JSON may be missing when only its table came back) and draws tokens/s against T, one line per model,
architecture and head count, into ``results/bench_training_{device}_{date}_throughput.png``.
"""

from __future__ import annotations

import glob
import os

from absl import app, flags

from experiments import benchreport as br

_DEVICE = flags.DEFINE_string("device", "H100", "Device short name in the result file names.")
_DATE = flags.DEFINE_string("date", "2026-11-22", "Date in the result file names.")


def table_rows(path: str) -> list[dict[str, str]]:
    """The rows of the first markdown table whose header starts with ``| arch |``."""
    rows, header = [], None
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| arch |"):
                header = cells
            elif header and line.startswith("|") and not line.startswith("|---"):
                rows.append(dict(zip(header, cells, strict=True)))
            elif header and not line.startswith("|"):
                break
    return rows


def series(paths) -> dict[str, list[tuple[int, float]]]:
    """(T, tokens/s) per "model arch" label, measured rows only, one point per T (the latest file wins)."""
    points: dict[str, dict[int, float]] = {}
    for path in sorted(paths):
        for row in table_rows(path):
            try:
                rate = float(row["tokens/s"].replace(",", ""))
            except ValueError:  # OOM, skipped, ...
                continue
            label = f"{row['model']} {row['arch']}"
            if row["arch"] == "torchscale":
                label += f" C={row['C']}" if row["C"].isdigit() else " parallel"
            if row.get("docs", "–") != "–":  # packed documents (bench_training --documents)
                label += f" docs {row['docs']}"
            if row.get("remat", "full") not in ("full", "yes"):  # other policies (--remat); "yes" = full
                label += f" remat {row['remat']}"
            points.setdefault(label, {})[int(row["T"])] = rate
    return {label: sorted(p.items()) for label, p in points.items()}


def main(argv):
    del argv
    stem = os.path.join(br.OUT_DIR.value, f"bench_training_{_DEVICE.value}_{_DATE.value}")
    paths = [p for p in glob.glob(stem + "*.md") if not p.endswith("_throughput.md")]
    data = series(paths)
    fig, axes = br.figure(1, 1, size=(8.0, 4.5))
    ax = axes[0][0]
    xs = []
    for label, pts in sorted(data.items()):
        t, rate = zip(*pts, strict=True)
        xs += t
        ax.plot(t, [r / 1e3 for r in rate], marker="o", label=label)
    title = f"train step throughput, {_DEVICE.value} {_DATE.value}"
    ax.set(xlabel="T", ylabel="thousand tokens/s", title=title)
    br.log2_xaxis(ax, xs or [1])
    ax.legend(fontsize=6)
    br.save_figure(fig, stem + "_throughput.png")
    print("Wrote", stem + "_throughput.png", "from", len(paths), "tables")


if __name__ == "__main__":
    app.run(main)
