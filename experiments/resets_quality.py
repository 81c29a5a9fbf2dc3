"""What document resets do to quality: the same model trained on the same tokens with and without
``reset_at_documents``, each evaluated on the same validation batches under both rules.

    python -m experiments.resets_quality                     # one H200: ~4 min for the four runs (est.)
    python -m experiments.resets_quality --smoke             # toy sizes on a CPU (about a minute)
    python -m experiments.resets_quality --archs=retnet --seeds=0,1 --tag=seeds   # the spread of seeds

Each run is ``retnet_jax.training.loop.train_and_evaluate`` (the library's loop: its data pipeline,
Trainer, learning-rate schedule and periodic validation) on the offline default corpus (the running
Python's top-level standard-library modules, one document per file; ``--dataset`` and ``--tokenizer``
point it elsewhere, e.g. the replication's code corpus and BPE). For each architecture (``--archs``) and
seed, two runs differ only in ``reset_at_documents``: same initialization, same batches in the same
order, same number of tokens. The final parameters are then evaluated on the validation split's first
``--eval_batches`` batches (0: all of it) with ``Trainer.eval_step(reset_at_documents=...)``, both ways:

* with resets: retention's state is emptied and positions restart at every document start inside a row
  (the Transformer masks attention across documents), so each document's piece of the row is read alone;
* without: state, attention and positions flow from the previous document into the next.

The two rules compute the same thing for every token before a row's first document start (causality),
so they differ only on the targets after it; the report gives the loss on those targets alone ("after a
boundary") beside the loss on all, and how many rows and tokens that is. A row's first piece (a
document cut at the row start) starts from an empty state under both rules, as every packed row does.

Defaults: a 30M-parameter model (D512, L8, H4, V = F = 2D; the Transformer of equal size beside it),
byte tokens, rows of 8192 tokens (the default corpus's documents average ~28K byte tokens: at T=2048
only ~7% of the rows would hold a document start; at 8192 ~30% of the validation rows do, and ~15% of
its targets follow one), 2 rows a step, 800 steps: 13M tokens,
about 3 epochs of the corpus's training split (4.3M tokens; more would mostly measure memorization).
The validation split is ~17 modules (~0.37M tokens): the comparison rests on few documents, and one
seed gives no spread (``--seeds`` adds seeds).

Results: ``experiments/results/resets_quality_{device}_{date}[_{tag}].{md,json,png}``, the command
included; the PNG shows the validation-loss curves (each run evaluated under its own rule during
training, and both rules at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from experiments import benchlib as bl
from experiments import benchreport as br
from retnet_jax.configs.default import get_config
from retnet_jax.training import checkpoints as checkpoint_lib
from retnet_jax.training import corpus, loop, reporting
from retnet_jax.training import data as data_lib
from retnet_jax.training import tokenizers as tokenizer_lib
from retnet_jax.training.sharding import make_mesh
from retnet_jax.training.trainer import ARCHS, Trainer, model_config, model_vocab_size

_ARCHS = flags.DEFINE_list("archs", list(ARCHS), f"Architectures to train: {ARCHS}.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (initialization and data order); two runs each.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Toy sizes (a CPU run of about a minute); given flags still win.")
_MODEL = flags.DEFINE_string("model", "small", "Preset the architecture starts from.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "D (0: the preset's); V = F = 2D with it.")
_LAYERS = flags.DEFINE_integer("num_layers", 8, "Layers (0: the preset's).")
_HEADS = flags.DEFINE_integer(
    "num_heads", 4, "RetNet heads (0: the preset's); the Transformer keeps its own."
)
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters and optimizer stay float32).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "T: tokens a row.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Rows a step.")
_STEPS = flags.DEFINE_integer("steps", 800, "Steps of every run.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (cosine to 0.1× after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 40, "Linear warm-up steps.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Steps between validation points of the curves.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0, "Validation batches (0: the whole split).")
_MODE = flags.DEFINE_string("mode", "chunkwise", "RetNet's training form: chunkwise or parallel.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "C of the chunkwise form.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", "auto", "Kernels: auto, pallas or xla.")
_DATASET = flags.DEFINE_string("dataset", "default", "The corpus (--config.dataset of retnet-train).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "byte, sentencepiece, or a tokenizer file.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where tfds builds the corpus ('': tfds's default).")
_WORK_DIR = flags.DEFINE_string("work_dir", "", "Keep the runs' workdirs here ('': a temporary folder).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Utilization assumed by the printed time estimate.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 790.0, "bf16 rate of the estimate (H200: ~790 measured).")

# --smoke: toy sizes, each unless its flag is given on the command line.
SMOKE = dict(
    model="tiny",
    d_model=0,
    num_layers=0,
    num_heads=0,
    dtype="float32",
    seq_len=512,
    batch_size=2,
    steps=6,
    warmup_steps=2,
    eval_every=3,
    eval_batches=4,
    learning_rate=3e-3,
)


def _value(flag) -> Any:
    if _SMOKE.value and flag.name in SMOKE and not flags.FLAGS[flag.name].present:
        return SMOKE[flag.name]
    return flag.value


def experiment_config(arch: str, resets: bool, seed: int):
    """The library's default experiment with this study's sizes; runs differ in arch, resets and seed."""
    c = get_config()
    c.arch, c.model, c.reset_at_documents, c.seed = arch, _value(_MODEL), resets, seed
    overrides = c.model_overrides
    if _value(_D_MODEL):
        d = _value(_D_MODEL)
        overrides.d_model, overrides.value_dim, overrides.ffn_dim = d, 2 * d, 2 * d
    if _value(_LAYERS):
        overrides.num_layers = _value(_LAYERS)
    if _value(_HEADS):
        overrides.num_heads = _value(_HEADS)
    overrides.dtype = _value(_DTYPE)
    overrides.dropout = 0.0
    c.mode, c.chunk_size, c.implementation = _MODE.value, _CHUNK.value, _IMPLEMENTATION.value
    c.dataset, c.tokenizer, c.data_dir = _DATASET.value, _TOKENIZER.value, _DATA_DIR.value
    c.seq_len, c.batch_size, c.steps = _value(_SEQ_LEN), _value(_BATCH), _value(_STEPS)
    c.learning_rate, c.warmup_steps, c.schedule = _value(_LR), _value(_WARMUP), "cosine"
    c.eval_every, c.eval_batches = _value(_EVAL_EVERY), _value(_EVAL_BATCHES) or 10**9
    c.log_every = max(1, c.steps // 50)
    c.checkpoint_every, c.keep_checkpoints = c.steps, 1  # the final state only: it is read back here
    c.mesh = "-1,1,1"
    return c


# ------------------------------------------------------------------------------------------------------
# Data: the validation batches every model is measured on, and how many document boundaries rows hold.


def validation_batches(config, tokenizer, vocab_size: int) -> list[dict[str, np.ndarray]]:
    """The batches ``loop.evaluate`` reads (the split's first ``eval_batches``, in order), each with
    ``after_boundary`` [B, T] float32 marking the targets after the row's first document start (where the
    rules differ)."""
    iterator = data_lib.make_dataset(config, tokenizer, config.eval_split, train=False, vocab_size=vocab_size)
    try:
        batches = [b for _, b in zip(range(config.eval_batches), iterator, strict=False)]
    finally:
        iterator.close()
    if not batches:
        raise ValueError(f"The validation split gives no full batch of {config.batch_size}×{config.seq_len}.")
    for batch in batches:
        batch["after_boundary"] = after_boundary(batch["segment_ids"]).astype(np.float32)
    return batches


def after_boundary(segment_ids: np.ndarray) -> np.ndarray:
    """[B, T] bool: positions whose input belongs to a document that started inside the row."""
    return segment_ids != segment_ids[:, :1]


def row_stats(batches) -> dict[str, float]:
    """Rows, the share of rows holding a document start after position 0, the share of such tokens."""
    ids = np.concatenate([b["segment_ids"] for b in batches])
    marked = after_boundary(ids)
    return dict(
        rows=int(ids.shape[0]),
        rows_with_boundary=float(marked.any(axis=1).mean()),
        tokens_after_boundary=float(marked.mean()),
        boundaries=int(np.sum(ids[:, 1:] != ids[:, :-1])),
    )


def document_stats(config, tokenizer, split: str) -> dict[str, float]:
    """Documents of a split and their mean length in tokens ([BOS] + ids + [EOS], as packed)."""
    source = corpus.text_source(
        config.dataset, split, data_dir=config.data_dir or None, text_feature=config.text_feature
    )
    lengths = np.array([len(tokenizer.encode(source[i])) + 2 for i in range(len(source))])
    return dict(documents=len(lengths), tokens=int(lengths.sum()), mean_tokens=float(lengths.mean()))


def training_row_stats(config, tokenizer, vocab_size: int, batches: int) -> dict[str, float]:
    """``row_stats`` of the first training batches (the ones every run starts with)."""
    iterator = data_lib.make_dataset(config, tokenizer, config.train_split, train=True, vocab_size=vocab_size)
    try:
        return row_stats([b for _, b in zip(range(batches), iterator, strict=False)])
    finally:
        iterator.close()


# ------------------------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass
class Measured:
    loss: float  # mean over the validation batches, all targets
    after_boundary: float | None  # over the targets after a boundary (None: the batches hold none)


def evaluate(trainer: Trainer, params, batches, reset_at_documents: bool) -> Measured:
    """The validation loss of ``params`` under one rule: all targets, and those after a boundary."""
    sums = np.zeros(2)
    counts = np.zeros(2)
    for batch in batches:
        for i, weights in enumerate((np.ones_like(batch["after_boundary"]), batch["after_boundary"])):
            local = dict(
                inputs=batch["inputs"],
                targets=batch["targets"],
                segment_ids=batch["segment_ids"],
                weights=weights,
            )
            loss = trainer.eval_step(
                params, trainer.global_batch(local), reset_at_documents=reset_at_documents
            )
            sums[i] += float(loss) * weights.sum()
            counts[i] += weights.sum()
    return Measured(
        loss=float(sums[0] / counts[0]), after_boundary=float(sums[1] / counts[1]) if counts[1] else None
    )


def run(arch: str, resets: bool, seed: int, work_dir: str) -> dict[str, Any]:
    """Trains one model with the library's loop, then measures it under both rules."""
    config = experiment_config(arch, resets, seed)
    workdir = os.path.join(work_dir, f"{arch}_{'resets' if resets else 'flow'}_seed{seed}")
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resumed one
    start = time.perf_counter()
    state = loop.train_and_evaluate(config, workdir)
    wall_s = time.perf_counter() - start
    with contextlib.closing(checkpoint_lib.Checkpoints(workdir, read_only=True)) as reader:
        tokenizer = tokenizer_lib.tokenizer_from_dict(reader.restore_tokenizer())
    trainer = Trainer(config, model_config(config, model_vocab_size(tokenizer)), make_mesh(config.mesh))
    batches = validation_batches(config, tokenizer, trainer.model_config.vocab_size)
    start = time.perf_counter()
    measured = {rule: evaluate(trainer, state.params, batches, rule) for rule in (True, False)}
    eval_s = time.perf_counter() - start
    records = reporting.read_metrics(workdir)
    tokens_per_step = config.batch_size * config.seq_len
    curve = [
        dict(step=r["step"], tokens=r["step"] * tokens_per_step, loss=r["eval_loss"])
        for r in records
        if "eval_loss" in r
    ]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    step = int(state.step)
    return dict(
        status="ok",
        params=trainer.num_params,
        flops_per_token=trainer.train_flops_per_token(),
        steps=step,
        tokens=step * tokens_per_step,
        wall_s=wall_s,
        eval_s=eval_s,
        tokens_per_s=float(np.median(speeds)) if speeds else None,
        eval_with_resets=measured[True].loss,
        eval_without_resets=measured[False].loss,
        after_boundary_with_resets=measured[True].after_boundary,
        after_boundary_without_resets=measured[False].after_boundary,
        curve=curve,
        # The loop's last validation point (its own evaluation, the training rule) against ours.
        curve_check=curve[-1]["loss"] - measured[resets].loss if curve else None,
        validation=row_stats(batches),
        tokenizer=type(tokenizer).__name__,
    )


