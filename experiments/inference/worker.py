"""A worker of ``bench_inference``: one group's tasks (decoding, the largest fitting batch, prefill, the
bfloat16 state's error) measured in one process, rows appended to a JSON-lines file as they finish."""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib as bl
from experiments import benchprograms as bp
from experiments import benchreport as br
from experiments import hlostats
from experiments.inference import plan
from retnet_jax.models.lm import prefill as lm_prefill


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
            f.write(json.dumps(dict(type=line_type, **fields), default=br.json_default) + "\n")

    device = bl.device_info()
    emit("device", **device)
    if payload.get("ceilings") is None:
        emit("ceilings", **bl.measure_ceilings())
    dtype = (
        plan.DTYPE.value
        if plan.DTYPE.value != "auto"
        else ("float32" if device["platform"] == "cpu" else "bfloat16")
    )
    model, decoder, variables = bp.decode_model(group["arch"], plan.MODEL.value, dtype)
    ctx = Context(group["arch"], group["flags"], model, decoder, variables, bp.nbytes(variables), emit)
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
    ctx.emit("hlo", name=name, stats=stats, text=text if plan.HLO.value else None)
    return stats


def run_decode(ctx: Context, task) -> dict[str, Any]:
    batch, context, state_dtype = task["B"], task["T"], task["state_dtype"]
    spec = bp.decode_state_spec(
        ctx.model, batch, context, extra_slots=plan.STEPS.value, state_dtype=state_dtype
    )
    state_bytes = bp.nbytes(bp.state_arrays(spec))
    free = bl.free_bytes()
    if free is not None and state_bytes > free:  # known before compiling or allocating anything
        return dict(status="does not fit", state_bytes=state_bytes, free_bytes=free)
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    # A RetNet state's shape does not depend on the context: one program serves every context.
    key = (batch, str(jax.tree.map(lambda x: (x.shape, x.dtype), spec)))
    reused = key in ctx.programs
    if not reused:
        ctx.programs[key] = bl.compile_timed(
            bp.decode_program(ctx.decoder, plan.STEPS.value), ctx.variables, token, spec, donate_argnums=(2,)
        )
    compiled, compile_s, memory = ctx.programs[key]
    result = dict(state_bytes=state_bytes, memory=memory, compile_s=None if reused else compile_s)
    if not reused:  # the first program of each (arch, flags, state dtype): what one step runs
        label = f"decode {ctx.arch} [{ctx.flags}] B{batch}" + (f" {state_dtype} state" if state_dtype else "")
        stats = record_hlo(ctx, label, (ctx.arch, ctx.flags, state_dtype), compiled, "step")
        if stats is not None:
            result["hlo"] = stats
    if memory and state_dtype is None and context == plan.BATCH_CONTEXT.value:
        ctx.memory_points[batch] = memory["bytes"]
    needed = None if memory is None else memory["bytes"] - ctx.params_bytes
    if free is not None and needed is not None and needed > free:
        return dict(result, status="does not fit", free_bytes=free, needed_bytes=needed)
    state = bp.decode_state(ctx.model, batch, context, extra_slots=plan.STEPS.value, state_dtype=state_dtype)
    carry = dict(
        token=jnp.asarray(bl.random_tokens(batch, (batch,), ctx.model.config.vocab_size)), state=state
    )
    del state  # donated: only carry holds the live state

    def call():
        state = bp.at_position(carry["state"], context)
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
    mode = "chunkwise" if plan.is_retnet(ctx.arch) else None
    if task["variant"] == "forward":  # the training forward: logits of every position and the loss

        def program(variables, tokens, targets):
            logits = model.apply(variables, tokens, mode=mode)[0]
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

        args = (*args, jnp.asarray(bl.random_tokens(length + 1, (batch, length), vocab)))
    elif task["variant"] == "state":  # the prompt's state only: XLA drops the output head
        if plan.is_retnet(ctx.arch):

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
    if not plan.is_retnet(ctx.arch):
        return dict(status="n/a")
    from retnet_jax.inference.decoding import LMDecoder

    model = ctx.model.clone(unroll_decode=False)  # the same function; a smaller program to compile
    decoder = LMDecoder(model, "chunkwise")
    batch, prompt, steps = task["B"], task["T"], plan.CHECK_STEPS.value
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
