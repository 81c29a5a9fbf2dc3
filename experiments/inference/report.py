"""The report of ``bench_inference``: its tables (markdown and JSON, the HLO texts in a zip) and plot."""

from __future__ import annotations

import zipfile

from experiments import benchreport as br
from experiments import hlostats
from experiments.inference import plan
from experiments.inference.analysis import summary_lines


def _state_label(r) -> str:
    if r.get("state_dtype"):
        return {"bfloat16": "bf16", "float32": "f32"}.get(r["state_dtype"], r["state_dtype"])
    return "f32" if plan.is_retnet(r["arch"]) else "cache"


def _ms(r, key):
    return br.fmt(r.get(key), 1e3, ".3f")


DECODE_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("state", lambda r: _state_label(r)),
    ("context", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("ms/step", br.when_ok(lambda r: _ms(r, "seconds"))),
    ("iqr%", br.when_ok(lambda r: br.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("tokens/s", br.when_ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("floor ms", br.when_ok(lambda r: _ms(r, "floor_s"))),
    ("× floor", br.when_ok(lambda r: br.fmt(r.get("vs_floor"), 1, ".2f"))),
    ("× floor params", br.when_ok(lambda r: br.fmt(r.get("vs_floor_params"), 1, ".2f"))),
    ("RetNet/Transformer", br.when_ok(lambda r: br.fmt(r.get("vs_transformer"), 1, ".2f"))),
    ("state GB", lambda r: br.fmt(r.get("state_bytes"), 1e-9, ".3g")),
    ("decode mem GB", br.when_ok(lambda r: br.fmt((r.get("memory") or {}).get("bytes"), 1e-9, ".3g"))),
    ("compile s", br.when_ok(lambda r: br.fmt(r.get("compile_s"), 1, ".1f"))),
]
STATE_COLUMNS = DECODE_COLUMNS[:6] + [
    ("tokens/s", br.when_ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("× floor", br.when_ok(lambda r: br.fmt(r.get("vs_floor"), 1, ".2f"))),
    ("time vs f32 state", br.when_ok(lambda r: br.fmt(r.get("vs_float32_state"), 1, ".2f"))),
    ("state GB", lambda r: br.fmt(r.get("state_bytes"), 1e-9, ".3g")),
]
FLAG_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("XLA flags", lambda r: r["flags"]),
    ("B", lambda r: str(r["B"])),
    ("ms/step", br.when_ok(lambda r: _ms(r, "seconds"))),
    ("iqr%", br.when_ok(lambda r: br.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("× floor", br.when_ok(lambda r: br.fmt(r.get("vs_floor"), 1, ".2f"))),
    ("time vs default", br.when_ok(lambda r: br.fmt(r.get("vs_default"), 1, ".3f"))),
    ("compile s", br.when_ok(lambda r: br.fmt(r.get("compile_s"), 1, ".1f"))),
]
PREFILL_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("T", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("program", lambda r: r["variant"]),
    ("ms", br.when_ok(lambda r: br.fmt(r["seconds"], 1e3, ".2f"))),
    ("iqr%", br.when_ok(lambda r: br.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("tokens/s", br.when_ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("× training forward", br.when_ok(lambda r: br.fmt(r.get("vs_forward"), 1, ".2f"))),
    ("copies (all)", br.when_ok(lambda r: _copies(r))),
    ("mem GB", br.when_ok(lambda r: br.fmt((r["memory"] or {}).get("bytes"), 1e-9, ".3g"))),
    ("compile s", br.when_ok(lambda r: br.fmt(r["compile_s"], 1, ".1f"))),
]


def _copies(row) -> str:
    copies = (row.get("hlo") or {}).get("copies") or {}
    return f"{copies.get('count', 0)} ({copies.get('bytes', 0) / 1e9:.3g} GB)"


def write(report, results, dtype):
    rows, ceilings = results["rows"], results["ceilings"]

    def table(
        columns, select, key=lambda r: (r["arch"], r.get("state_dtype") or "", r["T"], r.get("B") or 0)
    ):
        sel = [r for r in rows if select(r)]
        return br.markdown_table(sorted(sel, key=key), columns) if sel else "(not run)"

    default = lambda r: r.get("flags") == "default"  # noqa: E731
    setup = (
        f"Model {plan.MODEL.value} in {dtype} (parameters too); greedy decoding, {plan.STEPS.value} steps "
        "per call. Contexts are set up without prefilling: a RetNet state is made at position N (random "
        "contents; its step does not depend on N, one compiled program serves every N), a Transformer KV "
        f"cache of N + {plan.STEPS.value} slots holds N random keys and values. Floor = parameter bytes / "
        "measured copy bandwidth, plus the state read and written once (RetNet) or the cache read once "
        "(Transformer); × floor params leaves the state out."
    )
    check = [r for r in rows if r["kind"] == "state_check"]
    check_text = "(not run)"
    if check:
        lines = []
        for r in check:
            if r.get("status") != "ok":
                lines.append(f"- {r['arch']}: {r.get('status')}")
                continue
            first = r["first_disagreement"]
            lines.append(
                f"- {r['arch']}, B={r['B']}, prompt {r['T']} tokens, {r['steps']} steps: logits' "
                f"relative error {r['error_first']:.2e} after one step, {r['error_last']:.2e} after the "
                f"last, {r['error_max']:.2e} at worst; greedy tokens agree {100 * r['agree']:.1f}% (first "
                f"disagreement: {'none' if first is None else f'step {first}'}); the state's own relative "
                f"error at the end {r['state_error']:.2e}."
            )
        check_text = "\n".join(lines)
    hlo_rows = [hlostats.markdown_rows(h["name"], h["stats"]) for h in results["hlo"]]
    hlo_table = (
        br.markdown_table(hlo_rows, [(c, lambda r, i=i: r[i]) for i, c in enumerate(hlostats.COLUMNS)])
        if hlo_rows
        else "(none)"
    )
    fit_rows = [r for r in rows if r["kind"] == "fit"]
    sections = [
        br.ceilings_markdown(results["device"] or {}, ceilings),
        setup,
        "## Against the targets\n\n" + ("\n".join(summary_lines(rows)) or "(nothing measured)"),
        f"## Decoding vs context, batch {plan.LENGTH_BATCH.value}\n\n"
        + table(DECODE_COLUMNS, lambda r: default(r) and "length" in r.get("panels", [])),
        f"## Decoding vs batch, context {plan.BATCH_CONTEXT.value}\n\n"
        + table(
            DECODE_COLUMNS,
            lambda r: (
                default(r)
                and ("batch" in r.get("panels", []) or (r["kind"] == "fit" and r.get("status") == "ok"))
            ),
        ),
        "## Largest batch that fits\n\n"
        + ("\n".join(_fit_line(r) for r in fit_rows) if fit_rows else "(not run)"),
        f"## Prefill vs the training forward, batch {plan.PREFILL_BATCH.value}\n\n"
        + table(
            PREFILL_COLUMNS,
            lambda r: r["kind"] == "prefill",
            key=lambda r: (r["arch"], r["T"], ("forward", "state", "decoder").index(r["variant"])),
        ),
        f"## A bfloat16 recurrent state, context {plan.BATCH_CONTEXT.value}\n\n"
        + table(STATE_COLUMNS, lambda r: _in_state_table(r, rows))
        + "\n\nError against the float32 state:\n\n"
        + check_text,
        f"## XLA flag sets, context {plan.BATCH_CONTEXT.value}\n\n"
        + "".join(
            f"- {name}: `{value}`\n" for name, value in plan.parse_flag_sets(plan.XLA_FLAG_SETS.value).items()
        )
        + "\n"
        + table(
            FLAG_COLUMNS,
            lambda r: _in_flag_table(r, rows),
            key=lambda r: (r["arch"], r["B"], r["flags"] != "default", r["flags"]),
        ),
        "## What one decoding step runs (compiled HLO, the decode loop's body)\n\n" + hlo_table,
    ]
    raw = dict(
        device=results["device"],
        ceilings=ceilings,
        model=plan.MODEL.value,
        dtype=dtype,
        rows=rows,
        hlo=[dict(name=h["name"], stats=h["stats"]) for h in results["hlo"]],
    )
    text = report.write("Inference benchmark", sections, raw)
    if plan.HLO.value and any(h.get("text") for h in results["hlo"]):
        with zipfile.ZipFile(report.stem + "_hlo.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for h in results["hlo"]:
                if h.get("text"):
                    z.writestr(
                        h["name"].replace(" ", "_").replace("[", "").replace("]", "") + ".txt", h["text"]
                    )
    return text


def _in_state_table(r, rows) -> bool:
    """bf16-state rows, and the float32-state rows they are compared with."""
    if r["kind"] != "decode" or r.get("flags") != "default":
        return False
    if r["state_dtype"] is not None:
        return True
    return any(
        o["kind"] == "decode"
        and o["state_dtype"] is not None
        and (o["arch"], o["T"], o["B"]) == (r["arch"], r["T"], r["B"])
        for o in rows
    )


def _in_flag_table(r, rows) -> bool:
    """Rows under other XLA flags, and the default-flag rows they are compared with."""
    if r["kind"] != "decode" or r["state_dtype"] is not None:
        return False
    if r["flags"] != "default":
        return True
    return any(
        o["kind"] == "decode"
        and o["flags"] != "default"
        and (o["arch"], o["T"], o["B"]) == (r["arch"], r["T"], r["B"])
        for o in rows
    )


def _fit_line(r) -> str:
    if r.get("status") != "ok":
        return f"- {r['arch']}: {r.get('status')}" + (f" ({r['note']})" if r.get("note") else "")
    fit = r["fit"]
    return (
        f"- {r['arch']}, context {r['T']}: B={r['B']} ({fit['bytes_per_row'] / 1e9:.3g} GB per row, "
        f"{fit['free_bytes'] / 1e9:.3g} GB free): {r['seconds'] * 1e3:.3f} ms/step, "
        f"{r['tokens_per_s']:,.0f} tokens/s, {r['vs_floor']:.2f}× its floor."
    )


def plot(rows, path):
    fig, axes = br.figure(1, 3)
    panels = [
        (
            "length",
            "T",
            lambda r: (r["memory"] or {}).get("bytes", 0) / 1e9,
            "decode memory GB",
            "(a) memory",
        ),
        ("length", "T", lambda r: r["tokens_per_s"], "tokens/s", "(b) throughput"),
        ("batch", "B", lambda r: r["tokens_per_s"], "tokens/s", "(c) throughput"),
    ]
    for ax, (panel, x, y, label, title) in zip(axes[0], panels, strict=True):
        xs = []
        for arch in plan.ARCHS.value:
            sel = [
                r
                for r in rows
                if r["kind"] == "decode"
                and panel in r.get("panels", [])
                and r["arch"] == arch
                and r["flags"] == "default"
                and r["state_dtype"] is None
            ]
            xs += [r[x] for r in sel]
            pts = sorted((r[x], y(r)) for r in sel if r.get("status") == "ok")
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=arch)
        fixed = f"B={plan.LENGTH_BATCH.value}" if panel == "length" else f"context {plan.BATCH_CONTEXT.value}"
        ax.set(
            xlabel="context" if x == "T" else "batch",
            ylabel=label,
            title=f"{title}, {plan.MODEL.value}, {fixed}",
        )
        if xs:
            br.log2_xaxis(ax, xs)
            if x == "B":
                ax.set_yscale("log")
        ax.legend(fontsize=7)
    br.save_figure(fig, path)
