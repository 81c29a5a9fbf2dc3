"""Inference: decoding at the memory floor, for RetNet (recurrent state) and the Transformer (KV cache).

    python -m experiments.bench_inference                        # paper-1.3b on a GPU: every table, ~8 min
    python -m experiments.bench_inference --xla_flag_sets=cmdbuf,nostrength   # and the decode rows again
                                                                 # under other XLA_FLAGS, side by side
    python -m experiments.bench_inference --model=tiny --contexts=128,4096 --batches=1,4 \\
        --prefill_lengths=128 --in_process                       # CPU smoke run (a minute)

One command gives every table (``--panels``, run in the order given — by default length, batch, prefill,
fit, state — each arch's in a worker process of its own):

* ``length``: decoding at batch ``--length_batch`` against the context, 1K … 1M. How the context is set
  up: no prompt is prefilled. A RetNet step's work does not depend on the context, so its state is made
  directly at position N (random contents: the work of a step does not depend on them either) — one
  compiled program serves every N. The Transformer gets a KV cache of N + ``--decode_steps`` slots holding
  N random keys and values at position N, and runs only where that cache fits the device (else "does not
  fit", from the cache's size, before anything is allocated).
* ``batch``: decoding at context ``--batch_context`` against the batch, 1 … 256, the same way; each
  arch's largest batch that ran and its best throughput are summed up below the table.
* ``fit``: the largest batch that fits the device at that context, from the compiled programs' memory
  (bytes per row = the slope between the two largest batches measured), then measured.
* ``prefill``: prompt throughput of the chunkwise form (the kernels training uses: ``implementation=
  "auto"``) at batch ``--prefill_batch`` and each of ``--prefill_lengths``, against the training forward
  (the same model's logits and mean cross-entropy, forward only) at equal T: "state" = the prompt's state
  only (``model.apply(return_state=True)``), "decoder" = the path ``generate`` takes (``LMDecoder.prefill``:
  T − 1 tokens chunkwise continuing a state, then one step for the first logits), "forward" = training's.
* ``state``: the RetNet state stored in bfloat16 (``state_dtype``): decoding at ``--state_batches``, and
  its error against the float32 state: a ``--state_check_prompt``-token prompt prefilled once, then
  ``--state_check_steps`` steps teacher-forced on the float32 run's greedy tokens, both states side by
  side (normwise relative error of each step's logits, and how often the greedy token agrees).

Decoding is timed as one jitted ``lax.fori_loop`` of ``--decode_steps`` greedy steps through the model's
``decoding.LMDecoder`` (embedding, all layers, output head, argmax), its state donated and chained from
call to call; each call sets the position back to the context. Time per token = call time / steps (median
over ``--repeats`` calls after a warm-up call; compilation timed apart). Floors: a step reads every
parameter at least once, so "floor params" = parameter bytes / the copy bandwidth measured in the same
run; "floor" adds the state traffic (a RetNet state read and written once, a KV cache read once).

``--xla_flag_sets``: sets of XLA flags: names of ``FLAG_SETS`` ("cmdbuf,nostrength"; "a+b" joins two),
or ``name=--flag=value --flag2=...`` entries, ";"-separated. Each set reruns the decoding rows of
``--flag_set_archs`` at ``--flag_set_batches`` (context ``--batch_context``) in a worker started with
those flags appended to XLA_FLAGS; the table puts them beside the default's. Every worker also reports
what its first compiled decoding program runs per step (``hlostats``: kernels, matrix products, dots
rewritten as reductions, copies), and the HLO texts are written to a zip beside the report.

Time: the run stops starting configurations after ``--time_budget_s``; each worker gets a share of what
is left (``_SHARES``), stops starting configurations at its deadline and is killed 30 s after it. Rows
reach the parent as they finish, so a killed worker loses only the configuration it was running.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import sys
import tempfile
import time
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchlib as bl
from experiments import hlostats
from retnet_jax.models.lm import prefill as lm_prefill

PANELS = ("length", "batch", "prefill", "fit", "state")
# Named XLA flag sets for --xla_flag_sets (flags appended to XLA_FLAGS in the set's worker).
FLAG_SETS = {
    # The decoding loop (a while loop) captured whole into CUDA graphs: XLA's default command buffer
    # types plus WHILE and CONDITIONAL.
    "cmdbuf": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
    # One-row (matrix-vector) products kept as matrix products (cuBLAS/Triton) instead of being rewritten
    # into multiply + reduce fusions (XLA's GPU pass "dot-strength-reduction").
    "nostrength": "--xla_disable_hlo_passes=dot-strength-reduction",
}
_SHARES = {"retnet": 6.0, "retnet-loop": 3.0, "transformer": 3.5, "flags": 1.5}  # of the time budget
_GRACE_S = 30.0  # a worker is killed this long after its deadline

_ARCHS = flags.DEFINE_list(
    "archs",
    ["retnet", "transformer"],
    "retnet, retnet-loop (the decode step's layer loop not unrolled: unroll_decode=False), transformer.",
)
_MODEL = flags.DEFINE_string("model", "paper-1.3b", "Model preset (RetNetConfig.preset); tiny on a CPU.")
_PANELS = flags.DEFINE_list("panels", list(PANELS), f"Parts, run in this order: {', '.join(PANELS)}.")
_CONTEXTS = flags.DEFINE_string("contexts", "1024,8192,65536,262144,1048576", "Contexts of the length part.")
_LENGTH_BATCH = flags.DEFINE_integer("length_batch", 1, "Batch of the length part.")
_BATCHES = flags.DEFINE_string("batches", "1,8,64,256", "Batches of the batch part (run in this order).")
_BATCH_CONTEXT = flags.DEFINE_integer("batch_context", 8192, "Context of the batch, fit and flag parts.")
_STEPS = flags.DEFINE_integer("decode_steps", 64, "Decode steps per timed call.")
_PREFILL_LENGTHS = flags.DEFINE_string("prefill_lengths", "8192", "Prompt lengths T of prefill.")
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 1, "Batch of prefill and of the training forward.")
_STATE_BATCHES = flags.DEFINE_string("state_batches", "64,256", "Batches decoded with a bfloat16 state.")
_CHECK_STEPS = flags.DEFINE_integer("state_check_steps", 256, "Steps of the bf16 state's error check.")
_CHECK_PROMPT = flags.DEFINE_integer("state_check_prompt", 1024, "Prompt tokens of the error check.")
_CHECK_BATCH = flags.DEFINE_integer("state_check_batch", 4, "Rows of the error check.")
_FLAG_SETS = flags.DEFINE_string(
    "xla_flag_sets", "", f"';'-separated XLA flag sets: names of {sorted(FLAG_SETS)}, a+b, or name=FLAGS."
)
_FLAG_ARCHS = flags.DEFINE_list("flag_set_archs", ["retnet"], "Archs rerun under each XLA flag set.")
_FLAG_BATCHES = flags.DEFINE_string("flag_set_batches", "1,64", "Batches rerun under each flag set.")
_DTYPE = flags.DEFINE_string(
    "dtype", "auto", "Compute and parameter dtype (auto: bfloat16 on GPU, else f32)."
)
_IN_PROCESS = flags.DEFINE_bool(
    "in_process", False, "Run the default-flag parts in this process (CPU smoke runs; flag sets still spawn)."
)
_HLO = flags.DEFINE_bool("hlo", True, "Write the compiled decoding programs' HLO to a zip beside the report.")

flags.FLAGS.set_default("repeats", 5)
flags.FLAGS.set_default("time_budget_s", 480.0)


def is_retnet(arch: str) -> bool:
    return arch.startswith("retnet")


# ------------------------------------------------------------------------------------------------------
# The plan: groups of tasks, one worker each.


def parse_flag_sets(text: str) -> dict[str, str]:
    """{name: XLA flags} from --xla_flag_sets (see the module doc)."""
    sets: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        if "=" in entry.split("--", 1)[0]:  # name=--flag=...
            name, value = entry.split("=", 1)
            sets[name.strip()] = value.strip()
            continue
        for name in (n.strip() for n in entry.split(",") if n.strip()):
            parts = name.split("+")
            unknown = [p for p in parts if p not in FLAG_SETS]
            if unknown:
                raise ValueError(
                    f"--xla_flag_sets: unknown set(s) {unknown}; known: {sorted(FLAG_SETS)}, or give "
                    f"name=--xla_flag=value."
                )
            sets[name] = " ".join(FLAG_SETS[p] for p in parts)
    return sets


def decode_task(arch, context, batch, panel, state_dtype=None, flags_name="default"):
    return dict(
        kind="decode",
        arch=arch,
        T=context,
        B=batch,
        state_dtype=state_dtype,
        panels=[panel],
        flags=flags_name,
    )


def plan_groups() -> list[dict[str, Any]]:
    """One group per arch (its parts in --panels order), then one per (XLA flag set, arch)."""
    unknown = sorted(set(_PANELS.value) - set(PANELS))
    if unknown:
        raise ValueError(f"--panels: unknown {unknown}; choose from {PANELS}.")
    groups = []
    for arch in _ARCHS.value:
        tasks: list[dict[str, Any]] = []

        def add(task, tasks=tasks):
            for other in tasks:  # one run serves both panels
                if other["kind"] == "decode" and all(
                    other[k] == task[k] for k in ("T", "B", "state_dtype", "flags")
                ):
                    other["panels"] += task["panels"]
                    return
            tasks.append(task)

        for panel in _PANELS.value:
            if panel == "length":
                for context in bl.int_list(_CONTEXTS.value):
                    add(decode_task(arch, context, _LENGTH_BATCH.value, "length"))
            elif panel == "batch":
                for batch in bl.int_list(_BATCHES.value):
                    add(decode_task(arch, _BATCH_CONTEXT.value, batch, "batch"))
            elif panel == "prefill":
                for length in bl.int_list(_PREFILL_LENGTHS.value):
                    for variant in ("forward", "state", "decoder"):
                        tasks.append(
                            dict(kind="prefill", variant=variant, arch=arch, T=length, B=_PREFILL_BATCH.value)
                        )
            elif panel == "state" and is_retnet(arch):
                for batch in bl.int_list(_STATE_BATCHES.value):
                    add(decode_task(arch, _BATCH_CONTEXT.value, batch, "state", "bfloat16"))
                tasks.append(dict(kind="state_check", arch=arch, B=_CHECK_BATCH.value, T=_CHECK_PROMPT.value))
            elif panel == "fit":
                tasks.append(dict(kind="fit", arch=arch, T=_BATCH_CONTEXT.value, state_dtype=None))
        groups.append(
            dict(name=arch, arch=arch, flags="default", xla_flags="", tasks=tasks, share=_SHARES[arch])
        )
    for name, xla_flags in parse_flag_sets(_FLAG_SETS.value).items():
        for arch in _FLAG_ARCHS.value:
            tasks = [
                decode_task(arch, _BATCH_CONTEXT.value, b, "flags", flags_name=name)
                for b in bl.int_list(_FLAG_BATCHES.value)
            ]
            groups.append(
                dict(
                    name=f"{arch} [{name}]",
                    arch=arch,
                    flags=name,
                    xla_flags=xla_flags,
                    tasks=tasks,
                    share=_SHARES["flags"],
                )
            )
    return groups


# ------------------------------------------------------------------------------------------------------
# A worker: one group's tasks, rows appended to a JSON-lines file as they finish.


@dataclasses.dataclass
class Context:
    """What a group's tasks share: the model, its parameters, compiled programs, measured memory."""

    arch: str
    flags: str
    model: Any
    decoder: Any
    variables: Any
    params_bytes: int
    emit: Any
    programs: dict = dataclasses.field(default_factory=dict)
    memory_points: dict = dataclasses.field(default_factory=dict)  # batch → program bytes (fit)
    hlo_done: set = dataclasses.field(default_factory=set)


