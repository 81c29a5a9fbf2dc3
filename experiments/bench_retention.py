"""Retention alone, forward and forward + backward, bf16: our parallel and chunkwise forms against fla's
``chunk_retention`` (PyTorch/Triton) and cuDNN flash attention (``jax.nn.dot_product_attention``).

    python -m experiments.bench_retention --shapes=fla        # H32 K=V=128, T 2K..32K (~4 min on an H100)
    python -m experiments.bench_retention --shapes=paper      # H8 K256 V512, the paper's heads (~4 min)
    python -m experiments.bench_retention --shapes=fla --lengths=8192 --passes=fwdbwd   # the target row
    python -m experiments.bench_retention --shapes=fla --lengths=128,256 --tokens=512 \
        --chunk_sizes=32,64 --check_length=128 --repeats=3    # CPU smoke run (a minute)

Shapes: ``fla`` is fla's benchmark shape (H32, K=V=128); ``paper`` the paper's heads (H8, K256, V512,
i.e. D = 2048). B = max(1, tokens / T) keeps B·T constant (``--tokens=65536``: B8 at T8192, exactly).
Our forms run unnormalized (``--normalize=false``), the function fla computes; cuDNN runs causal softmax
attention at the same B, T and model width with 128-wide heads (H·K = H'·128, the Transformer baseline's
heads), since it needs K = V. Parallel runs only where its T×T scores fit (``--parallel_max_gb``).

TFLOP/s counts the matrix products of each form (forward; fwd+bwd = 3× forward), one count per form
whatever the implementation: chunkwise with chunk C (fla: C = 64) 2·B·H·T·(C·(K+V) + 2·K·V), parallel
2·B·H·T²·(K+V), cuDNN causal 2·B·H'·T²·K (half the T×T products); "% matmul" and "% datasheet" set it
against the measured bf16 matmul rate and the datasheet peak. "XLA-counted TFLOP/s" (our programs) uses
the FLOPs XLA's cost analysis finds in the compiled program instead: all it executes, elementwise work
and extra products (a matrix-form state carry) included, a loop body counted once.

Memory: XLA's ``memory_analysis`` of each program (inputs, outputs, temporaries); for fla,
``torch.cuda.max_memory_allocated``. Before timing, one small shape checks ours and fla against a float64
reference (outputs and gradients; relative error ‖x − ref‖ / ‖ref‖).

Target: fwd+bwd at B8 T8192 H32 K=V=128 bf16 in ≤ 0.7× fla's time (the report's last line says).
"""

from __future__ import annotations

import importlib.util
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchlib as bl
from retnet_jax import retention
from retnet_jax.ops import retention as retention_ops
from retnet_jax.ops.gpu import chunk_retention as fused_retention

SHAPES = {"fla": dict(H=32, K=128, V=128), "paper": dict(H=8, K=256, V=512)}
TARGET = dict(shape="fla", B=8, T=8192, passes="fwdbwd", ratio=0.7)

_SHAPES = flags.DEFINE_list("shapes", ["fla", "paper"], f"Head shapes to run: {sorted(SHAPES)}.")
_LENGTHS = flags.DEFINE_string("lengths", "2048,4096,8192,16384,32768", "Sequence lengths T.")
_TOKENS = flags.DEFINE_integer("tokens", 65536, "B·T per configuration: B = max(1, tokens // T).")
_CHUNKS = flags.DEFINE_string("chunk_sizes", "64,128,256,512", "Chunk sizes C of our chunkwise form.")
_IMPLS = flags.DEFINE_list(
    "impls", ["parallel", "chunkwise", "fused", "fla", "cudnn"], "Implementations to run."
)
_FUSED_CHUNKS = flags.DEFINE_string("fused_chunk_sizes", "64,128", "Chunk sizes C of the fused kernels.")
_FUSED_TILES = flags.DEFINE_list(
    "fused_tiles",
    [],
    "Tilings of the fused kernels to compare, each BKxBVxWARPSxSTAGES (e.g. 128x64x4x2); "
    "none: fused_retention.default_tiles.",
)
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd (forward + backward).")
_NORMALIZE = flags.DEFINE_bool("normalize", False, "Time our normalized retention instead (fla: never).")
_PARALLEL_MAX_GB = flags.DEFINE_float("parallel_max_gb", 48.0, "Skip parallel when its scores exceed this.")
_CHECK_LENGTH = flags.DEFINE_integer("check_length", 1024, "T of the correctness check (B2, H4, K=V=128).")
_PEER_TIMEOUT_S = flags.DEFINE_float("peer_timeout_s", 240.0, "Time limit of the fla worker process.")


