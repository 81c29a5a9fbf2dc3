"""``bench_scaling``'s tables and plot: per study, the rows of the plan with their results and the figures
derived from them (tokens/s, MFU, scaling efficiency, the overlap flags' speed-up, decoding rates)."""

from __future__ import annotations

import numpy as np

from experiments import benchreport as br
from experiments import scaling_plan as plan
from experiments.scaling_workers import CHECK_LOSS_RTOL, CHECK_UPDATE_RTOL

# Weak-scaling efficiency the benchmark is held to, from 1 to 8 devices: (model spec, strategy) → bound.
WEAK_TARGETS = {("paper-1.3b", "dp"): 0.90, ("paper-6.7b", "fsdp"): 0.80}


def merged(row: dict, results: dict) -> dict:
    """The plan's row with its result (a skipped row says why) and the derived figures."""
    if row["skip"]:
        return {**row, "status": "skipped", "error": row["skip"]}
    return {**row, **results.get(row["key"], {"status": "skipped", "error": "not run"})}


def derive(row: dict, device: dict, ceilings: dict) -> dict:
    if row["cfg"]["kind"] != "train":
        return row
    row.setdefault("num_params", plan.num_params(row["arch"], row["model"]))
    if row.get("status") != "ok":
        return row
    seconds = row["timing"]["median_s"]
    row["tokens_per_s"] = row["B"] * row["T"] / seconds
    row["per_device"] = row["tokens_per_s"] / row["n"]
    achieved = row["flops_per_token"] * row["per_device"]
    row["mfu_measured"] = 100 * achieved / ceilings["matmul_flops"]
    if device.get("datasheet_flops"):
        row["mfu_datasheet"] = 100 * achieved / device["datasheet_flops"]
    return row


def scaling_efficiency(rows: list[dict]):
    """Weak and strong rows: per-device tokens/s over that at the smallest n that ran (same spec, arch)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["study"] in ("weak", "strong"):
            groups.setdefault((row["study"], row["spec"], row["arch"], row["variant"]), []).append(row)
    for members in groups.values():
        done = [r for r in members if r.get("status") == "ok"]
        if not done:
            continue
        base = min(done, key=lambda r: r["n"])
        for row in done:
            row["base_n"] = base["n"]
            row["efficiency"] = row["per_device"] / base["per_device"]
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]


def overlap_speedup(rows: list[dict], first: str):
    """Overlap rows: tokens/s over the same spec's under the first variant."""
    plain = {
        (r["spec"], r["arch"]): r["tokens_per_s"]
        for r in rows
        if r["study"] == "overlap" and r["variant"] == first and r.get("status") == "ok"
    }
    for row in rows:
        if row["study"] == "overlap" and row.get("status") == "ok" and (row["spec"], row["arch"]) in plain:
            row["vs_first"] = row["tokens_per_s"] / plain[(row["spec"], row["arch"])]


def _ok(cell):
    return br.when_ok(cell)


def _note(row):
    return "" if row.get("status") == "ok" else str(row.get("error", ""))[:120].replace("|", "/")


