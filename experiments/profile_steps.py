"""Where the time goes: a device trace of a decode call and of a train step, summed by kernel.

    python -m experiments.profile_steps                                   # paper-1.3b on a GPU (~3 min)
    python -m experiments.profile_steps --model=tiny --train_T=64 --train_B=2 --decode_steps=4 \\
        --decode_context=64                                               # CPU smoke run

Each program is compiled and run once untraced, then run under ``jax.profiler.trace``; the trace's
device plane (GPU streams; on a CPU, the XLA executor threads) is read back with
``jax.profiler.ProfileData`` and every kernel's time is summed by name and by kind (matrix products,
cuDNN attention, Pallas/Triton kernels, copies, other XLA fusions). The tables give each kind's share of
the device's busy time and the longest kernels, beside the wall time of the traced call.

Programs, for each of ``--archs`` (retnet, retnet-loop, transformer): the batch-``--decode_batch``
decoding loop of ``bench_inference`` (``--decode_steps`` greedy steps at context ``--decode_context``),
and the train step of ``bench_training`` (B ``--train_B``, T ``--train_T``).
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchprograms as bp
from experiments import benchreport as br

_TARGETS = flags.DEFINE_list("targets", ["decode", "train"], "decode and/or train.")
_MODEL = flags.DEFINE_string("model", "paper-1.3b", "Model preset (RetNetConfig.preset); tiny on a CPU.")
_ARCHS = flags.DEFINE_list("archs", ["retnet", "transformer"], "retnet, retnet-loop, transformer.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 64, "Decode steps per traced call.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1, "Batch of the decoding loop.")
_DECODE_CONTEXT = flags.DEFINE_integer("decode_context", 8192, "Context of the decoding loop.")
_TRAIN_T = flags.DEFINE_integer("train_T", 8192, "Sequence length of the train step.")
_TRAIN_B = flags.DEFINE_integer("train_B", 2, "Batch of the train step.")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "RetNet chunk size C of the train step (0: parallel).")
_REMAT = flags.DEFINE_string(
    "remat", "full", "Remat policy of the train step: none, full, projections, mixer."
)
_HEADS = flags.DEFINE_integer("retnet_heads", 0, "RetNet heads (0: the preset's).")
_TOP = flags.DEFINE_integer("top", 12, "Kernels listed per program.")

KINDS = (
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash")),
    ("Pallas / Triton", ("triton", "_kernel", "pallas")),  # a Pallas kernel is named by its function
    ("copy / memset", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other XLA fusions"


def device_events(trace_dir: str):
    """(name, duration_ns) of every kernel on the first device's streams (CPU: the XLA threads)."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    planes = {p.name: p for p in profile.planes}
    gpu = sorted(n for n in planes if n.startswith("/device:GPU"))
    if gpu:
        plane = planes[gpu[0]]
        lines = [line for line in plane.lines if line.name.startswith("Stream")]
    else:
        plane = planes["/host:CPU"]
        lines = [line for line in plane.lines if "XLA" in line.name and "Client" not in line.name]
    return [(e.name, e.duration_ns) for line in lines for e in line.events]


def profile(name: str, run, calls: int = 1):
    """Traces ``calls`` calls of ``run`` (already warm); returns the summary dict."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(run())
            wall = (time.perf_counter() - start) / calls
        events = device_events(tmp)
    by_name = collections.defaultdict(lambda: [0, 0])
    by_kind = collections.defaultdict(int)
    for kernel, ns in events:
        by_name[kernel][0] += ns / calls
        by_name[kernel][1] += 1
        by_kind[kind_of(kernel)] += ns / calls
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[: _TOP.value]
    return dict(
        name=name,
        wall_s=wall,
        busy_s=busy * 1e-9,
        launches=len(events) / calls,
        kinds=sorted(((k, v * 1e-9) for k, v in by_kind.items()), key=lambda kv: -kv[1]),
        top=[(k, v[0] * 1e-9, v[1] // calls) for k, v in top],
    )


def decode_run(arch: str, dtype: str):
    model, decoder, variables = bp.decode_model(arch, _MODEL.value, dtype)
    batch, context = _DECODE_BATCH.value, _DECODE_CONTEXT.value
    state = bp.decode_state(model, batch, context, extra_slots=_DECODE_STEPS.value)
    token = jnp.asarray(bl.random_tokens(batch, (batch,), model.config.vocab_size))
    program = jax.jit(bp.decode_program(decoder, _DECODE_STEPS.value), donate_argnums=(2,))
    carry = dict(token=token, state=state)

    def run():
        state = bp.at_position(carry["state"], context)
        carry["token"], carry["state"] = program(variables, carry["token"], state)
        return carry["token"]

    jax.block_until_ready(run())  # compile and warm up
    return run


def train_run(arch: str, model: str):
    cfg = dict(
        arch=arch,
        model=model,
        T=_TRAIN_T.value,
        B=_TRAIN_B.value,
        chunk=_CHUNK.value,
        remat=bl.remat_policy(_REMAT.value),
        heads=_HEADS.value if arch == "retnet" else 0,
    )
    step = bp.jax_train_step(cfg)[0]
    for _ in range(2):
        jax.block_until_ready(step())
    return step


def markdown(result) -> str:
    busy = result["busy_s"]
    kinds = br.markdown_table(
        [dict(kind=k, s=v) for k, v in result["kinds"]],
        [
            ("kind", lambda r: r["kind"]),
            ("ms", lambda r: br.fmt(r["s"], 1e3, ".2f")),
            ("% of busy", lambda r: br.fmt(100 * r["s"] / busy if busy else None, 1, ".1f")),
        ],
    )
    top = br.markdown_table(
        [dict(kernel=k, s=v, n=n) for k, v, n in result["top"]],
        [
            ("kernel", lambda r: f"`{r['kernel'][:90]}`"),
            ("ms", lambda r: br.fmt(r["s"], 1e3, ".3f")),
            ("launches", lambda r: str(r["n"])),
            ("kind", lambda r: kind_of(r["kernel"])),
        ],
    )
    return (
        f"## {result['name']}\n\nWall time of the traced call {result['wall_s'] * 1e3:.2f} ms; device busy "
        f"{busy * 1e3:.2f} ms in {result['launches']:.0f} kernel launches.\n\n{kinds}\n\n{top}"
    )


def main(argv):
    del argv
    device = bl.device_info()
    dtype = "float32" if device["platform"] == "cpu" else "bfloat16"
    report = br.Report("profile_steps", device["short"])
    sections = []
    model = _MODEL.value
    for arch in _ARCHS.value:
        if "decode" in _TARGETS.value:
            name = (
                f"decode: {arch} {model}, B{_DECODE_BATCH.value}, context {_DECODE_CONTEXT.value}, "
                f"{_DECODE_STEPS.value} steps per call (times per call)"
            )
            print(name, flush=True)
            result = bl.guarded(lambda arch=arch, name=name: profile(name, decode_run(arch, dtype)))
            sections.append(markdown(result) if result["status"] == "ok" else f"## {name}\n\n{result}")
        if "train" in _TARGETS.value:
            name = f"train step: {arch} {model}, B{_TRAIN_B.value} T{_TRAIN_T.value} (times per step)"
            print(name, flush=True)
            result = bl.guarded(lambda arch=arch, name=name: profile(name, train_run(arch, model), calls=2))
            sections.append(markdown(result) if result["status"] == "ok" else f"## {name}\n\n{result}")
    text = report.write("Device profile by kernel", [br.ceilings_markdown(device, None), *sections], {})
    print(text)
    print("Wrote", *report.paths())


if __name__ == "__main__":
    app.run(main)
