"""What ``bench_retention`` runs: the preset head shapes, its flags, every configuration in the order run,
and what each costs (the matrix-product FLOPs of its form, the parallel form's scores)."""

from __future__ import annotations

from absl import app, flags

from experiments import benchlib as bl
from retnet_jax.ops import retention as retention_ops

# Head shapes of the presets (in the order "presets" runs them).
SHAPES = {
    "paper": dict(H=8, K=256, V=512),  # paper-1.3b (and fla-hub's retnet-1.3B)
    "torchscale-xl": dict(H=8, K=256, V=432),  # torchscale v2 xl (value width 3456 = 8·432)
    "fla": dict(H=32, K=128, V=128),  # fla's benchmark heads
    "paper-2.7b": dict(H=10, K=256, V=512),
    "paper-6.7b": dict(H=16, K=256, V=512),
    "k64": dict(H=32, K=64, V=64),
    "k64v128": dict(H=32, K=64, V=128),  # paper-1.3b's width in 32 heads
}

RUN_SHAPES = flags.DEFINE_list(
    "shapes", ["fla", "paper"], f"Head shapes to run: {sorted(SHAPES)} or presets."
)
LENGTHS = flags.DEFINE_string("lengths", "2048,4096,8192,16384,32768", "Sequence lengths T.")
TOKENS = flags.DEFINE_integer("tokens", 65536, "B·T per configuration: B = max(1, tokens // T).")
BATCH = flags.DEFINE_integer("batch", 0, "B of every configuration, whatever T (0: from --tokens).")
CHUNKS = flags.DEFINE_string("chunk_sizes", "64,128,256,512", "Chunk sizes C of our chunkwise form.")
IMPLS = flags.DEFINE_list(
    "impls", ["parallel", "chunkwise", "fused", "fla", "cudnn"], "Implementations to run."
)
FUSED_CHUNKS = flags.DEFINE_string("fused_chunk_sizes", "64", "Chunk sizes C of the fused kernels.")
FUSED_PLANS = flags.DEFINE_list(
    "fused_plans",
    ["auto"],
    "Kernel plans of the fused runs: auto (what chunkwise(implementation='auto') runs at this C, by the "
    "heads and B·H), register, split (a family with its default tiles), or FAMILY:BKxBVxWARPSxSTAGES "
    "(e.g. split:64x64x4x2, register:64x64x4x3x2); a split plan may end in :stored "
    "(the variant that computes each chunk's scores once: split:stored, split:64x64x4x3:stored).",
)
PASSES = flags.DEFINE_list("passes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd (forward + backward).")
NORMS = flags.DEFINE_list(
    "norms", ["unnormalized"], "Our forms unnormalized (fla's function) and/or normalized (fla: never)."
)
STATE = flags.DEFINE_enum("state", "none", ["none", "carried"], "Continue a random state and return one.")
PARALLEL_MAX_GB = flags.DEFINE_float("parallel_max_gb", 48.0, "Skip parallel when its scores exceed this.")
CHECK_LENGTH = flags.DEFINE_integer("check_length", 1024, "T of the correctness checks (B2).")
CHECK_PLANS = flags.DEFINE_bool(
    "check_plans", True, "Compile and run the kernel plan of every preset shape against XLA first."
)
PROFILE_TOP = flags.DEFINE_integer(
    "profile_top",
    0,
    "Trace each configuration again (fla's with torch.profiler) and list its N longest kernels (0: none).",
)
PEER_SHARE = flags.DEFINE_float(
    "peer_share", 0.45, "Share of --time_budget_s the fla worker may use (it autotunes per head shape)."
)


def shape_names() -> list[str]:
    names = []
    for name in RUN_SHAPES.value:
        names += list(SHAPES) if name == "presets" else [name]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise app.UsageError(f"--shapes: unknown {unknown}; expected presets or some of {sorted(SHAPES)}.")
    return list(dict.fromkeys(names))


def configs():
    """Every (T, shape, pass, impl, C, norm) to run, in order: lengths in the order given (so that a budget
    cut skips the last ones), then shapes."""
    out = []
    chunks = bl.int_list(CHUNKS.value)
    norms = [n == "normalized" for n in NORMS.value]
    state = STATE.value == "carried"
    for length in bl.int_list(LENGTHS.value):
        batch = BATCH.value or max(1, TOKENS.value // length)
        for shape in shape_names():
            dims = SHAPES[shape]
            for pass_ in PASSES.value:
                base = dict(
                    shape=shape, T=length, B=batch, passes=pass_, state=state, normalize=False, **dims
                )
                if "parallel" in IMPLS.value and not state:
                    out += [dict(base, impl="parallel", C=None, normalize=n) for n in norms]
                if "chunkwise" in IMPLS.value:
                    out += [
                        dict(base, impl="chunkwise", C=c, normalize=n)
                        for c in chunks
                        if c <= length
                        for n in norms
                    ]
                if "fused" in IMPLS.value:
                    out += [
                        dict(base, impl="fused", C=c, plan=plan, normalize=n)
                        for c in bl.int_list(FUSED_CHUNKS.value)
                        for plan in FUSED_PLANS.value
                        for n in norms
                    ]
                if "fla" in IMPLS.value:
                    out.append(dict(base, impl="fla", C=64))
                if "cudnn" in IMPLS.value and not state:
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