def run_group(payload: dict[str, Any]) -> dict[str, Any]:
    group, deadline = payload["group"], payload["deadline"]

    def emit(line_type: str, /, **fields):
        with open(payload["rows_path"], "a") as f:
            f.write(json.dumps(dict(type=line_type, **fields), default=bl._json_default) + "\n")

    device = bl.device_info()
    emit("device", **device)
    if payload.get("ceilings") is None:
        emit("ceilings", **bl.measure_ceilings())
    dtype = (
        _DTYPE.value if _DTYPE.value != "auto" else ("float32" if device["platform"] == "cpu" else "bfloat16")
    )
    model, decoder, variables = bl.decode_model(group["arch"], _MODEL.value, dtype)
    ctx = Context(group["arch"], group["flags"], model, decoder, variables, bl.nbytes(variables), emit)
    emit("setup", dtype=dtype, params_bytes=ctx.params_bytes, group=group["name"])
    runners = dict(decode=run_decode, prefill=run_prefill, state_check=run_state_check, fit=run_fit)
    for task in group["tasks"]:
        row = dict(task, flags=group["flags"], params_bytes=ctx.params_bytes)
        if time.time() > deadline:
            row["status"] = "skipped"
        else:
            print(f"[{group['name']}] {describe(task)} ...", flush=True)
            row.update(bl.guarded(functools.partial(runners[task["kind"]], ctx, task)))
            gc.collect()
        emit("row", **row)
    return {"status": "ok"}


