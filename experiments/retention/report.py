"""The report of ``bench_retention``: rates against the ceilings, the ratio to fla, the targets, its
tables (correctness, kernel plans, timings) and plot."""

from __future__ import annotations

from experiments import benchreport as br
from experiments import profiling
from experiments.retention import sweep

TARGET_RATIO = 0.7  # fwd+bwd time against fla's, at every shape and T


def plans_markdown(plans) -> str:
    columns = [
        ("shape", lambda r: r["shape"]),
        ("dtype", lambda r: r["dtype"]),
        ("plan (family, tiles)", br.when_ok(lambda r: r["plan"])),
        ("est. shared KiB", br.when_ok(lambda r: f"{r['smem_kib']:.0f}")),
    ] + [
        (f"rel err {n}", br.when_ok(lambda r, n=n: br.fmt(r["errors"][n], 1, ".1e")))
        for n in ("o", "state", "dq", "dk", "dv", "dstate")
    ]
    return br.markdown_table(plans, columns) if plans else "Not run (fused not requested)."


def impl_label(r) -> str:
    label = r["impl"] + (f" C={r['C']}" if r["C"] and r["impl"] != "fla" else "")
    if r.get("plan") and r["plan"] != "auto":
        label += f" {r['plan']}"
    elif r["impl"] == "fused" and r.get("family"):
        label += f" {r['family']}"
    if r["impl"] != "fla":
        label += " norm" if r.get("normalize") else ""
    return label + (" +state" if r.get("state") else "")


COLUMNS = [
    ("shape", lambda r: r["shape"]),
    ("B", lambda r: str(r["B"])),
    ("T", lambda r: str(r["T"])),
    ("H/K/V", lambda r: f"{r['H']}/{r['K']}/{r['V']}"),
    ("impl", lambda r: impl_label(r)),
    ("pass", lambda r: r["passes"]),
    ("ms", br.when_ok(lambda r: br.fmt(r.get("timing", {}).get("median_s"), 1e3, ".3f"))),
    ("iqr%", br.when_ok(lambda r: br.fmt(r.get("timing", {}).get("iqr_pct"), 1, ".1f"))),
    ("× fla", br.when_ok(lambda r: br.fmt(r.get("vs_fla"), 1, ".2f"))),
    ("TFLOP/s", br.when_ok(lambda r: br.fmt(r.get("flops_per_s"), 1e-12, ".3g"))),
    ("% matmul", br.when_ok(lambda r: br.fmt(r.get("pct_measured"), 1, ".1f"))),
    ("% datasheet", br.when_ok(lambda r: br.fmt(r.get("pct_datasheet"), 1, ".1f"))),
    ("XLA-counted TFLOP/s", br.when_ok(lambda r: br.fmt(r.get("xla_flops_per_s"), 1e-12, ".3g"))),
    ("mem GB", br.when_ok(lambda r: br.fmt((r.get("memory") or {}).get("bytes"), 1e-9, ".2f"))),
    ("compile s", br.when_ok(lambda r: br.fmt(r.get("compile_s"), 1, ".1f"))),
]


def _key(r):
    return (r["shape"], r["T"], r["B"], r["passes"])


