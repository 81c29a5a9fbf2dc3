"""Scaling over the GPUs of one host: the training step under data parallel, FSDP, tensor parallel and their
mixes, weak and strong scaling, the largest model that trains, decoding split by tensor parallel, and
what XLA's collective-overlap flags change.

    python -m experiments.bench_scaling --resume          # every study for the GPUs present (~9 min a call:
                                                          # call again until it reports nothing left)
    python -m experiments.bench_scaling --studies=weak --weak=paper-1.3b/dp --resume
    python -m experiments.bench_scaling --plan_only=8     # what would run on 8 H200s, and why not the rest
    python -m experiments.bench_scaling --smoke           # 8 fake CPU devices, tiny model (~40 s on 2 cores)

Studies (``--studies``, run in the order given; ``experiments/scaling_plan.py`` names strategies and specs):

* ``check``: one float32 training step of a small model on every (data, fsdp, tensor) mesh of the devices
  against the same step on one device (loss and the parameters' change; the kernels forced for RetNet).
* ``throughput``: tokens/s and MFU for ``--models`` × ``--lengths`` × ``--meshes`` on all devices, with
  ``--tokens_per_device`` tokens per device per step (B = tokens_per_device · N / T rows in all).
* ``weak`` / ``strong``: per ``--weak`` / ``--strong`` spec, n = 1, 2, 4, ... N devices (the first n of
  them) at T = ``--scaling_length``: per-device batch fixed (weak) or global batch ``--strong_tokens``
  fixed (strong). Efficiency = (tokens/s per device at n) / (tokens/s per device at the smallest n that
  ran).
* ``overlap``: the ``--overlap`` specs on all devices under each ``--xla_overlap`` variant
  (``scaling_plan.XLA_OVERLAP_FLAGS``); every other study runs under the first variant.
* ``largest``: ``--largest_models`` from the smallest up, FSDP over all devices, T = ``--largest_length``,
  one row per device; the sweep ends at the first model that does not train.
* ``decode``: greedy decoding of ``--decode_models`` (bf16) at ``--decode_context`` with the model split
  over 1 device and over the most devices that divide its heads (tensor parallel), per batch in
  ``--decode_batches``: tokens/s, ms per step, and weight bytes read per device per second.

Each training configuration (and each decode model) runs in a fresh process with ``NCCL_NVLS_ENABLE=0``
(NVLink multicast off), only its n GPUs visible (``CUDA_VISIBLE_DEVICES``) and its variant's XLA flags; an
OOM, failure or timeout (``--config_timeout_s``) is recorded and the run goes on. Configurations that
cannot run (a width that does not split over the mesh, a training state larger than the devices, 16 bytes
per parameter) are listed as skipped with the reason; configurations the same in two studies run once.
``--resume`` keeps the rows of the same day's results (status ok or OOM) and runs the rest, so a run cut
short by ``--time_budget_s`` continues where it stopped. Training: bf16 compute, float32 parameters and
AdamW state, remat ``--remat``, synthetic random tokens, timing as in ``benchlib``. MFU = model FLOPs per
token (``Trainer.train_flops_per_token``) × tokens/s over n × the per-device peak (datasheet, and the bf16
matmul rate measured on one device in the same run).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from experiments import benchlib as bl
from experiments import benchreport as br
from experiments import scaling_plan as plan
from experiments import scaling_report
from experiments import scaling_workers as workers
from retnet_jax.nn import remat as remat_lib

STUDIES = ("check", "weak", "strong", "overlap", "decode", "largest", "throughput")
MODULE = "experiments.bench_scaling"

_STUDIES = flags.DEFINE_list("studies", list(STUDIES), f"Studies to run, in this order: {STUDIES}.")
_ARCHS = flags.DEFINE_list("archs", ["retnet"], "Training architectures: retnet, transformer.")
_MODELS = flags.DEFINE_list("models", ["paper-1.3b", "paper-2.7b", "paper-6.7b"], "Model specs (throughput).")
_LENGTHS = flags.DEFINE_string("lengths", "2048,8192", "Sequence lengths T (throughput).")
_MESHES = flags.DEFINE_list(
    "meshes",
    ["dp", "fsdp", "tp", "fsdp_tp", "dp_fsdp_tp"],
    f"Throughput meshes: strategies {plan.STRATEGIES} or DxFxT (data x fsdp x tensor).",
)
_TOKENS = flags.DEFINE_integer("tokens_per_device", 16384, "Tokens per device per step (B·T / N).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "RetNet chunk size C.")
_REMAT = flags.DEFINE_string("remat", "full", f"Remat policy: {remat_lib.POLICIES}.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed training steps per configuration (after 2 warm-up steps).")
_WEAK = flags.DEFINE_list("weak", ["paper-1.3b/dp", "paper-6.7b/fsdp"], "Weak-scaling specs MODEL/STRATEGY.")
_STRONG = flags.DEFINE_list("strong", ["paper-1.3b/dp"], "Strong-scaling specs MODEL/STRATEGY.")
_SCALING_LENGTH = flags.DEFINE_integer("scaling_length", 2048, "T of the weak, strong and overlap studies.")
_SCALING_DEVICES = flags.DEFINE_string(
    "scaling_devices", "", "Device counts of the weak and strong studies (default 1, 2, 4, ... N)."
)
_STRONG_TOKENS = flags.DEFINE_integer("strong_tokens", 65536, "Tokens per step of the strong-scaling study.")
_OVERLAP = flags.DEFINE_list(
    "overlap", ["paper-1.3b/fsdp", "paper-6.7b/fsdp"], "Overlap specs MODEL/STRATEGY."
)
_XLA_OVERLAP = flags.DEFINE_list(
    "xla_overlap",
    ["default", "on"],
    f"XLA flag variants {tuple(plan.XLA_OVERLAP_FLAGS)}: the overlap study runs each; the others the first.",
)
_LARGEST = flags.DEFINE_list(
    "largest_models",
    ["paper-6.7b", "paper-13b", "paper-13b:num_layers=80", "paper-13b:num_layers=120", "torchscale-65b"],
    "Model specs swept upward (by parameter count) until one does not train.",
)
_LARGEST_LENGTH = flags.DEFINE_integer("largest_length", 2048, "T of the largest-model sweep (B = N).")
_DECODE_MODELS = flags.DEFINE_list("decode_models", ["paper-6.7b", "paper-13b"], "Decoding model specs.")
_DECODE_ARCHS = flags.DEFINE_list("decode_archs", ["retnet", "transformer"], "Decoding architectures.")
_DECODE_BATCHES = flags.DEFINE_string("decode_batches", "1,32", "Decoding batch sizes.")
_DECODE_CONTEXT = flags.DEFINE_integer("decode_context", 2048, "Tokens already in the state.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 64, "Greedy steps per timed call.")
_CHECK_MESHES = flags.DEFINE_list("check_meshes", ["all"], "Meshes of the check ('all': every DxFxT).")
_CHECK_ARCHS = flags.DEFINE_list("check_archs", ["retnet", "transformer"], "Architectures of the check.")
_CONFIG_TIMEOUT_S = flags.DEFINE_float("config_timeout_s", 300.0, "Time limit of one configuration.")
_IN_PROCESS = flags.DEFINE_bool(
    "in_process", False, "Run configurations in this process where the XLA flags allow (CPU smoke)."
)
_RESUME = flags.DEFINE_bool("resume", False, "Keep the same day's finished rows (ok, OOM); run the rest.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "8 fake CPU devices, a tiny model, every study (~40 s on 2 CPU cores; sets most flags)."
)
_PLAN_ONLY = flags.DEFINE_integer(
    "plan_only", 0, "Print the plan for this many devices of --plan_device_gb each, and run nothing."
)
_PLAN_DEVICE_GB = flags.DEFINE_float(
    "plan_device_gb", 130.0, "Device memory JAX may use (H200: 0.92 × 141 GB)."
)

flags.FLAGS.set_default("time_budget_s", 540.0)

# One layer of tiny with 8 heads, so that every mesh of 8 devices splits it.
_TINY = "tiny:num_heads=8:num_layers=1"
SMOKE = dict(
    studies="check,weak,strong,overlap,decode,largest,throughput",
    models=_TINY,
    lengths="64",
    meshes="fsdp,tp",
    tokens_per_device="64",
    steps="2",
    weak=f"{_TINY}/fsdp",
    strong=f"{_TINY}/fsdp",
    scaling_length="64",
    scaling_devices="1,8",
    strong_tokens="512",
    overlap=f"{_TINY}/fsdp",
    xla_overlap="default,on",
    largest_models=f"{_TINY},tiny:num_heads=8",
    largest_length="64",
    decode_models=_TINY,
    decode_archs="retnet",
    decode_batches="2",
    decode_context="16",
    decode_steps="4",
    check_meshes="2x2x2",
    check_archs="retnet",
    in_process="true",
    repeats="1",
    min_sample_s="0.001",
)
SMOKE_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_cpu_use_fusion_emitters=false"
)

# ------------------------------------------------------------------------------------------------------
# The plan: one row per (study, configuration); configurations shared by studies run once.


def _key(cfg) -> str:
    return json.dumps(cfg, sort_keys=True)


def _row(study, cfg, variant, skip=None, **labels):
    return dict(study=study, variant=variant, **labels, cfg=cfg, key=_key(cfg), skip=skip)


def train_row(study, arch, model, length, batch, mesh, variant, device_bytes, **labels):
    """A training configuration on the first n = prod(mesh) devices."""
    n = mesh[0] * mesh[1] * mesh[2]
    shape = dict(arch=arch, model=model, T=length, B=batch, mesh=list(mesh))
    cfg = dict(kind="train", **shape, devices=n, chunk=_CHUNK.value, remat=bl.remat_policy(_REMAT.value))
    cfg.update(steps=_STEPS.value, variant=variant)
    why = plan.problem(arch, model, mesh, batch, device_bytes)
    return _row(study, cfg, variant, why, **shape, n=n, **labels)


def check_rows(n, variant):
    if _CHECK_MESHES.value == ["all"]:
        meshes = plan.all_meshes(n)
    else:
        meshes = [plan.parse_mesh(m, n) for m in _CHECK_MESHES.value]
    cfg = dict(
        kind="check", meshes=[list(m) for m in meshes if m != (1, 1, 1)], archs=_CHECK_ARCHS.value, T=64
    )
    return [_row("check", cfg, variant, None if cfg["meshes"] else "one device: no mesh to compare", n=n)]


def throughput_rows(n, variant, device_bytes):
    rows = []
    for model, length, arch in itertools.product(_MODELS.value, bl.int_list(_LENGTHS.value), _ARCHS.value):
        batch = max(1, _TOKENS.value * n // length)
        for label, mesh in plan.meshes(_MESHES.value, n):
            rows.append(
                train_row(
                    "throughput", arch, model, length, batch, mesh, variant, device_bytes, strategy=label
                )
            )
    return rows


def scaling_rows(study, n, variants, device_bytes):
    """weak / strong: 1, 2, 4, ... n devices under the first variant; overlap: n devices under each."""
    specs = {"weak": _WEAK, "strong": _STRONG, "overlap": _OVERLAP}[study].value
    counts = bl.int_list(_SCALING_DEVICES.value) or plan.device_counts(n)
    if study == "overlap":
        counts = [n]
    elif max(counts) > n or min(counts) < 1:
        raise ValueError(f"--scaling_devices must lie in 1..{n} (the devices present); got {counts}.")
    length, rows = _SCALING_LENGTH.value, []
    for spec, arch, variant, m in itertools.product(specs, _ARCHS.value, variants, counts):
        model, strategy = plan.parse_scaling(spec)
        mesh = plan.strategy_mesh(strategy, m)
        if mesh is not None:
            tokens = _STRONG_TOKENS.value if study == "strong" else _TOKENS.value * m
            batch = max(1, tokens // length)
            rows.append(
                train_row(
                    study,
                    arch,
                    model,
                    length,
                    batch,
                    mesh,
                    variant,
                    device_bytes,
                    strategy=strategy,
                    spec=spec,
                )
            )
    return rows


def largest_rows(n, variant, device_bytes):
    models = sorted(_LARGEST.value, key=lambda spec: plan.num_params("retnet", spec))
    length = _LARGEST_LENGTH.value
    return [
        train_row("largest", "retnet", m, length, n, (1, n, 1), variant, device_bytes, strategy="fsdp")
        for m in models
    ]


def decode_rows(n, variant):
    rows = []
    for model, arch in itertools.product(_DECODE_MODELS.value, _DECODE_ARCHS.value):
        for tensor in plan.tensor_sizes(arch, model, n):
            cfg = dict(
                kind="decode",
                arch=arch,
                model=model,
                tensor=tensor,
                batches=bl.int_list(_DECODE_BATCHES.value),
            )
            cfg.update(context=_DECODE_CONTEXT.value, steps=_DECODE_STEPS.value)
            rows.append(_row("decode", cfg, variant, arch=arch, model=model, n=tensor))
    return rows


def plan_rows(n: int, device_bytes: int | None) -> list[dict]:
    """Every study's rows, in the order of --studies."""
    variants = _XLA_OVERLAP.value
    unknown = [v for v in variants if v not in plan.XLA_OVERLAP_FLAGS]
    if unknown or not variants:
        raise ValueError(f"--xla_overlap: {unknown} unknown; give some of {tuple(plan.XLA_OVERLAP_FLAGS)}.")
    base, rows = variants[0], []
    for study in _STUDIES.value:
        if study == "check":
            rows += check_rows(n, base)
        elif study == "throughput":
            rows += throughput_rows(n, base, device_bytes)
        elif study in ("weak", "strong", "overlap"):
            rows += scaling_rows(study, n, variants if study == "overlap" else [base], device_bytes)
        elif study == "largest":
            rows += largest_rows(n, base, device_bytes)
        elif study == "decode":
            rows += decode_rows(n, base)
        else:
            raise ValueError(f"--studies: unknown study {study!r}; expected some of {STUDIES}.")
    return rows


