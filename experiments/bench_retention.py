"""Retention alone, forward and forward + backward, bf16: our XLA chunkwise form and fused kernels against
fla's ``chunk_retention`` (PyTorch/Triton) and cuDNN flash attention (``jax.nn.dot_product_attention``).

    # Every preset head shape, fused kernels beside fla, normalized and not, a state carried in and out,
    # plus the kernel-plan check of every shape (8 minutes on an H200: lengths in priority order, the
    # budget skips what does not fit; run the skipped lengths again with --lengths=... --tag=presets-2):
    python -m experiments.bench_retention --shapes=presets --lengths=8192,2048,32768,4096,16384 \
        --impls=fused,fla --norms=unnormalized,normalized --state=carried --repeats=5 --min_sample_s=0.02 \
        --peer_share=0.5 --time_budget_s=470 --tag=presets
    # The split kernels' two variants (scores recomputed per tile / stored once) side by side, at the
    # paper's heads (B8 T8192 and B8 T2048) and fla's, beside fla (auto: the register kernels at fla's heads,
    # the same plan as split:64x64x4x3 at the paper's, a repeat that shows the timing noise):
    python -m experiments.bench_retention --shapes=paper,fla --lengths=8192,2048 --batch=8 \
        --impls=fused,fla --passes=fwd,fwdbwd --fused_plans=auto,split:64x64x4x3,split:64x64x4x3:stored \
        --check_plans=false --time_budget_s=500 --peer_share=0.6 --tag=stored-scores
    # The split kernels' tiles and chunk lengths at the paper's heads, beside XLA and fla (tuning):
    python -m experiments.bench_retention --shapes=paper --lengths=8192 --impls=chunkwise,fused,fla \
        --chunk_sizes=256 --passes=fwdbwd --fused_chunk_sizes=64,128 \
        --fused_plans=auto,split:64x64x4x3,split:64x128x4x2,split:32x64x4x2,split:64x64x8x2,split:128x64x8x2 \
        --time_budget_s=470 --tag=split-sweep
    python -m experiments.bench_retention --shapes=fla --lengths=8192 --passes=fwdbwd   # the first target row
    python -m experiments.bench_retention --shapes=fla --lengths=128,256 --tokens=512 \
        --chunk_sizes=32,64 --check_length=128 --repeats=3    # CPU smoke run (a minute)

Shapes (``SHAPES``; ``presets`` = all): ``paper`` (H8, K256, V512: paper-1.3b), ``paper-2.7b`` (H10),
``paper-6.7b`` (H16), ``torchscale-xl`` (H8, K256, V432), ``fla`` (fla's benchmark shape, H32, K=V=128),
``k64`` (H32, K=V=64). B = max(1, tokens / T) keeps B·T constant (``--tokens=65536``: B8 at T8192);
``--batch`` fixes B instead.
``--norms``: our forms unnormalized (the function fla computes) and/or normalized (÷ sqrt(c_n)); fla is
always unnormalized. ``--state=carried``: every call continues a random state (count T) and returns the
final state (fla: ``initial_state``, ``output_final_state``); the backward takes cotangents for both.
cuDNN runs causal softmax attention at the same B, T and model width with 128-wide heads (H·K = H'·128,
the Transformer baseline's heads), since it needs K = V. Parallel runs only where its T×T scores fit
(``--parallel_max_gb``).

"fused" is ``chunkwise(implementation="pallas")``: the kernel plan ``ops.gpu.plan`` picks per shape (the
register kernels for K·V ≤ 128·128, else the split kernels); ``--fused_plans`` adds forced families and
tiles (``split:BKxBVxWARPSxSTAGES``, ``register:BKxBVxWARPSxSTAGES``), and the split kernels' variant that
stores each chunk's scores once (``split:stored``, ``split:64x64x4x3:stored``: ``Tiles.stored_scores``).
Every forced plan that fits a check shape also joins the correctness check (GPU only).

TFLOP/s counts the matrix products of each form (forward; fwd+bwd = 3× forward), one count per form
whatever the implementation: chunkwise with chunk C (fla: C = 64) 2·B·H·T·(C·(K+V) + 2·K·V), parallel
2·B·H·T²·(K+V), cuDNN causal 2·B·H'·T²·K (half the T×T products); "% matmul" and "% datasheet" set it
against the measured bf16 matmul rate and the datasheet peak. "XLA-counted TFLOP/s" (our programs) uses
the FLOPs XLA's cost analysis finds in the compiled program instead: all it executes, elementwise work
and extra products (a matrix-form state carry) included, a loop body counted once.

Memory: XLA's ``memory_analysis`` of each program (inputs, outputs, temporaries); for fla,
``torch.cuda.max_memory_allocated``. Before timing, small shapes (fla's heads and the paper's) check ours
and fla against a float64 reference (outputs and gradients; relative error ‖x − ref‖ / ‖ref‖).

Targets: fwd+bwd in ≤ 0.7× fla's time at every shape and T (the "Targets" section; a shape and T meet it
when the fastest of our rows there does).

The script's parts: ``retention/sweep.py`` (flags, shapes, the configurations), ``retention/jax_forms.py``
(ours and cuDNN, timed here), ``retention/fla_peer.py`` (fla, in a worker process), ``retention/checks.py``
(correctness and kernel plans), ``retention/report.py`` (figures, targets, tables, plot).
"""