def describe(task) -> str:
    extra = task.get("variant") or task.get("state_dtype") or ""
    return f"{task['kind']} {task['arch']} T{task.get('T')} B{task.get('B', '?')} {extra}".strip()


def record_hlo(ctx: Context, name: str, key, compiled, scope: str) -> dict[str, Any] | None:
    """The program's ``hlostats`` summary (also sent with its text to the parent), once per key."""
    if key in ctx.hlo_done:
        return None
    ctx.hlo_done.add(key)
    text = compiled.as_text()
    stats = hlostats.summarize(text, scope)
    ctx.emit("hlo", name=name, stats=stats, text=text if _HLO.value else None)
    return stats


def run_decode(ctx: Context, task) -> dict[str, Any]:
    batch, context, state_dtype = task["B"], task["T"], task["state_dtype"]
    spec = bl.decode_state_spec(ctx.model, batch, context, extra_slots=_STEPS.value, state_dtype=state_dtype)
    state_bytes = bl.nbytes(bl.state_arrays(spec))
    free = bl.free_bytes()
    if free is not None and state_bytes > free:  # known before compiling or allocating anything
        return dict(status="does not fit", state_bytes=state_bytes, free_bytes=free)
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    # A RetNet state's shape does not depend on the context: one program serves every context.
    key = (batch, str(jax.tree.map(lambda x: (x.shape, x.dtype), spec)))
    reused = key in ctx.programs
    if not reused:
        ctx.programs[key] = bl.compile_timed(
            bl.decode_program(ctx.decoder, _STEPS.value), ctx.variables, token, spec, donate_argnums=(2,)
        )
    compiled, compile_s, memory = ctx.programs[key]
    result = dict(state_bytes=state_bytes, memory=memory, compile_s=None if reused else compile_s)
    if not reused:  # the first program of each (arch, flags, state dtype): what one step runs
        label = f"decode {ctx.arch} [{ctx.flags}] B{batch}" + (f" {state_dtype} state" if state_dtype else "")
        stats = record_hlo(ctx, label, (ctx.arch, ctx.flags, state_dtype), compiled, "step")
        if stats is not None:
            result["hlo"] = stats
    if memory and state_dtype is None and context == _BATCH_CONTEXT.value:
        ctx.memory_points[batch] = memory["bytes"]
    needed = None if memory is None else memory["bytes"] - ctx.params_bytes
    if free is not None and needed is not None and needed > free:
        return dict(result, status="does not fit", free_bytes=free, needed_bytes=needed)
    state = bl.decode_state(ctx.model, batch, context, extra_slots=_STEPS.value, state_dtype=state_dtype)
    carry = dict(
        token=jnp.asarray(bl.random_tokens(batch, (batch,), ctx.model.config.vocab_size)), state=state
    )
    del state  # donated: only carry holds the live state

    def call():
        state = bl.at_position(carry["state"], context)
        carry["token"], carry["state"] = compiled(ctx.variables, carry["token"], state)
        return carry["token"]

    timing = bl.time_calls(call, warmup=1, calls_per_sample=1)
    carry.clear()
    return dict(result, timing=timing.to_dict())


