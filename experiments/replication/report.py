"""The study's report: every run's JSON merged into one markdown file with tables and PNG plots.

Reads ``corpus.json``, ``calibrate.json``, ``train_{arch}_{size}.json`` and ``mqar_{arch}_{size}.json`` from
the results folder; writes ``replication_{device}_{date}.md`` and its plots ``..._loss.png`` (validation
loss against tokens, one panel per size), ``..._scaling.png`` (final loss against parameters),
``..._extrapolation.png`` (loss by position up to 4× the training length) and ``..._mqar.png`` (recall
accuracy against the number of keys). Checks that the runs compared used the same corpus, tokenizer and
tokens, and says where they did not.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any

from experiments.replication import recipe, schedule

SIZE_ORDER = (
    "smoke",
    "s",
    "s-k128",
    "s-lr3e-4",
    "s-lr3e-3",
    "m",
    "m-k128",
    "m-lr3e-4",
    "m-lr3e-3",
    "l",
)
ARCH_STYLE = {
    "retnet": dict(color="tab:blue", marker="o"),
    "transformer": dict(color="tab:orange", marker="s"),
}

COMMANDS = """\
python -m experiments.replicate --part=corpus --out_dir=$OUT
python -m experiments.replicate --part=calibrate --size=s,m,l --out_dir=$OUT
python -m experiments.replicate --part=train --arch=retnet,transformer --size=s --out_dir=$OUT
python -m experiments.replicate --part=train --arch=retnet --size=m --out_dir=$OUT
python -m experiments.replicate --part=train --arch=transformer --size=m --out_dir=$OUT
  (the same two for --size=l)
python -m experiments.replicate --part=mqar --mqar_size=s,m --out_dir=$OUT
python -m experiments.replicate --part=mqar --mqar_setup=small --mqar_size=xs  (an easier task, CPU)
python -m experiments.replicate --part=train --arch=retnet --size=s-k128 --out_dir=$OUT  (K = 128 heads)
python -m experiments.replicate --part=train --arch=retnet --size=m-k128 --out_dir=$OUT
python -m experiments.replicate --part=train --arch=retnet,transformer --size=s-lr3e-3 --out_dir=$OUT
  (other rates: s-lr3e-4; m-lr3e-4 and m-lr3e-3 one architecture a call)
