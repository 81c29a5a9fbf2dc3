"""The figures of ``bench_inference`` derived from its rows: rates, floors and the ratios between rows,
and the lines that set them against the targets."""

from __future__ import annotations

from experiments.inference import plan


def derive(rows, ceilings):
    """Per-row rates and floors, and the ratios between rows (vs the Transformer, vs training, vs flags)."""
    bandwidth = (ceilings or {}).get("bandwidth")
    for row in rows:
        if row.get("status") != "ok" or row["kind"] not in ("decode", "fit", "prefill"):
            continue
        steps = plan.STEPS.value if row["kind"] != "prefill" else 1
        seconds = row["timing"]["median_s"] / steps
        row["seconds"] = seconds
        row["tokens_per_s"] = row["B"] * (1 if row["kind"] != "prefill" else row["T"]) / seconds
        if row["kind"] != "prefill" and bandwidth:
            traffic = row["state_bytes"] * (2 if plan.is_retnet(row["arch"]) else 1)
            row["floor_params_s"] = row["params_bytes"] / bandwidth
            row["floor_s"] = (row["params_bytes"] + traffic) / bandwidth
            row["vs_floor_params"] = seconds / row["floor_params_s"]
            row["vs_floor"] = seconds / row["floor_s"]
    ok = [r for r in rows if r.get("status") == "ok" and "tokens_per_s" in r]

    def find(**match):
        return next((r for r in ok if all(r.get(k) == v for k, v in match.items())), None)

    for row in ok:
        if row["kind"] == "decode" and plan.is_retnet(row["arch"]):
            other = find(kind="decode", arch="transformer", T=row["T"], B=row["B"], flags="default")
            if other:
                row["vs_transformer"] = row["tokens_per_s"] / other["tokens_per_s"]
        if row["kind"] == "decode" and row["flags"] != "default":
            base = find(
                kind="decode",
                arch=row["arch"],
                T=row["T"],
                B=row["B"],
                flags="default",
                state_dtype=row["state_dtype"],
            )
            if base:
                row["vs_default"] = row["seconds"] / base["seconds"]
        if row["kind"] == "decode" and row["state_dtype"] is not None:
            base = find(
                kind="decode", arch=row["arch"], T=row["T"], B=row["B"], flags=row["flags"], state_dtype=None
            )
            if base:
                row["vs_float32_state"] = row["seconds"] / base["seconds"]
        if row["kind"] == "prefill":
            base = find(kind="prefill", variant="forward", arch=row["arch"], T=row["T"], B=row["B"])
            if base:
                row["vs_forward"] = row["tokens_per_s"] / base["tokens_per_s"]


def summary_lines(rows) -> list[str]:
    """The figures the targets are stated in (each line says what it compares)."""
    ok = [r for r in rows if r.get("status") == "ok" and "seconds" in r and r["flags"] == "default"]
    lines = []
    for arch in sorted({r["arch"] for r in ok}):
        length = [
            r
            for r in ok
            if r["arch"] == arch and "length" in r.get("panels", []) and r["state_dtype"] is None
        ]
        if len(length) >= 2:
            times = [r["seconds"] for r in length]
            targets = plan.is_retnet(arch)
            lines.append(
                f"- {arch}, B={length[0]['B']}: {min(times) * 1e3:.3f}–{max(times) * 1e3:.3f} ms/step over "
                f"contexts {min(r['T'] for r in length)}–{max(r['T'] for r in length)} (spread "
                f"{100 * (max(times) / min(times) - 1):.1f}%{'; target ≤ 3%' if targets else ''}), "
                f"{min(r.get('vs_floor_params', float('inf')) for r in length):.2f}× the parameter floor "
                f"at best{' (target ≤ 1.3×)' if targets else ''}."
            )
        decode = [
            r
            for r in ok
            if r["arch"] == arch
            and r["kind"] in ("decode", "fit")
            and r["T"] == plan.BATCH_CONTEXT.value
            and r["state_dtype"] is None
        ]
        if decode:
            best = max(decode, key=lambda r: r["tokens_per_s"])
            largest = max(decode, key=lambda r: r["B"])
            lines.append(
                f"- {arch}, context {plan.BATCH_CONTEXT.value}: best {best['tokens_per_s']:,.0f} tokens/s at "
                f"B={best['B']}; largest batch run B={largest['B']} ({largest['vs_floor']:.2f}× its floor)."
            )
    retnet = {
        r["B"]: r
        for r in ok
        if r["arch"] == "retnet"
        and r["kind"] in ("decode", "fit")
        and r["T"] == plan.BATCH_CONTEXT.value
        and r["state_dtype"] is None
    }
    trans = {
        r["B"]: r
        for r in ok
        if r["arch"] == "transformer"
        and r["kind"] in ("decode", "fit")
        and r["T"] == plan.BATCH_CONTEXT.value
    }
    if 8 in retnet and 8 in trans:
        lines.append(
            f"- B=8: RetNet {retnet[8]['tokens_per_s'] / trans[8]['tokens_per_s']:.2f}× the Transformer's "
            f"throughput (target ≥ 3×)."
        )
    if retnet and trans:
        best_r = max(r["tokens_per_s"] for r in retnet.values())
        best_t = max(r["tokens_per_s"] for r in trans.values())
        lines.append(
            f"- Best throughput: RetNet {best_r / best_t:.2f}× the Transformer's best (target ≥ 10×)."
        )
    batched = [r for r in retnet.values() if r["B"] >= 8]
    if batched:
        lines.append(
            "- RetNet B ≥ 8, × the floor counting the state: "
            + ", ".join(f"B={r['B']} {r['vs_floor']:.2f}×" for r in sorted(batched, key=lambda r: r["B"]))
            + " (target ≤ 1.5×)."
        )
    flagged = [r for r in rows if r.get("status") == "ok" and r.get("vs_default")]
    for r in sorted(flagged, key=lambda r: (r["arch"], r["B"], r["flags"])):
        lines.append(
            f"- XLA flags {r['flags']}, {r['arch']} B={r['B']}: {r['vs_default']:.3f}× the default flags' "
            f"time ({r['seconds'] * 1e3:.3f} ms/step, {r.get('vs_floor', float('nan')):.2f}× the floor)."
        )
    for r in ok:
        if r["kind"] == "prefill" and r["variant"] != "forward" and "vs_forward" in r:
            lines.append(
                f"- Prefill {r['arch']} T={r['T']} ({r['variant']}): {r['vs_forward']:.2f}× the training "
                f"forward's tokens/s (target ≥ 0.8)."
            )
    return lines