# ------------------------------------------------------------------------------------------------------
# Report.


def _loss(key: str):
    return br.when_ok(lambda r: br.fmt(r.get(key), 1, ".4f"))


COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("params", lambda r: br.fmt_count(r.get("params"))),
    ("seed", lambda r: str(r["seed"])),
    ("resets in training", lambda r: "yes" if r["resets"] else "no"),
    ("val loss, eval with resets", _loss("eval_with_resets")),
    ("val loss, eval without", _loss("eval_without_resets")),
    ("after a boundary: with resets", _loss("after_boundary_with_resets")),
    ("after a boundary: without", _loss("after_boundary_without_resets")),
    ("tokens trained", br.when_ok(lambda r: br.fmt_count(r["tokens"]))),
    ("steps", br.when_ok(lambda r: str(r["steps"]))),
    ("wall s", br.when_ok(lambda r: br.fmt(r["wall_s"], 1, ".0f"))),
    ("tokens/s", br.when_ok(lambda r: br.fmt(r.get("tokens_per_s"), 1, ",.0f"))),
]


def comparisons(rows) -> list[str]:
    """One line per architecture and seed: trained with resets minus trained without, under each rule."""
    lines = []
    done = {(r["arch"], r["seed"], r["resets"]): r for r in rows if r.get("status") == "ok"}
    for arch, seed in dict.fromkeys((r["arch"], r["seed"]) for r in rows):
        pair = done.get((arch, seed, True)), done.get((arch, seed, False))
        if None in pair:
            continue
        parts = []
        for key, label in (
            ("eval_with_resets", "evaluated with resets"),
            ("eval_without_resets", "evaluated without"),
            ("after_boundary_with_resets", "after a boundary, with resets"),
            ("after_boundary_without_resets", "after a boundary, without"),
        ):
            if pair[0].get(key) is not None and pair[1].get(key) is not None:
                parts.append(f"{label} {pair[0][key] - pair[1][key]:+.4f}")
        lines.append(
            f"- {arch}, seed {seed}: trained with resets − trained without: " + "; ".join(parts) + "."
        )
    return lines