# ------------------------------------------------------------------------------------------------------
# Running.


def devices_of(cfg) -> int:
    if cfg["kind"] == "check":
        return max(m[0] * m[1] * m[2] for m in cfg["meshes"])
    return cfg["tensor"] if cfg["kind"] == "decode" else cfg["devices"]


def worker_env(cfg, variant: str, device: dict) -> dict[str, str]:
    """NVLink multicast off, the variant's XLA flags, and (GPU) only the configuration's devices visible."""
    env = {"NCCL_NVLS_ENABLE": "0"}
    extra = " ".join(plan.XLA_OVERLAP_FLAGS[variant])
    if extra:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()
    if device.get("platform") == "gpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(device["device_count"])]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[: devices_of(cfg)])
    return env


def rejected_flags(variant: str) -> str | None:
    """None where XLA starts with the variant's flags, else XLA's complaint (unknown flags are fatal)."""
    extra = " ".join(plan.XLA_OVERLAP_FLAGS[variant])
    if not extra:
        return None
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()}
    cmd = [sys.executable, "-c", "import jax; jax.devices()"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if "flag" in line.lower()]
    return (lines or [f"exit status {proc.returncode}"])[-1][-300:]


def run_job(cfg, variant: str, device: dict, seconds_left: float) -> dict:
    """The configuration's result; a worker is stopped where the time budget ends (and counts as not run:
    ``--resume`` tries it again)."""
    payload = dict(cfg, steps=cfg.get("steps", _STEPS.value))
    if _IN_PROCESS.value and not plan.XLA_OVERLAP_FLAGS[variant]:  # flags are read once per process
        return bl.guarded(lambda: workers.WORKERS[cfg["kind"]](payload))
    timeout = min(_CONFIG_TIMEOUT_S.value, max(seconds_left, 1.0))
    result = bl.run_worker(MODULE, payload, timeout, env=worker_env(cfg, variant, device))
    if result.get("status") == "timeout" and timeout < _CONFIG_TIMEOUT_S.value:
        return dict(status="skipped", error=f"time budget (stopped after {timeout:.0f} s)")
    return result