def run_fit(ctx: Context, task) -> dict[str, Any]:
    """The largest batch whose decoding program and state fit what the device has free, then measured."""
    free = bl.free_bytes()
    if free is None:
        return dict(status="n/a", note="the backend reports no memory limit (CPU)")
    points = sorted(ctx.memory_points.items())
    if not points:
        return dict(status="n/a", note="no decoding program measured at this context (run the batch part)")
    if len(points) >= 2:
        (b1, m1), (b2, m2) = points[-2:]
        per_row = (m2 - m1) / (b2 - b1)
    else:
        (b2, m2) = points[-1]
        per_row = (m2 - ctx.params_bytes) / b2
    fixed = max(0.0, m2 - ctx.params_bytes - per_row * b2)  # temporaries that do not grow with B
    batch = int((0.95 * free - fixed) // per_row)
    batch = batch - batch % 8 if batch >= 16 else batch
    if batch < 1:
        return dict(status="does not fit", note=f"{per_row / 1e9:.3g} GB per row, {free / 1e9:.3g} GB free")
    estimate = dict(B=batch, bytes_per_row=per_row, fixed_bytes=fixed, free_bytes=free)
    for attempt in range(3):  # the estimate is from a line through two points: shrink if it misses
        try:
            result = run_decode(ctx, dict(task, B=batch))
        except Exception as error:  # noqa: BLE001 — an out-of-memory error shrinks the batch; others raise
            if not bl.is_oom(error) or attempt == 2:
                raise
            result = dict(status="OOM")
        if result.get("status", "ok") == "ok":
            break
        gc.collect()
        batch = int(batch * 0.9) // 8 * 8 or batch - 1
        if batch < 1:
            break
    return dict(result, B=batch, fit=estimate)


def run_prefill(ctx: Context, task) -> dict[str, Any]:
    model, variables, batch, length = ctx.model, ctx.variables, task["B"], task["T"]
    vocab = model.config.vocab_size
    tokens = jnp.asarray(bl.random_tokens(length, (batch, length), vocab))
    args = (variables, tokens)
    mode = "chunkwise" if is_retnet(ctx.arch) else None
    if task["variant"] == "forward":  # the training forward: logits of every position and the loss

        def program(variables, tokens, targets):
            logits = model.apply(variables, tokens, mode=mode)[0]
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

        args = (*args, jnp.asarray(bl.random_tokens(length + 1, (batch, length), vocab)))
    elif task["variant"] == "state":  # the prompt's state only: XLA drops the output head
        if is_retnet(ctx.arch):

            def program(variables, tokens):
                return model.apply(variables, tokens, mode=mode, return_state=True)[1]
        else:

            def program(variables, tokens):
                return lm_prefill(model, variables, tokens, max_length=length)[1]
    else:  # the generate path: T − 1 tokens continuing an empty state, then one step

        def program(variables, tokens):
            state = ctx.decoder.init_state(jnp.zeros((batch,), jnp.int32), length)
            return ctx.decoder.prefill(variables, tokens, state)

    compiled, compile_s, memory = bl.compile_timed(program, *args)
    timing = bl.time_calls(lambda: compiled(*args), warmup=1, calls_per_sample=1)
    stats = hlostats.summarize(compiled.as_text(), "program")
    copies = {k: stats[k] for k in ("copies", "concatenates", "dynamic_update_slices")}
    return dict(compile_s=compile_s, memory=memory, timing=timing.to_dict(), hlo=copies)


def run_state_check(ctx: Context, task) -> dict[str, Any]:
    """The bf16 state's error: one prefill, then both states stepped side by side on the same tokens."""
    if not is_retnet(ctx.arch):
        return dict(status="n/a")
    from retnet_jax.inference.decoding import LMDecoder

    model = ctx.model.clone(unroll_decode=False)  # the same function; a smaller program to compile
    decoder = LMDecoder(model, "chunkwise")
    batch, prompt, steps = task["B"], task["T"], _CHECK_STEPS.value
    tokens = jnp.asarray(bl.random_tokens(7, (batch, prompt), model.config.vocab_size))

    def program(variables, tokens):
        state = decoder.init_state(jnp.zeros((batch,), jnp.int32), prompt)
        logits, full = decoder.prefill(variables, tokens, state)
        half = full._replace(kv=full.kv.astype(jnp.bfloat16))

        def body(carry, _):
            token, full, half = carry
            a, full = decoder.step(variables, token, full)
            b, half = decoder.step(variables, token, half)
            error = jnp.linalg.norm(b - a, axis=-1) / jnp.linalg.norm(a, axis=-1)
            agree = jnp.argmax(a, -1) == jnp.argmax(b, -1)
            return (jnp.argmax(a, -1).astype(jnp.int32), full, half), (error, agree)

        first = jnp.argmax(logits, -1).astype(jnp.int32)
        (_, full, half), (errors, agree) = jax.lax.scan(body, (first, full, half), None, length=steps)
        kv_error = jnp.linalg.norm((half.kv.astype(jnp.float32) - full.kv).ravel()) / jnp.linalg.norm(
            full.kv.ravel()
        )
        return errors, agree, kv_error

    compiled, compile_s, _ = bl.compile_timed(program, ctx.variables, tokens)
    errors, agree, kv_error = (np.asarray(x) for x in compiled(ctx.variables, tokens))
    worst = errors.max(axis=1)  # [steps]: the worst row at each step
    disagree = np.nonzero(~agree.all(axis=1))[0]
    return dict(
        compile_s=compile_s,
        steps=steps,
        error_first=float(worst[0]),
        error_max=float(worst.max()),
        error_last=float(worst[-1]),
        error_by_step=[float(x) for x in worst],
        agree=float(agree.mean()),
        first_disagreement=int(disagree[0]) + 1 if disagree.size else None,
        state_error=float(kv_error),
    )


# ------------------------------------------------------------------------------------------------------
# The parent: groups in order, each in a worker with its share of the budget.


def run_groups(groups, budget, on_group_done) -> dict[str, Any]:
    results: dict[str, Any] = dict(rows=[], hlo=[], device=None, ceilings=None, setups={})
    shares_left = sum(g["share"] for g in groups)
    for group in groups:
        left = budget.left()
        deadline_s = max(0.0, left * group["share"] / shares_left)
        shares_left -= group["share"]
        in_process = _IN_PROCESS.value and not group["xla_flags"]
        with tempfile.TemporaryDirectory() as tmp:
            rows_path = os.path.join(tmp, "rows.jsonl")
            payload = dict(
                kind="group",
                group=group,
                deadline=time.time() + deadline_s,
                rows_path=rows_path,
                ceilings=results["ceilings"],
            )
            worker: dict[str, Any] = {"status": "ok"}
            if left <= 0:
                worker = {"status": "skipped"}
            elif in_process:
                run_group(payload)
            else:
                env = dict(os.environ)
                env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), group["xla_flags"]]).strip()
                print(f"worker [{group['name']}]: {deadline_s:.0f} s", flush=True)
                module = __spec__.name if __spec__ else "experiments.bench_inference"
                worker = bl.run_worker(
                    module, payload, deadline_s + _GRACE_S, extra_flags=sys.argv[1:], env=env
                )
            lines = []
            if os.path.exists(rows_path):
                with open(rows_path) as f:
                    lines = [json.loads(line) for line in f if line.strip()]
        done = []
        for line in lines:
            kind = line.pop("type")
            if kind == "row":
                done.append(line)
            elif kind == "device":
                results["device"] = results["device"] or line
            elif kind == "ceilings":
                results["ceilings"] = results["ceilings"] or line
            elif kind == "hlo":
                results["hlo"].append(line)
            elif kind == "setup":
                results["setups"][group["name"]] = line
        for task in group["tasks"][len(done) :]:  # what the worker never reported
            status = worker.get("status", "error") if worker.get("status") != "ok" else "skipped"
            done.append(
                dict(
                    task,
                    flags=group["flags"],
                    status=status,
                    error=worker.get("error"),
                    log=worker.get("log"),
                )
            )
        results["rows"] += done
        on_group_done(results)
    return results