def plot(rows, path: str):
    """Top: each run's validation curve (its own rule), with both rules at the end. Bottom: trained with
    resets minus trained without, per evaluation point (each under its own rule) and at the end."""
    ok = [r for r in rows if r.get("status") == "ok"]
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = br.figure(2, len(archs), size=(5.2, 3.6))
    finals = (("eval_with_resets", "^", "with"), ("eval_without_resets", "v", "without"))
    for column, arch in enumerate(archs):
        ax, below = axes[0][column], axes[1][column]
        for row in (r for r in ok if r["arch"] == arch):
            label = f"{'resets' if row['resets'] else 'no resets'}, seed {row['seed']}"
            tokens = [p["tokens"] / 1e6 for p in row["curve"]]
            (line,) = ax.plot(tokens, [p["loss"] for p in row["curve"]], "o-", ms=3, label=label)
            for key, marker, rule in finals:
                end = row["tokens"] / 1e6
                ax.plot(
                    [end], [row[key]], marker, color=line.get_color(), ms=7, label=f"  final, eval {rule}"
                )
        ax.set(xlabel="tokens trained (M)", ylabel="validation loss (nats/token)", title=arch)
        losses = [p["loss"] for r in ok if r["arch"] == arch for p in r["curve"]]
        if losses:  # the first point (random init) would flatten the rest
            low = min(losses)
            ax.set_ylim(low - 0.05, min(max(losses), low + 1.5))
        for seed in dict.fromkeys(r["seed"] for r in ok if r["arch"] == arch):
            pair = [
                next((r for r in ok if (r["arch"], r["seed"], r["resets"]) == (arch, seed, x)), None)
                for x in (True, False)
            ]
            if None in pair:
                continue
            flow = {p["step"]: p["loss"] for p in pair[1]["curve"]}
            points = [
                (p["tokens"] / 1e6, p["loss"] - flow[p["step"]])
                for p in pair[0]["curve"]
                if p["step"] in flow
            ]
            (line,) = below.plot(*zip(*points, strict=True), "o-", ms=3, label=f"seed {seed}, own rules")
            for key, marker, rule in finals:
                end = pair[0]["tokens"] / 1e6
                delta = pair[0][key] - pair[1][key]
                below.plot(
                    [end], [delta], marker, color=line.get_color(), ms=7, label=f"  final, eval {rule}"
                )
        below.axhline(0.0, color="gray", lw=0.8)
        below.set(
            xlabel="tokens trained (M)", ylabel="Δ loss: resets − no resets", title=f"{arch}: difference"
        )
        below.grid(alpha=0.3)
        for a in (ax, below):
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
    br.save_figure(fig, path)


