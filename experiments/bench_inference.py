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
is left (``_SHARES`` in ``inference/plan.py``), stops starting configurations at its deadline and is
killed 30 s after it. Rows reach the parent as they finish, so a killed worker loses only the
configuration it was running.

The script's parts: ``inference/plan.py`` (flags, the groups of tasks), ``inference/worker.py`` (the
measurements, in a worker process), ``inference/runner.py`` (the parent starting the workers),
``inference/analysis.py`` (derived figures, the summary against the targets), ``inference/report.py``
(tables and plot).
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags

from experiments import benchlib as bl
from experiments import benchreport as br
from experiments.inference import analysis, plan, report, runner, worker

# The benchmark's own flags are defined in inference/plan.py; --help lists them as this script's.
flags.adopt_module_key_flags(plan)


def main(argv):
    del argv
    if bl.maybe_run_worker({"group": worker.run_group}):
        return
    budget = bl.Budget()
    groups = plan.plan_groups()
    state: dict[str, Any] = {}

    def on_group_done(results):
        if results["device"] is None:
            return
        if "report" not in state:
            state["report"] = br.Report("bench_inference", results["device"]["short"])
        setup = next(iter(results["setups"].values()), {})
        state["dtype"] = setup.get("dtype", "?")
        for row in results["rows"]:
            row.setdefault("params_bytes", setup.get("params_bytes"))
        analysis.derive(results["rows"], results["ceilings"])
        report.write(state["report"], results, state["dtype"])

    module = __spec__.name if __spec__ else "experiments.bench_inference"  # the workers re-run it
    results = runner.run_groups(groups, budget, on_group_done, module)
    if "report" not in state:
        print("No worker reported a device; see the errors above.", results["rows"][:1])
        sys.exit(1)
    text = report.write(state["report"], results, state["dtype"])
    if br.PLOTS.value:
        bl.guarded(lambda: report.plot(results["rows"], state["report"].png))
    print(text)
    print("Wrote", *state["report"].paths(), *([state["report"].stem + "_hlo.zip"] if plan.HLO.value else []))


if __name__ == "__main__":
    app.run(main)
