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
from retnet_jax.ops import dispatch
from retnet_jax.ops import retention as retention_ops
from retnet_jax.ops.gpu import chunk_retention, split_retention
from retnet_jax.ops.gpu import plan as plan_lib

# Head shapes of the presets (in the order "presets" runs them).
SHAPES = {
    "paper": dict(H=8, K=256, V=512),  # paper-1.3b (and fla-hub's retnet-1.3B)
    "torchscale-xl": dict(H=8, K=256, V=432),  # torchscale v2 xl (value width 3456 = 8·432)
    "fla": dict(H=32, K=128, V=128),  # fla's benchmark heads
    "paper-2.7b": dict(H=10, K=256, V=512),
    "paper-6.7b": dict(H=16, K=256, V=512),
    "k64": dict(H=32, K=64, V=64),
}
TARGET_RATIO = 0.7  # fwd+bwd time against fla's, at every shape and T

_SHAPES = flags.DEFINE_list("shapes", ["fla", "paper"], f"Head shapes to run: {sorted(SHAPES)} or presets.")
_LENGTHS = flags.DEFINE_string("lengths", "2048,4096,8192,16384,32768", "Sequence lengths T.")
_TOKENS = flags.DEFINE_integer("tokens", 65536, "B·T per configuration: B = max(1, tokens // T).")
_BATCH = flags.DEFINE_integer("batch", 0, "B of every configuration, whatever T (0: from --tokens).")
_CHUNKS = flags.DEFINE_string("chunk_sizes", "64,128,256,512", "Chunk sizes C of our chunkwise form.")
_IMPLS = flags.DEFINE_list(
    "impls", ["parallel", "chunkwise", "fused", "fla", "cudnn"], "Implementations to run."
)
_FUSED_CHUNKS = flags.DEFINE_string("fused_chunk_sizes", "64", "Chunk sizes C of the fused kernels.")
_FUSED_PLANS = flags.DEFINE_list(
    "fused_plans",
    ["auto"],
    "Kernel plans of the fused runs: auto (ops.gpu.plan's choice), register, split (a family with its "
    "default tiles), or FAMILY:BKxBVxWARPSxSTAGES (e.g. split:64x64x4x2); a split plan may end in :stored "
    "(the variant that computes each chunk's scores once: split:stored, split:64x64x4x3:stored).",
)
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd (forward + backward).")
_NORMS = flags.DEFINE_list(
    "norms", ["unnormalized"], "Our forms unnormalized (fla's function) and/or normalized (fla: never)."
)
_STATE = flags.DEFINE_enum("state", "none", ["none", "carried"], "Continue a random state and return one.")
_PARALLEL_MAX_GB = flags.DEFINE_float("parallel_max_gb", 48.0, "Skip parallel when its scores exceed this.")
_CHECK_LENGTH = flags.DEFINE_integer("check_length", 1024, "T of the correctness checks (B2).")
_CHECK_PLANS = flags.DEFINE_bool(
    "check_plans", True, "Compile and run the kernel plan of every preset shape against XLA first."
)
_PEER_SHARE = flags.DEFINE_float(
    "peer_share", 0.45, "Share of --time_budget_s the fla worker may use (it autotunes per head shape)."
)


def shape_names() -> list[str]:
    names = []
    for name in _SHAPES.value:
        names += list(SHAPES) if name == "presets" else [name]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise app.UsageError(f"--shapes: unknown {unknown}; expected presets or some of {sorted(SHAPES)}.")
    return list(dict.fromkeys(names))


