"""Training throughput on one device: tokens/s, MFU and peak memory of a full train step (forward,
cross-entropy, backward, AdamW with clipping) for RetNet, the Transformer baseline, torchscale's RetNet and
fla's RetNet.

    python -m experiments.bench_training --models=paper-1.3b --archs=retnet,transformer   # ~6-8 min, H100
    python -m experiments.bench_training --models=paper-1.3b --archs=torchscale
    python -m experiments.bench_training --models=paper-1.3b --archs=retnet,transformer,fla \
        --chunk_size=64 --time_budget_s=540 --tag=fla-train-1.3b     # T 2K/8K/16K, ~8 min
    python -m experiments.bench_training --models=paper-2.7b --archs=retnet,transformer --lengths=2048,8192
    python -m experiments.bench_training --models=tiny --lengths=64 --tokens_per_step=256 \
        --steps=3 --in_process                                      # CPU smoke run (under a minute)

    # What packed documents with resets cost (mean length 1000 against none), one T per command (~6 min):
    python -m experiments.bench_training --models=paper-1.3b --archs=retnet,transformer --chunk_size=64 \
        --documents=0,1000 --lengths=2048 --time_budget_s=540       # and again with --lengths=8192

    # Remat policies side by side (nn/remat.py) in one process, 12 configurations of ~20 s (add "none"
    # for the no-remat bound):
    python -m experiments.bench_training --models=paper-1.3b --archs=retnet,transformer --chunk_size=64 \
        --lengths=2048,8192 --remat=full,projections,mixer --in_process --steps=5 --time_budget_s=270

Ours runs through ``retnet_jax.training.trainer.Trainer`` (``--arch`` retnet or transformer, bf16 compute,
float32 parameters and optimizer state) on a one-device mesh, with synthetic batches of random token ids.
B = max(1, tokens_per_step / T), unless ``--batch_size`` is given. RetNet trains chunkwise with
``--chunk_size`` (0: parallel); the Transformer uses cuDNN flash attention on GPU. torchscale 0.3.0's
``RetNetDecoder`` (PyTorch, bf16 autocast, float32 master weights, fused AdamW, the same clipping) runs
at the same D, L, H, value width and vocabulary; its FFN is always a GLU, so for the paper presets (a GELU
MLP with F = 2D) it gets F' = 2F/3, which matches the parameter count.

fla (flash-linear-attention 0.6.0) trains its ``RetNetForCausalLM`` as a user would: its config from ours by
``peer_configs.fla_retnet_config`` (the same D, L, H, K = D/H, value width and vocabulary, the GLU width F' as
for torchscale), its defaults otherwise: chunk mode (C = 64, fixed), fused RMSNorm and norm + swish gate,
fused SwiGLU, fused cross-entropy on ``labels`` (shifted inside the model). Its architecture differs where
fla fixes it: RMSNorm (the paper presets: LayerNorm), rotate-half rotation, unnormalized retention, no
dropout. ``--fla_params`` float32 keeps float32 parameters and AdamW state under bf16 autocast (as ours and
torchscale); bfloat16 casts the model to bf16 as fla's own throughput script does. The same AdamW and
clipping, grad checkpointing per block for ``--remat=full``. Both peers' rows give their parameter count
against ours. fla's Triton kernels need a CUDA GPU: elsewhere, or without torch and fla, its rows are "n/a".

``--remat`` lists remat policies (``nn.remat``: none, full, projections, mixer; true / false mean full /
none); each configuration runs once per entry, and the "remat" column names the policy. "XLA temp GB" is
the compiled step's temporary memory as XLA plans it (activations kept for the backward and workspace,
no parameters or optimizer state): per configuration even with ``--in_process``, where "peak mem GB" is
the process's peak so far.

``--documents`` lists mean document lengths; each configuration runs once per entry. 0 trains on rows
without document ids (as before); m > 0 packs documents of geometric lengths with mean m into every row
(``segment_ids`` in the synthetic batches, ``reset_at_documents`` on): retention's state is emptied and
positions restart at each start, the Transformer masks attention across documents. The "resets" column
gives such a row's step time over the same configuration's time without documents, − 1 (the bound set
for packed training: at most +5%). torchscale takes no document ids and runs only at 0.

Each configuration runs in a fresh process, so its peak memory (``peak_bytes_in_use``, or
``torch.cuda.max_memory_allocated``) is its own and an OOM leaves the others untouched
(``--in_process`` runs them here instead, for CPU smoke runs; peak memory is then the process's).
Compilation (XLA) or the first step (PyTorch) is timed apart from the steps. MFU = model FLOPs per
token (6 per weight, embedding lookups excluded, plus the token mixer: ``Trainer.train_flops_per_token``)
× tokens/s over the datasheet peak (989 TFLOP/s for an H100) and over the bf16 matmul rate measured in
the same run.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchprograms as bp
from experiments import benchreport as br
from experiments.peer_configs import (
    FLA_CHUNK,
    fla_num_params,
    fla_retnet_config,
    matched_ffn,
    ours_num_params,
)
from retnet_jax.models.config import RetNetConfig
from retnet_jax.nn import remat as remat_lib
from retnet_jax.training import flops as flops_lib

ARCHS = ("retnet", "transformer", "torchscale", "fla")
PEERS = ("torchscale", "fla")  # PyTorch models: no document ids, remat none or full only
PEER_MODULES = {"torchscale": ("torch", "torchscale", "fairscale"), "fla": ("torch", "fla", "transformers")}

_ARCHS = flags.DEFINE_list("archs", list(ARCHS), f"Models to train: {ARCHS}.")
_MODELS = flags.DEFINE_list("models", ["paper-1.3b", "paper-2.7b"], "Model presets (RetNetConfig.preset).")
_LENGTHS = flags.DEFINE_string("lengths", "2048,8192,16384", "Sequence lengths T.")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 16384, "B·T per step: B = max(1, tokens // T).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per step (overrides --tokens_per_step when > 0).")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "RetNet chunk size C (0: the parallel form).")
_DOCUMENTS = flags.DEFINE_list(
    "documents", ["0"], "Mean document lengths packed into the rows (0: no document ids, no resets)."
)
_HEADS = flags.DEFINE_integer(
    "retnet_heads", 0, "RetNet heads (0: the preset's); the Transformer keeps its own."
)
_REMAT = flags.DEFINE_list(
    "remat", ["full"], f"Remat policies, each a configuration (all archs): {remat_lib.POLICIES}, true, false."
)
_DROPOUT = flags.DEFINE_float("dropout", 0.0, "Dropout rate (the paper presets say 0.1).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per configuration (after 2 warm-up steps).")
_IN_PROCESS = flags.DEFINE_bool("in_process", False, "Run configurations in this process (CPU smoke).")
_CONFIG_TIMEOUT_S = flags.DEFINE_float("config_timeout_s", 300.0, "Time limit of one configuration.")
_FLA_PARAMS = flags.DEFINE_enum(
    "fla_params",
    "float32",
    ["float32", "bfloat16"],
    "fla's parameter and AdamW state dtype: float32 under bf16 autocast (as ours), or bfloat16 (as fla's own "
    "throughput script: the model cast to bf16, autocast too).",
)

flags.FLAGS.set_default("time_budget_s", 480.0)


def configs():
    out = []
    policies = list(dict.fromkeys(bl.remat_policy(text) for text in _REMAT.value))
    for model in _MODELS.value:
        for length in bl.int_list(_LENGTHS.value):
            batch = _BATCH.value or max(1, _TOKENS.value // length)
            for arch in _ARCHS.value:
                for documents in bl.int_list(",".join(_DOCUMENTS.value)):
                    if documents and arch in PEERS:
                        continue  # no document ids there
                    for remat in policies:
                        if arch in PEERS and remat not in ("none", "full"):
                            continue  # their checkpointing is all or nothing
                        out.append(
                            dict(
                                arch=arch,
                                model=model,
                                T=length,
                                B=batch,
                                chunk=FLA_CHUNK if arch == "fla" else _CHUNK.value,
                                remat=remat,
                                heads=_HEADS.value if arch == "retnet" else 0,
                                documents=documents,
                            )
                        )
    return out


# ------------------------------------------------------------------------------------------------------
# Workers: one configuration each (or the device ceilings).


def peaks_worker(payload):
    del payload
    return dict(device=bl.device_info(), ceilings=bl.measure_ceilings())


def jax_worker(cfg):
    step, trainer, init_s, compile_s, compiled = bp.jax_train_step(cfg)
    timing = bl.time_calls(step, repeats=cfg["steps"], warmup=2, calls_per_sample=1)
    return dict(
        num_params=trainer.num_params,
        flops_per_token=trainer.train_flops_per_token(),
        init_s=init_s,
        compile_s=compile_s,
        timing=timing.to_dict(),
        loss=float(step.carry["loss"]),
        memory=dict(bytes=bl.peak_bytes_in_use(), program=bl.program_memory(compiled)),
    )


def torchscale_worker(cfg):
    import torch
    import torch.nn.functional as F
    from torchscale.architecture.config import RetNetConfig as TorchscaleConfig
    from torchscale.architecture.retnet import RetNetDecoder

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: smoke runs only
    ours = RetNetConfig.preset(cfg["model"])
    d, n = ours.d_model, ours.vocab_size
    args = TorchscaleConfig(
        decoder_embed_dim=d,
        decoder_value_embed_dim=ours.value_dim,
        decoder_retention_heads=ours.num_heads,
        decoder_ffn_embed_dim=matched_ffn(ours),
        decoder_layers=ours.num_layers,
        activation_fn=ours.activation,
        dropout=cfg["dropout"],
        vocab_size=n,
        chunkwise_recurrent=cfg["chunk"] > 0,
        recurrent_chunk_size=cfg["chunk"] or 512,
        checkpoint_activations=cfg["remat"] == "full",
        no_scale_embedding=True,
    )
    embed = torch.nn.Embedding(n, d)
    torch.nn.init.normal_(embed.weight, std=d**-0.5)
    model = RetNetDecoder(args, embed_tokens=embed).to(device).train()
    fused = dict(fused=True) if device == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), weight_decay=0.05, **fused)
    num_params = sum(p.numel() for p in model.parameters())
    shape = (cfg["B"], cfg["T"])
    batches = [
        [torch.tensor(bl.random_tokens(2 * i + j, shape, n), device=device, dtype=torch.long) for j in (0, 1)]
        for i in range(2)
    ]

    def step(i):
        tokens, targets = batches[i % 2]
        with torch.autocast(device, dtype=torch.bfloat16):
            logits, _ = model(tokens)
        loss = F.cross_entropy(logits.float().view(-1, n), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step(0)
    sync()
    first_s = time.perf_counter() - start
    step(1)
    samples = []
    for i in range(cfg["steps"]):
        if device == "cuda":  # CUDA events around the step
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            loss = step(i)
            end.record()
            sync()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            loss = step(i)
            samples.append(time.perf_counter() - begin)
    chunk = cfg["chunk"] or None
    mixer = ours.mixer_flops_per_token(cfg["T"], chunk)
    forward = flops_lib.lm_forward_flops_per_token(num_params - n * d, ours.num_layers, mixer)
    return dict(
        num_params=num_params,
        flops_per_token=3 * forward,
        compile_s=first_s,
        timing=bl.Timing(samples).to_dict(),
        loss=float(loss),
        memory=dict(bytes=int(torch.cuda.max_memory_allocated()) if device == "cuda" else None),
        ffn_dim=matched_ffn(ours),
    )


def fla_worker(cfg):
    import torch
    from fla.models import RetNetConfig as FlaConfig
    from fla.models import RetNetForCausalLM

    if not torch.cuda.is_available():
        return dict(status="n/a", error="fla's Triton kernels need a CUDA GPU")
    device = "cuda"
    ours = RetNetConfig.preset(cfg["model"])
    d, n = ours.d_model, ours.vocab_size
    kwargs = fla_retnet_config(ours)
    with torch.device(device):  # built and initialized on the GPU (fla's init: normal, std 0.02)
        model = RetNetForCausalLM(FlaConfig(**kwargs))
    if cfg["fla_params"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.train()
    if cfg["remat"] == "full":  # each block recomputed in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), weight_decay=0.05, fused=True)
    num_params = sum(p.numel() for p in model.parameters())
    if num_params != fla_num_params(kwargs):
        raise RuntimeError(f"fla built {num_params} parameters, fla_num_params says {fla_num_params(kwargs)}")
    shape = (cfg["B"], cfg["T"])
    batches = [
        torch.tensor(bl.random_tokens(2 * i, shape, n), device=device, dtype=torch.long) for i in (0, 1)
    ]

    def step(i):
        tokens = batches[i % 2]
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss  # fused cross-entropy, labels shifted inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    step(0)  # Triton compiles and autotunes here
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    step(1)
    samples = []
    for i in range(cfg["steps"]):  # CUDA events around each step
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        loss = step(i)
        end.record()
        torch.cuda.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3)
    mixer = ours.mixer_flops_per_token(cfg["T"], FLA_CHUNK)
    forward = flops_lib.lm_forward_flops_per_token(num_params - n * d, ours.num_layers, mixer)
    return dict(
        num_params=num_params,
        flops_per_token=3 * forward,
        compile_s=first_s,
        timing=bl.Timing(samples).to_dict(),
        loss=float(loss),
        memory=dict(bytes=int(torch.cuda.max_memory_allocated())),
        ffn_dim=kwargs["intermediate_size"],
        fla_config=kwargs,
    )


WORKERS = {
    "peaks": peaks_worker,
    "retnet": jax_worker,
    "transformer": jax_worker,
    "torchscale": torchscale_worker,
    "fla": fla_worker,
}


def run_config(cfg):
    arch = cfg["arch"]
    payload = dict(kind=arch, steps=_STEPS.value, dropout=_DROPOUT.value, fla_params=_FLA_PARAMS.value, **cfg)
    if arch in PEER_MODULES and not all(importlib.util.find_spec(m) for m in PEER_MODULES[arch]):
        return dict(status="n/a", error=f"{', '.join(PEER_MODULES[arch])}: not all installed")
    if _IN_PROCESS.value:
        result = bl.guarded(lambda: WORKERS[arch](payload))
    else:
        result = bl.run_worker("experiments.bench_training", payload, _CONFIG_TIMEOUT_S.value)
    if arch in PEERS and result.get("status") == "ok":
        result["ours_params"] = ours_num_params(cfg["model"])  # abstract shapes: the GPU stays untouched
    return result


# ------------------------------------------------------------------------------------------------------
# Report.


def derive(row, device, ceilings):
    if row.get("status") != "ok":
        return
    seconds = row["timing"]["median_s"]
    row["tokens_per_s"] = row["B"] * row["T"] / seconds
    achieved = row["flops_per_token"] * row["tokens_per_s"]
    row["mfu_measured"] = 100 * achieved / ceilings["matmul_flops"]
    if device.get("datasheet_flops"):
        row["mfu_datasheet"] = 100 * achieved / device["datasheet_flops"]


def compare_resets(rows):
    """Each row with packed documents gets its step time over the same configuration's without, − 1."""
    same = ("arch", "model", "T", "B", "chunk", "remat", "heads")
    plain = {
        tuple(r[k] for k in same): r["timing"]["median_s"]
        for r in rows
        if not r.get("documents") and r.get("status") == "ok"
    }
    for row in rows:
        key = tuple(row[k] for k in same)
        if row.get("documents") and row.get("status") == "ok" and key in plain:
            row["resets_slower"] = row["timing"]["median_s"] / plain[key] - 1


