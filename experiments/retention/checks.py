"""The correctness checks of ``bench_retention``, run before timing: ours (and fla's outputs, from its
worker) against a float64 NumPy reference at small shapes; and the kernel plan of every preset head shape
compiled and run against the XLA form on this device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib as bl
from experiments.retention import sweep
from experiments.retention.jax_forms import jax_function, kernel_plan
from retnet_jax import retention
from retnet_jax.ops import dispatch
from retnet_jax.ops.gpu import plan as plan_lib

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
            n: (rng.standard_normal((2, sweep.CHECK_LENGTH.value, heads, w)) * scales[n])
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
        if "fused" in sweep.IMPLS.value and jax.default_backend() == "gpu":
            impls.append(("fused", 64, None))
            # The forced plans that fit this shape (e.g. both variants of the split kernels).
            impls += [
                ("fused", 64, spec)
                for spec in sweep.FUSED_PLANS.value
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


# The kernel plans: every preset head shape (and the f32 CPU presets) compiled and run on this device.

# name → (H, K, V, dtype): the benchmark's shapes in bf16, the tiny and small presets in float32 (the small
# preset's forced "pallas" used to exceed shared memory).
PLAN_SHAPES = {
    **{name: (d["H"], d["K"], d["V"], "bfloat16") for name, d in sweep.SHAPES.items()},
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
    if "fused" not in sweep.IMPLS.value:
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