def derive(rows, ceilings):
    """Per-row rates and floors, and the ratios between rows (vs the Transformer, vs training, vs flags)."""
    bandwidth = (ceilings or {}).get("bandwidth")
    for row in rows:
        if row.get("status") != "ok" or row["kind"] not in ("decode", "fit", "prefill"):
            continue
        steps = _STEPS.value if row["kind"] != "prefill" else 1
        seconds = row["timing"]["median_s"] / steps
        row["seconds"] = seconds
        row["tokens_per_s"] = row["B"] * (1 if row["kind"] != "prefill" else row["T"]) / seconds
        if row["kind"] != "prefill" and bandwidth:
            traffic = row["state_bytes"] * (2 if is_retnet(row["arch"]) else 1)
            row["floor_params_s"] = row["params_bytes"] / bandwidth
            row["floor_s"] = (row["params_bytes"] + traffic) / bandwidth
            row["vs_floor_params"] = seconds / row["floor_params_s"]
            row["vs_floor"] = seconds / row["floor_s"]
    ok = [r for r in rows if r.get("status") == "ok" and "tokens_per_s" in r]

    def find(**match):
        return next((r for r in ok if all(r.get(k) == v for k, v in match.items())), None)

    for row in ok:
        if row["kind"] == "decode" and is_retnet(row["arch"]):
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