def _params(row) -> str:
    """The parameter count; a peer's with its difference to our RetNet's of the same preset."""
    text = br.fmt_count(row.get("num_params"))
    if row.get("num_params") and row.get("ours_params"):
        text += f" ({100 * (row['num_params'] / row['ours_params'] - 1):+.2f}% vs ours)"
    return text


def _peak_bytes(row):
    return row["memory"].get("bytes")


def _temp_bytes(row):
    return (row["memory"].get("program") or {}).get("temp_bytes")


COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("model", lambda r: r["model"] + (f" H{r['heads']}" if r.get("heads") else "")),
    ("params", lambda r: _params(r)),
    ("T", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("C", lambda r: str(r["chunk"]) if r["arch"] != "transformer" and r["chunk"] else "–"),
    ("docs", lambda r: f"mean {r['documents']}" if r.get("documents") else "–"),
    ("remat", lambda r: r["remat"]),
    ("step ms", br.when_ok(lambda r: br.fmt(r["timing"]["median_s"], 1e3, ".1f"))),
    ("iqr%", br.when_ok(lambda r: br.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("tokens/s", br.when_ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("MFU % datasheet", br.when_ok(lambda r: br.fmt(r.get("mfu_datasheet"), 1, ".1f"))),
    ("MFU % measured", br.when_ok(lambda r: br.fmt(r.get("mfu_measured"), 1, ".1f"))),
    ("peak mem GB", br.when_ok(lambda r: br.fmt(_peak_bytes(r), 1e-9, ".1f"))),
    ("XLA temp GB", br.when_ok(lambda r: br.fmt(_temp_bytes(r), 1e-9, ".1f"))),
    ("compile / first step s", br.when_ok(lambda r: br.fmt(r["compile_s"], 1, ".1f"))),
    ("loss", br.when_ok(lambda r: br.fmt(r["loss"], 1, ".3f"))),
    ("resets", lambda r: f"{100 * r['resets_slower']:+.1f}%" if "resets_slower" in r else "–"),
]


def _series(row, several_policies: bool) -> str:
    """A bar series: the architecture, the mean document length where documents are packed, and the remat
    policy where the run compares several."""
    return (
        row["arch"]
        + (f" docs {row['documents']}" if row.get("documents") else "")
        + (f" remat {row['remat']}" if several_policies else "")
    )


def plot(rows, path):
    several = len({r["remat"] for r in rows}) > 1
    groups = list(dict.fromkeys((r["model"], r["T"]) for r in rows))
    archs = list(dict.fromkeys(_series(r, several) for r in rows))
    fig, axes = br.figure(1, 2, size=(max(5.0, 1.2 * len(groups) + 2), 3.8))
    width = 0.8 / max(1, len(archs))
    # In one process the peak is the process's so far: the program's own temporary memory compares instead.
    memory = (_temp_bytes, "XLA temp memory GB") if _IN_PROCESS.value else (_peak_bytes, "peak memory GB")
    for panel, (value_of, scale, label) in enumerate(
        [(lambda r: r.get("tokens_per_s"), 1e-3, "thousand tokens/s"), (memory[0], 1e-9, memory[1])]
    ):
        ax = axes[0][panel]
        for i, arch in enumerate(archs):
            values = []
            for group in groups:
                row = next(
                    (r for r in rows if (r["model"], r["T"]) == group and _series(r, several) == arch), {}
                )
                value = value_of(row) if row.get("status") == "ok" else None
                values.append((value or 0) * scale)
            ax.bar(np.arange(len(groups)) + i * width, values, width, label=arch)
        ax.set_xticks(np.arange(len(groups)) + width * (len(archs) - 1) / 2)
        ax.set_xticklabels([f"{m}\nT={t}" for m, t in groups], fontsize=7)
        ax.set(ylabel=label, title=f"train step, {label}")
        ax.legend(fontsize=7)
    br.save_figure(fig, path)


def main(argv):
    del argv
    if bl.maybe_run_worker(WORKERS):
        return
    budget = bl.Budget()
    if _IN_PROCESS.value:
        peaks = peaks_worker({})
    else:  # this process never touches the GPU, so each worker has all of it
        peaks = bl.run_worker("experiments.bench_training", dict(kind="peaks"), 300)
        if peaks.get("status") != "ok":
            raise SystemExit(f"Measuring the device ceilings failed: {peaks}")
    device, ceilings = peaks["device"], peaks["ceilings"]
    report = br.Report("bench_training", device["short"])
    rows, longest = [], 0.0
    for cfg in configs():
        if budget.exhausted(next_seconds=longest):  # the longest configuration so far as the estimate
            result = dict(status="skipped", error="time budget")
        else:
            print(
                f"{cfg['arch']} {cfg['model']} T{cfg['T']} B{cfg['B']} remat {cfg['remat']} ...", flush=True
            )
            start = time.perf_counter()
            result = run_config(cfg)
            longest = max(longest, time.perf_counter() - start)
            if result.get("status") not in ("ok", "n/a"):
                print(f"  -> {result.get('status')}: {result.get('error')}\n{result.get('log', '')[-1500:]}")
        row = {**cfg, **result}
        derive(row, device, ceilings)
        rows.append(row)
        compare_resets(rows)
        text = write(report, rows, device, ceilings)
    if br.PLOTS.value:
        bl.guarded(lambda: plot(rows, report.png))
    print(text)
    print("Wrote", *report.paths())


def write(report, rows, device, ceilings):
    notes = (
        "bf16 compute, float32 parameters and AdamW state; synthetic random tokens "
        "(docs: packed documents of geometric lengths, resets at their starts); "
        f"dropout {_DROPOUT.value}; "
        f"{'each configuration in its own process' if not _IN_PROCESS.value else 'all in one process'}. "
        "torchscale: GLU FFN with F' = 2F/3 for the paper presets (same parameter count), bf16 autocast. "
        "fla 0.6.0 RetNetForCausalLM: our D, L, H, K, value width, vocabulary and torchscale's F', its "
        "defaults otherwise (chunk mode, C=64; fused norms, SwiGLU, cross-entropy; RMSNorm, unnormalized "
        "retention, no dropout), "
        + (
            "float32 parameters and AdamW state under bf16 autocast."
            if _FLA_PARAMS.value == "float32"
            else "bf16 parameters and AdamW state (cast as fla's throughput script does), bf16 autocast."
        )
    )
    sections = [br.ceilings_markdown(device, ceilings), notes, br.markdown_table(rows, COLUMNS)]
    return report.write(
        "Training step benchmark", sections, dict(device=device, ceilings=ceilings, rows=rows)
    )


if __name__ == "__main__":
    app.run(main)
