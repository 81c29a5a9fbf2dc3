"""The benchmark scripts run end to end on the CPU at toy sizes, skipping the GPU-only peers.

Each script runs as a subprocess (as its docstring's command does) with toy sizes: about 10 s each on 2 CPU
cores, JAX's start-up and compilation included. Plots are drawn by one of them only (matplotlib's import
alone costs seconds).
"""

import json
import os
import subprocess
import sys

import pytest

from retnet_jax.ops.gpu import skinny_nd

pytestmark = pytest.mark.slow  # each runs a script in a process of its own

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--repeats=1", "--min_sample_s=0.001", "--matmul_n=128", "--copy_mib=4"]
SCRIPTS = {
    "bench_retention": [
        # B = 1 of the smallest heads: the interpreted kernels' time grows with B·H·K·V (the correctness
        # check has shapes of its own).
        "--shapes=k64",
        "--lengths=64",
        "--tokens=64",
        "--chunk_sizes=32",
        "--fused_chunk_sizes=32",
        "--check_length=64",
        "--passes=fwdbwd",
        "--profile_top=3",
        "--plots=false",
    ],
    "bench_training": [
        "--models=tiny",
        "--lengths=32",
        "--tokens_per_step=64",
        "--steps=2",
        "--archs=retnet,torchscale,fla",
        "--in_process",
        "--plots=false",
    ],
    "bench_inference": [
        "--model=tiny",
        "--contexts=32,64",
        "--batches=1,2",
        "--batch_context=32",
        "--decode_steps=4",
        "--prefill_lengths=16",
        "--state_batches=2",
        "--state_check_steps=4",
        "--state_check_prompt=8",
        "--flag_set_batches=1",
        "--xla_flag_sets=exact=--xla_cpu_enable_fast_math=false",
        "--in_process",
    ],
    "bench_serving": [
        "--model=tiny",
        "--requests=6",
        "--rows=2",
        "--prompt_lengths=4,14",  # one prompt bucket: the scheduler's grouping is test_batching's
        "--output_lengths=2,10",
        "--plots=false",
    ],
    "bench_backends": ["--matmuls=64", "--attention=1x128x2x64", "--plots=false"],
    "bench_products": [
        "--shapes=qkvg:64x256",
        "--rows=1",
        "--max_plans=1",
        "--norm_shape=qkvg",
        "--plots=false",
    ],
    "bench_scaling": ["--smoke", "--plots=false"],  # 8 fake CPU devices: every study, a tiny model
    "profile_steps": [
        "--model=tiny",
        "--archs=retnet",
        "--targets=decode",
        "--decode_steps=2",
        "--decode_context=16",
        "--plots=false",
    ],
}