python -m experiments.replicate --part=report"""


def _load(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_results(results_dir: str) -> dict[str, Any]:
    """Every result file of the folder: corpus, calibration, train runs and MQAR runs by (arch, size)."""
    found: dict[str, Any] = {
        "corpus": _load(os.path.join(results_dir, "corpus.json")),
        "calibrate": _load(os.path.join(results_dir, "calibrate.json")),
        "train": {},
        "mqar": {},
        "mqar_variants": {},  # {variant: {(arch, size): run}}: MQAR set-ups other than the study's
    }
    for kind in ("train", "mqar"):
        for path in sorted(glob.glob(os.path.join(results_dir, f"{kind}_*_*.json"))):
            arch, size = os.path.basename(path)[len(kind) + 1 : -len(".json")].split("_", 1)
            if kind == "mqar" and "@" in size:
                size, variant = size.split("@", 1)
                found["mqar_variants"].setdefault(variant, {})[(arch, size)] = _load(path)
            else:
                found[kind][(arch, size)] = _load(path)
    return found


def _sizes(runs: dict) -> list[str]:
    sizes = {size for _, size in runs}
    return sorted(sizes, key=lambda s: (SIZE_ORDER.index(s) if s in SIZE_ORDER else len(SIZE_ORDER), s))


def _fmt(value, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _count(n) -> str:
    if not n:
        return "–"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _ok(run: dict | None) -> bool:
    return bool(run) and run.get("status") == "ok"


def _has(run: dict | None, measurement: str) -> bool:
    """The run finished and its ``measurement`` (extrapolation, decode) succeeded."""
    return _ok(run) and run.get(measurement, {}).get("status", "missing") == "ok"


def corpus_section(corpus: dict | None) -> str:
    if not corpus:
        return "## Corpus\n\nNo `corpus.json`: run `--part=corpus`."
    stats, tokens = corpus["corpus"], corpus["tokens"]
    rows = [
        [
            split,
            f"{stats['files'][split]:,}",
            f"{stats['packages'][split]:,}",
            f"{stats['bytes'][split] / 1e6:.1f}",
            f"{tokens[split] / 1e6:.2f}M",
            f"{corpus['bytes_per_token'][split]:.2f}",
        ]
        for split in ("train", "validation")
    ]
    skipped = ", ".join(f"{k} {v:,}" for k, v in stats["skipped"].items()) or "none"
    packages = stats["validation_packages"]
    shown = ", ".join(packages[:40]) + (f", … ({len(packages)} in all)" if len(packages) > 40 else "")
    return "\n\n".join(
        [
            "## Corpus",
            f"The `*.py` files of {', '.join(stats['roots'])}, split by top-level package "
            f"(validation: {stats['options']['validation_fraction']:.0%} of the bytes, packages never "
            "seen in "
            f"training). Byte-level BPE of {corpus['tokenizer']['vocab_size']} entries trained on the train "
            f"split (digest `{corpus['tokenizer']['digest']}`); corpus fingerprint "
            f"`{stats['fingerprint'][:16]}`. "
            "Tokens include the BOS and EOS framing each file.",
            _table(["split", "files", "packages", "MB", "tokens", "bytes/token"], rows),
            f"Left out: {skipped}.",
            f"Validation packages: {shown}.",
        ]
    )


def calibration_section(calibrate: dict | None) -> str:
    if not calibrate:
        return ""
    rows = []
    for size in sorted(calibrate["runs"], key=lambda s: SIZE_ORDER.index(s) if s in SIZE_ORDER else 99):
        for arch, run in calibrate["runs"][size].items():
            if run.get("status") != "ok":
                rows.append([size, arch, run.get("status", "?")] + [""] * 6)
                continue
            rows.append(
                [
                    size,
                    arch,
                    _count(run["params"]["non_embedding"]),
                    f"{1e3 * run['step_s']:.1f}",
                    f"{run.get('step_tokens_per_s', run['tokens_per_s']):,.0f}",
                    _fmt(run.get("data_tokens_per_s"), ",.0f"),
                    _fmt(run.get("mfu") and 100 * run["mfu"], ".1f"),
                    f"{run['setup_and_compile_s']:.0f}",
                    _fmt(run.get("peak_memory_bytes") and run["peak_memory_bytes"] / 2**30, ".1f"),
                ]
            )
    header = [
        "size",
        "arch",
        "non-emb params",
        "step ms",
        "step tokens/s",
        "data tokens/s",
        "MFU %",
        "setup+compile s",
        "peak GiB",
    ]
    return "\n\n".join(
        [
            "## Step time (calibration)",
            f"Device {calibrate['device']['device_kind']}; the token budgets of the runs were set from these "
            "(the slower architecture's tokens/s through the runs' own training loop, timed for 20 s, × the "
            f"training seconds / {schedule.MARGIN:g}, capped at 20 tokens per parameter and at "
            f"{recipe.MAX_EPOCHS} epochs).",
            _table(header, rows),
        ]
    )


def _consistency(train: dict) -> list[str]:
    notes = []
    ok = {key: run for key, run in train.items() if _ok(run)}
    for field, what in (("corpus_fingerprint", "corpora"), ("tokenizer_digest", "tokenizers")):
        values = {run.get(field) for run in ok.values()}
        if len(values) > 1:
            notes.append(f"**The runs used different {what}** ({field}: {sorted(map(str, values))}).")
    for size in _sizes(ok):
        tokens = {arch: run["tokens_done"] for (arch, s), run in ok.items() if s == size}
        if len(set(tokens.values())) > 1:
            notes.append(f"**Size {size}: the architectures trained on different token counts** {tokens}.")
        for (arch, s), run in ok.items():
            if s == size and run.get("truncated"):
                notes.append(f"Size {size}, {arch}: stopped at its deadline, {run['tokens_done']:,} tokens.")
    return notes


def runs_section(train: dict, corpus: dict | None) -> str:
    if not train:
        return "## Language models\n\nNo `train_*.json` yet."
    rows = []
    for size in _sizes(train):
        # the Transformer at the same size (a learning-rate variant's own), else the base size's
        base = train.get(("transformer", size)) or train.get(("transformer", recipe.base_size(size)))
        for arch in recipe.ARCHS:
            run = train.get((arch, size))
            if run is None:
                continue
            if not _ok(run):
                rows.append([size, arch, run.get("status", "?")] + [""] * 11)
                continue
            delta = ""
            if arch == "retnet" and _ok(base):
                delta = f"{run['final_eval_loss'] - base['final_eval_loss']:+.4f}"
            rows.append(
                [
                    size,
                    arch,
                    _count(run["params"]["non_embedding"]),
                    _count(run["params"]["total"]),
                    _count(run["tokens_done"]),
                    f"{run['tokens_done'] / run['params']['non_embedding']:.1f}",
                    _fmt(_epochs(run, corpus), ".2f"),
                    str(run["budget"].get("limited_by", "–")),
                    f"{run['final_eval_loss']:.4f}",
                    f"{math.exp(run['final_eval_loss']):.2f}",
                    delta,
                    _fmt(run.get("tokens_per_s"), ",.0f"),
                    _fmt(run.get("mfu") and 100 * run["mfu"], ".1f"),
                    f"{sum(run['phases'].values()):.0f}",
                ]
            )
    header = [
        "size",
        "arch",
        "non-emb params",
        "params",
        "tokens",
        "tokens/param",
        "epochs",
        "limited by",
        "val loss",
        "val ppl",
        "RetNet − Transformer",
        "train tokens/s",
        "MFU %",
        "run s",
    ]
    first = next(run for run in train.values() if _ok(run)) if any(_ok(r) for r in train.values()) else None
    recipe_line = ""
    if first:
        c = first["config"]
        recipe_line = (
            f"Recipe: AdamW β = ({c['b1']}, {c['b2']}), weight decay {c['weight_decay']}, clip "
            f"{c['grad_clip']}, "
            f"{c['schedule']} decay to {c['end_learning_rate_factor']}× after {c['warmup_steps']} "
            "warm-up steps "
            f"(5%), batches of {c['batch_size']} × {c['seq_len']} tokens, {first['architecture']['dtype']} "
            f"compute, RetNet in the {c['mode']} form (C = {c['chunk_size']}); validation loss in nats per "
            "token on the held-out packages."
        )
    budget_line = (
        "Tokens: every run trains on the same number of tokens whatever its size (*limited by* "
        "`the study's tokens`), as the paper compares its sizes: what the largest size trains in one device "
        "call. The smaller sizes could train longer; at equal tokens the larger models are the less trained "
        "per parameter."
        if all("--tokens" in str(run["budget"].get("limited_by", "")) for run in train.values())
        else "Token budget of a size (the same for both architectures): what the slower one trains in the "
        f"training time a device call leaves, capped at 20 tokens per non-embedding parameter and at "
        f"{recipe.MAX_EPOCHS} epochs of the training split; *limited by* names the cap that bound. A size "
        "limited by time trains on fewer than 20 tokens per parameter: its losses are those of a short, "
        "equal-compute run, not of a converged model."
    )
    return "\n\n".join(["## Language models", recipe_line, budget_line, _table(header, rows)])


def _epochs(run: dict, corpus: dict | None) -> float | None:
    """Passes over the training split: the run's own count, else from corpus.json."""
    if run.get("epochs_done") is not None:
        return run["epochs_done"]
    return run["tokens_done"] / corpus["tokens"]["train"] if corpus else None