TRAIN = [
    ("arch", lambda r: r["arch"]),
    ("model", lambda r: r["model"]),
    ("params", lambda r: br.fmt_count(r.get("num_params"))),
    ("T", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("strategy", lambda r: r.get("strategy", "")),
    ("mesh DxFxT", lambda r: plan.mesh_name(r["mesh"])),
    ("GPUs", lambda r: str(r["n"])),
    ("XLA", lambda r: r["variant"]),
    ("step ms", _ok(lambda r: br.fmt(r["timing"]["median_s"], 1e3, ".1f"))),
    ("tokens/s", _ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("per GPU", _ok(lambda r: br.fmt(r["per_device"], 1, ",.0f"))),
    ("MFU % datasheet", _ok(lambda r: br.fmt(r.get("mfu_datasheet"), 1, ".1f"))),
    ("MFU % measured", _ok(lambda r: br.fmt(r.get("mfu_measured"), 1, ".1f"))),
    ("peak GB", _ok(lambda r: br.fmt(r["memory"].get("bytes"), 1e-9, ".1f"))),
    ("XLA temp GB", _ok(lambda r: br.fmt((r["memory"].get("program") or {}).get("temp_bytes"), 1e-9, ".1f"))),
    ("compile s", _ok(lambda r: br.fmt(r["compile_s"], 1, ".1f"))),
    ("loss", _ok(lambda r: br.fmt(r["loss"], 1, ".3f"))),
    ("retention", _ok(lambda r: _retention(r))),
]
SCALING = [
    *TRAIN[:9],
    ("tokens/s", _ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("per GPU", _ok(lambda r: br.fmt(r["per_device"], 1, ",.0f"))),
    ("speed-up", _ok(lambda r: f"{r['speedup']:.2f}× vs {r['base_n']}")),
    ("efficiency", _ok(lambda r: f"{100 * r['efficiency']:.1f}%")),
    ("MFU % datasheet", _ok(lambda r: br.fmt(r.get("mfu_datasheet"), 1, ".1f"))),
    ("peak GB", _ok(lambda r: br.fmt(r["memory"].get("bytes"), 1e-9, ".1f"))),
]
OVERLAP = [
    *TRAIN[:9],
    TRAIN[10],
    ("vs first", _ok(lambda r: br.fmt(r.get("vs_first"), 1, ".3f") + "×")),
    *TRAIN[12:16],
]
CHECK = [
    ("arch", lambda r: r["arch"]),
    ("mesh DxFxT", lambda r: plan.mesh_name(r["mesh"])),
    ("loss", _ok(lambda r: br.fmt(r["loss"], 1, ".6f"))),
    ("loss rel. diff", _ok(lambda r: br.fmt(r["loss_rel"], 1, ".1e"))),
    ("update rel. error", _ok(lambda r: br.fmt(r["update_rel"], 1, ".1e"))),
    ("agrees", _ok(lambda r: "yes" if r["agrees"] else "NO")),
]
DECODE = [
    ("arch", lambda r: r["arch"]),
    ("model", lambda r: r["model"]),
    ("params", lambda r: br.fmt_count(r.get("num_params"))),
    ("tensor", lambda r: str(r["n"])),
    ("B", lambda r: str(r.get("B", "–"))),
    ("context", lambda r: str(r["cfg"]["context"])),
    ("ms / step", _ok(lambda r: br.fmt(r["step_s"], 1e3, ".2f"))),
    ("tokens/s", _ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("weights GB/s per GPU", _ok(lambda r: br.fmt(r["weight_rate"], 1e-9, ",.0f"))),
    ("program GB", _ok(lambda r: br.fmt((r.get("memory") or {}).get("bytes"), 1e-9, ".1f"))),
    ("compile s", _ok(lambda r: br.fmt(r["compile_s"], 1, ".1f"))),
]


def _retention(row) -> str:
    """How the step ran retention: the fused kernels (Pallas calls in the compiled step) or XLA."""
    if row["arch"] != "retnet":
        return "–"
    return "kernels" if (row.get("hlo") or {}).get("kernels") else "XLA"


def _with_note(columns):
    return [*columns, ("note", _note)]


def check_rows(rows):
    out = []
    for row in rows:
        if row["study"] == "check":
            if row.get("status") == "ok":
                out += [{"status": "ok", **r} for r in row["rows"]]
            else:
                out.append(dict(arch="–", mesh=[0, 0, 0], status=row["status"], error=row.get("error")))
    return out


def decode_rows(rows):
    out = []
    for row in rows:
        if row["study"] != "decode":
            continue
        if row.get("status") != "ok":
            out.append(row)
            continue
        for result in row["rows"]:
            item = {**row, **result, "num_params": row["num_params"]}
            if item.get("status") == "ok":
                steps = row["cfg"]["steps"]
                item["step_s"] = item["timing"]["median_s"] / steps
                item["tokens_per_s"] = item["B"] / item["step_s"]
                item["weight_rate"] = row["weight_bytes"] / row["n"] / item["step_s"]
            out.append(item)
    return out


def sections(rows, device, ceilings, device_bytes, rejected, kept, variants):
    by = lambda study: [r for r in rows if r["study"] == study]  # noqa: E731
    memory = f"{device_bytes / 1e9:.0f} GB each" if device_bytes else "memory not reported"
    flags_text = "; ".join(
        f"`{v}`: " + (" ".join(f"`{f}`" for f in plan.XLA_OVERLAP_FLAGS[v]) or "XLA's own settings")
        for v in variants
    )
    out = [
        br.ceilings_markdown(device, ceilings),
        f"{device['device_count']} devices ({memory}). Every worker runs with `NCCL_NVLS_ENABLE=0`. XLA flag "
        f"variants: {flags_text}."
        + "".join(f" Variant `{v}` was rejected by XLA: {why}." for v, why in rejected.items())
        + (f" {len(kept)} configurations kept from the earlier run of the day (`--resume`)." if kept else ""),
    ]
    train = next((r["cfg"] for r in rows if r["cfg"]["kind"] == "train"), None)
    if train:
        out.append(
            f"Training: bf16 compute, float32 parameters and AdamW state, remat {train['remat']}, chunk "
            f"{train['chunk']}, synthetic random tokens; B = rows per step in all (split over data × fsdp); "
            "per GPU = tokens/s over the GPUs used; MFU per GPU against the datasheet bf16 peak and the "
            "bf16 matmul rate measured on one GPU; efficiency = per-GPU tokens/s over that at the smallest "
            "GPU count that ran (named in the speed-up column); retention = the fused kernels found in the "
            "compiled step, or XLA."
        )
    if by("check"):
        bounds = f"loss within {CHECK_LOSS_RTOL:g}, the parameters' change within {CHECK_UPDATE_RTOL:g}"
        out += ["## One step on each mesh against one device (float32)",
                f"Agrees: {bounds} (relative).",
                br.markdown_table(check_rows(rows), _with_note(CHECK))]  # fmt: skip
    if by("throughput"):
        out += ["## Throughput per mesh", br.markdown_table(by("throughput"), _with_note(TRAIN))]
    for study, title in (
        ("weak", "Weak scaling (rows per GPU fixed)"),
        ("strong", "Strong scaling (batch fixed)"),
    ):
        if by(study):
            out += [f"## {title}", br.markdown_table(by(study), _with_note(SCALING))]
    weak = [r for r in by("weak") if r.get("efficiency") is not None and r["n"] == device["device_count"]]
    for row in weak:
        target = WEAK_TARGETS.get((row["model"], row["strategy"]))
        if target and row["base_n"] == 1:
            verdict = "met" if row["efficiency"] >= target else "missed"
            out.append(f"Target ≥ {100 * target:.0f}% for {row['spec']} at {row['n']} GPUs: "
                       f"{100 * row['efficiency']:.1f}%, {verdict}.")  # fmt: skip
    if by("overlap"):
        out += ["## XLA collective-overlap flags", br.markdown_table(by("overlap"), _with_note(OVERLAP))]
    if by("largest"):
        trained = [r for r in by("largest") if r.get("status") == "ok"]
        best = max(trained, key=lambda r: r["num_params"], default=None)
        line = (f"Largest that trained: {best['model']} ({br.fmt_count(best['num_params'])} parameters)."
                if best else "No model of the sweep trained.")  # fmt: skip
        out += [
            "## Largest model that trains (FSDP over all GPUs)",
            line,
            br.markdown_table(by("largest"), _with_note(TRAIN)),
        ]
    if by("decode"):
        out += [
            "## Decoding split by tensor parallel (bf16, greedy)",
            br.markdown_table(decode_rows(rows), _with_note(DECODE)),
        ]
    return out


def write(report, plan_rows, results, device, ceilings, device_bytes, rejected, kept):
    rows = [derive(merged(r, results), device, ceilings) for r in plan_rows]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    scaling_efficiency(rows)
    overlap_speedup(rows, variants[0] if variants else "default")
    text = sections(rows, device, ceilings, device_bytes, rejected, kept, variants)
    raw = dict(device=device, ceilings=ceilings, device_bytes=device_bytes, rejected=rejected,
               rows=[{k: v for k, v in r.items() if k != "cfg"} for r in rows], results=results)  # fmt: skip
    return report.write("Scaling over several GPUs", text, raw)


def plot(plan_rows, results, device, ceilings, path):
    rows = [derive(merged(r, results), device, ceilings) for r in plan_rows]
    scaling_efficiency(rows)
    fig, axes = br.figure(2, 2, size=(6.0, 4.0))
    ax = axes[0][0]
    through = [r for r in rows if r["study"] == "throughput"]
    groups = list(dict.fromkeys((r["arch"], r["model"], r["T"]) for r in through))
    meshes = list(dict.fromkeys(plan.mesh_name(r["mesh"]) for r in through))
    width = 0.8 / max(1, len(meshes))
    for i, mesh in enumerate(meshes):
        values = [
            next((r.get("per_device") or 0 for r in through
                  if (r["arch"], r["model"], r["T"]) == g and plan.mesh_name(r["mesh"]) == mesh), 0) / 1e3
            for g in groups
        ]  # fmt: skip
        ax.bar(np.arange(len(groups)) + i * width, values, width, label=mesh)
    ax.set_xticks(np.arange(len(groups)) + width * (len(meshes) - 1) / 2)
    ax.set_xticklabels([f"{a} {m}\nT={t}" for a, m, t in groups], fontsize=7)
    ax.set(ylabel="thousand tokens/s per GPU", title="training throughput per mesh (DxFxT)")
    if meshes:
        ax.legend(fontsize=7)
    for ax, study in ((axes[0][1], "weak"), (axes[1][0], "strong")):
        for spec in dict.fromkeys(r["spec"] for r in rows if r["study"] == study):
            done = [r for r in rows if r["study"] == study and r["spec"] == spec and r.get("efficiency")]
            if done:
                ax.plot([r["n"] for r in done], [100 * r["efficiency"] for r in done], "o-", label=spec)
        counts = [r["n"] for r in rows if r["study"] == study and r.get("efficiency")]
        if counts:
            br.log2_xaxis(ax, counts)
        ax.axhline(100, color="gray", lw=0.5)
        ax.set(xlabel="GPUs", ylabel="efficiency %", title=f"{study} scaling", ylim=(0, 110))
        ax.legend(fontsize=7)
    ax = axes[1][1]
    for key in dict.fromkeys((r["arch"], r["model"], r.get("B")) for r in decode_rows(rows)):
        done = [
            r
            for r in decode_rows(rows)
            if (r["arch"], r["model"], r.get("B")) == key and r.get("status") == "ok"
        ]
        if done:
            ax.plot(
                [r["n"] for r in done],
                [r["tokens_per_s"] for r in done],
                "o-",
                label=f"{key[0]} {key[1]} B{key[2]}",
            )
    counts = [r["n"] for r in decode_rows(rows) if r.get("status") == "ok"]
    if counts:
        br.log2_xaxis(ax, counts)
    ax.set(xlabel="GPUs (tensor parallel)", ylabel="tokens/s", title="decoding", yscale="log")
    ax.legend(fontsize=7)
    br.save_figure(fig, path)