# ------------------------------------------------------------------------------------------------------
# The report.


def _state_label(r) -> str:
    if r.get("state_dtype"):
        return {"bfloat16": "bf16", "float32": "f32"}.get(r["state_dtype"], r["state_dtype"])
    return "f32" if is_retnet(r["arch"]) else "cache"


def _ms(r, key):
    return bl.fmt(r.get(key), 1e3, ".3f")


DECODE_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("state", lambda r: _state_label(r)),
    ("context", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("ms/step", bl.when_ok(lambda r: _ms(r, "seconds"))),
    ("iqr%", bl.when_ok(lambda r: bl.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("tokens/s", bl.when_ok(lambda r: bl.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("floor ms", bl.when_ok(lambda r: _ms(r, "floor_s"))),
    ("× floor", bl.when_ok(lambda r: bl.fmt(r.get("vs_floor"), 1, ".2f"))),
    ("× floor params", bl.when_ok(lambda r: bl.fmt(r.get("vs_floor_params"), 1, ".2f"))),
    ("RetNet/Transformer", bl.when_ok(lambda r: bl.fmt(r.get("vs_transformer"), 1, ".2f"))),
    ("state GB", lambda r: bl.fmt(r.get("state_bytes"), 1e-9, ".3g")),
    ("decode mem GB", bl.when_ok(lambda r: bl.fmt((r.get("memory") or {}).get("bytes"), 1e-9, ".3g"))),
    ("compile s", bl.when_ok(lambda r: bl.fmt(r.get("compile_s"), 1, ".1f"))),
]
STATE_COLUMNS = DECODE_COLUMNS[:6] + [
    ("tokens/s", bl.when_ok(lambda r: bl.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("× floor", bl.when_ok(lambda r: bl.fmt(r.get("vs_floor"), 1, ".2f"))),
    ("time vs f32 state", bl.when_ok(lambda r: bl.fmt(r.get("vs_float32_state"), 1, ".2f"))),
    ("state GB", lambda r: bl.fmt(r.get("state_bytes"), 1e-9, ".3g")),
]
FLAG_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("XLA flags", lambda r: r["flags"]),
    ("B", lambda r: str(r["B"])),
    ("ms/step", bl.when_ok(lambda r: _ms(r, "seconds"))),
    ("iqr%", bl.when_ok(lambda r: bl.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("× floor", bl.when_ok(lambda r: bl.fmt(r.get("vs_floor"), 1, ".2f"))),
    ("time vs default", bl.when_ok(lambda r: bl.fmt(r.get("vs_default"), 1, ".3f"))),
    ("compile s", bl.when_ok(lambda r: bl.fmt(r.get("compile_s"), 1, ".1f"))),
]
PREFILL_COLUMNS = [
    ("arch", lambda r: r["arch"]),
    ("T", lambda r: str(r["T"])),
    ("B", lambda r: str(r["B"])),
    ("program", lambda r: r["variant"]),
    ("ms", bl.when_ok(lambda r: bl.fmt(r["seconds"], 1e3, ".2f"))),
    ("iqr%", bl.when_ok(lambda r: bl.fmt(r["timing"]["iqr_pct"], 1, ".1f"))),
    ("tokens/s", bl.when_ok(lambda r: bl.fmt(r["tokens_per_s"], 1, ",.0f"))),
    ("× training forward", bl.when_ok(lambda r: bl.fmt(r.get("vs_forward"), 1, ".2f"))),
    ("copies (all)", bl.when_ok(lambda r: _copies(r))),
    ("mem GB", bl.when_ok(lambda r: bl.fmt((r["memory"] or {}).get("bytes"), 1e-9, ".3g"))),
    ("compile s", bl.when_ok(lambda r: bl.fmt(r["compile_s"], 1, ".1f"))),
]


def _copies(row) -> str:
    copies = (row.get("hlo") or {}).get("copies") or {}
    return f"{copies.get('count', 0)} ({copies.get('bytes', 0) / 1e9:.3g} GB)"


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
            targets = is_retnet(arch)
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
            and r["T"] == _BATCH_CONTEXT.value
            and r["state_dtype"] is None
        ]
        if decode:
            best = max(decode, key=lambda r: r["tokens_per_s"])
            largest = max(decode, key=lambda r: r["B"])
            lines.append(
                f"- {arch}, context {_BATCH_CONTEXT.value}: best {best['tokens_per_s']:,.0f} tokens/s at "
                f"B={best['B']}; largest batch run B={largest['B']} ({largest['vs_floor']:.2f}× its floor)."
            )
    retnet = {
        r["B"]: r
        for r in ok
        if r["arch"] == "retnet"
        and r["kind"] in ("decode", "fit")
        and r["T"] == _BATCH_CONTEXT.value
        and r["state_dtype"] is None
    }
    trans = {
        r["B"]: r
        for r in ok
        if r["arch"] == "transformer" and r["kind"] in ("decode", "fit") and r["T"] == _BATCH_CONTEXT.value
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


def write(report, results, dtype):
    rows, ceilings = results["rows"], results["ceilings"]

    def table(
        columns, select, key=lambda r: (r["arch"], r.get("state_dtype") or "", r["T"], r.get("B") or 0)
    ):
        sel = [r for r in rows if select(r)]
        return bl.markdown_table(sorted(sel, key=key), columns) if sel else "(not run)"

    default = lambda r: r.get("flags") == "default"  # noqa: E731
    setup = (
        f"Model {_MODEL.value} in {dtype} (parameters too); greedy decoding, {_STEPS.value} steps per call. "
        "Contexts are set up without prefilling: a RetNet state is made at position N (random contents; "
        "its step does not depend on N, one compiled program serves every N), a Transformer KV cache of "
        f"N + {_STEPS.value} slots holds N random keys and values. Floor = parameter bytes / measured copy "
        "bandwidth, plus the state read and written once (RetNet) or the cache read once (Transformer); "
        "× floor params leaves the state out."
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
        bl.markdown_table(hlo_rows, [(c, lambda r, i=i: r[i]) for i, c in enumerate(hlostats.COLUMNS)])
        if hlo_rows
        else "(none)"
    )
    fit_rows = [r for r in rows if r["kind"] == "fit"]
    sections = [
        bl.ceilings_markdown(results["device"] or {}, ceilings),
        setup,
        "## Against the targets\n\n" + ("\n".join(summary_lines(rows)) or "(nothing measured)"),
        f"## Decoding vs context, batch {_LENGTH_BATCH.value}\n\n"
        + table(DECODE_COLUMNS, lambda r: default(r) and "length" in r.get("panels", [])),
        f"## Decoding vs batch, context {_BATCH_CONTEXT.value}\n\n"
        + table(
            DECODE_COLUMNS,
            lambda r: (
                default(r)
                and ("batch" in r.get("panels", []) or (r["kind"] == "fit" and r.get("status") == "ok"))
            ),
        ),
        "## Largest batch that fits\n\n"
        + ("\n".join(_fit_line(r) for r in fit_rows) if fit_rows else "(not run)"),
        f"## Prefill vs the training forward, batch {_PREFILL_BATCH.value}\n\n"
        + table(
            PREFILL_COLUMNS,
            lambda r: r["kind"] == "prefill",
            key=lambda r: (r["arch"], r["T"], ("forward", "state", "decoder").index(r["variant"])),
        ),
        f"## A bfloat16 recurrent state, context {_BATCH_CONTEXT.value}\n\n"
        + table(STATE_COLUMNS, lambda r: _in_state_table(r, rows))
        + "\n\nError against the float32 state:\n\n"
        + check_text,
        f"## XLA flag sets, context {_BATCH_CONTEXT.value}\n\n"
        + "".join(f"- {name}: `{value}`\n" for name, value in parse_flag_sets(_FLAG_SETS.value).items())
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
        model=_MODEL.value,
        dtype=dtype,
        rows=rows,
        hlo=[dict(name=h["name"], stats=h["stats"]) for h in results["hlo"]],
    )
    text = report.write("Inference benchmark", sections, raw)
    if _HLO.value and any(h.get("text") for h in results["hlo"]):
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
        ("batch", "B", lambda r: r["tokens_per_s"], "tokens/s", "(c) throughput"),
    ]
    for ax, (panel, x, y, label, title) in zip(axes[0], panels, strict=True):
        xs = []
        for arch in _ARCHS.value:
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
        fixed = f"B={_LENGTH_BATCH.value}" if panel == "length" else f"context {_BATCH_CONTEXT.value}"
        ax.set(
            xlabel="context" if x == "T" else "batch", ylabel=label, title=f"{title}, {_MODEL.value}, {fixed}"
        )
        if xs:
            bl.log2_xaxis(ax, xs)
            if x == "B":
                ax.set_yscale("log")
        ax.legend(fontsize=7)
    bl.save_figure(fig, path)


def main(argv):
    del argv
    if bl.maybe_run_worker({"group": run_group}):
        return
    budget = bl.Budget()
    groups = plan_groups()
    state: dict[str, Any] = {}

    def on_group_done(results):
        if results["device"] is None:
            return
        if "report" not in state:
            state["report"] = bl.Report("bench_inference", results["device"]["short"])
        setup = next(iter(results["setups"].values()), {})
        state["dtype"] = setup.get("dtype", "?")
        for row in results["rows"]:
            row.setdefault("params_bytes", setup.get("params_bytes"))
        derive(results["rows"], results["ceilings"])
        write(state["report"], results, state["dtype"])

    results = run_groups(groups, budget, on_group_done)
    if "report" not in state:
        print("No worker reported a device; see the errors above.", results["rows"][:1])
        sys.exit(1)
    text = write(state["report"], results, state["dtype"])
    if bl.PLOTS.value:
        bl.guarded(lambda: plot(results["rows"], state["report"].png))
    print(text)
    print("Wrote", *state["report"].paths(), *([state["report"].stem + "_hlo.zip"] if _HLO.value else []))


if __name__ == "__main__":
    app.run(main)