def extrapolation_section(train: dict) -> str:
    rows = []
    for size in _sizes(train):
        for arch in recipe.ARCHS:
            run = train.get((arch, size))
            if not _has(run, "extrapolation"):
                continue
            e = run["extrapolation"]
            w = e["window_mean"]
            rows.append(
                [
                    size,
                    arch,
                    str(e["seq_len"]),
                    str(e["documents"]),
                    f"{w['0-1x']:.4f}",
                    f"{w['1-2x']:.4f}",
                    f"{w['2-4x']:.4f}",
                    f"{w['2-4x'] - w['0-1x']:+.4f}",
                ]
            )
    if not rows:
        return ""
    header = [
        "size",
        "arch",
        "T",
        "documents",
        "loss [0, T)",
        "loss [T, 2T)",
        "loss [2T, 4T)",
        "[2T, 4T) − [0, T)",
    ]
    return "\n\n".join(
        [
            "## Length extrapolation",
            "Validation files of at least 4T tokens, each read from its start in one call of 4T tokens; mean "
            "loss over positions in each window. Within one file later positions are easier (more "
            "context), so "
            "a model that extrapolates has a lower loss past T than before it.",
            _table(header, rows),
        ]
    )


def decode_section(train: dict) -> str:
    rows = []
    for size in _sizes(train):
        for arch in recipe.ARCHS:
            run = train.get((arch, size))
            if not _has(run, "decode"):
                continue
            d = run["decode"]
            cells = [
                f"{v['tokens_per_s']:,.0f} ({v['ms_per_step']:.2f} ms/step)" for v in d["by_batch"].values()
            ]
            rows.append([size, arch, ", ".join(f"B={b}" for b in d["by_batch"]), *cells])
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    first = next(run["decode"] for run in train.values() if _has(run, "decode"))
    header = ["size", "arch", "batches"] + [f"tokens/s #{i + 1}" for i in range(width - 3)]
    return "\n\n".join(
        [
            "## Decoding speed of the trained models",
            f"Greedy, {first['prompt_tokens']}-token prompts, {first['new_tokens']} new tokens, "
            "parameters in "
            f"{first['dtype']}; `inference.generate` (prefill included), median of 3 calls after a "
            "compiling one.",
            _table(header, rows),
        ]
    )


