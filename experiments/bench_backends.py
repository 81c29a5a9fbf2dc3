"""Which Pallas backend for the GPU kernels: what each reaches on this GPU, measured with JAX's own kernels.

    # one H200 call (~3 minutes): matmuls and causal attention through XLA/cuDNN, Pallas-Triton and
    # Pallas Mosaic GPU, bf16, same run
    python -m experiments.bench_backends --tag=backends
    # CPU smoke run (the Triton rows interpreted at toy sizes; the Mosaic GPU rows report why they cannot run)
    python -m experiments.bench_backends --matmuls=64 --attention=1x128x2x64 --repeats=2 --plots=false

The retention kernels are Pallas on its Triton backend, which JAX 0.11 deprecates for Pallas Mosaic GPU
(``docs/kernels.md`` §6). Whether moving pays depends on what each backend's kernels reach on the work the
retention kernels do, products of tiles of a few hundred rows, so this script times, side by side:

* **matmul** [n, n] × [n, n] for each ``--matmuls``: XLA's (cuBLAS); a Pallas-Triton matmul (grid over
  output tiles, a loop over K that Triton pipelines; each of ``TRITON_TILES``); JAX's Mosaic GPU Hopper
  matmul (``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``: TMA, ``wgmma``, warp specialization; each
  of ``MOSAIC_TILES``). The best tiles of each backend are reported.
* **causal attention** forward and forward + backward for each ``--attention`` (BxTxHxD): cuDNN
  (``jax.nn.dot_product_attention(implementation="cudnn")``), JAX's Pallas-Triton flash attention
  (``ops.gpu.attention.mha``) and JAX's Mosaic GPU attention (``ops.gpu.attention_mgpu.attention``, each of
  its ``block_kv``) — the closest of JAX's kernels to a chunk pass: tiles of queries against tiles of
  keys and values, a running state, a masked diagonal.

Every output is compared with XLA's in float32 (``err``: ‖y − ref‖ / ‖ref‖); a row that cannot run (API of
this JAX, shared memory, a backend this GPU lacks) records why and the others still run. Timing:
``benchlib`` (compilation apart, warm-up, medians of ``--repeats`` samples).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental import pallas as pl

from experiments import benchlib as bl
from experiments import benchreport as br
from retnet_jax.ops.gpu import common

MATMULS = flags.DEFINE_string("matmuls", "4096,8192", "n of the [n, n] × [n, n] bf16 matmuls.")
ATTENTION = flags.DEFINE_string(
    "attention", "4x4096x16x128,1x16384x16x128", "BxTxHxD of the causal attention rows."
)

# (BM, BN, BK, warps, stages) of the Pallas-Triton matmul: the usual Hopper picks of Triton's own tuning
TRITON_TILES = ((128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4))
# (tile_m, tile_n, tile_k, max_concurrent_steps, grid_tile_width) of the Mosaic GPU matmul
# (the H200's 227 KiB of shared memory refused 128x256 and 256x128 at 4 steps, and 128x128 at 6)
MOSAIC_TILES = ((128, 128, 64, 4, 4), (128, 128, 64, 4, 8), (128, 256, 64, 2, 8), (256, 128, 64, 3, 8))
MOSAIC_BLOCK_KV = (64, 128)


def _triton_matmul(a, b, *, tiles, interpret: bool):
    bm, bn, bk, warps, stages = tiles
    m, k = a.shape
    n = b.shape[1]

    def kernel(a_ref, b_ref, o_ref):
        def step(i, acc):
            x = a_ref[:, pl.ds(i * bk, bk)]
            y = b_ref[pl.ds(i * bk, bk), :]
            return acc + jnp.dot(x, y, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, k // bk, step, jnp.zeros((bm, bn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), a.dtype),
        compiler_params=None if interpret else common.compiler_params(warps, stages),
        interpret=interpret,
    )(a, b)


def _module(name: str, interpret: bool = False):
    """JAX's example kernel module ``jax.experimental.pallas.ops.gpu.<name>``, or why it cannot run here
    (``interpret``: a CPU, where a Mosaic GPU kernel never runs)."""
    if interpret and name.endswith("_mgpu"):
        return "Mosaic GPU kernels run on an NVIDIA GPU only"
    try:
        return importlib.import_module(f"jax.experimental.pallas.ops.gpu.{name}")
    except Exception as error:  # absent in this JAX, or its Mosaic GPU dependencies are
        return f"{type(error).__name__}: {error}"[:300]


def _config(cls, **values):
    """``cls(**values)`` keeping the fields this JAX's config has (the examples' configs change)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def matmul_rows(n: int, interpret: bool) -> list[dict[str, Any]]:
    keys = jax.random.split(jax.random.key(n), 2)
    a = bl.normal(keys[0], (n, n), jnp.bfloat16)
    b = bl.normal(keys[1], (n, n), jnp.bfloat16)
    ref = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
    flops = 2 * n**3
    configs: list[tuple[str, str, Any]] = [("xla", "cuBLAS / XLA", jnp.dot)]
    for tiles in TRITON_TILES:
        if n % tiles[0] or n % tiles[1] or n % tiles[2]:
            continue
        label = "{}x{}x{} w{} s{}".format(*tiles)
        configs.append(
            ("pallas-triton", label, functools.partial(_triton_matmul, tiles=tiles, interpret=interpret))
        )
    if interpret:  # the toy size: one small tile
        configs.append(
            (
                "pallas-triton",
                "32x32x32",
                functools.partial(_triton_matmul, tiles=(32, 32, 32, 4, 1), interpret=True),
            )
        )
    mosaic = _module("hopper_matmul_mgpu", interpret)
    for tile_m, tile_n, tile_k, steps, width in MOSAIC_TILES:
        label = f"{tile_m}x{tile_n}x{tile_k} steps{steps} width{width}"
        if isinstance(mosaic, str):
            configs.append(("pallas-mosaic", label, mosaic))
            continue
        config = _config(
            mosaic.TuningConfig,
            tile_m=tile_m,
            tile_n=tile_n,
            tile_k=tile_k,
            max_concurrent_steps=steps,
            grid_tile_width=width,
        )
        takes_c = "c" in inspect.signature(mosaic.matmul).parameters
        fn = functools.partial(mosaic.matmul, config=config)
        configs.append(("pallas-mosaic", label, (lambda a, b, fn=fn: fn(a, b, None)) if takes_c else fn))
    rows = []
    for backend, label, fn in configs:
        row = dict(kind="matmul", shape=f"{n}³", backend=backend, config=label, flops=flops)
        if isinstance(fn, str):
            rows.append(dict(row, status="n/a", error=fn))
            continue
        rows.append(dict(row, **bl.guarded(lambda fn=fn: _timed(fn, (a, b), ref))))
    return rows


