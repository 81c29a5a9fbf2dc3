"""Few-row products alone: XLA's product against the few-row kernel with its default plan and each of its
candidate plans, on W stored [D, N] (``ops.gpu.skinny``) and stored transposed [N, D]
(``ops.gpu.skinny_nd``, a decoding loop's prepared weights), at the shapes of one decoding step, bf16.

    # paper-1.3b's decoding products at 1, 8 and 16 rows, every candidate plan, the LayerNorm prologue on
    # q/k/v/g (one call, < 8 minutes on an H200; rows 1 first, the budget skips what does not fit):
    python -m experiments.bench_products --model=paper-1.3b --rows=1,8,16 --repeats=5 \\
        --min_sample_s=0.01 --time_budget_s=420 --tag=plans
    # Plans of one's own beside the default (BDxBNxSxWARPSxSTAGES), one shape:
    python -m experiments.bench_products --shapes=out:4096x2048 --rows=1 --max_plans=0 \\
        --extra_plans=128x32x1x4x3,256x16x1x8x2 --extra_nd_plans=512x8x4x4,256x16x8x3 --tag=out-more
    # CPU smoke run (the kernels interpreted; a few seconds):
    python -m experiments.bench_products --shapes=qkvg:64x256,out:128x64 --rows=1,3 --max_plans=3 \\
        --norm_shape=qkvg --repeats=2

Shapes (``--model``, a RetNet preset): ``qkvg`` [D, 2·D + 2·value_dim] (q, k, v and g as one product),
``out`` [value_dim, D], ``fc1`` [D, F] (with a GLU also the gate: the same shape, counted twice a layer),
``fc2`` [F, D], ``head`` [D, vocab]; ``--shapes=name:DxN,...`` replaces them. Each runs at every
``--rows`` (M rows of x, as a decoding step at batch M):

* ``xla``: ``jnp.einsum("MD,DN->MN")`` in the compute dtype; ``xla→f32``: the same cast to float32 after
  (as the model's head does to its logits);
* ``kernel``: ``skinny.matmul`` with ``skinny.plan``'s plan (what the model runs on [D, N]), then each of
  ``skinny.candidates`` (at most ``--max_plans``) and ``--extra_plans`` that fit the shape;
* ``kernel-nd``: ``skinny_nd.matmul`` on copies of the same W stored [N, D] (transposed before timing),
  with ``skinny_nd.plan``'s plan (what the prepared decoding loop runs), each of ``skinny_nd.candidates``
  (at most ``--max_plans``) and ``--extra_nd_plans`` (``--nd=false``: none).

On ``--norm_shape`` (LayerNorm, as paper-1.3b's block norm before q/k/v/g): XLA's norm then its product
(``ops.norms.normalize``, x in the compute dtype, scale and bias float32) against the kernel with the
norm in its prologue, with the default plan and with the fastest plain plan of that shape and rows, for
each layout.

Timing (``benchlib``: compilation apart, warm-up, medians of ``--repeats`` samples): one jitted program
multiplies L different x by L different copies of W (``--target_mib`` of weights in all, at least two
copies, so that W is read from HBM and not from the 50 MB L2, as in a step whose 24 layers each read their
own weights); a product's time is the program's / L. The program's dispatch is shared by its L products.
Every product is checked against the float32 product of the same inputs (``err``: ‖y − ref‖ / ‖ref‖; a
plan over ``ERROR_LIMIT`` is never the best). "GB/s" counts W's bytes only; "× floor" = time × the copy
bandwidth measured in the same run / W's bytes (1.0: W read at the copy rate; the step's target is 1.3).
Programs of one shape and rows are compiled ``--compile_threads`` at a time (lowered one by one).

"One decoding step's products" sums each shape's time × its count in a step (layers × per layer; the
head once): XLA's (the head's with the float32 cast), the default plans', the best plans', per layout.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchreport as br
from retnet_jax.models import RetNetConfig
from retnet_jax.ops import norms
from retnet_jax.ops.gpu import skinny, skinny_nd

MODEL = flags.DEFINE_string("model", "paper-1.3b", "RetNet preset whose decoding products are measured.")
SHAPES = flags.DEFINE_string("shapes", "", "name:DxN,... measured instead of the model's (counted once).")
ROWS = flags.DEFINE_string("rows", "1,8,16", "Rows M of x (a decoding step's batch), in priority order.")
DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of x and W.")
MAX_PLANS = flags.DEFINE_integer("max_plans", skinny.MAX_CANDIDATES, "Candidate plans per shape (0: none).")
EXTRA_PLANS = flags.DEFINE_string("extra_plans", "", "More plans, BDxBNxSxWARPSxSTAGES,... (where they fit).")
ND = flags.DEFINE_bool("nd", True, "Also the kernel on W stored transposed [N, D] (kernel-nd rows).")
EXTRA_ND_PLANS = flags.DEFINE_string(
    "extra_nd_plans", "", "More [N, D] plans, BDxBNxWARPSxSTAGES[xREDUCE],... (where they fit)."
)
NORM_SHAPE = flags.DEFINE_string("norm_shape", "qkvg", "Shape of the LayerNorm prologue rows ('': none).")
TARGET_MIB = flags.DEFINE_integer("target_mib", 256, "MiB of weight copies one timed program reads (GPU).")
COPIES = flags.DEFINE_integer("copies", 0, "Copies L of W per program (0: from --target_mib; 2 on a CPU).")
COMPILE_THREADS = flags.DEFINE_integer("compile_threads", 4, "Programs compiled at once.")

ERROR_LIMIT = 2e-2  # bf16 outputs of sums of thousands of terms: ~4e-3 relative; a wrong plan is ~1
NORM_EPS = 1e-5


KERNELS = {"kernel": skinny, "kernel-nd": skinny_nd}  # the rows' impl → the kernel's module


def plan_label(tiles) -> str:
    """BDxBN S w s ([D, N] plans) or BDxBN w s ([N, D] plans: no splits)."""
    splits = f" S{tiles.splits}" if isinstance(tiles, skinny.Plan) else ""
    reduce = " reduce" if getattr(tiles, "reduce", 0) else ""
    return f"{tiles.block_d}x{tiles.block_n}{splits} w{tiles.num_warps} s{tiles.num_stages}{reduce}"


def plan_of(cfg):
    """The row's plan as its kernel's ``Plan``, or None."""
    return KERNELS[cfg["impl"]].Plan(*cfg["plan"]) if cfg.get("plan") else None


def parse_plans(text: str, module=skinny, name: str = "--extra_plans") -> list:
    plans, fields = [], len(module.Plan._fields)
    example = "128x32x1x4x3" if module is skinny else "512x8x4x3"
    for item in bl.str_list(text):
        numbers = [int(v) for v in item.split("x")]
        optional = 1 if "reduce" in module.Plan._fields else 0  # a trailing field with a default
        if not fields - optional <= len(numbers) <= fields:
            spelled = "BDxBNxSxWARPSxSTAGES" if module is skinny else "BDxBNxWARPSxSTAGES[xREDUCE]"
            raise ValueError(f"{name}: {item!r} is not {spelled} (e.g. {example}).")
        plans.append(module.Plan(*numbers))
    return plans


def shapes() -> list[dict[str, Any]]:
    """The products measured: name, D, N, and how many a decoding step runs (``count``)."""
    if SHAPES.value:
        listed = []
        for item in bl.str_list(SHAPES.value):
            name, _, size = item.partition(":")
            d, n = (int(v) for v in size.split("x"))
            listed.append(dict(name=name, d=d, n=n, count=1))
        return listed
    config = RetNetConfig.preset(MODEL.value)
    d, layers, f, v = config.d_model, config.num_layers, config.ffn_dim, config.value_dim
    k = config.num_heads * config.key_dim
    glu = config.ffn_type == "glu"
    return [
        dict(name="qkvg", d=d, n=2 * k + 2 * v, count=layers),
        dict(name="fc1+gate" if glu else "fc1", d=d, n=f, count=layers * (2 if glu else 1)),
        dict(name="out", d=v, n=d, count=layers),
        dict(name="fc2", d=f, n=d, count=layers),
        dict(name="head", d=d, n=config.vocab_size, count=1),
    ]


def copies_of(shape, dtype) -> int:
    if COPIES.value:
        return COPIES.value
    if jax.devices()[0].platform == "cpu":
        return 2
    weight = shape["d"] * shape["n"] * jnp.dtype(dtype).itemsize
    return int(min(64, max(2, math.ceil(TARGET_MIB.value * 2**20 / weight))))


def product_of(cfg, interpret: bool):
    """The measured product: (x, w, *affine) → y (w stored [N, D] for ``kernel-nd``)."""
    tiles = plan_of(cfg)
    impl, norm = cfg["impl"], cfg.get("norm")
    if impl in KERNELS and norm:
        return lambda x, w, scale, bias: KERNELS[impl].matmul(
            x, w, norm=norm, scale=scale, bias=bias, eps=NORM_EPS, tiles=tiles, interpret=interpret
        )
    if impl in KERNELS:
        return lambda x, w: KERNELS[impl].matmul(x, w, tiles=tiles, interpret=interpret)
    cast = impl == "xla→f32"

    def xla(x, w, *affine):
        if norm:
            x = norms.normalize(x, norm, NORM_EPS, *affine, dtype=w.dtype)
        y = jnp.einsum("MD,DN->MN", x, w)
        return y.astype(jnp.float32) if cast else y

    return xla


def program_of(product):
    """All L products in one program; the product jitted once inside, so that it is lowered once."""
    inner = jax.jit(product)

    def program(xs, ws, affine):
        return [inner(x, w, *affine) for x, w in zip(xs, ws, strict=True)]

    return program


class Inputs:
    """Weight copies per shape (made once), x copies per shape and rows, norm parameters per D."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.weights: dict[str, list] = {}

    def transposed(self, shape) -> list:
        """The weight copies of ``shape`` stored [N, D] (made once, before any timing)."""
        name = shape["name"] + "ᵀ"
        if name not in self.weights:
            self.weights[name] = [jnp.transpose(w).copy() for w in self.weights[shape["name"]]]
        return self.weights[name]

    def get(self, shape, rows: int, norm: bool):
        copies = copies_of(shape, self.dtype)
        if shape["name"] not in self.weights:
            keys = jax.random.split(jax.random.key(len(self.weights)), copies)
            self.weights[shape["name"]] = [bl.normal(k, (shape["d"], shape["n"]), self.dtype) for k in keys]
        keys = jax.random.split(jax.random.key(1000 + rows), copies + 2)
        # x with a mean away from 0 and a spread of 3, as a residual stream: the norm must centre it
        xs = [bl.normal(k, (rows, shape["d"]), jnp.float32) for k in keys[:copies]]
        xs = [(3 * x + 1).astype(self.dtype) if norm else x.astype(self.dtype) for x in xs]
        affine = ()
        if norm:
            scale = 1 + bl.normal(keys[-2], (shape["d"],), jnp.float32, 0.2)
            affine = (scale, bl.normal(keys[-1], (shape["d"],), jnp.float32, 0.2))
        return xs, self.weights[shape["name"]], affine


