"""Inference: decode latency per token, throughput and memory against context length and batch, for RetNet
(recurrent state) and the Transformer baseline (KV cache) — the paper's Figure 6 (a, b, c) — and prefill.

    python -m experiments.bench_inference --panels=length         # paper-1.3b, Fig. 6a/b + prefill (~5 min)
    python -m experiments.bench_inference --panels=batch          # Fig. 6c (~4 min)
    python -m experiments.bench_inference --panels=length --archs=retnet --contexts=1024,65536
    python -m experiments.bench_inference --model=tiny --contexts=128,4096 --batches=1   # CPU (1-2 min)

Decoding: one jitted ``lax.fori_loop`` of ``--decode_steps`` greedy steps through the model's
``decoding.LMDecoder`` (embedding, all layers, output head, argmax), its state donated and chained from
call to call; time per token = call time / steps (median
over ``--repeats`` calls, after a warm-up call; compilation timed apart). Decoding starts from a state
already at the context length, filled with random values (the work of a step does not depend on them):
a RetNet state at the context's position, or a Transformer cache of ``context + decode_steps`` slots
holding ``context`` tokens; each call sets the position back to the context, so every timed step sees
the stated context. A RetNet state's shape does not depend on the context, so one compiled program
serves all contexts of a batch size (later rows show compile "–"). Prefill (a random prompt of the
context's length through the chunkwise form, or cuDNN attention for the Transformer on GPU) is timed on
its own, at ``--length_batch``.

Panels: (a) memory vs context and (b) throughput vs context at batch ``--length_batch``; (c) latency vs
batch at context ``--batch_context``. Memory is XLA's ``memory_analysis`` of the decoding program
(parameters, state and temporaries; the state is donated, so it is counted once), plus the state alone.
Floors: a step must read every parameter (and the state: the RetNet's is read and written, the cache
read), so params / bandwidth and (params + state traffic) / bandwidth, with the bandwidth measured in the
same run, bound the step time from below.
"""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib as bl
from retnet_jax.models.lm import prefill as lm_prefill

_ARCHS = flags.DEFINE_list(
    "archs",
    ["retnet", "transformer"],
    "retnet, retnet-loop (the decode step's layer loop not unrolled: unroll_decode=False), transformer.",
)
_MODEL = flags.DEFINE_string("model", "paper-1.3b", "Model preset (RetNetConfig.preset); tiny on a CPU.")
_PANELS = flags.DEFINE_list("panels", ["length", "batch"], "length: Fig. 6a/b (and prefill); batch: 6c.")
_CONTEXTS = flags.DEFINE_string("contexts", "1024,2048,4096,8192,16384,32768,65536", "Contexts (panel a/b).")
_LENGTH_BATCH = flags.DEFINE_integer("length_batch", 1, "Batch of the length panels and of prefill.")
_BATCHES = flags.DEFINE_string("batches", "1,2,4,8,16,32,64,128", "Batch sizes (panel c).")
_BATCH_CONTEXT = flags.DEFINE_integer("batch_context", 8192, "Context of the batch panel.")
_STEPS = flags.DEFINE_integer("decode_steps", 64, "Decode steps per timed call.")
_PREFILL = flags.DEFINE_bool("prefill", True, "Also time prefill at each context of the length panel.")
_DTYPE = flags.DEFINE_string(
    "dtype", "auto", "Compute and parameter dtype (auto: bfloat16 on GPU, else f32)."
)

flags.FLAGS.set_default("repeats", 5)
flags.FLAGS.set_default("time_budget_s", 480.0)


def build(arch: str, dtype: str):
    return bl.decode_model(arch, _MODEL.value, dtype)


def is_retnet(arch: str) -> bool:
    return arch.startswith("retnet")


_PROGRAMS = {}  # compiled decoding programs of the current model, by state shape


def run_decode(arch, model, decoder, variables, batch: int, context: int):
    state = bl.decode_state(model, batch, context, extra_slots=_STEPS.value)
    state_bytes = bl.nbytes(bl.state_arrays(state))
    token = jnp.asarray(bl.random_tokens(batch, (batch,), model.config.vocab_size))
    # A RetNet state's shape does not depend on the context: one program serves every context.
    key = (arch, batch, str(jax.tree.map(lambda x: (x.shape, x.dtype), state)))
    reused = key in _PROGRAMS
    if not reused:
        _PROGRAMS[key] = bl.compile_timed(
            bl.decode_program(decoder, _STEPS.value), variables, token, state, donate_argnums=(2,)
        )
    compiled, compile_s, memory = _PROGRAMS[key]
    compile_s = None if reused else compile_s  # "–" in the table: compiled for an earlier context
    carry = dict(token=token, state=state)
    del state  # donated: only carry holds the live state

    def call():
        state = bl.at_position(carry["state"], context)
        carry["token"], carry["state"] = compiled(variables, carry["token"], state)
        return carry["token"]

    timing = bl.time_calls(call, warmup=1, calls_per_sample=1)
    carry.clear()
    return dict(compile_s=compile_s, memory=memory, state_bytes=state_bytes, timing=timing.to_dict())