from __future__ import annotations

import tempfile

import numpy as np
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchreport as br
from experiments.retention import sweep
from experiments.retention.checks import check_inputs, check_plans, run_check
from experiments.retention.fla_peer import fla_worker, measure_fla
from experiments.retention.jax_forms import kernel_plan, run_jax
from experiments.retention.report import derive, impl_label, plot, write

# The benchmark's own flags are defined in retention/sweep.py; --help lists them as this script's.
flags.adopt_module_key_flags(sweep)


def main(argv):
    del argv
    if bl.maybe_run_worker({"fla": fla_worker}):
        return
    budget = bl.Budget()
    todo = sweep.configs()
    tmp = tempfile.mkdtemp(prefix="bench_retention_")
    data, files = check_inputs(tmp)
    fla = measure_fla([c for c in todo if c["impl"] == "fla"], files, budget)
    fla_ok = fla.get("status") == "ok" and fla.get("available")
    fla_results = iter(fla["results"]) if fla_ok else None
    fla_missing = dict(status="n/a" if fla.get("status") == "ok" else fla.get("status"))
    fla_missing["error"] = fla.get("reason") or fla.get("error")

    device = bl.device_info()
    ceilings = bl.measure_ceilings()
    report = br.Report("bench_retention", device["short"])
    fla_outputs = None
    if fla_ok and fla["check"]["status"] == "ok":
        fla_outputs = {name: dict(np.load(path)) for name, path in fla["check"]["outputs"].items()}
    check = run_check(data, fla_outputs, bl.int_list(sweep.CHUNKS.value)[0])
    plans = check_plans() if sweep.CHECK_PLANS.value else {}

    rows = []
    for cfg in todo:
        label = f"{cfg['shape']} B{cfg['B']} T{cfg['T']} {impl_label(cfg)} {cfg['passes']}"
        if cfg["impl"] == "fused":
            cfg = dict(
                cfg, family=bl.guarded(lambda cfg=cfg: dict(family=kernel_plan(cfg).family)).get("family")
            )
        if cfg["impl"] == "fla":
            result = next(fla_results) if fla_ok else fla_missing
        elif cfg["impl"] == "cudnn" and device["platform"] != "gpu":
            result = dict(status="n/a", error="cuDNN needs a GPU")
        elif cfg["impl"] == "parallel" and sweep.parallel_bytes(cfg) > sweep.PARALLEL_MAX_GB.value * 1e9:
            result = dict(status="skipped", error=f"scores ≈ {sweep.parallel_bytes(cfg) / 1e9:.0f} GB")
        elif budget.exhausted():
            result = dict(status="skipped", error="time budget")
        else:
            print(f"{label} ...", flush=True)
            result = bl.guarded(lambda cfg=cfg: run_jax(cfg))
        rows.append({**cfg, **result})
        derive(rows, device, ceilings)
        write(report, rows, device, ceilings, check, fla, plans)
    text = write(report, rows, device, ceilings, check, fla, plans)
    if br.PLOTS.value:
        bl.guarded(lambda: plot(rows, report.png))
    print(text)
    print("Wrote", *report.paths())


if __name__ == "__main__":
    app.run(main)