def reference(x, w, affine, norm):
    """The float32 product (of XLA's norm, in the compute dtype, with ``norm``) of one copy."""
    if norm:
        x = norms.normalize(x, norm, NORM_EPS, *affine, dtype=w.dtype)
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")


def run_group(cfgs, inputs, interpret: bool, budget: bl.Budget) -> list[dict[str, Any]]:
    """Lowers, compiles (several at once) and times the configurations of one shape and rows."""
    first = cfgs[0]
    xs, ws, affine = inputs.get(first["shape"], first["rows"], bool(first.get("norm")))
    ref = jax.jit(reference, static_argnums=3)(xs[0], ws[0], affine, first.get("norm"))

    def weights(cfg):  # the same copies of W, stored [N, D] for the kernel that reads them so
        return inputs.transposed(first["shape"]) if cfg["impl"] == "kernel-nd" else ws

    lowered = {}
    for i, cfg in enumerate(cfgs):
        if cfg.get("status"):
            continue

        def lower(cfg=cfg):
            start = time.perf_counter()
            program = program_of(product_of(cfg, interpret))
            lowered = jax.jit(program).lower(xs, weights(cfg), affine)
            return dict(lowered=lowered, lower_s=time.perf_counter() - start)

        result = bl.guarded(lower)
        if result["status"] == "ok":
            lowered[i] = result
        else:
            cfgs[i] = {**cfg, **result}

    def compile_one(item):
        start = time.perf_counter()
        return item["lowered"].compile(), time.perf_counter() - start

    compiled = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, COMPILE_THREADS.value)) as pool:
        futures = {i: pool.submit(compile_one, item) for i, item in lowered.items()}
        for i, future in futures.items():
            result = bl.guarded(
                lambda future=future: dict(zip(("fn", "compile_s"), future.result(), strict=True))
            )
            if result["status"] == "ok":
                compiled[i] = result
            else:
                cfgs[i] = {**cfgs[i], **result}
    for i, item in compiled.items():
        cfg = cfgs[i]
        if budget.exhausted():
            cfgs[i] = {**cfg, "status": "skipped", "error": "time budget"}
            continue
        print(f"{cfg['shape']['name']} M{cfg['rows']} {label(cfg)} ...", flush=True)

        w = weights(cfg)

        def measure(fn=item["fn"], lower_s=lowered[i]["lower_s"], compile_s=item["compile_s"], w=w):
            error = bl.rel_error(fn(xs, w, affine)[0], ref)
            timing = bl.time_calls(lambda: fn(xs, w, affine))
            compile_s = lower_s + compile_s
            return dict(copies=len(w), timing=timing.to_dict(), error=error, compile_s=compile_s)

        cfgs[i] = {**cfg, **bl.guarded(measure)}
    return cfgs