def previous_results(report) -> dict[str, dict]:
    """The finished results (ok, OOM) of the same day's run, by configuration key (``--resume``)."""
    path = report.stem + ".json"
    if not (_RESUME.value and os.path.exists(path)):
        return {}
    with open(path) as f:
        saved = json.load(f).get("results", {})
    return {key: r for key, r in saved.items() if r.get("status") in ("ok", "OOM")}


def apply_smoke():
    """--smoke: the SMOKE values for every flag not given, and 8 CPU devices (this process and workers)."""
    import jax

    for name, value in SMOKE.items():
        if not flags.FLAGS[name].present:
            flags.FLAGS[name].parse(value)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def main(argv):
    del argv
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # every process started from here inherits it
    if bl.maybe_run_worker(workers.WORKERS):
        return
    if _SMOKE.value:
        apply_smoke()
    if _PLAN_ONLY.value:
        return print_plan(_PLAN_ONLY.value, int(_PLAN_DEVICE_GB.value * 1e9))
    if not _IN_PROCESS.value:
        import jax

        jax.config.update("jax_platforms", "cpu")  # this process plans (shapes only); workers use the GPUs
    budget = bl.Budget()
    if _IN_PROCESS.value:
        peaks = bl.guarded(lambda: workers.peaks_worker({}))
    else:
        peaks = bl.run_worker(MODULE, dict(kind="peaks"), 300, env={"NCCL_NVLS_ENABLE": "0"})
    if peaks.get("status") != "ok":
        raise SystemExit(f"Measuring the devices failed: {peaks}")
    device, ceilings, device_bytes = peaks["device"], peaks["ceilings"], peaks.get("device_bytes")
    n = device["device_count"]
    report = br.Report("bench_scaling", f"{device['short']}x{n}")
    rows = plan_rows(n, device_bytes)
    results = previous_results(report)
    kept = set(results)
    variants = {row["variant"] for row in rows if not row["skip"] and row["key"] not in results}
    rejected = {v: r for v in sorted(variants) if (r := rejected_flags(v))}
    longest: dict[str, float] = {}
    largest_failed = False  # a model of the sweep did not train: the larger ones are not tried
    for row in rows:
        key, kind = row["key"], row["cfg"]["kind"]
        if row["skip"]:
            largest_failed |= row["study"] == "largest"
            continue
        if key in results:
            pass  # ran for an earlier study, or kept by --resume
        elif row["variant"] in rejected:
            results[key] = dict(status="error", error=f"XLA rejected the flags: {rejected[row['variant']]}")
        elif row["study"] == "largest" and largest_failed:
            row["skip"] = "a smaller model did not train"
            continue
        elif budget.exhausted(next_seconds=longest.get(kind, 0.0)):
            results[key] = dict(status="skipped", error="time budget")
        else:
            elapsed = budget.seconds - budget.left()
            print(f"[{elapsed:.0f}s] {row['study']}: {summary(row['cfg'])} ...", flush=True)
            start = time.perf_counter()
            results[key] = run_job(row["cfg"], row["variant"], device, budget.left())
            longest[kind] = max(longest.get(kind, 0.0), time.perf_counter() - start)
            if results[key].get("status") != "ok":
                status, error = results[key].get("status"), results[key].get("error")
                print(f"  -> {status}: {error}\n{results[key].get('log', '')[-1500:]}", flush=True)
        # A model that did not train ends the sweep (one not tried for the time budget does not).
        largest_failed |= row["study"] == "largest" and results[key]["status"] not in ("ok", "skipped")
        scaling_report.write(report, rows, results, device, ceilings, device_bytes, rejected, kept)
    text = scaling_report.write(report, rows, results, device, ceilings, device_bytes, rejected, kept)
    if br.PLOTS.value:
        bl.guarded(lambda: scaling_report.plot(rows, results, device, ceilings, report.png))
    print(text)
    left = sum(1 for r in rows if not r["skip"] and results.get(r["key"], {}).get("status") == "skipped")
    print(f"{left} configurations left (time budget): run the same command with --resume to continue."
          if left else "Every configuration ran or was ruled out.")  # fmt: skip
    print("Wrote", *report.paths())


def print_plan(n: int, device_bytes: int):
    import jax

    jax.config.update("jax_platforms", "cpu")  # parameter counts from shapes only
    rows = plan_rows(n, device_bytes)
    keys = {r["key"] for r in rows if not r["skip"]}
    for row in rows:
        print(
            f"{row['study']:>10}  {summary(row['cfg'])}"
            + (f"  -- skipped: {row['skip']}" if row["skip"] else "")
        )
    print(
        f"{len(keys)} configurations to run ({len(rows)} rows) on {n} devices of {device_bytes / 1e9:.0f} GB."
    )


def summary(cfg) -> str:
    if cfg["kind"] == "train":
        mesh = plan.mesh_name(cfg["mesh"])
        return f"{cfg['arch']} {cfg['model']} T{cfg['T']} B{cfg['B']} mesh {mesh} xla {cfg['variant']}"
    if cfg["kind"] == "decode":
        return f"{cfg['arch']} {cfg['model']} tensor {cfg['tensor']} batches {cfg['batches']}"
    return f"{len(cfg['meshes'])} meshes, {cfg['archs']}"


if __name__ == "__main__":
    app.run(main)
