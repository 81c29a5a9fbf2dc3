"""Serving many requests: continuous batching against static batches, for RetNet and the Transformer.

    python -m experiments.bench_serving --archs=retnet --tag=retnet              # paper-1.3b, GPU
    python -m experiments.bench_serving --archs=transformer --tag=transformer
    python -m experiments.bench_serving --archs= --merge=A.json,B.json --tag=all  # one table of earlier runs
    python -m experiments.bench_serving --model=tiny --requests=64 --rows=8 \\
        --prompt_lengths=16,512 --output_lengths=16,128                            # CPU (~2 min)

The workload: ``--requests`` requests whose prompt and output lengths are drawn (``--seed``) from
``--prompt_lengths`` and ``--output_lengths`` (log-uniformly by default: many short, a few long; or
uniformly), prompts of random token ids, no stop tokens (each request generates exactly its output
length), greedy. All requests are there at the start.

Policies, through the same scheduler and the same compiled programs (``inference.batching.Scheduler``
with ``--rows`` rows):

* continuous: a finished row takes the next request at once (prefilled into the free row, chunkwise);
* static: ``R`` requests at a time, prefilled at the batch's longest prompt, decoded until the batch's
  longest output has ended, then the next ``R``.

The RetNet's state is a fixed size per row; the Transformer's KV cache is sized for the longest request
(BOS + prompt + output). Parameters are random (``benchprograms.decode_model``) in ``--dtype``.

Timing: each policy serves the whole workload ``--repeats`` times. Programs are compiled on first use,
while the device is idle, and timed apart (``compile s``); the time to finish is the wall time from the
start to the last token minus that compile time (median over repeats). tokens/s = tokens generated /
time to finish; prompt tokens/s likewise; latency = a request's finish time (every request arrives at
0). ``busy`` = tokens decoded / (decoding steps × R): how full the rows were (a request's first token
comes from its prefill); ``prefill pad`` = the share of prefill tokens that were padding or unused rows.
The first run also pays each program's first call (loading it: milliseconds each), which the median
of ``--repeats=3`` or more leaves out.
"""

from __future__ import annotations

import gc
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchprograms as bp
from experiments import benchreport as br
from retnet_jax.inference import batching

_ARCHS = flags.DEFINE_list("archs", ["retnet", "transformer"], "retnet, transformer.")
_MODEL = flags.DEFINE_string("model", "paper-1.3b", "Model preset (RetNetConfig.preset); tiny on a CPU.")
_POLICIES = flags.DEFINE_list("policies", ["continuous", "static"], "continuous, static.")
_REQUESTS = flags.DEFINE_integer("requests", 1000, "Requests in the workload.")
_PROMPTS = flags.DEFINE_string("prompt_lengths", "16,4096", "Prompt lengths: min,max.")
_OUTPUTS = flags.DEFINE_string("output_lengths", "16,1024", "Output lengths (tokens generated): min,max.")
_DISTRIBUTION = flags.DEFINE_enum("distribution", "loguniform", ["loguniform", "uniform"], "Length draws.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the workload's lengths and prompts.")
_ROWS = flags.DEFINE_string("rows", "64", "Rows decoded together (comma list).")
_BLOCK = flags.DEFINE_integer("block_size", 16, "Decoding steps per program at most.")
_REFILL_AT = flags.DEFINE_integer(
    "refill_at", 1, "Free rows that end a decoding program while requests wait."
)
_PREFILL_TOKENS = flags.DEFINE_integer("max_prefill_tokens", 8192, "Rows × width of a prefill call at most.")
_MERGE = flags.DEFINE_list(
    "merge", [], "JSON results of earlier runs of this script whose rows join the table (runs split by arch)."
)
_DTYPE = flags.DEFINE_string(
    "dtype", "auto", "Compute and parameter dtype (auto: bfloat16 on GPU, else f32)."
)

flags.FLAGS.set_default("repeats", 1)
flags.FLAGS.set_default("time_budget_s", 540.0)


def lengths(rng, count: int, bounds: str) -> np.ndarray:
    low, high = bl.int_list(bounds)
    if _DISTRIBUTION.value == "uniform":
        return rng.integers(low, high + 1, count)
    drawn = np.exp(rng.uniform(np.log(low), np.log(high + 1), count))
    return np.clip(drawn.astype(np.int64), low, high)


def workload(vocab_size: int) -> list[batching.Request]:
    rng = np.random.default_rng(_SEED.value)
    prompt_lengths = lengths(rng, _REQUESTS.value, _PROMPTS.value)
    output_lengths = lengths(rng, _REQUESTS.value, _OUTPUTS.value)
    return [
        batching.Request(i, rng.integers(0, vocab_size, int(p)).tolist(), int(o))
        for i, (p, o) in enumerate(zip(prompt_lengths, output_lengths, strict=True))
    ]