def run_prefill(arch, model, variables, batch: int, context: int):
    tokens = jnp.asarray(bl.random_tokens(context, (batch, context), model.config.vocab_size))
    if is_retnet(arch):  # only the state is returned, so XLA drops the output head over the prompt

        def prefill(variables, tokens):
            return model.apply(variables, tokens, mode="chunkwise", return_state=True)[1]
    else:

        def prefill(variables, tokens):
            return lm_prefill(model, variables, tokens, max_length=context)[1]

    compiled, compile_s, memory = bl.compile_timed(prefill, variables, tokens)
    timing = bl.time_calls(lambda: compiled(variables, tokens), warmup=1, calls_per_sample=1)
    gc.collect()
    return dict(compile_s=compile_s, memory=memory, timing=timing.to_dict())


# ------------------------------------------------------------------------------------------------------
# The run and the report.


def plan():
    """Decode configurations (arch, context, batch, panels) without repeats, and prefill ones."""
    decode, prefill = {}, []
    for arch in _ARCHS.value:
        if "length" in _PANELS.value:
            for context in bl.int_list(_CONTEXTS.value):
                decode.setdefault((arch, context, _LENGTH_BATCH.value), set()).add("length")
                if _PREFILL.value:
                    prefill.append((arch, context, _LENGTH_BATCH.value))
        if "batch" in _PANELS.value:
            for batch in bl.int_list(_BATCHES.value):
                decode.setdefault((arch, _BATCH_CONTEXT.value, batch), set()).add("batch")
    return decode, prefill


def derive(row, ceilings):
    if row.get("status") != "ok":
        return
    seconds = row["timing"]["median_s"] / (_STEPS.value if row["kind"] == "decode" else 1)
    row["seconds"] = seconds
    row["tokens_per_s"] = row["B"] * (1 if row["kind"] == "decode" else row["T"]) / seconds
    if row["kind"] == "decode":
        state_traffic = row["state_bytes"] * (2 if is_retnet(row["arch"]) else 1)
        row["floor_params_s"] = row["params_bytes"] / ceilings["bandwidth"]
        row["floor_s"] = (row["params_bytes"] + state_traffic) / ceilings["bandwidth"]
        row["vs_floor_params"] = seconds / row["floor_params_s"]