def configs():
    """Every (T, shape, pass, impl, C, norm) to run, in order: lengths in the order given (so that a budget
    cut skips the last ones), then shapes."""
    out = []
    chunks = bl.int_list(_CHUNKS.value)
    norms = [n == "normalized" for n in _NORMS.value]
    state = _STATE.value == "carried"
    for length in bl.int_list(_LENGTHS.value):
        batch = _BATCH.value or max(1, _TOKENS.value // length)
        for shape in shape_names():
            dims = SHAPES[shape]
            for pass_ in _PASSES.value:
                base = dict(
                    shape=shape, T=length, B=batch, passes=pass_, state=state, normalize=False, **dims
                )
                if "parallel" in _IMPLS.value and not state:
                    out += [dict(base, impl="parallel", C=None, normalize=n) for n in norms]
                if "chunkwise" in _IMPLS.value:
                    out += [
                        dict(base, impl="chunkwise", C=c, normalize=n)
                        for c in chunks
                        if c <= length
                        for n in norms
                    ]
                if "fused" in _IMPLS.value:
                    out += [
                        dict(base, impl="fused", C=c, plan=plan, normalize=n)
                        for c in bl.int_list(_FUSED_CHUNKS.value)
                        for plan in _FUSED_PLANS.value
                        for n in norms
                    ]
                if "fla" in _IMPLS.value:
                    out.append(dict(base, impl="fla", C=64))
                if "cudnn" in _IMPLS.value and not state:
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


def kernel_plan(cfg):
    """The plan of a fused run: dispatch's choice at C, or the family / tiles / variant that --fused_plans
    names (FAMILY[:BKxBVxWARPSxSTAGES][:stored])."""
    spec = cfg.get("plan") or "auto"
    chunk = dispatch.kernel_chunk(cfg["C"])
    if spec == "auto":  # what chunkwise(implementation="pallas") runs (backend="cpu": no Triton probe)
        return dispatch.kernel_plan("bench", "pallas", cfg["K"], cfg["V"], chunk, jnp.bfloat16, backend="cpu")
    family, *options = spec.split(":")
    stored = "stored" in options
    sizes = [o for o in options if o != "stored"]
    if len(sizes) > 1 or any(not o.replace("x", "").isdigit() for o in sizes):
        raise ValueError(
            f"plan {spec}: expected FAMILY[:BKxBVxWARPSxSTAGES][:stored], e.g. split:64x64x4x3:stored"
        )
    tiles = None
    if sizes:
        numbers = bl.int_list(sizes[0].replace("x", ","))
        tiles = (chunk_retention.Tiles if family == "register" else split_retention.Tiles)(*numbers)
    plan = plan_lib.make(
        cfg["K"], cfg["V"], chunk, jnp.bfloat16, family=family, tiles=tiles, stored_scores=stored
    )
    if isinstance(plan, str):
        raise ValueError(f"plan {spec}: {plan}")
    return plan


def jax_function(cfg):
    """(q, k, v, kv) → (o, final kv) for one implementation (kv unused without a carried state)."""
    normalize = cfg.get("normalize", False)
    if cfg["impl"] == "cudnn":
        return lambda q, k, v, kv: (
            jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
            kv,
        )
    log_decay = retention.log_decays(cfg["H"])
    if cfg["impl"] == "parallel":
        return lambda q, k, v, kv: (retention.parallel(q, k, v, log_decay, normalize=normalize), kv)
    plan = kernel_plan(cfg) if cfg["impl"] == "fused" else None

    def chunkwise(q, k, v, kv):
        state = None
        if cfg.get("state"):
            state = retention.RetentionState(kv, jnp.full((q.shape[0],), q.shape[1], jnp.int32))
        if plan is not None:
            o, new = dispatch.fused_chunkwise(q, k, v, log_decay, plan, state, normalize)
        else:
            o, new = retention.chunkwise(
                q, k, v, log_decay, chunk_size=cfg["C"], state=state, normalize=normalize
            )
        return o, new.kv

    return chunkwise


def with_backward(f):
    """(q, k, v, kv, do, dkv) → ((o, kv'), (dq, dk, dv, dkv)): the forward and the gradients."""

    def fwd_bwd(q, k, v, kv, do, dkv):
        out, vjp = jax.vjp(f, q, k, v, kv)
        return out, vjp((do, dkv))

    return fwd_bwd


def run_jax(cfg):
    b, t, h, k, v = cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"]
    keys = jax.random.split(jax.random.key(t + 7 * h), 6)
    q = bl.normal(keys[0], (b, t, h, k), jnp.bfloat16)
    kk = bl.normal(keys[1], (b, t, h, k), jnp.bfloat16, scale=k**-0.5)  # k arrives scaled by K^-1/2
    vv = bl.normal(keys[2], (b, t, h, v), jnp.bfloat16)
    kv = bl.normal(keys[3], (b, h, k, v), jnp.float32)
    f = jax_function(cfg)
    if not cfg.get("state"):  # no state: the function of q, k, v alone
        inner = f
        f = lambda q, k, v, kv: (inner(q, k, v, None)[0], kv)  # noqa: E731
    args = (q, kk, vv, kv)
    if cfg["passes"] == "fwdbwd":
        cotangents = (
            bl.normal(keys[4], (b, t, h, v), jnp.bfloat16),
            bl.normal(keys[5], (b, h, k, v), jnp.float32),
        )
        f, args = with_backward(f), (*args, *cotangents)
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
    deadline = time.monotonic() + payload["budget_s"]

    def retain(q, k, v, h0=None):
        # Inputs [B, T, H, K|V]; fla scales q by `scale` itself: 1.0, since k arrives scaled like ours.
        return chunk_retention(q, k, v, scale=1.0, initial_state=h0, output_final_state=h0 is not None)

    def run_check():
        outputs = {}
        for name, files in payload["checks"].items():
            data = np.load(files["inputs"])
            q, k, v, do = (
                torch.tensor(data[n], device="cuda").to(torch.bfloat16).requires_grad_() for n in "qkvd"
            )
            o = retain(q, k, v)[0]
            o.backward(do.detach())
            grads = dict(o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
            np.savez(files["outputs"], **{n: x.float().cpu().numpy() for n, x in grads.items()})
            outputs[name] = files["outputs"]
        return dict(outputs=outputs)

    check = bl.guarded(run_check)
    results = []
    for cfg in payload["configs"]:
        if time.monotonic() > deadline:
            results.append(dict(status="skipped", error="time budget of the fla worker"))
            continue

        def one(cfg=cfg):
            b, t, h, kd, vd = cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"]
            gen = torch.Generator(device="cuda").manual_seed(t + 7 * h)

            def rand(*shape, scale=1.0, dtype=torch.bfloat16):
                return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)

            q, k, v = rand(b, t, h, kd), rand(b, t, h, kd, scale=kd**-0.5), rand(b, t, h, vd)
            h0 = rand(b, h, kd, vd, dtype=torch.float32) if cfg["state"] else None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if cfg["passes"] == "fwd":
                with torch.no_grad():
                    fn, grads = (lambda: retain(q, k, v, h0)), None
                    fn()
            else:
                leaves = [x.requires_grad_() for x in (q, k, v, h0) if x is not None]
                do = rand(b, t, h, vd)
                dht = rand(b, h, kd, vd, dtype=torch.float32) if h0 is not None else None

                def fn():
                    o, ht = retain(q, k, v, h0)
                    torch.autograd.backward(
                        [o] + ([ht] if ht is not None else []), [do] + ([dht] if ht is not None else [])
                    )

                fn, grads = fn, leaves
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
# The correctness checks: small shapes, float64 reference in NumPy.

# name → (H, K, V): the register kernels' heads and the split kernels' heads (the paper's).
CHECKS = {"H4 K=V=128": (4, 128, 128), "H2 K256 V512": (2, 256, 512)}


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


def check_inputs(tmp: str):
    """Random bf16-representable inputs of each check shape, saved for the fla worker."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    data, files = {}, {}
    for i, (name, (heads, key_dim, value_dim)) in enumerate(CHECKS.items()):
        shapes = dict(q=key_dim, k=key_dim, v=value_dim, d=value_dim)
        scales = dict(q=1.0, k=key_dim**-0.5, v=1.0, d=1.0)
        data[name] = {
            n: (rng.standard_normal((2, _CHECK_LENGTH.value, heads, w)) * scales[n])
            .astype(ml_dtypes.bfloat16)
            .astype(np.float32)
            for n, w in shapes.items()
        }
        files[name] = dict(inputs=f"{tmp}/check_inputs_{i}.npz", outputs=f"{tmp}/fla_outputs_{i}.npz")
        np.savez(files[name]["inputs"], **data[name])
    return data, files


def _plan_fits(dims, spec) -> bool:
    """Whether the forced plan ``spec`` runs heads ``dims`` (H, K, V) at C = 64."""
    return bl.guarded(lambda: dict(ok=kernel_plan(dict(dims, C=64, plan=spec)))).get("ok", False)


def run_check(data, fla_outputs, chunk: int):
    """Relative errors of (o, dq, dk, dv) against the float64 reference, and of ours against fla."""
    names = ("o", "dq", "dk", "dv")
    out = []
    for shape, inputs in data.items():
        heads = CHECKS[shape][0]
        ref = reference(inputs["q"], inputs["k"], inputs["v"], inputs["d"], retention.log_decays(heads))
        args = [jnp.asarray(inputs[n], jnp.bfloat16) for n in "qkvd"]
        results = {}
        dims = dict(H=heads, K=CHECKS[shape][1], V=CHECKS[shape][2])
        impls = [("chunkwise", chunk, None), ("parallel", None, None)]
        if "fused" in _IMPLS.value and jax.default_backend() == "gpu":
            impls.append(("fused", 64, None))
            # The forced plans that fit this shape (e.g. both variants of the split kernels).
            impls += [
                ("fused", 64, spec)
                for spec in _FUSED_PLANS.value
                if spec != "auto" and _plan_fits(dims, spec)
            ]
        for impl, c, spec in impls:
            f = jax_function(dict(dims, impl=impl, C=c, plan=spec))

            def fwd_bwd(q, k, v, do, f=f):
                o, vjp = jax.vjp(lambda q, k, v: f(q, k, v, None)[0], q, k, v)
                return o, vjp(do)

            o, grads = jax.jit(fwd_bwd)(*args)
            results[f"ours {impl}" + (f" C={c}" if c else "") + (f" {spec}" if spec else "")] = [o, *grads]
        against = {name: ref for name in results}
        if fla_outputs and shape in fla_outputs:
            results["fla chunk_retention"] = [fla_outputs[shape][n] for n in names]
            against["fla chunk_retention"] = ref
            results["ours chunkwise vs fla"] = results[f"ours chunkwise C={chunk}"]
            against["ours chunkwise vs fla"] = results["fla chunk_retention"]
        out += [
            dict(
                shape=shape,
                impl=name,
                errors={n: bl.rel_error(x, r) for n, x, r in zip(names, values, against[name], strict=True)},
            )
            for name, values in results.items()
        ]
    return out


# ------------------------------------------------------------------------------------------------------
# The kernel plans: every preset head shape (and the f32 CPU presets) compiled and run on this device.

# name → (H, K, V, dtype): the benchmark's shapes in bf16, the tiny and small presets in float32 (the small
# preset's forced "pallas" used to exceed shared memory).
PLAN_SHAPES = {
    **{name: (d["H"], d["K"], d["V"], "bfloat16") for name, d in SHAPES.items()},
    "small f32": (4, 64, 128, "float32"),
    "tiny f32": (2, 32, 64, "float32"),
    "fla f32": (4, 128, 128, "float32"),
}


def check_plan(name: str):
    """chunkwise(implementation="pallas") against the XLA form on one shape: a carried state in and out,
    normalized, T = 300 (not a multiple of C); relative errors of o, the final state and the gradients."""
    heads, key_dim, value_dim, dtype = PLAN_SHAPES[name]
    plan = dispatch.kernel_plan("bench", "pallas", key_dim, value_dim, 64, dtype, backend="cpu")
    keys = jax.random.split(jax.random.key(1), 5)
    q = bl.normal(keys[0], (1, 300, heads, key_dim), dtype)
    k = bl.normal(keys[1], (1, 300, heads, key_dim), dtype, scale=key_dim**-0.5)
    v = bl.normal(keys[2], (1, 300, heads, value_dim), dtype)
    kv = bl.normal(keys[3], (1, heads, key_dim, value_dim), jnp.float32)
    do = bl.normal(keys[4], v.shape, jnp.float32)
    log_decay = retention.log_decays(heads)

    def loss(impl):
        def f(q, k, v, kv):
            state = retention.RetentionState(kv, jnp.array([7], jnp.int32))
            o, new = retention.chunkwise(q, k, v, log_decay, chunk_size=64, state=state, implementation=impl)
            return jnp.vdot(o.astype(jnp.float32), do) + jnp.sum(new.kv), (o, new.kv)

        return jax.jit(jax.value_and_grad(f, range(4), has_aux=True))(q, k, v, kv)

    (_, ours), grads = loss("pallas")
    (_, xla), expected = loss("xla")
    names = ("o", "state", "dq", "dk", "dv", "dstate")
    errors = {
        n: bl.rel_error(a, b) for n, a, b in zip(names, (*ours, *grads), (*xla, *expected), strict=True)
    }
    sizes = plan_lib.shared_memory(plan, key_dim, value_dim, dtype)
    return dict(plan=f"{plan.family} {tuple(plan.tiles)}", smem_kib=max(sizes.values()) / 1024, errors=errors)


def check_plans():
    if "fused" not in _IMPLS.value:
        return []
    # The interpreter is slow: off the GPU only the small shapes.
    names = list(PLAN_SHAPES) if jax.default_backend() == "gpu" else ["tiny f32"]
    out = []
    for name in names:
        print(f"plan check {name} ...", flush=True)
        out.append(
            dict(shape=name, dtype=PLAN_SHAPES[name][3], **bl.guarded(lambda name=name: check_plan(name)))
        )
    return out


def plans_markdown(plans) -> str:
    columns = [
        ("shape", lambda r: r["shape"]),
        ("dtype", lambda r: r["dtype"]),
        ("plan (family, tiles)", bl.when_ok(lambda r: r["plan"])),
        ("est. shared KiB", bl.when_ok(lambda r: f"{r['smem_kib']:.0f}")),
    ] + [
        (f"rel err {n}", bl.when_ok(lambda r, n=n: bl.fmt(r["errors"][n], 1, ".1e")))
        for n in ("o", "state", "dq", "dk", "dv", "dstate")
    ]
    return bl.markdown_table(plans, columns) if plans else "Not run (fused not requested)."


# ------------------------------------------------------------------------------------------------------
# The run.


def impl_label(r) -> str:
    label = r["impl"] + (f" C={r['C']}" if r["C"] and r["impl"] != "fla" else "")
    if r.get("plan") and r["plan"] != "auto":
        label += f" {r['plan']}"
    elif r["impl"] == "fused" and r.get("family"):
        label += f" {r['family']}"
    if r["impl"] != "fla":
        label += " norm" if r.get("normalize") else ""
    return label + (" +state" if r.get("state") else "")


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


def _key(r):
    return (r["shape"], r["T"], r["B"], r["passes"])


def derive(rows, device, ceilings):
    """Adds achieved FLOP/s, % of peaks and the ratio to fla's time at the same shape, T, B and pass."""
    fla = {_key(r): r["timing"]["median_s"] for r in rows if r["impl"] == "fla" and r.get("status") == "ok"}
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
        base = fla.get(_key(r))
        r["vs_fla"] = seconds / base if base else None


def targets(rows) -> str:
    """Per shape and T: the fastest of our fwd+bwd rows against fla (unnormalized and normalized)."""
    lines = []
    for key in dict.fromkeys(_key(r) for r in rows if r["passes"] == "fwdbwd"):
        cells = []
        for normalize in (False, True):
            ours = [
                r
                for r in rows
                if _key(r) == key
                and r["impl"] in ("chunkwise", "parallel", "fused")
                and bool(r.get("normalize")) == normalize
                and r.get("vs_fla")
            ]
            if ours:
                best = min(ours, key=lambda r: r["timing"]["median_s"])
                verdict = "met" if best["vs_fla"] <= TARGET_RATIO else "NOT met"
                cells.append(f"{impl_label(best)}: {best['vs_fla']:.2f}× ({verdict})")
            else:
                cells.append("–")
        dims = SHAPES[key[0]]
        lines.append(
            f"| {key[0]} | {dims['H']}/{dims['K']}/{dims['V']} | {key[2]} | {key[1]} | "
            + " | ".join(cells)
            + " |"
        )
    if not lines:
        return "No fwd+bwd rows with fla beside them in this run."
    head = "| shape | H/K/V | B | T | unnormalized: best ours / fla | normalized: best ours / fla |"
    return "\n".join([head, "|---|---|---|---|---|---|", *lines])


def plot(rows, path):
    shapes = [s for s in shape_names() if any(r["shape"] == s for r in rows)]
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
            size = f"B = {_BATCH.value}" if _BATCH.value else f"B·T = {_TOKENS.value}"
            title = f"{shape}: H{dims['H']} K{dims['K']} V{dims['V']}, {pass_}, {size}"
            ax.set(yscale="log", xlabel="T", ylabel="ms per call", title=title)
            bl.log2_xaxis(ax, [r["T"] for r in sel] or [1])
            ax.legend(fontsize=7)
    bl.save_figure(fig, path)


def measure_fla(fla_configs, files, budget):
    """fla's timings and check outputs, from a PyTorch worker process (before JAX takes the GPU)."""
    if "fla" not in _IMPLS.value:
        return dict(status="ok", available=False, reason="not requested")
    if not all(importlib.util.find_spec(m) for m in ("torch", "fla")):
        return dict(status="ok", available=False, reason="torch or fla not installed")
    print(f"fla worker: {len(fla_configs)} configurations ...", flush=True)
    share = _PEER_SHARE.value * budget.left()
    payload = dict(kind="fla", configs=fla_configs, checks=files, budget_s=share)
    # The worker stops starting configurations after its share; the margin lets a started one finish.
    fla = bl.run_worker("experiments.bench_retention", payload, share + 90, [f"--repeats={bl.REPEATS.value}"])
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
    data, files = check_inputs(tmp)
    fla = measure_fla([c for c in todo if c["impl"] == "fla"], files, budget)
    fla_ok = fla.get("status") == "ok" and fla.get("available")
    fla_results = iter(fla["results"]) if fla_ok else None
    fla_missing = dict(status="n/a" if fla.get("status") == "ok" else fla.get("status"))
    fla_missing["error"] = fla.get("reason") or fla.get("error")

    device = bl.device_info()
    ceilings = bl.measure_ceilings()
    report = bl.Report("bench_retention", device["short"])
    fla_outputs = None
    if fla_ok and fla["check"]["status"] == "ok":
        fla_outputs = {name: dict(np.load(path)) for name, path in fla["check"]["outputs"].items()}
    check = run_check(data, fla_outputs, bl.int_list(_CHUNKS.value)[0])
    plans = check_plans() if _CHECK_PLANS.value else {}

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
        elif cfg["impl"] == "parallel" and parallel_bytes(cfg) > _PARALLEL_MAX_GB.value * 1e9:
            result = dict(status="skipped", error=f"scores ≈ {parallel_bytes(cfg) / 1e9:.0f} GB")
        elif budget.exhausted():
            result = dict(status="skipped", error="time budget")
        else:
            print(f"{label} ...", flush=True)
            result = bl.guarded(lambda cfg=cfg: run_jax(cfg))
        rows.append({**cfg, **result})
        derive(rows, device, ceilings)
        write(report, rows, device, ceilings, check, fla, plans)
    text = write(report, rows, device, ceilings, check, fla, plans)
    if bl.PLOTS.value:
        bl.guarded(lambda: plot(rows, report.png))
    print(text)
    print("Wrote", *report.paths())


def write(report, rows, device, ceilings, check, fla, plans):
    check_rows = bl.markdown_table(
        check,
        [("shape", lambda r: r["shape"]), ("impl", lambda r: r["impl"])]
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
        peers
        + f". Our forms: {', '.join(_NORMS.value)}; state {_STATE.value}; bf16 inputs, float32 accumulation.",
        f"## Correctness (B2 T{_CHECK_LENGTH.value}, bf16 inputs, unnormalized, vs a float64 reference)\n\n"
        + check_rows,
        "## Kernel plans (chunkwise pallas vs xla, B1 T300 C64, state in and out, normalized)\n\n"
        + plans_markdown(plans),
        "## Timings\n\n" + bl.markdown_table(rows, COLUMNS),
        f"## Targets (fwd+bwd ≤ {TARGET_RATIO}× fla)\n\n" + targets(rows),
    ]
    raw = dict(
        device=device,
        ceilings=ceilings,
        check=check,
        plans=plans,
        fla=dict((k, v) for k, v in fla.items() if k != "results"),
        rows=rows,
    )
    return report.write("Retention op benchmark", sections, raw)


if __name__ == "__main__":
    app.run(main)
