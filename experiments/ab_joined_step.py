"""The decode kernel's step from the joined projection against the same loop without it, in one process.

Where ``dispatch.joined_kernel`` says so, a prepared decoding step hands each layer's joined q/k/v/g
product to the decode kernel, which splits, scales and rotates q and k itself; told no, XLA does that
between the product and the kernel (three kernels a layer). This script compiles the same greedy decoding loop
(``benchprograms.decode_program``: 64 steps a call, per-layer weights with q, k, v, g joined, as
``generate`` runs it) both ways, for each batch and projection implementation, times them beside each
other, and compares their results after one call from the same state (tokens agreeing, the state's
relative error: bf16 steps that round k and the rotated q and k differently).

    python -m experiments.ab_joined_step --batches=1,8,64 --projections=auto,pallas
    python -m experiments.ab_joined_step --ab=head_norm --batches=1 --projections=auto

prints a markdown table (ms per step, the joined step's ratio to the other). ``--ab=head_norm`` compares
instead the loop with retention's head norm and gate in the output projection's prologue
(``products.AUTO_HEAD_NORM_PROLOGUE`` on) against it without (off), the rest as "auto" chooses. On a CPU
it runs the tiny preset through the interpreted kernel (a smoke test of the script only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchprograms as bp
from retnet_jax.ops import dispatch, products

MODEL = flags.DEFINE_string("model", "paper-1.3b", "Model preset (tiny on a CPU).")
BATCHES = flags.DEFINE_string("batches", "1,8,64", "Batches.")
CONTEXT = flags.DEFINE_integer(
    "context", 8192, "The state's position (the step's work does not depend on it)."
)
STEPS = flags.DEFINE_integer("decode_steps", 64, "Greedy steps per timed call.")
PROJECTIONS = flags.DEFINE_list("projections", ["auto", "pallas"], "The projections' implementations.")
AB = flags.DEFINE_enum(
    "ab",
    "joined",
    ["joined", "head_norm"],
    "What is on in one loop and off in the other: the joined "
    "decode step, or the head norm and gate in the output projection's prologue.",
)


def _run(batch: int, projections: str, on: bool, gpu: bool):
    """(median ms per step, the tokens and state after one call) of the loop with ``--ab``'s part on or
    off."""
    # The layers ask dispatch.joined_kernel and products.head_norm_prologue when the step is traced: one
    # program per setting.
    joined = on or AB.value != "joined"
    choose = dispatch.joined_kernel if joined else (lambda *args, **kwargs: False)
    model_name = MODEL.value if gpu else "tiny"
    dtype = "bfloat16" if gpu else "float32"
    impl = "auto" if gpu else "pallas"  # "pallas" on a CPU: the interpreted kernels
    model, decoder, variables = bp.decode_model(f"retnet@{impl}/{projections}", model_name, dtype)
    state = bp.decode_state(model, batch, CONTEXT.value, extra_slots=STEPS.value)
    token = jnp.zeros((batch,), jnp.int32)
    steps = STEPS.value if gpu else 2
    original, dispatch.joined_kernel = dispatch.joined_kernel, choose
    switch = dispatch.AUTO_JOINED_KERNEL
    prologue = products.AUTO_HEAD_NORM_PROLOGUE
    if AB.value == "joined":
        dispatch.AUTO_JOINED_KERNEL = True  # "auto" measured either way
    else:
        products.AUTO_HEAD_NORM_PROLOGUE = on
    try:
        compiled, _, _ = bl.compile_timed(bp.decode_program(decoder, steps), variables, token, state)
    finally:
        dispatch.joined_kernel, dispatch.AUTO_JOINED_KERNEL = original, switch
        products.AUTO_HEAD_NORM_PROLOGUE = prologue
    result = jax.block_until_ready(compiled(variables, token, state))
    timing = bl.time_calls(lambda: compiled(variables, token, state), repeats=5 if gpu else 1)
    return float(np.median(timing.samples)) * 1e3 / steps, result


def main(argv):
    del argv
    gpu = jax.default_backend() == "gpu"
    model = MODEL.value if gpu else "tiny"
    print(f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}; model {model}\n")
    on, off = ("joined", "split") if AB.value == "joined" else ("prologue", "XLA head norm")
    print(f"| projections | B | {on} ms/step | {off} ms/step | ratio | tokens agree | state rel err |")
    print("|---|---|---|---|---|---|---|")
    for projections in PROJECTIONS.value:
        for batch in bl.int_list(BATCHES.value):
            ms_joined, (tokens_joined, state_joined) = _run(batch, projections, True, gpu)
            ms_split, (tokens_split, state_split) = _run(batch, projections, False, gpu)
            agree = float(np.mean(np.asarray(tokens_joined) == np.asarray(tokens_split)))
            error = bl.rel_error(state_joined.kv.astype(jnp.float32), state_split.kv.astype(jnp.float32))
            print(
                f"| {projections} | {batch} | {ms_joined:.3f} | {ms_split:.3f} | {ms_joined / ms_split:.3f} "
                f"| {agree:.2f} | {error:.1e} |"
            )


if __name__ == "__main__":
    app.run(main)