def _mqar_table(mqar: dict) -> str:
    pairs = sorted({int(p) for run in mqar.values() if run for p in run["best"]["accuracy"]})
    rows = []
    for size in _sizes(mqar):
        for arch in recipe.ARCHS:
            run = mqar.get((arch, size))
            if not run:
                continue
            best = run["best"]
            rows.append(
                [size, arch, f"d{run['size']['d_model']}", _count(run["runs"][0]["params"])]
                + [_fmt(best["accuracy"].get(str(p)), ".3f") for p in pairs]
                + [", ".join(f"{r['learning_rate']:g}" for r in run["runs"])]
                + [", ".join(_fmt(r.get("final_train_loss"), ".3f") for r in run["runs"])]
            )
    header = (
        ["size", "arch", "width", "params"]
        + [f"{p} keys" for p in pairs]
        + ["learning rates", "final train loss (each rate)"]
    )
    return _table(header, rows)


def _mqar_setup_text(mqar: dict) -> str:
    first = next(iter(mqar.values()))
    setup = first["setup"]
    device = (first.get("device") or {}).get("short", "unknown device")
    return (
        f"Rows of {setup['seq_len']} tokens, vocabulary {setup['vocab_size']}, keys from the lower half and "
        f"values from the upper, queries at power-law gaps (a = {setup['power_a']}); trained on "
        f"{setup['train_examples']:,} rows mixing {list(setup['train_pairs'])} keys for {setup['steps']} "
        f"steps of {setup['batch_size']}; accuracy on {setup['eval_examples']} test rows per key count, the "
        "best learning rate per key count (chance: one over half the vocabulary); loss only on the answers "
        f"(a model that knows only that answers are values has the loss ln {setup['vocab_size'] // 2} = "
        f"{math.log(setup['vocab_size'] // 2):.2f}). Two layers. Device: {device}."
    )


