"""The JAX side of ``bench_retention``, timed in the parent process: our parallel and chunkwise (XLA)
forms, the fused kernels (``chunkwise(implementation="pallas")`` with a chosen plan) and cuDNN attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import benchlib as bl
from experiments import profiling
from experiments.retention import sweep
from retnet_jax import retention
from retnet_jax.ops import dispatch
from retnet_jax.ops.gpu import chunk_retention, split_retention
from retnet_jax.ops.gpu import plan as plan_lib


def kernel_plan(cfg):
    """The plan of a fused run: dispatch's choice at C, or the family / tiles / variant that --fused_plans
    names (FAMILY[:BKxBVxWARPSxSTAGES][:stored])."""
    spec = cfg.get("plan") or "auto"
    chunk = dispatch.kernel_chunk(cfg["C"])
    if spec == "auto":  # what chunkwise(implementation="auto") runs at C: few programs take the split family
        plan = plan_lib.make(
            cfg["K"], cfg["V"], chunk, jnp.bfloat16, rows=cfg["B"] * cfg["H"] if "B" in cfg else None
        )
        if isinstance(plan, str):
            raise ValueError(f"plan auto: {plan}")
        return plan
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
        cfg["K"], cfg["V"], chunk, jnp.bfloat16, family=family, tiles=tiles, stored_scores=stored or None
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
    result = dict(
        compile_s=compile_s, memory=memory, xla_flops=bl.program_flops(compiled), timing=timing.to_dict()
    )
    if sweep.PROFILE_TOP.value > 0:
        result["kernels"] = profiling.profile(
            "", lambda: compiled(*args), calls=3, top=sweep.PROFILE_TOP.value
        )
    return result