def label(cfg) -> str:
    text = cfg["impl"] if not cfg.get("plan") else f"{cfg['impl']} {plan_label(plan_of(cfg))}"
    text += " (default)" if cfg.get("default") else ""
    return f"{cfg['norm']} + {text}" if cfg.get("norm") else text


def derive(row, ceilings, dtype) -> None:
    """µs per product, GB/s of W's bytes, × the copy-bandwidth floor."""
    if row.get("status") != "ok":
        return
    shape = row["shape"]
    weight = shape["d"] * shape["n"] * jnp.dtype(dtype).itemsize
    seconds = row["timing"]["median_s"] / row["copies"]
    row.update(
        us=seconds * 1e6, gbps=weight / seconds / 1e9, x_floor=seconds * ceilings["bandwidth"] / weight
    )


def kernel_configs(impl: str, shape, rows: int, dtype) -> list[dict[str, Any]]:
    """One layout's kernel rows: the default plan, candidates, extra plans (or why none)."""
    module = KERNELS[impl]
    base = dict(shape=shape, rows=rows, impl=impl)
    reason = module.plan(rows, shape["d"], shape["n"], dtype)
    if isinstance(reason, str):
        return [dict(base, status="n/a", error=reason)]
    listed = module.candidates(rows, shape["d"], shape["n"], dtype)[: 1 + MAX_PLANS.value]
    extra = EXTRA_PLANS if impl == "kernel" else EXTRA_ND_PLANS
    for tiles in parse_plans(extra.value, module, f"--{extra.name}"):
        if module.check(tiles, rows, shape["d"], shape["n"], dtype) is None and tiles not in listed:
            listed.append(tiles)
    return [dict(base, plan=list(p), default=i == 0) for i, p in enumerate(listed)]