def mqar_section(mqar: dict, variants: dict | None = None) -> str:
    if not mqar and not variants:
        return ""
    parts = ["## Associative recall (MQAR)"]
    if mqar:
        parts += [_mqar_setup_text(mqar), _mqar_table(mqar)]
    for variant, runs in sorted((variants or {}).items()):
        parts += [f"### Set-up `{variant}`", _mqar_setup_text(runs), _mqar_table(runs)]
    return "\n\n".join(parts)


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel_runs(train: dict, size: str):
    """(label, line style, run) of a base size's panel: its runs, then its ablations' (head widths
    dotted, learning rates dashed)."""
    for name in _sizes(train):
        if recipe.base_size(name) != size:
            continue
        for arch in recipe.ARCHS:
            run = train.get((arch, name))
            if run is None:
                continue
            if name == size:
                yield arch, dict(ARCH_STYLE[arch]), run
            elif name in recipe.HEAD_ABLATIONS:
                yield f"{arch} ({name})", dict(ARCH_STYLE[arch], marker="^", linestyle=":"), run
            else:
                yield f"{arch} ({name})", dict(ARCH_STYLE[arch], marker="x", linestyle="--"), run


def _panel_sizes(train: dict, has) -> list[str]:
    """Base sizes with a run that ``has`` (an ablation's run puts its base size in)."""
    return [
        s
        for s in _sizes(train)
        if s not in recipe.ABLATIONS and any(has(r) for *_, r in _panel_runs(train, s))
    ]


def plot_loss(train: dict, path: str) -> str | None:
    sizes = _panel_sizes(train, _ok)
    if not sizes:
        return None
    plt, fig, axes = _figure(len(sizes))
    for ax, size in zip(axes, sizes, strict=True):
        for label, style, run in _panel_runs(train, size):
            if _ok(run):
                points = run["eval_curve"][1:]  # the untrained point would flatten the plot
                ax.plot([p["tokens"] for p in points], [p["loss"] for p in points], label=label, **style)
        ax.set_title(f"size {size}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path)


def plot_scaling(train: dict, path: str) -> str | None:
    if not any(_ok(r) for r in train.values()):
        return None
    plt, fig, axes = _figure(1)
    ax = axes[0]
    for arch in recipe.ARCHS:
        for kind, names, label, style in (
            ("base", None, arch, ARCH_STYLE[arch]),
            ("heads", recipe.HEAD_ABLATIONS, f"{arch}, K = 128 heads", dict(marker="^", linestyle=":")),
            ("rates", recipe.LR_ABLATIONS, f"{arch}, other learning rates", dict(marker="x", linestyle="")),
        ):
            points = sorted(
                (run["params"]["non_embedding"], run["final_eval_loss"])
                for (a, size), run in train.items()
                if a == arch
                and _ok(run)
                and (size in names if names is not None else size not in recipe.ABLATIONS)
            )
            if points:
                line = dict(ARCH_STYLE[arch], **style) if kind != "base" else style
                ax.plot(*zip(*points, strict=True), label=label, **line)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_extrapolation(train: dict, path: str) -> str | None:
    sizes = _panel_sizes(train, lambda run: _has(run, "extrapolation"))
    if not sizes:
        return None
    plt, fig, axes = _figure(len(sizes))
    for ax, size in zip(axes, sizes, strict=True):
        seq_len = None
        for label, style, run in _panel_runs(train, size):
            if _has(run, "extrapolation"):
                e = run["extrapolation"]
                seq_len, width = e["seq_len"], e["bin_width"]
                x = [(i + 0.5) * width for i in range(len(e["binned"]))]
                ax.plot(
                    x, e["binned"], label=label, color=style["color"], linestyle=style.get("linestyle", "-")
                )
        for k in (1, 2):
            ax.axvline(k * seq_len, color="gray", ls="--", lw=0.8)
        ax.set_title(f"size {size} (trained at T = {seq_len})")
        ax.set_xlabel("position in the file")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path)