def write(report, rows, device, data, estimate) -> str:
    config = experiment_config(_ARCHS.value[0], True, 0)
    val, train_rows = data.get("validation_rows", {}), data.get("train_rows", {})
    docs = data.get("documents", {})
    setup = (
        f"Corpus `{config.dataset}`, tokenizer `{config.tokenizer}`; model `{config.model}` with "
        f"{ {k: v for k, v in config.model_overrides.items() if v is not None} }; {config.mode} "
        f"(C={config.chunk_size}, {config.implementation}) for RetNet; T={config.seq_len}, "
        f"B={config.batch_size}, {config.steps} steps, AdamW lr {config.learning_rate:g} (cosine, "
        f"{config.warmup_steps} warm-up steps), no dropout. Every pair of runs shares its seed: same "
        "initialization, same batches in the same order."
    )
    lines = [setup]
    if docs:
        lines.append(
            "Documents: "
            + "; ".join(
                f"{split} {d['documents']} documents, {d['tokens']:,} tokens, mean {d['mean_tokens']:,.0f} "
                f"tokens a document"
                for split, d in docs.items()
            )
            + "."
        )
    if val:
        lines.append(
            f"Validation batches: {val['rows']} rows of {config.seq_len}; "
            f"{100 * val['rows_with_boundary']:.1f}% hold a document start after position 0 "
            f"({val['boundaries']} starts); "
            f"{100 * val['tokens_after_boundary']:.1f}% of the targets follow one (the only targets the two "
            "rules treat differently: the 'after a boundary' columns)."
        )
    if train_rows:
        lines.append(
            f"Training rows (first {train_rows['rows']}): "
            f"{100 * train_rows['rows_with_boundary']:.1f}% hold a document start, "
            f"{100 * train_rows['tokens_after_boundary']:.1f}% of the targets follow one."
        )
    if estimate:
        lines.append(estimate)
    notes = (
        "Eval with resets: each document's piece of a row from an empty state (attention masked across "
        "documents for the Transformer), positions restarting; without: state and positions flow across "
        "documents. Losses are mean cross-entropy per token (nats) over the same validation batches for "
        "every model. Wall s: the library's train_and_evaluate (compilation, periodic validation and the "
        "final checkpoint included). One seed per pair unless more rows are shown: differences between "
        "trainings smaller than the seed-to-seed spread say nothing."
    )
    sections = [
        br.ceilings_markdown(device, None),
        "\n\n".join(lines),
        br.markdown_table(rows, COLUMNS),
        "\n".join(comparisons(rows)) or "(no complete pair)",
        notes,
    ]
    return report.write(
        "Document resets: validation loss", sections, dict(device=device, data=data, rows=rows)
    )