def plain_configs(shape, rows: int, dtype) -> list[dict[str, Any]]:
    base = dict(shape=shape, rows=rows)
    cfgs = [dict(base, impl="xla"), dict(base, impl="xla→f32")]
    cfgs += kernel_configs("kernel", shape, rows, dtype)
    return cfgs + (kernel_configs("kernel-nd", shape, rows, dtype) if ND.value else [])


def best_kernel(rows_done, norm=None, impl="kernel"):
    """The fastest row of kernel ``impl`` whose output checked out, or None."""
    good = [
        r
        for r in rows_done
        if r["impl"] == impl
        and r.get("status") == "ok"
        and r.get("norm") == norm
        and r["error"] < ERROR_LIMIT
    ]
    return min(good, key=lambda r: r["us"]) if good else None


def norm_configs(shape, rows: int, plain) -> list[dict[str, Any]]:
    base = dict(shape=shape, rows=rows, norm="layernorm")
    cfgs = [dict(base, impl="xla")]
    for impl in KERNELS:
        default = next((r for r in plain if r.get("default") and r["impl"] == impl), None)
        if default is None:
            continue
        cfgs.append(dict(base, impl=impl, plan=default["plan"], default=True))
        best = best_kernel(plain, impl=impl)
        if best is not None and best["plan"] != default["plan"]:
            cfgs.append(dict(base, impl=impl, plan=best["plan"]))
    return cfgs if len(cfgs) > 1 else []


# ------------------------------------------------------------------------------------------------------
# Report.


def _ratio(a, b) -> str:
    return br.fmt(a / b, spec=".2f") if a and b else "–"