def derive(rows, device, ceilings):
    """Adds achieved FLOP/s, % of peaks and the ratio to fla's time at the same shape, T, B and pass."""
    fla = {_key(r): r["timing"]["median_s"] for r in rows if r["impl"] == "fla" and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        seconds = r["timing"]["median_s"]
        r["flops"] = sweep.form_flops(r)
        r["flops_per_s"] = r["flops"] / seconds
        r["pct_measured"] = 100 * r["flops_per_s"] / ceilings["matmul_flops"]
        r["xla_flops_per_s"] = r["xla_flops"] / seconds if r.get("xla_flops") else None
        if device["datasheet_flops"]:
            r["pct_datasheet"] = 100 * r["flops_per_s"] / device["datasheet_flops"]
        base = fla.get(_key(r))
        r["vs_fla"] = seconds / base if base else None


def targets(rows) -> str:
    """Per shape and T: the fastest of our fwd+bwd rows against fla (unnormalized and normalized)."""
    lines = []
    for key in dict.fromkeys(_key(r) for r in rows if r["passes"] == "fwdbwd"):
        cells = []
        for normalize in (False, True):
            ours = [
                r
                for r in rows
                if _key(r) == key
                and r["impl"] in ("chunkwise", "parallel", "fused")
                and bool(r.get("normalize")) == normalize
                and r.get("vs_fla")
            ]
            if ours:
                best = min(ours, key=lambda r: r["timing"]["median_s"])
                verdict = "met" if best["vs_fla"] <= TARGET_RATIO else "NOT met"
                cells.append(f"{impl_label(best)}: {best['vs_fla']:.2f}× ({verdict})")
            else:
                cells.append("–")
        dims = sweep.SHAPES[key[0]]
        lines.append(
            f"| {key[0]} | {dims['H']}/{dims['K']}/{dims['V']} | {key[2]} | {key[1]} | "
            + " | ".join(cells)
            + " |"
        )
    if not lines:
        return "No fwd+bwd rows with fla beside them in this run."
    head = "| shape | H/K/V | B | T | unnormalized: best ours / fla | normalized: best ours / fla |"
    return "\n".join([head, "|---|---|---|---|---|---|", *lines])


def plot(rows, path):
    shapes = [s for s in sweep.shape_names() if any(r["shape"] == s for r in rows)]
    fig, axes = br.figure(max(1, len(shapes)), len(sweep.PASSES.value))
    for i, shape in enumerate(shapes):
        for j, pass_ in enumerate(sweep.PASSES.value):
            ax = axes[i][j]
            sel = [
                r for r in rows if r["shape"] == shape and r["passes"] == pass_ and r.get("status") == "ok"
            ]
            for label in dict.fromkeys(impl_label(r) for r in sel):
                pts = sorted((r["T"], r["timing"]["median_s"] * 1e3) for r in sel if impl_label(r) == label)
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            dims = sweep.SHAPES[shape]
            size = f"B = {sweep.BATCH.value}" if sweep.BATCH.value else f"B·T = {sweep.TOKENS.value}"
            title = f"{shape}: H{dims['H']} K{dims['K']} V{dims['V']}, {pass_}, {size}"
            ax.set(yscale="log", xlabel="T", ylabel="ms per call", title=title)
            br.log2_xaxis(ax, [r["T"] for r in sel] or [1])
            ax.legend(fontsize=7)
    br.save_figure(fig, path)


def write(report, rows, device, ceilings, check, fla, plans):
    check_rows = br.markdown_table(
        check,
        [("shape", lambda r: r["shape"]), ("impl", lambda r: r["impl"])]
        + [
            (f"rel err {n}", lambda r, n=n: br.fmt(r["errors"][n], 1, ".2e")) for n in ("o", "dq", "dk", "dv")
        ],
    )
    peers = "fla: " + (
        f"measured on {fla.get('device')}"
        if fla.get("available")
        else f"not measured ({fla.get('reason') or fla.get('error')})"
    )
    fla_check = fla.get("check") or {}
    if fla.get("available") and fla_check.get("status") != "ok":
        peers += f" (no correctness check: {fla_check.get('error')})"
    sections = [
        br.ceilings_markdown(device, ceilings),
        peers
        + f". Our forms: {', '.join(sweep.NORMS.value)}; state {sweep.STATE.value}; bf16 inputs, float32 "
        "accumulation.",
        f"## Correctness (B2 T{sweep.CHECK_LENGTH.value}, bf16 inputs, unnormalized, vs a float64 "
        "reference)\n\n" + check_rows,
        "## Kernel plans (chunkwise pallas vs xla, B1 T300 C64, state in and out, normalized)\n\n"
        + plans_markdown(plans),
        "## Timings\n\n" + br.markdown_table(rows, COLUMNS),
        f"## Targets (fwd+bwd ≤ {TARGET_RATIO}× fla)\n\n" + targets(rows),
    ]
    traced = [r for r in rows if r.get("kernels")]
    if traced:
        sections.append(
            "## Kernels (device trace, times per call)\n\n"
            + "\n\n".join(
                profiling.markdown(
                    dict(
                        r["kernels"], name=f"{r['shape']} B{r['B']} T{r['T']} {impl_label(r)} {r['passes']}"
                    ),
                    level=3,
                )
                for r in traced
            )
        )
    raw = dict(
        device=device,
        ceilings=ceilings,
        check=check,
        plans=plans,
        fla=dict((k, v) for k, v in fla.items() if k != "results"),
        rows=rows,
    )
    return report.write("Retention op benchmark", sections, raw)