def _timed(fn, args, ref) -> dict[str, Any]:
    compiled, compile_s, _ = bl.compile_timed(fn, *args)
    out = compiled(*args)
    timing = bl.time_calls(lambda: compiled(*args))
    # the largest relative error over the outputs (a gradient row has three)
    err = max(bl.rel_error(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True))
    return dict(status="ok", median_s=timing.median_s, iqr_pct=timing.iqr_pct, compile_s=compile_s, err=err)


def _attention_reference(q, k, v):
    """Causal softmax attention in float32, [B, T, H, D]."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def attention_rows(shape: tuple[int, int, int, int], interpret: bool) -> list[dict[str, Any]]:
    b, t, h, d = shape
    keys = jax.random.split(jax.random.key(t), 4)
    q, k, v, do = (bl.normal(key, (b, t, h, d), jnp.bfloat16) for key in keys)
    scale = d**-0.5
    configs: list[tuple[str, str, Any]] = []
    if not interpret:
        configs.append(
            ("cudnn", "cuDNN", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                           implementation="cudnn"))
        )  # fmt: skip
    configs.append(("xla", "XLA", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)))
    triton = _module("attention")
    if isinstance(triton, str):
        configs.append(("pallas-triton", "mha", triton))
    else:
        configs.append(
            ("pallas-triton", "mha", lambda q, k, v: triton.mha(q, k, v, None, sm_scale=scale, causal=True,
                                                             interpret=interpret))
        )  # fmt: skip
    mosaic = _module("attention_mgpu", interpret)
    for block_kv in MOSAIC_BLOCK_KV:
        label = f"block_q 64 block_kv {block_kv}"
        if isinstance(mosaic, str):
            configs.append(("pallas-mosaic", label, mosaic))
            continue
        config = _config(
            mosaic.TuningConfig, block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True
        )
        # the Mosaic example does not scale the scores itself: q comes in scaled
        configs.append(
            ("pallas-mosaic", label, lambda q, k, v, c=config: mosaic.attention(q * scale, k, v, c))
        )
    ref = _attention_reference(q, k, v)
    ref_grads = jax.vjp(_attention_reference, q, k, v)[1](do.astype(jnp.float32))
    flops = 4 * b * h * t * t * d // 2  # the causal half of QKᵀ and PV
    rows = []
    for backend, label, fn in configs:
        row = dict(kind="attention", shape=f"B{b} T{t} H{h} D{d}", backend=backend, config=label)
        if isinstance(fn, str):
            rows.append(dict(row, status="n/a", error=fn, pass_="forward"))
            continue
        rows.append(
            dict(row, pass_="forward", flops=flops, **bl.guarded(lambda fn=fn: _timed(fn, (q, k, v), ref)))
        )

        def train(q, k, v, fn=fn):
            out, vjp = jax.vjp(fn, q, k, v)
            return vjp(do.astype(out.dtype))

        rows.append(
            dict(row, pass_="forward + backward", flops=flops * 7 // 2,
                 **bl.guarded(lambda train=train: _timed(train, (q, k, v), ref_grads)))
        )  # fmt: skip
    return rows


def _best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest finished row of each (kind, shape, pass, backend)."""
    best: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["kind"], row["shape"], row.get("pass_", ""), row["backend"])
        if row.get("status") == "ok" and (key not in best or row["median_s"] < best[key]["median_s"]):
            best[key] = row
    return list(best.values())