DECODE_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("context", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("ms/token step", bl.when_ok(lambda r: bl.fmt(r["seconds"], 1e3, ".3f"))),
    ("iqr%", bl.when_ok(lambda r: bl.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("tokens/s", bl.when_ok(lambda r: bl.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("state GB", bl.when_ok(lambda r: bl.fmt(r["state_bytes"], 1e-9, ".3g"))),
    ("decode mem GB", bl.when_ok(lambda r: bl.fmt((r["memory"] or {}).get("bytes"), 1e-9, ".3g"))),
    ("floor params ms", bl.when_ok(lambda r: bl.fmt(r["floor_params_s"], 1e3, ".3f"))),
    ("floor +state ms", bl.when_ok(lambda r: bl.fmt(r["floor_s"], 1e3, ".3f"))),
    ("× floor params", bl.when_ok(lambda r: bl.fmt(r["vs_floor_params"], 1, ".2f"))),
    ("compile s", bl.when_ok(lambda r: bl.fmt(r["compile_s"], 1, ".1f"))),
]
PREFILL_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("context", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("prefill ms", bl.when_ok(lambda r: bl.fmt(r["seconds"], 1e3, ".1f"))),
    ("iqr%", bl.when_ok(lambda r: bl.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("tokens/s", bl.when_ok(lambda r: bl.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("mem GB", bl.when_ok(lambda r: bl.fmt((r["memory"] or {}).get("bytes"), 1e-9, ".3g"))),
    ("compile s", bl.when_ok(lambda r: bl.fmt(r["compile_s"], 1, ".1f"))),
]


def plot(rows, path):
    fig, axes = bl.figure(1, 3)
    panels = [
        (
            "length",
            "T",
            lambda r: (r["memory"] or {}).get("bytes", 0) / 1e9,
            "decode memory GB",
            "(a) memory",
        ),
        ("length", "T", lambda r: r["tokens_per_s"], "tokens/s", "(b) throughput"),
        ("batch", "B", lambda r: r["seconds"] * 1e3, "ms per step", "(c) latency"),
    ]
    for ax, (panel, x, y, label, title) in zip(axes[0], panels, strict=True):
        xs = []
        for arch in _ARCHS.value:
            sel = [r for r in rows if r["kind"] == "decode" and panel in r["panels"] and r["arch"] == arch]
            xs += [r[x] for r in sel]
            pts = sorted((r[x], y(r)) for r in sel if r.get("status") == "ok")
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=arch)
        fixed = f"B={_LENGTH_BATCH.value}" if panel == "length" else f"context {_BATCH_CONTEXT.value}"
        ax.set(
            xlabel="context" if x == "T" else "batch", ylabel=label, title=f"{title}, {_MODEL.value}, {fixed}"
        )
        if xs:
            bl.log2_xaxis(ax, xs)
        ax.legend(fontsize=7)
    bl.save_figure(fig, path)


def run_arch(arch, dtype, decode, prefill, budget, record):
    """Runs one architecture's configurations, passing each row to ``record`` (the model lives in here)."""
    model, decoder, variables = build(arch, dtype)
    params_bytes = bl.nbytes(variables)
    todo = [("decode", *key) for key in decode if key[0] == arch]
    todo += [("prefill", *key) for key in prefill if key[0] == arch]
    for kind, _, context, batch in todo:
        row = dict(kind=kind, arch=arch, T=context, B=batch, params_bytes=params_bytes)
        row["panels"] = sorted(decode.get((arch, context, batch), ())) if kind == "decode" else ["prefill"]
        if budget.exhausted():
            row["status"] = "skipped"
        else:
            print(f"{kind} {arch} context {context} B{batch} ...", flush=True)
            if kind == "decode":
                run = functools.partial(run_decode, arch, model, decoder, variables, batch, context)
            else:
                run = functools.partial(run_prefill, arch, model, variables, batch, context)
            row.update(bl.guarded(run))
            gc.collect()
        record(row)


def main(argv):
    del argv
    budget = bl.Budget()
    device = bl.device_info()
    ceilings = bl.measure_ceilings()
    dtype = (
        _DTYPE.value if _DTYPE.value != "auto" else ("float32" if device["platform"] == "cpu" else "bfloat16")
    )
    report = bl.Report("bench_inference", device["short"])
    decode, prefill = plan()
    rows = []

    def record(row):
        derive(row, ceilings)
        rows.append(row)
        write(report, rows, device, ceilings, dtype)

    for arch in _ARCHS.value:
        run_arch(arch, dtype, decode, prefill, budget, record)
        _PROGRAMS.clear()
        gc.collect()
    text = write(report, rows, device, ceilings, dtype)
    if bl.PLOTS.value:
        bl.guarded(lambda: plot(rows, report.png))
    print(text)
    print("Wrote", *report.paths())


def write(report, rows, device, ceilings, dtype):
    def table(kind, panel, columns):
        sel = [r for r in rows if r["kind"] == kind and panel in r["panels"]]
        return bl.markdown_table(sorted(sel, key=lambda r: (r["arch"], r["T"], r["B"])), columns)

    setup = (
        f"Model {_MODEL.value} in {dtype} (parameters too); greedy decoding, {_STEPS.value} steps per call; "
        f"peak device memory of this process: {bl.fmt(bl.peak_bytes_in_use(), 1e-9, '.1f')} GB."
    )
    sections = [
        bl.ceilings_markdown(device, ceilings),
        setup,
        f"## Decoding vs context (Fig. 6a/b), batch {_LENGTH_BATCH.value}\n\n"
        + table("decode", "length", DECODE_COLUMNS),
        f"## Decoding vs batch (Fig. 6c), context {_BATCH_CONTEXT.value}\n\n"
        + table("decode", "batch", DECODE_COLUMNS),
        f"## Prefill, batch {_LENGTH_BATCH.value}\n\n" + table("prefill", "prefill", PREFILL_COLUMNS),
    ]
    raw = dict(device=device, ceilings=ceilings, model=_MODEL.value, dtype=dtype, rows=rows)
    return report.write("Inference benchmark", sections, raw)


if __name__ == "__main__":
    app.run(main)