def plot_mqar(mqar: dict, path: str) -> str | None:
    sizes = [s for s in _sizes(mqar) if any(mqar.get((a, s)) for a in recipe.ARCHS)]
    if not sizes:
        return None
    plt, fig, axes = _figure(len(sizes))
    for ax, size in zip(axes, sizes, strict=True):
        for arch in recipe.ARCHS:
            run = mqar.get((arch, size))
            if run:
                points = sorted((int(p), a) for p, a in run["best"]["accuracy"].items())
                ax.plot(*zip(*points, strict=True), label=arch, **ARCH_STYLE[arch])
                width = run["size"]["d_model"]
        ax.set_xscale("log", base=2)
        ticks = sorted(
            {int(p) for a in recipe.ARCHS if mqar.get((a, size)) for p in mqar[(a, size)]["best"]["accuracy"]}
        )
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR, size {size} (d{width})")
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path)


def device_name(found: dict[str, Any]) -> str:
    """The short device name of the runs (e.g. H200), from any result that has one."""
    for run in [*found["train"].values(), *found["mqar"].values(), found["calibrate"], found["corpus"]]:
        if run and run.get("device"):
            return run["device"]["short"]
    return "unknown"


def recorded_commands(found: dict[str, Any]) -> str:
    """The commands that made the results in this report, as each result recorded its own."""
    rows = [
        (name, run["command"])
        for name, run in [
            ("calibration", found["calibrate"]),
            *((f"train {arch} {size}", run) for (arch, size), run in sorted(found["train"].items())),
            *((f"mqar {arch} {size}", run) for (arch, size), run in sorted(found["mqar"].items())),
            *(
                (f"mqar {arch} {size} ({variant})", run)
                for variant, runs in sorted(found["mqar_variants"].items())
                for (arch, size), run in sorted(runs.items())
            ),
        ]
        if run and run.get("command")
    ]
    if not rows:
        return ""
    # the output folder was the device call's own: written as the commands above write it
    lines = [f"| {name} | `{re.sub(r'--out_dir=[^ ]+', '--out_dir=$OUT', cmd)}` |" for name, cmd in rows]
    return "\n".join(["The results above were made by:", "", "| result | command |", "|---|---|", *lines])


def write_report(results_dir: str, report_dir: str, date: str) -> str:
    """Writes the markdown report and its plots; returns the markdown's path."""
    found = load_results(results_dir)
    os.makedirs(report_dir, exist_ok=True)
    stem = os.path.join(report_dir, f"replication_{device_name(found)}_{date}")
    plots = {
        "Validation loss during training": plot_loss(found["train"], stem + "_loss.png"),
        "Final loss against size": plot_scaling(found["train"], stem + "_scaling.png"),
        "Loss by position": plot_extrapolation(found["train"], stem + "_extrapolation.png"),
        "Associative recall": plot_mqar(found["mqar"], stem + "_mqar.png"),
    }
    notes = _consistency(found["train"])
    sections = [
        f"# Does it learn? RetNet against the Transformer at small scale ({device_name(found)}, {date})",
        "Both architectures are built by this library from the same configuration, differ only in the token "
        "mixer (multi-scale retention or softmax attention), have the same parameter count, and train on the "
        "same tokens in the same order.",
        "\n".join(f"- {n}" for n in notes) if notes else "",
        corpus_section(found["corpus"]),
        calibration_section(found["calibrate"]),
        runs_section(found["train"], found["corpus"]),
        extrapolation_section(found["train"]),
        decode_section(found["train"]),
        mqar_section(found["mqar"], found["mqar_variants"]),
        "## Plots\n\n"
        + "\n\n".join(f"{title}:\n\n![{title}]({os.path.basename(p)})" for title, p in plots.items() if p),
        "## Commands\n\nEach command below is one device call (under 10 minutes on an H200); copy what it "
        "writes under `$OUT` into `experiments/results/replication/`, then run the report:\n\n```bash\n"
        + COMMANDS
        + "\n```",
        recorded_commands(found),
    ]
    text = "\n\n".join(s for s in sections if s) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    return stem + ".md"