def write(report: br.Report, rows, device, ceilings) -> str:
    peak = (ceilings or {}).get("matmul_flops")

    def tflops(row):
        return br.fmt(row["flops"] / row["median_s"] / 1e12, spec=".0f") if row.get("flops") else "–"

    def of_peak(row):
        return (
            br.fmt(100 * row["flops"] / row["median_s"] / peak, spec=".0f")
            if peak and row.get("flops")
            else "–"
        )

    columns = [
        ("work", lambda r: r["kind"]),
        ("shape", lambda r: r["shape"]),
        ("pass", lambda r: r.get("pass_", "forward")),
        ("backend", lambda r: r["backend"]),
        ("config", lambda r: r["config"]),
        ("ms", br.when_ok(lambda r: br.fmt(r["median_s"], 1e3, ".4g"))),
        ("iqr%", br.when_ok(lambda r: br.fmt(r["iqr_pct"], spec=".1f"))),
        ("TFLOP/s", br.when_ok(tflops)),
        ("% of matmul peak", br.when_ok(of_peak)),
        ("err", br.when_ok(lambda r: br.fmt(r["err"], spec=".1e"))),
        ("compile s", br.when_ok(lambda r: br.fmt(r["compile_s"], spec=".1f"))),
    ]
    failures = [r for r in rows if r.get("status") != "ok"]
    sections = [
        br.ceilings_markdown(device, ceilings),
        "## Best of each backend\n\n" + br.markdown_table(_best(rows), columns),
        "## Every configuration\n\n" + br.markdown_table(rows, columns),
    ]
    if failures:
        sections.append(
            "## What did not run\n\n"
            + "\n".join(
                f"- {r['kind']} {r['shape']} {r['backend']} {r['config']}: {r.get('error', '')}"
                for r in failures
            )
        )
    return report.write("Pallas backends on this GPU: Triton and Mosaic GPU beside XLA and cuDNN", sections,
                        dict(device=device, ceilings=ceilings, rows=rows))  # fmt: skip


def main(argv):
    del argv
    device = bl.device_info()
    interpret = device["platform"] != "gpu"
    ceilings = bl.measure_ceilings()
    report = br.Report("bench_backends", device["short"])
    rows: list[dict[str, Any]] = []
    for n in bl.int_list(MATMULS.value):
        rows += matmul_rows(n, interpret)
        write(report, rows, device, ceilings)
    for text in bl.str_list(ATTENTION.value):
        rows += attention_rows(tuple(int(x) for x in text.split("x")), interpret)
        write(report, rows, device, ceilings)
    text = write(report, rows, device, ceilings)
    print(text)
    print("Wrote", *report.paths())


if __name__ == "__main__":
    app.run(main)
