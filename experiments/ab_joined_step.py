"""The decode kernel's step from the joined projection against the same loop without it, in one process.

Where ``dispatch.joined_kernel`` says so, a prepared decoding step hands each layer's joined q/k/v/g
product to the decode kernel, which splits, scales and rotates q and k itself; told no, XLA does that
between the product and the kernel (three kernels a layer). This script compiles the same greedy decoding loop
(``benchprograms.decode_program``: 64 steps a call, per-layer weights with q, k, v, g joined, as
``generate`` runs it) both ways, for each batch and projection implementation, times them beside each
other, and checks both against XLA's step (``retnet@xla/xla``, the same weights): one step from the same
token and state, the logits' relative error and that of the state's change (new − old: the random state
the loop starts from would hide it). Greedy tokens after a whole call are no check with random weights:
near-equal logits flip on a rounding, and the paths part from there.

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


def _one_step(decoder):
    """f(variables, token, state) → (logits, state) of one prepared step."""
    from retnet_jax.inference.decoding import prepare

    def step(variables, token, state):
        return decoder.step(prepare(decoder, variables, token.shape[0]), token, state)

    return step


def _run(batch: int, projections: str, on: bool | None, gpu: bool):
    """(median ms per step, (logits, state) after one step) of the loop with ``--ab``'s part on or off;
    ``on=None``: XLA's step (the reference), not timed."""
    # The layers ask dispatch.joined_kernel and products.head_norm_prologue when the step is traced: one
    # program per setting.
    joined = on or AB.value != "joined"
    choose = dispatch.joined_kernel if joined else (lambda *args, **kwargs: False)
    model_name = MODEL.value if gpu else "tiny"
    dtype = "bfloat16" if gpu else "float32"
    impl = "auto" if gpu else "pallas"  # "pallas" on a CPU: the interpreted kernels
    arch = "retnet@xla/xla" if on is None else f"retnet@{impl}/{projections}"
    model, decoder, variables = bp.decode_model(arch, model_name, dtype)
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
        one = jax.jit(_one_step(decoder)).lower(variables, token, state).compile()
        if on is not None:
            compiled, _, _ = bl.compile_timed(bp.decode_program(decoder, steps), variables, token, state)
    finally:
        dispatch.joined_kernel, dispatch.AUTO_JOINED_KERNEL = original, switch
        products.AUTO_HEAD_NORM_PROLOGUE = prologue
    logits, new_state = jax.block_until_ready(one(variables, token, state))
    result = (logits.astype(jnp.float32), new_state.kv.astype(jnp.float32) - state.kv.astype(jnp.float32))
    if on is None:
        return float("nan"), result
    timing = bl.time_calls(lambda: compiled(variables, token, state), repeats=5 if gpu else 1)
    return float(np.median(timing.samples)) * 1e3 / steps, result


def main(argv):
    del argv
    gpu = jax.default_backend() == "gpu"
    model = MODEL.value if gpu else "tiny"
    print(f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}; model {model}\n")
    on, off = ("joined", "split") if AB.value == "joined" else ("prologue", "XLA head norm")
    print(
        f"| projections | B | {on} ms/step | {off} ms/step | ratio | logits rel err vs XLA, {on} / {off} "
        f"| state change rel err vs XLA, {on} / {off} |"
    )
    print("|---|---|---|---|---|---|---|")
    for projections in PROJECTIONS.value:
        for batch in bl.int_list(BATCHES.value):
            _, (logits_ref, change_ref) = _run(batch, projections, None, gpu)
            ms_on, (logits_on, change_on) = _run(batch, projections, True, gpu)
            ms_off, (logits_off, change_off) = _run(batch, projections, False, gpu)
            errors = [bl.rel_error(x, ref) for x, ref in ((logits_on, logits_ref), (logits_off, logits_ref))]
            changes = [bl.rel_error(x, change_ref) for x in (change_on, change_off)]
            print(
                f"| {projections} | {batch} | {ms_on:.3f} | {ms_off:.3f} | {ms_on / ms_off:.3f} "
                f"| {errors[0]:.1e} / {errors[1]:.1e} | {changes[0]:.1e} / {changes[1]:.1e} |"
            )


if __name__ == "__main__":
    app.run(main)