def serve_once(model, variables, requests, rows: int, policy: str, max_length: int | None):
    """Serves every request once: (seconds without compiling, stats, finish times per request)."""
    scheduler = batching.Scheduler(
        model,
        variables,
        rows=rows,
        bos_id=0,
        pad_id=0,
        max_length=max_length,
        block_size=_BLOCK.value,
        refill_at=_REFILL_AT.value,
        max_prefill_tokens=_PREFILL_TOKENS.value,
        static=policy == "static",
    )
    finish, generated = {}, 0
    start = time.perf_counter()
    for event in scheduler.serve(requests):
        generated += len(event.tokens)
        if event.finished:
            finish[event.id] = time.perf_counter() - start - scheduler.stats.compile_s
    seconds = time.perf_counter() - start - scheduler.stats.compile_s
    expected = sum(r.max_new_tokens for r in requests)
    if generated != expected or len(finish) != len(requests):
        raise RuntimeError(
            f"served {generated} tokens of {expected}, {len(finish)} of {len(requests)} requests"
        )
    return seconds, scheduler.stats, np.asarray(list(finish.values()))


def state_bytes(model, rows: int, max_length: int | None) -> int:
    """Bytes of the decoding state of ``rows`` rows (the RetNet's states or the Transformer's cache)."""
    state = jax.eval_shape(lambda: model.config.init_state(rows, max_length=max_length))
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in bp.state_arrays(state))


def run(arch, model, variables, requests, rows: int, policy: str):
    # The KV cache holds the longest request: BOS + prompt + output − the last token.
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    max_length = None if arch == "retnet" else longest
    runs, compile_s = [], 0.0
    for _ in range(max(1, bl.REPEATS.value)):
        seconds, stats, finish = serve_once(model, variables, requests, rows, policy, max_length)
        compile_s += stats.compile_s
        runs.append((seconds, stats, finish))
        gc.collect()
    seconds, stats, finish = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return dict(
        seconds=seconds,
        samples=[r[0] for r in runs],
        compile_s=compile_s,
        generated=stats.generated,
        prompt_tokens=stats.prompt_tokens,
        prefill_tokens=stats.prefill_tokens,
        prefill_calls=stats.prefill_calls,
        steps=stats.steps,
        blocks=stats.blocks,
        busy=(stats.generated - stats.requests) / max(1, stats.row_steps),
        tokens_per_s=stats.generated / seconds,
        prompt_tokens_per_s=stats.prompt_tokens / seconds,
        latency_mean_s=float(np.mean(finish)),
        latency_p90_s=float(np.percentile(finish, 90)),
        state_bytes=state_bytes(model, rows, max_length),
        max_length=max_length,
    )


COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("policy", lambda r: r["policy"]),
    ("R", lambda r: str(r["R"])),
    ("time to finish s", br.when_ok(lambda r: br.fmt(r["seconds"], 1, ".2f"))),
    ("tokens/s", br.when_ok(lambda r: br.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("× static", br.when_ok(lambda r: br.fmt(r.get("vs_static"), 1, ".2f"))),
    ("× Transformer", br.when_ok(lambda r: br.fmt(r.get("vs_transformer"), 1, ".2f"))),
    ("prompt tokens/s", br.when_ok(lambda r: br.fmt(r["prompt_tokens_per_s"], 1, ",.0f"))),
    ("latency mean s", br.when_ok(lambda r: br.fmt(r["latency_mean_s"], 1, ".2f"))),
    ("latency p90 s", br.when_ok(lambda r: br.fmt(r["latency_p90_s"], 1, ".2f"))),
    ("busy %", br.when_ok(lambda r: br.fmt(r["busy"], 100, ".0f"))),
    ("prefill pad %", br.when_ok(lambda r: br.fmt(1 - r["prompt_tokens"] / r["prefill_tokens"], 100, ".0f"))),
    ("steps", br.when_ok(lambda r: str(r["steps"]))),
    ("state GB", br.when_ok(lambda r: br.fmt(r["state_bytes"], 1e-9, ".3g"))),
    ("compile s", br.when_ok(lambda r: br.fmt(r["compile_s"], 1, ".1f"))),
]


def derive(rows):
    """Ratios: against the same arch's static batches, and against the Transformer's same policy and R."""
    ok = {(r["arch"], r["policy"], r["R"]): r for r in rows if r.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        static = ok.get((row["arch"], "static", row["R"]))
        if static is not None:
            row["vs_static"] = row["tokens_per_s"] / static["tokens_per_s"]
        transformer = ok.get(("transformer", row["policy"], row["R"]))
        if transformer is not None and row["arch"] != "transformer":
            row["vs_transformer"] = row["tokens_per_s"] / transformer["tokens_per_s"]


def merge_rows(rows):
    """Drops a skipped or failed row where another run measured the same arch, policy and R."""
    measured = {(r["arch"], r["policy"], r["R"]) for r in rows if r.get("status") == "ok"}
    return [r for r in rows if r.get("status") == "ok" or (r["arch"], r["policy"], r["R"]) not in measured]


def describe(requests) -> str:
    prompts = np.asarray([len(r.prompt) for r in requests])
    outputs = np.asarray([r.max_new_tokens for r in requests])
    return (
        f"Workload: {len(requests)} requests, {_DISTRIBUTION.value} lengths (seed {_SEED.value}): prompts "
        f"{prompts.min()}–{prompts.max()} tokens (mean {prompts.mean():.0f}, {prompts.sum():,} in all), "
        f"outputs {outputs.min()}–{outputs.max()} (mean {outputs.mean():.0f}, {outputs.sum():,} in all); "
        f"greedy, no stop tokens."
    )


def plot(rows, path):
    fig, axes = br.figure(1, 1)
    ax = axes[0][0]
    ok = [r for r in rows if r.get("status") == "ok"]
    labels = [f"{r['arch']}\n{r['policy']} R={r['R']}" for r in ok]
    ax.bar(range(len(ok)), [r["tokens_per_s"] for r in ok])
    ax.set_xticks(range(len(ok)), labels, fontsize=7)
    ax.set(ylabel="tokens/s", title=f"Serving {_REQUESTS.value} requests, {_MODEL.value}")
    br.save_figure(fig, path)


def run_arch(arch, dtype, budget, rows, write) -> str:
    """Runs one architecture's configurations (the model lives in here); returns the setup line."""
    model, _, variables = bp.decode_model(arch, _MODEL.value, dtype)
    requests = workload(model.config.vocab_size)
    setup = (
        f"Model {_MODEL.value} in {dtype} (parameters too). {describe(requests)} Blocks of {_BLOCK.value} "
        f"steps, refill at {_REFILL_AT.value} free row(s), prefill calls of at most {_PREFILL_TOKENS.value} "
        f"tokens."
    )
    for count in bl.int_list(_ROWS.value):
        for policy in _POLICIES.value:
            row = dict(arch=arch, policy=policy, R=count)
            if budget.exhausted():
                row["status"] = "skipped"
            else:
                print(f"{arch} {policy} R={count} ...", flush=True)
                row.update(bl.guarded(lambda c=count, p=policy: run(arch, model, variables, requests, c, p)))
                gc.collect()
            rows.append(row)
            write(setup)
    return setup


def main(argv):
    del argv
    budget = bl.Budget()
    device = bl.device_info()
    dtype = (
        _DTYPE.value if _DTYPE.value != "auto" else ("float32" if device["platform"] == "cpu" else "bfloat16")
    )
    rows, setups, merged_devices = [], [], []
    for path in _MERGE.value:
        with open(path) as f:
            earlier = json.load(f)
        rows += [dict(row, merged_from=os.path.basename(path)) for row in earlier["rows"]]
        setups += [] if earlier.get("setup", "") in setups else [earlier.get("setup", "")]
        merged_devices.append(earlier["device"])
    if not _ARCHS.value and merged_devices:
        # Only earlier runs in the table: it is theirs, named after the device that measured them.
        kinds = {d["device_kind"] for d in merged_devices}
        if len(kinds) > 1:
            raise app.UsageError(
                f"--merge: the runs come from different devices ({sorted(kinds)}); merge one device's."
            )
        device = merged_devices[0]
    report = br.Report("bench_serving", device["short"])

    def write(setup=""):
        rows[:] = merge_rows(rows)
        derive(rows)
        setup = " ".join(dict.fromkeys(s for s in [*setups, setup] if s))
        if _MERGE.value:
            setup += " Merged from " + ", ".join(os.path.basename(p) for p in _MERGE.value) + "."
        sections = [
            br.ceilings_markdown(device, None),
            setup,
            "## Continuous batching vs static batches\n\n"
            + br.markdown_table(sorted(rows, key=lambda r: (r["arch"], r["R"], r["policy"])), COLUMNS),
        ]
        raw = dict(device=device, model=_MODEL.value, dtype=dtype, setup=setup, rows=rows)
        return report.write("Serving benchmark", sections, raw)

    setup = ""
    for arch in _ARCHS.value:
        setup = run_arch(arch, dtype, budget, rows, write)
        gc.collect()
    text = write(setup)
    if br.PLOTS.value:
        bl.guarded(lambda: plot(rows, report.png))
    print(text)
    print("Wrote", *report.paths())


if __name__ == "__main__":
    app.run(main)