def run(name, tmp_path):
    """Runs a script; returns (its JSON results, its markdown) after checking the files it wrote."""
    cmd = [sys.executable, "-m", f"experiments.{name}", f"--out_dir={tmp_path}", *COMMON, *SCRIPTS[name]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    files = sorted(f for f in os.listdir(tmp_path) if not f.endswith("_hlo.zip"))
    plots = "--plots=false" not in SCRIPTS[name]
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md", "png"][: 3 if plots else 2], files
    assert all(f.startswith(f"{name}_cpu") for f in files), files  # bench_scaling: cpux8
    stem = os.path.join(tmp_path, files[0].rsplit(".", 1)[0])
    with open(stem + ".json") as f, open(stem + ".md") as g:
        return json.load(f), g.read()


def test_retention(tmp_path):
    results, text = run("bench_retention", tmp_path)
    status = {(r["impl"], r["passes"]): r["status"] for r in results["rows"]}
    assert status[("parallel", "fwdbwd")] == status[("chunkwise", "fwdbwd")] == "ok"
    assert status[("fused", "fwdbwd")] == "ok"  # the Pallas kernels, interpreted on the CPU
    assert status[("cudnn", "fwdbwd")] == "n/a"  # GPU only
    # Our forms agree with the float64 reference to bf16 rounding, outputs and gradients.
    for check in results["check"]:
        assert all(error < 2e-2 for error in check["errors"].values()), check
    assert "## Timings" in text and "| shape | B | T |" in text
    # --profile_top: each JAX configuration's trace, its longest kernels with their times.
    traced = [r for r in results["rows"] if r["status"] == "ok" and r["impl"] != "cudnn"]
    assert traced and all(0 < len(r["kernels"]["top"]) <= 3 for r in traced)
    assert all(r["kernels"]["busy_s"] > 0 for r in traced)
    assert "## Kernels (device trace, times per call)" in text


def test_retention_auto_plan_is_what_chunkwise_runs():
    """bench_retention's "auto" rows run chunkwise(implementation="auto")'s plan, few (batch row, head)
    pairs included; the correctness check's configurations (no B) plan by the heads alone."""
    code = (
        "import jax.numpy as jnp\n"
        "from experiments.retention.jax_forms import kernel_plan\n"
        "from retnet_jax.ops import dispatch\n"
        "check = kernel_plan(dict(K=64, V=64, C=64, plan='auto'))\n"
        "assert check.family == 'register' and check.tiles.num_warps == 4, check\n"
        "for b in (2, 32):\n"
        "    ours = kernel_plan(dict(B=b, H=32, K=64, V=64, C=64, plan='auto'))\n"
        "    auto = dispatch.kernel_plan('f', 'auto', 64, 64, 64, jnp.bfloat16, 'gpu', rows=b * 32)\n"
        "    assert ours == auto and ours.family == ('split' if b == 2 else 'register'), (b, ours)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_training(tmp_path):
    results, _ = run("bench_training", tmp_path)
    rows = {r["arch"]: r for r in results["rows"]}
    assert rows["retnet"]["status"] == "ok", rows["retnet"]
    assert rows["retnet"]["tokens_per_s"] > 0 and rows["retnet"]["mfu_measured"] > 0
    # Without PyTorch, torchscale and fairscale installed it is reported, not run.
    assert rows["torchscale"]["status"] in ("n/a", "ok"), rows["torchscale"]
    # fla's Triton kernels need a CUDA GPU: n/a here, installed or not.
    assert rows["fla"]["status"] == "n/a", rows["fla"]


def test_inference_decode_impls(tmp_path):
    """--decode_impls times the RetNet decoding rows once per retention implementation and weights' layout
    (here XLA's products on kernels stored [N, D], and on [D, N] kernels apart), labelled."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench_inference",
        f"--out_dir={tmp_path}",
        *COMMON,
        "--model=tiny",
        "--archs=retnet",
        "--panels=batch",
        "--batches=1",
        "--batch_context=32",
        "--decode_steps=2",
        "--decode_impls=xla,pallas,xla/xla/nd,xla/xla/separate+dn",
        "--hlo=false",
        "--plots=false",
        "--in_process",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (stem,) = {f.rsplit(".", 1)[0] for f in os.listdir(tmp_path)}
    with open(os.path.join(tmp_path, stem + ".json")) as f:
        rows = json.load(f)["rows"]
    ran = {(r["arch"], r["status"]) for r in rows if r["kind"] == "decode"}
    labels = ("retnet", "retnet@xla", "retnet@pallas", "retnet@xla/xla/nd", "retnet@xla/xla/separate+dn")
    assert ran == {(label, "ok") for label in labels}, ran


def test_inference(tmp_path):
    """Every part runs (the largest fitting batch is n/a on a CPU), the flag set in a worker of its own."""
    results, text = run("bench_inference", tmp_path)
    rows = results["rows"]
    kinds = {(r["kind"], r["arch"], r.get("flags")) for r in rows}
    for arch in ("retnet", "transformer"):
        assert {("decode", arch, "default"), ("prefill", arch, "default"), ("fit", arch, "default")} <= kinds
    assert ("state_check", "retnet", "default") in kinds and ("decode", "retnet", "exact") in kinds
    ran = [r for r in rows if r["kind"] != "fit"]
    assert all(r["status"] == "ok" for r in ran), [r for r in ran if r["status"] != "ok"]
    assert all(r["tokens_per_s"] > 0 for r in ran if r["kind"] in ("decode", "prefill"))
    # The context is set up without a prompt: one RetNet program serves both contexts.
    retnet_b1 = [r for r in rows if r["kind"] == "decode" and r["arch"] == "retnet" and r["B"] == 1]
    assert sum(r["compile_s"] is not None for r in retnet_b1 if r["flags"] == "default") == 1
    bf16 = next(r for r in rows if r["kind"] == "decode" and r["state_dtype"] == "bfloat16")
    f32 = next(r for r in rows if r["kind"] == "decode" and r["arch"] == "retnet" and r["B"] == 2)
    assert bf16["state_bytes"] * 2 == f32["state_bytes"] and 0 < bf16["vs_float32_state"]
    check = next(r for r in rows if r["kind"] == "state_check")
    assert 0 < check["error_max"] < 5e-2, check
    # What a step runs, per program; the RetNet state is updated in place (no copy of it).
    step = next(h["stats"] for h in results["hlo"] if h["name"].startswith("decode retnet [default]"))
    assert step["kernels"] > 0 and step["copies"]["bytes"] < f32["state_bytes"] / 2
    for title in (
        "Against the targets",
        "Decoding vs context",
        "Decoding vs batch",
        "Largest batch",
        "Prefill vs the training forward",
        "bfloat16 recurrent state",
        "XLA flag sets",
        "What one decoding step runs",
    ):
        assert f"## {title}" in text or title in text, title
    assert any(f.endswith("_hlo.zip") for f in os.listdir(tmp_path))


def test_serving(tmp_path):
    results, text = run("bench_serving", tmp_path)
    rows = results["rows"]
    assert {(r["arch"], r["policy"]) for r in rows} == {
        (arch, policy) for arch in ("retnet", "transformer") for policy in ("continuous", "static")
    }
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    # Both policies generate every request's tokens; refilled rows need fewer steps than static batches.
    for arch in ("retnet", "transformer"):
        continuous, static = (
            next(r for r in rows if (r["arch"], r["policy"]) == (arch, p)) for p in ("continuous", "static")
        )
        assert continuous["generated"] == static["generated"] > 0
        assert continuous["steps"] < static["steps"]
    assert "× static" in text

    # --merge of two earlier runs only: their device names the table, a row one run skipped and the other
    # measured appears once, measured, and RetNet's rows get their ratio to the Transformer's.
    device = dict(results["device"], device_kind="NVIDIA H200", short="H200", platform="gpu")
    retnet_run = [r for r in rows if r["arch"] == "retnet"] + [
        dict(arch="transformer", policy="continuous", R=r["R"], status="skipped")
        for r in rows
        if (r["arch"], r["policy"]) == ("transformer", "continuous")
    ]
    paths = []
    for name, run_rows in (("a", retnet_run), ("b", [r for r in rows if r["arch"] == "transformer"])):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(dict(results, device=device, rows=run_rows), f)
    merged_dir = tmp_path / "merged"
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench_serving",
        f"--out_dir={merged_dir}",
        "--archs=",
        f"--merge={','.join(paths)}",
        "--plots=false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (name,) = [f for f in os.listdir(merged_dir) if f.endswith(".json")]
    assert name.startswith("bench_serving_H200_"), name
    with open(merged_dir / name) as f:
        merged = json.load(f)["rows"]
    assert len(merged) == 4 and all(r["status"] == "ok" for r in merged), merged
    by_key = {(r["arch"], r["policy"]): r for r in merged}
    for policy in ("continuous", "static"):
        retnet, transformer = by_key[("retnet", policy)], by_key[("transformer", policy)]
        assert retnet["vs_transformer"] == pytest.approx(retnet["tokens_per_s"] / transformer["tokens_per_s"])


def test_profile(tmp_path):
    _, text = run("profile_steps", tmp_path)
    assert "## decode: retnet tiny" in text and "kernel launches" in text
    assert "| kernel | ms | launches | kind |" in text


def test_scaling(tmp_path):
    results, text = run("bench_scaling", tmp_path)
    rows = results["rows"]
    assert {r["study"] for r in rows} == {
        "check",
        "weak",
        "strong",
        "overlap",
        "decode",
        "largest",
        "throughput",
    }
    assert all(r["status"] == "ok" for r in rows), [
        (r["study"], r.get("error")) for r in rows if r["status"] != "ok"
    ]
    assert results["device"]["device_count"] == 8 and not results["rejected"]
    # The mesh agrees with one device (the kernels, interpreted, under their partitioning rule).
    (check,) = [r for r in rows if r["study"] == "check"]
    assert check["rows"] and all(r["status"] == "ok" and r["agrees"] for r in check["rows"]), check["rows"]
    train = [r for r in rows if r["study"] not in ("check", "decode")]
    assert all(r["tokens_per_s"] > 0 and r["mfu_measured"] > 0 for r in train)
    # Weak and strong scaling: efficiency against the one-device row of the same spec.
    for study in ("weak", "strong"):
        assert sorted(r["n"] for r in rows if r["study"] == study) == [1, 8]
        assert all(r["base_n"] == 1 for r in rows if r["study"] == study)
    # Each overlap variant ran with its XLA flags, every training worker with NVLink multicast off.
    overlap = {r["variant"]: r for r in rows if r["study"] == "overlap"}
    assert set(overlap) == {"default", "on"} and overlap["default"]["vs_first"] == 1.0
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in overlap["on"]["env"]["XLA_FLAGS"]
    assert all(r["env"]["NCCL_NVLS_ENABLE"] == "0" for r in train)
    # The largest sweep goes upward; decoding ran on 1 device and split over 8.
    largest = [r for r in rows if r["study"] == "largest"]
    assert [r["num_params"] for r in largest] == sorted(r["num_params"] for r in largest)
    assert "Largest that trained: tiny:num_heads=8 (" in text
    decode = [r for r in rows if r["study"] == "decode"]
    assert sorted(r["n"] for r in decode) == [1, 8]
    assert all(b["status"] == "ok" for r in decode for b in r["rows"])
    assert "## Weak scaling" in text and "| mesh DxFxT |" in text


def test_a_worker_that_dies_returns_what_it_saved():
    sys.path.insert(0, ROOT)
    from experiments import benchlib as bl

    result = bl.run_worker("tests.dying_worker", dict(kind="dies", done=3), timeout_s=300)
    assert result["status"] == "ok" and result["done"] == 3
    assert result["partial"] == "error: worker exited with 3"


def test_the_timed_decode_loop_reads_no_slice_of_the_stacked_weights():
    """The timed decoding loop prepares the variables once before it, as the library's loop does: its
    compiled body slices no weights out of the layer stack (a kernel's operand slice is a copy on a GPU:
    all of paper-1.3b's layer weights, every step), unlike the loop that reads the stack."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from experiments import hlostats
    from experiments.benchprograms import decode_program
    from retnet_jax.inference.decoding import LMDecoder
    from retnet_jax.models import DecoderLM, RetNetConfig

    config = RetNetConfig.preset("tiny")
    model = DecoderLM(config)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    args = (variables, jnp.zeros((1,), jnp.int32), config.init_state(1, max_length=16))
    slices = {}
    for unstack in (True, False):
        program = decode_program(LMDecoder(model, unstack_layers=unstack), 2)
        slices[unstack] = hlostats.summarize(jax.jit(program).lower(*args).compile().as_text())["slices"]
    assert slices[True]["count"] == 0, slices
    assert slices[False]["count"] >= config.num_layers, slices


def test_products(tmp_path):
    """XLA's product, the kernel's default plan and a candidate (interpreted) on W [D, N] and on W stored
    [N, D], and the LayerNorm prologue against XLA's norm, all equal to the float32 product to bf16
    rounding; the summary names a best plan for each layout."""
    results, text = run("bench_products", tmp_path)
    rows = results["rows"]
    assert [r["status"] for r in rows] == ["ok"] * len(rows), rows
    assert all(r["error"] < 2e-2 for r in rows)
    kernels = [r for r in rows if r["impl"] == "kernel" and not r.get("norm")]
    assert len(kernels) == 2 and kernels[0]["default"] and kernels[0]["plan"] != kernels[1]["plan"]
    nd = [r for r in rows if r["impl"] == "kernel-nd" and not r.get("norm")]  # the [N, D] layout's rows
    assert len(nd) == 2 and nd[0]["default"] and nd[0]["plan"] != nd[1]["plan"]
    assert len(nd[0]["plan"]) == len(skinny_nd.Plan._fields)  # recorded whole: BD, BN, warps, stages, reduce
    assert {r["impl"] for r in rows if r.get("norm")} == {"xla", "kernel", "kernel-nd"}
    best = results["best"][0]
    assert best["best_plan"] is not None and best["nd_best_plan"] is not None
    assert "## Best plan per shape and rows" in text and "[N, D] best µs" in text


def test_backends(tmp_path):
    """On a CPU: XLA's matmul and attention and the Pallas-Triton ones (interpreted) run and equal the
    float32 reference to bf16 rounding; every Mosaic GPU row says why it did not run."""
    results, text = run("bench_backends", tmp_path)
    rows = results["rows"]
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["kind"], r["backend"]) for r in ran} == {
        ("matmul", "xla"),
        ("matmul", "pallas-triton"),
        ("attention", "xla"),
        ("attention", "pallas-triton"),
    }
    assert all(r["err"] < 1e-2 for r in ran), ran
    assert {r.get("pass_") for r in ran if r["kind"] == "attention"} == {"forward", "forward + backward"}
    mosaic = [r for r in rows if r["backend"] == "pallas-mosaic"]
    assert mosaic and all(r["status"] == "n/a" and r["error"] for r in mosaic)
    assert "## Best of each backend" in text and "## What did not run" in text