def configs():
    """Every (shape, T, B, impl, C, pass) to run, in order."""
    out = []
    chunks = bl.int_list(_CHUNKS.value)
    for shape in _SHAPES.value:
        dims = SHAPES[shape]
        for length in bl.int_list(_LENGTHS.value):
            batch = max(1, _TOKENS.value // length)
            for pass_ in _PASSES.value:
                base = dict(shape=shape, T=length, B=batch, passes=pass_, **dims)
                if "parallel" in _IMPLS.value:
                    out.append(dict(base, impl="parallel", C=None))
                if "chunkwise" in _IMPLS.value:
                    out += [dict(base, impl="chunkwise", C=c) for c in chunks if c <= length]
                if "fused" in _IMPLS.value:
                    out += [
                        dict(base, impl="fused", C=c, tiles=tiles)
                        for c in bl.int_list(_FUSED_CHUNKS.value)
                        if c <= length
                        for tiles in (_FUSED_TILES.value or [None])
                    ]
                if "fla" in _IMPLS.value:
                    out.append(dict(base, impl="fla", C=64))
                if "cudnn" in _IMPLS.value:
                    width = dims["H"] * dims["K"]
                    out.append(dict(base, impl="cudnn", C=None, H=width // 128, K=128, V=128))
    return out


def form_flops(cfg) -> float:
    """The matrix-product FLOPs of one call of the form (see the module docstring)."""
    b, t, h, k, v = cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"]
    if cfg["impl"] == "cudnn":
        forward = 2.0 * b * h * t * t * k  # causal: half of 2·(2·B·H·T²·K)
    else:
        forward = retention_ops.forward_flops(t, h, k, v, cfg["C"]) * b * t
    return forward * (3 if cfg["passes"] == "fwdbwd" else 1)


def parallel_bytes(cfg) -> float:
    # An estimate: per T×T entry the forward holds raw bf16 scores, float32 decayed weights and their bf16
    # copy (8 bytes); the backward about as much again.
    per_entry = 8 if cfg["passes"] == "fwd" else 16
    return float(per_entry * cfg["B"] * cfg["H"] * cfg["T"] ** 2)


# ------------------------------------------------------------------------------------------------------
# Our forms and cuDNN (this process).


def jax_function(cfg, normalize: bool):
    """(q, k, v) → o for one implementation."""
    if cfg["impl"] == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    log_decay = retention.log_decays(cfg["H"])
    if cfg["impl"] == "parallel":
        return lambda q, k, v: retention.parallel(q, k, v, log_decay, normalize=normalize)
    if cfg["impl"] == "fused" and cfg.get("tiles"):
        tiles = fused_retention.Tiles(*bl.int_list(cfg["tiles"].replace("x", ",")))
        return lambda q, k, v: fused_retention.fused_chunk_retention(
            q, k, v, log_decay, chunk_size=cfg["C"], tiles=tiles
        )
    implementation = "pallas" if cfg["impl"] == "fused" else "xla"

    def chunkwise(q, k, v):
        return retention.chunkwise(
            q, k, v, log_decay, chunk_size=cfg["C"], normalize=normalize, implementation=implementation
        )[0]

    return chunkwise


def with_backward(f):
    """(q, k, v, do) → (o, (dq, dk, dv)): the forward and the gradients for cotangent do."""

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    return fwd_bwd


def run_jax(cfg):
    b, t, h, k, v = cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"]
    keys = jax.random.split(jax.random.key(t + 7 * h), 4)
    q = bl.normal(keys[0], (b, t, h, k), jnp.bfloat16)
    kk = bl.normal(keys[1], (b, t, h, k), jnp.bfloat16, scale=k**-0.5)  # k arrives scaled by K^-1/2
    vv = bl.normal(keys[2], (b, t, h, v), jnp.bfloat16)
    f = jax_function(cfg, _NORMALIZE.value)
    args = (q, kk, vv)
    if cfg["passes"] == "fwdbwd":
        f, args = with_backward(f), (*args, bl.normal(keys[3], (b, t, h, v), jnp.bfloat16))
    compiled, compile_s, memory = bl.compile_timed(f, *args)
    timing = bl.time_calls(lambda: compiled(*args))
    return dict(
        compile_s=compile_s, memory=memory, xla_flops=bl.program_flops(compiled), timing=timing.to_dict()
    )


# ------------------------------------------------------------------------------------------------------
# fla (a PyTorch worker process, run before this process's JAX touches the GPU).


def fla_worker(payload):
    import torch

    if not torch.cuda.is_available():
        return dict(available=False, reason="no CUDA device for PyTorch")
    try:
        from fla.ops.retention import chunk_retention
    except ImportError as error:
        return dict(available=False, reason=f"fla not importable: {error}")

    def retain(q, k, v):
        # Inputs [B, T, H, K|V]; fla scales q by `scale` itself: 1.0, since k arrives scaled like ours.
        return chunk_retention(q, k, v, scale=1.0)[0]

    def run_check():
        check = payload["check"]
        data = np.load(check["inputs"])
        q, k, v, do = (
            torch.tensor(data[n], device="cuda").to(torch.bfloat16).requires_grad_() for n in "qkvd"
        )
        o = retain(q, k, v)
        o.backward(do.detach())
        grads = dict(o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
        np.savez(check["outputs"], **{n: x.float().cpu().numpy() for n, x in grads.items()})
        return {}

    check = bl.guarded(run_check)
    results = []
    for cfg in payload["configs"]:

        def one(cfg=cfg):
            b, t, h, kd, vd = cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"]
            gen = torch.Generator(device="cuda").manual_seed(t + 7 * h)

            def rand(*shape, scale=1.0):
                return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

            q, k, v = rand(b, t, h, kd), rand(b, t, h, kd, scale=kd**-0.5), rand(b, t, h, vd)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if cfg["passes"] == "fwd":
                with torch.no_grad():
                    fn, grads = (lambda: retain(q, k, v)), None
                    fn()
            else:
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                do = rand(b, t, h, vd)
                fn, grads = (lambda: retain(q, k, v).backward(do)), [q, k, v]
                fn()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start  # Triton compilation and autotuning
            memory = dict(bytes=int(torch.cuda.max_memory_allocated()))  # before do_bench's cache buffer
            if cfg["passes"] == "fwd":
                with torch.no_grad():
                    timing = bl.time_torch(fn)
            else:
                timing = bl.time_torch(fn, grad_to_none=grads)
            return dict(compile_s=first_s, memory=memory, timing=timing.to_dict())

        results.append(bl.guarded(one))
        torch.cuda.empty_cache()
    return dict(available=True, device=torch.cuda.get_device_name(), check=check, results=results)


# ------------------------------------------------------------------------------------------------------
# The correctness check: one small shape, float64 reference in NumPy.


def reference(q, k, v, do, log_decay):
    """Unnormalized retention and its gradients in float64: (o, dq, dk, dv), inputs [B, T, H, K|V]."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    n = np.arange(q.shape[1])
    rel = n[:, None] - n[None, :]
    decay = np.where(
        rel >= 0, np.exp(np.maximum(rel, 0) * np.asarray(log_decay, np.float64)[:, None, None]), 0
    )
    p = np.einsum("BTHK,BSHK->BHTS", q, k) * decay  # [B, H, T, S]
    o = np.einsum("BHTS,BSHV->BTHV", p, v)
    dp = np.einsum("BTHV,BSHV->BHTS", do, v) * decay
    return (
        o,
        np.einsum("BHTS,BSHK->BTHK", dp, k),
        np.einsum("BHTS,BTHK->BSHK", dp, q),
        np.einsum("BHTS,BTHV->BSHV", p, do),
    )


def check_inputs(path: str):
    """Random bf16-representable inputs of the check shape, saved for the fla worker."""
    import ml_dtypes

    shape = (2, _CHECK_LENGTH.value, 4, 128)
    rng = np.random.default_rng(0)
    scales = dict(q=1.0, k=128**-0.5, v=1.0, d=1.0)
    data = {
        n: (rng.standard_normal(shape) * s).astype(ml_dtypes.bfloat16).astype(np.float32)
        for n, s in scales.items()
    }
    np.savez(path, **data)
    return data


def run_check(data, fla_outputs, chunk: int):
    """Relative errors of (o, dq, dk, dv) against the float64 reference, and of ours against fla."""
    names = ("o", "dq", "dk", "dv")
    ref = reference(data["q"], data["k"], data["v"], data["d"], retention.log_decays(4))
    inputs = [jnp.asarray(data[n], jnp.bfloat16) for n in "qkvd"]
    results = {}
    impls = [("chunkwise", chunk), ("parallel", None)]
    if "fused" in _IMPLS.value and jax.default_backend() == "gpu":
        impls.append(("fused", 64))
    for impl, c in impls:
        o, grads = jax.jit(with_backward(jax_function(dict(impl=impl, H=4, C=c), normalize=False)))(*inputs)
        results[f"ours {impl}" + (f" C={c}" if c else "")] = [o, *grads]
    against = {name: ref for name in results}
    if fla_outputs is not None:
        results["fla chunk_retention"] = [fla_outputs[n] for n in names]
        against["fla chunk_retention"] = ref
        results["ours chunkwise vs fla"] = results[f"ours chunkwise C={chunk}"]
        against["ours chunkwise vs fla"] = results["fla chunk_retention"]
    return [
        dict(
            impl=name,
            errors={n: bl.rel_error(x, r) for n, x, r in zip(names, values, against[name], strict=True)},
        )
        for name, values in results.items()
    ]


# ------------------------------------------------------------------------------------------------------
# The run.


def impl_label(r) -> str:
    label = r["impl"] + (f" C={r['C']}" if r["C"] and r["impl"] != "fla" else "")
    return label + (f" {r['tiles']}" if r.get("tiles") else "")


COLUMNS = [
    ("shape", lambda r: r["shape"]),
    ("B", lambda r: str(r["B"])),
    ("T", lambda r: str(r["T"])),
    ("H/K/V", lambda r: f"{r['H']}/{r['K']}/{r['V']}"),
    ("impl", lambda r: impl_label(r)),
    ("pass", lambda r: r["passes"]),
    ("ms", bl.when_ok(lambda r: bl.fmt(r.get("timing", {}).get("median_s"), 1e3, ".3f"))),
    ("iqr%", bl.when_ok(lambda r: bl.fmt(r.get("timing", {}).get("iqr_pct"), 1, ".1f"))),
    ("× fla", bl.when_ok(lambda r: bl.fmt(r.get("vs_fla"), 1, ".2f"))),
    ("TFLOP/s", bl.when_ok(lambda r: bl.fmt(r.get("flops_per_s"), 1e-12, ".3g"))),
    ("% matmul", bl.when_ok(lambda r: bl.fmt(r.get("pct_measured"), 1, ".1f"))),
    ("% datasheet", bl.when_ok(lambda r: bl.fmt(r.get("pct_datasheet"), 1, ".1f"))),
    ("XLA-counted TFLOP/s", bl.when_ok(lambda r: bl.fmt(r.get("xla_flops_per_s"), 1e-12, ".3g"))),
    ("mem GB", bl.when_ok(lambda r: bl.fmt((r.get("memory") or {}).get("bytes"), 1e-9, ".2f"))),
    ("compile s", bl.when_ok(lambda r: bl.fmt(r.get("compile_s"), 1, ".1f"))),
]


def derive(rows, device, ceilings):
    """Adds achieved FLOP/s, % of peaks and the ratio to fla's time at the same shape, T, B and pass."""
    fla = {
        (r["shape"], r["T"], r["B"], r["passes"]): r["timing"]["median_s"]
        for r in rows
        if r["impl"] == "fla" and r.get("status") == "ok"
    }
    for r in rows:
        if r.get("status") != "ok":
            continue
        seconds = r["timing"]["median_s"]
        r["flops"] = form_flops(r)
        r["flops_per_s"] = r["flops"] / seconds
        r["pct_measured"] = 100 * r["flops_per_s"] / ceilings["matmul_flops"]
        r["xla_flops_per_s"] = r["xla_flops"] / seconds if r.get("xla_flops") else None
        if device["datasheet_flops"]:
            r["pct_datasheet"] = 100 * r["flops_per_s"] / device["datasheet_flops"]
        base = fla.get((r["shape"], r["T"], r["B"], r["passes"]))
        r["vs_fla"] = seconds / base if base else None


def target_line(rows) -> str:
    at = {k: TARGET[k] for k in ("shape", "B", "T", "passes")}
    match = [r for r in rows if r.get("status") == "ok" and all(r[k] == v for k, v in at.items())]
    ours = [r for r in match if r["impl"] in ("chunkwise", "parallel", "fused") and r.get("vs_fla")]
    head = f"Target (fwd+bwd, B8 T8192 H32 K=V=128 ≤ {TARGET['ratio']}× fla)"
    if not ours:
        return f"{head}: not measured in this run."
    best = min(ours, key=lambda r: r["timing"]["median_s"])
    verdict = "met" if best["vs_fla"] <= TARGET["ratio"] else "NOT met"
    return (
        f"{head}: best ours = {impl_label(best)} at {best['timing']['median_s'] * 1e3:.3f} ms "
        f"= {best['vs_fla']:.2f}× fla — {verdict}."
    )


def plot(rows, path):
    shapes = [s for s in _SHAPES.value if any(r["shape"] == s for r in rows)]
    fig, axes = bl.figure(max(1, len(shapes)), len(_PASSES.value))
    for i, shape in enumerate(shapes):
        for j, pass_ in enumerate(_PASSES.value):
            ax = axes[i][j]
            sel = [
                r for r in rows if r["shape"] == shape and r["passes"] == pass_ and r.get("status") == "ok"
            ]
            for label in dict.fromkeys(impl_label(r) for r in sel):
                pts = sorted((r["T"], r["timing"]["median_s"] * 1e3) for r in sel if impl_label(r) == label)
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            dims = SHAPES[shape]
            title = f"{shape}: H{dims['H']} K{dims['K']} V{dims['V']}, {pass_}, B·T = {_TOKENS.value}"
            ax.set(yscale="log", xlabel="T", ylabel="ms per call", title=title)
            bl.log2_xaxis(ax, [r["T"] for r in sel] or [1])
            ax.legend(fontsize=7)
    bl.save_figure(fig, path)


def measure_fla(fla_configs, tmp, budget):
    """fla's timings and check outputs, from a PyTorch worker process (before JAX takes the GPU)."""
    if "fla" not in _IMPLS.value:
        return dict(status="ok", available=False, reason="not requested")
    if not all(importlib.util.find_spec(m) for m in ("torch", "fla")):
        return dict(status="ok", available=False, reason="torch or fla not installed")
    print(f"fla worker: {len(fla_configs)} configurations ...", flush=True)
    check = dict(inputs=f"{tmp}/check_inputs.npz", outputs=f"{tmp}/fla_outputs.npz")
    payload = dict(kind="fla", configs=fla_configs, check=check)
    timeout = min(_PEER_TIMEOUT_S.value, budget.left())
    fla = bl.run_worker("experiments.bench_retention", payload, timeout, [f"--repeats={bl.REPEATS.value}"])
    if fla.get("status") != "ok" or not fla.get("available"):
        print(
            f"fla: not measured ({fla.get('reason') or fla.get('error')})\n{fla.get('log', '')}", flush=True
        )
    return fla


def main(argv):
    del argv
    if bl.maybe_run_worker({"fla": fla_worker}):
        return
    budget = bl.Budget()
    todo = configs()
    tmp = tempfile.mkdtemp(prefix="bench_retention_")
    data = check_inputs(f"{tmp}/check_inputs.npz")
    fla = measure_fla([c for c in todo if c["impl"] == "fla"], tmp, budget)
    fla_ok = fla.get("status") == "ok" and fla.get("available")
    fla_results = iter(fla["results"]) if fla_ok else None
    fla_missing = dict(status="n/a" if fla.get("status") == "ok" else fla.get("status"))
    fla_missing["error"] = fla.get("reason") or fla.get("error")

    device = bl.device_info()
    ceilings = bl.measure_ceilings()
    report = bl.Report("bench_retention", device["short"])
    fla_checked = fla_ok and fla["check"]["status"] == "ok"
    fla_outputs = dict(np.load(f"{tmp}/fla_outputs.npz")) if fla_checked else None
    check = run_check(data, fla_outputs, bl.int_list(_CHUNKS.value)[0])

    rows = []
    for cfg in todo:
        label = f"{cfg['shape']} B{cfg['B']} T{cfg['T']} {cfg['impl']} C={cfg['C']} {cfg['passes']}"
        if cfg["impl"] == "fla":
            result = next(fla_results) if fla_ok else fla_missing
        elif cfg["impl"] == "cudnn" and device["platform"] != "gpu":
            result = dict(status="n/a", error="cuDNN needs a GPU")
        elif cfg["impl"] == "parallel" and parallel_bytes(cfg) > _PARALLEL_MAX_GB.value * 1e9:
            result = dict(status="skipped", error=f"scores ≈ {parallel_bytes(cfg) / 1e9:.0f} GB")
        elif budget.exhausted():
            result = dict(status="skipped", error="time budget")
        else:
            print(f"{label} ...", flush=True)
            result = bl.guarded(lambda cfg=cfg: run_jax(cfg))
        rows.append({**cfg, **result})
        derive(rows, device, ceilings)
        write(report, rows, device, ceilings, check, fla)
    text = write(report, rows, device, ceilings, check, fla)
    if bl.PLOTS.value:
        bl.guarded(lambda: plot(rows, report.png))
    print(text)
    print("Wrote", *report.paths())


def write(report, rows, device, ceilings, check, fla):
    check_rows = bl.markdown_table(
        check,
        [("impl", lambda r: r["impl"])]
        + [
            (f"rel err {n}", lambda r, n=n: bl.fmt(r["errors"][n], 1, ".2e")) for n in ("o", "dq", "dk", "dv")
        ],
    )
    peers = "fla: " + (
        f"measured on {fla.get('device')}"
        if fla.get("available")
        else f"not measured ({fla.get('reason') or fla.get('error')})"
    )
    sections = [
        bl.ceilings_markdown(device, ceilings),
        peers + f". Our forms: normalize={_NORMALIZE.value}; bf16 inputs, float32 accumulation.",
        f"## Correctness (B2 T{_CHECK_LENGTH.value} H4 K=V=128, bf16 inputs, vs a float64 reference)\n\n"
        + check_rows,
        "## Timings\n\n" + bl.markdown_table(rows, COLUMNS),
        target_line(rows),
    ]
    raw = dict(
        device=device,
        ceilings=ceilings,
        check=check,
        fla=dict((k, v) for k, v in fla.items() if k != "results"),
        rows=rows,
    )
    return report.write("Retention op benchmark", sections, raw)


if __name__ == "__main__":
    app.run(main)
