"""Where the time goes: a device trace of a decode call and of a train step, summed by kernel.

    python -m experiments.profile_steps                                   # paper-1.3b on a GPU (~3 min)
    python -m experiments.profile_steps --model=tiny --train_T=64 --train_B=2 --decode_steps=4 \\
        --decode_context=64                                               # CPU smoke run

Each program is compiled and run once untraced, then run under ``jax.profiler.trace`` and summed by
kernel (``profiling.py``). The tables give each kind's share of the device's busy time and the longest
kernels, beside the wall time of the traced call.

Programs, for each of ``--archs`` (retnet, retnet-loop, transformer): the batch-``--decode_batch``
decoding loop of ``bench_inference`` (``--decode_steps`` greedy steps at context ``--decode_context``),
and the train step of ``bench_training`` (B ``--train_B``, T ``--train_T``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchprograms as bp
from experiments import benchreport as br
from experiments.profiling import markdown, profile

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
            result = bl.guarded(
                lambda arch=arch, name=name: profile(name, decode_run(arch, dtype), top=_TOP.value)
            )
            sections.append(markdown(result) if result["status"] == "ok" else f"## {name}\n\n{result}")
        if "train" in _TARGETS.value:
            name = f"train step: {arch} {model}, B{_TRAIN_B.value} T{_TRAIN_T.value} (times per step)"
            print(name, flush=True)
            result = bl.guarded(
                lambda arch=arch, name=name: profile(name, train_run(arch, model), calls=2, top=_TOP.value)
            )
            sections.append(markdown(result) if result["status"] == "ok" else f"## {name}\n\n{result}")
    text = report.write("Device profile by kernel", [br.ceilings_markdown(device, None), *sections], {})
    print(text)
    print("Wrote", *report.paths())


if __name__ == "__main__":
    app.run(main)