def time_estimate(vocab_size: int) -> str:
    """The training time of all runs from the model FLOPs at ``--mfu`` of ``--peak_tflops``."""
    mesh = make_mesh("-1,1,1")
    total = 0.0
    for arch in _ARCHS.value:
        config = experiment_config(arch, True, 0)
        flops = Trainer(config, model_config(config, vocab_size), mesh).train_flops_per_token()
        tokens = config.steps * config.batch_size * config.seq_len
        total += 2 * len(_SEEDS.value) * tokens * flops / (_MFU.value * _PEAK_TFLOPS.value * 1e12)
    return (
        f"Estimate from the model FLOPs at {_MFU.value:.0%} of {_PEAK_TFLOPS.value:g} TFLOP/s: "
        f"{total:.0f} s of training steps for all runs (compilation and evaluation not included)."
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # checkpointing logs every save and restore at INFO
    bad = [a for a in _ARCHS.value if a not in ARCHS]
    if bad:
        raise app.UsageError(f"--archs: unknown {bad}; choose from {ARCHS}.")
    seeds = [int(s) for s in _SEEDS.value]
    device = bl.device_info()
    report = br.Report("resets_quality", device["short"])
    config = experiment_config(_ARCHS.value[0], True, seeds[0])
    loop.validate(config, make_mesh(config.mesh))  # refused sizes fail before any training
    tokenizer = data_lib.make_tokenizer(config)
    vocab = model_vocab_size(tokenizer)
    estimate = time_estimate(vocab)
    print(estimate, flush=True)
    data: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        work_dir = _WORK_DIR.value or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="resets_quality_")
        )
        for seed in seeds:
            for arch in _ARCHS.value:
                for resets in (True, False):
                    print(f"== {arch}, seed {seed}, resets in training: {resets}", flush=True)
                    row = dict(arch=arch, seed=seed, resets=resets)
                    row.update(bl.guarded(lambda a=arch, r=resets, s=seed: run(a, r, s, work_dir)))
                    rows.append(row)
                    if row["status"] == "ok" and "validation_rows" not in data:
                        data["validation_rows"] = row["validation"]
                        data["documents"] = {
                            split: document_stats(config, tokenizer, split)
                            for split in (config.train_split, config.eval_split)
                        }
                        data["train_rows"] = training_row_stats(
                            config, tokenizer, vocab, min(config.steps, 200)
                        )
                    text = write(report, rows, device, data, estimate)
    if br.PLOTS.value:
        bl.guarded(lambda: plot(rows, report.png))
    print(text)
    print("Wrote", *report.paths())


if __name__ == "__main__":
    app.run(main)