def summaries(rows, shape_list) -> tuple[list[dict], list[dict]]:
    """(best plan per shape and rows, one decoding step's products per rows)."""
    best, step = [], []
    for m in dict.fromkeys(r["rows"] for r in rows):
        totals = dict(xla=0.0, default=0.0, best=0.0, nd_default=0.0, nd_best=0.0, bytes=0, complete=True)
        for shape in shape_list:
            here = [r for r in rows if r["rows"] == m and r["shape"] is shape and not r.get("norm")]
            times = {r["impl"]: r.get("us") for r in here if r["impl"] not in KERNELS}
            entry = dict(shape=shape, rows=m, xla=times.get("xla"), xla_f32=times.get("xla→f32"))
            for impl, prefix in (("kernel", ""), ("kernel-nd", "nd_")):
                default = next((r for r in here if r.get("default") and r["impl"] == impl), None)
                fastest = best_kernel(here, impl=impl)
                entry.update(
                    {
                        f"{prefix}default": default.get("us") if default else None,
                        f"{prefix}default_plan": default and default.get("plan"),
                        f"{prefix}best": fastest and fastest["us"],
                        f"{prefix}best_plan": fastest and fastest["plan"],
                        f"{prefix}best_x_floor": fastest and fastest["x_floor"],
                    }
                )
            best.append(entry)
            xla = entry["xla_f32"] if shape["name"] == "head" else entry["xla"]
            keys = ("default", "best") + (("nd_default", "nd_best") if ND.value else ())
            for key, value in (("xla", xla), *((k, entry[k]) for k in keys)):
                if value is None:
                    totals["complete"] = False
                else:
                    totals[key] += shape["count"] * value
            totals["bytes"] += shape["count"] * shape["d"] * shape["n"]
        step.append(dict(rows=m, **totals))
    return best, step


def write(report, rows, device, ceilings, shape_list, dtype) -> str:
    best, step = summaries(rows, shape_list)
    itemsize = jnp.dtype(dtype).itemsize

    def plan_cell(plan, module=skinny):
        return plan_label(module.Plan(*plan)) if plan else "–"

    def nd_plan_cell(plan):
        return plan_cell(plan, skinny_nd)

    def size(row):
        return f"{row['shape']['d']}×{row['shape']['n']}"

    best_table = br.markdown_table(
        best,
        [
            ("shape", lambda r: r["shape"]["name"]),
            ("D×N", size),
            ("M", lambda r: str(r["rows"])),
            ("xla µs", lambda r: br.fmt(r["xla"])),
            ("xla→f32 µs", lambda r: br.fmt(r["xla_f32"])),
            ("default plan", lambda r: plan_cell(r["default_plan"])),
            ("default µs", lambda r: br.fmt(r["default"])),
            ("best plan", lambda r: plan_cell(r["best_plan"])),
            ("best µs", lambda r: br.fmt(r["best"])),
            ("best × floor", lambda r: br.fmt(r["best_x_floor"], spec=".2f")),
            ("default / xla", lambda r: _ratio(r["default"], r["xla"])),
            ("best / xla", lambda r: _ratio(r["best"], r["xla"])),
        ]
        + (
            [
                ("[N, D] default plan", lambda r: nd_plan_cell(r["nd_default_plan"])),
                ("[N, D] default µs", lambda r: br.fmt(r["nd_default"])),
                ("[N, D] best plan", lambda r: nd_plan_cell(r["nd_best_plan"])),
                ("[N, D] best µs", lambda r: br.fmt(r["nd_best"])),
                ("[N, D] best × floor", lambda r: br.fmt(r["nd_best_x_floor"], spec=".2f")),
                ("[N, D] best / xla", lambda r: _ratio(r["nd_best"], r["xla"])),
            ]
            if ND.value
            else []
        ),
    )
    sections = [br.ceilings_markdown(device, ceilings), "## Best plan per shape and rows", best_table]
    if not SHAPES.value:
        floor = lambda r: r["bytes"] * itemsize / ceilings["bandwidth"] * 1e6  # noqa: E731
        step_table = br.markdown_table(
            step,
            [
                ("M", lambda r: str(r["rows"])),
                ("weights GB", lambda r: br.fmt(r["bytes"] * itemsize / 1e9)),
                ("floor µs", lambda r: br.fmt(floor(r))),
                ("xla µs", lambda r: br.fmt(r["xla"] or None)),
                ("default µs", lambda r: br.fmt(r["default"] or None)),
                ("best µs", lambda r: br.fmt(r["best"] or None)),
                ("xla × floor", lambda r: _ratio(r["xla"], floor(r))),
                ("default × floor", lambda r: _ratio(r["default"], floor(r))),
                ("best × floor", lambda r: _ratio(r["best"], floor(r))),
            ]
            + (
                [
                    ("[N, D] default µs", lambda r: br.fmt(r["nd_default"] or None)),
                    ("[N, D] best µs", lambda r: br.fmt(r["nd_best"] or None)),
                    ("[N, D] default × floor", lambda r: _ratio(r["nd_default"], floor(r))),
                    ("[N, D] best × floor", lambda r: _ratio(r["nd_best"], floor(r))),
                ]
                if ND.value
                else []
            )
            + [("complete", lambda r: "yes" if r["complete"] else "no (a shape missing)")],
        )
        sections += [f"## One decoding step's products ({MODEL.value}, products only)", step_table]
    normed = [r for r in rows if r.get("norm")]
    columns = [
        ("shape", lambda r: r["shape"]["name"]),
        ("D×N", size),
        ("M", lambda r: str(r["rows"])),
        ("program", label),
        ("µs", br.when_ok(lambda r: br.fmt(r["us"]))),
        ("iqr%", br.when_ok(lambda r: br.fmt(r["timing"]["iqr_pct"], spec=".1f"))),
        ("GB/s", br.when_ok(lambda r: br.fmt(r["gbps"], spec=".4g"))),
        ("× floor", br.when_ok(lambda r: br.fmt(r["x_floor"], spec=".2f"))),
        ("err", br.when_ok(lambda r: br.fmt(r["error"], spec=".1e"))),
        ("L", br.when_ok(lambda r: str(r["copies"]))),
        ("compile s", br.when_ok(lambda r: br.fmt(r["compile_s"], spec=".2f"))),
    ]
    if normed:
        sections += [f"## {normed[0]['norm']} in the kernel's prologue", br.markdown_table(normed, columns)]
    sections += ["## Every configuration", br.markdown_table([r for r in rows if not r.get("norm")], columns)]
    raw = dict(device=device, ceilings=ceilings, rows=rows, best=best, step=step, error_limit=ERROR_LIMIT)
    return report.write("Few-row products: XLA against the few-row kernel's plans", sections, raw)


def plot(best, shape_list, path: str) -> None:
    fig, axes = br.figure(1, len(shape_list))
    for ax, shape in zip(axes[0], shape_list, strict=True):
        here = [b for b in best if b["shape"] is shape]
        lines = (
            ("xla", "XLA"),
            ("default", "kernel [D, N], default plan"),
            ("best", "kernel [D, N], best plan"),
            ("nd_default", "kernel [N, D], default plan"),
            ("nd_best", "kernel [N, D], best plan"),
        )
        for key, name in lines:
            points = [(b["rows"], b[key]) for b in here if b.get(key)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set_xticks(sorted({b["rows"] for b in here}))
        ax.set_title(f"{shape['name']} {shape['d']}×{shape['n']}")
        ax.set_xlabel("rows M")
        ax.set_ylabel("µs per product")
        ax.legend(fontsize=7)
    br.save_figure(fig, path)


def main(argv):
    del argv
    budget = bl.Budget()
    dtype = jnp.dtype(DTYPE.value)
    device = bl.device_info()
    interpret = device["platform"] != "gpu"
    ceilings = bl.measure_ceilings()
    report = br.Report("bench_products", device["short"])
    shape_list = shapes()
    inputs = Inputs(dtype)
    rows: list[dict[str, Any]] = []
    last_group_s = 0.0  # a shape's group is not started where the last one's time is not left
    for m in bl.int_list(ROWS.value):
        for shape in shape_list:
            groups = [plain_configs(shape, m, dtype)]
            if shape["name"] == NORM_SHAPE.value:
                groups.append(None)  # made from the plain rows' results
            for cfgs in groups:
                if cfgs is None:
                    cfgs = norm_configs(shape, m, rows[-len(groups[0]) :])
                if not cfgs:
                    continue
                start = time.perf_counter()
                if budget.exhausted(last_group_s):
                    done = [
                        {**c, "status": c.get("status", "skipped"), "error": c.get("error", "time budget")}
                        for c in cfgs
                    ]
                else:
                    done = run_group(cfgs, inputs, interpret, budget)
                    if not cfgs[0].get("norm"):  # the norm's groups are a few programs
                        last_group_s = time.perf_counter() - start
                for row in done:
                    derive(row, ceilings, dtype)
                rows.extend(done)
                write(report, rows, device, ceilings, shape_list, dtype)
    text = write(report, rows, device, ceilings, shape_list, dtype)
    if br.PLOTS.value:
        bl.guarded(lambda: plot(summaries(rows, shape_list)[0], shape_list, report.png))
    print(text)
    print("Wrote", *report.paths())


if __name__ == "__main__":
    app.run(main)
