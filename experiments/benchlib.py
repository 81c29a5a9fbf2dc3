"""What the three benchmark scripts share: flags, the timing method, device ceilings, workers and reports.

Timing method (every number the scripts report):

* Compilation is timed on its own (``jax.jit(f).lower(*args).compile()``) and never enters a step time.
* Warm-up calls run first; then ``--repeats`` samples, each of enough back-to-back calls to last at least
  ``--min_sample_s``, ended by ``jax.block_until_ready``. A time is the median over samples, with the
  spread given as the interquartile range over the median (``iqr%``). PyTorch peers are timed with
  ``triton.testing.do_bench`` (CUDA events, median and quartiles), or CUDA events where Triton is missing.
* Inputs are random normal (tokens: uniform random ids), never zeros.
* Ceilings are measured once per run on the device itself: a bf16 matrix product through ``jnp.dot``
  (2·n³ FLOPs) and a device-to-device pass over a float32 array (bytes read + bytes written). Achieved
  rates are reported against these and against the datasheet peak (``retnet_jax.training.flops.PEAK_BF16``).
* Memory: ``memory_analysis`` of the compiled program (arguments + outputs + temporaries − aliased, or
  XLA's own peak estimate when it gives one) for programs that share a process; a process's
  ``peak_bytes_in_use`` where each configuration runs in a process of its own (XLA cannot reset it);
  ``torch.cuda.max_memory_allocated`` for PyTorch peers.
* Each configuration is guarded: an out-of-memory error is recorded as ``OOM``, any other failure as
  ``error`` (with its message in the JSON), and the run goes on.

Workers: a script re-runs itself with ``--worker_in=IN.json --worker_out=OUT.json`` to measure something
in a fresh process (PyTorch peers, which must not share the GPU with JAX's allocator, and configurations
whose peak memory matters). The parent starts them before its own JAX code touches the GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from retnet_jax.training import flops as flops_lib

# Read when JAX creates its GPU client (at the first device use, not at import), so this is in time.
# JAX's default (75% of the GPU) would turn large configurations into spurious OOMs.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT_DIR = flags.DEFINE_string("out_dir", "experiments/results", "Where the .md, .json and .png results go.")
TAG = flags.DEFINE_string("tag", "", "Appended to the result file names (e.g. the subset run).")
REPEATS = flags.DEFINE_integer("repeats", 10, "Timed samples per configuration (the median is reported).")
MIN_SAMPLE_S = flags.DEFINE_float("min_sample_s", 0.05, "Each sample runs calls back to back for this long.")
TIME_BUDGET_S = flags.DEFINE_float(
    "time_budget_s", 450.0, "Wall-clock budget: configurations not started by then are recorded as skipped."
)
MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "n of the n³ bf16 peak matmul (0: 8192 on GPU, 512 on CPU).")
COPY_MIB = flags.DEFINE_integer("copy_mib", 0, "MiB of the bandwidth pass (0: 2048 on GPU, 64 on CPU).")
PLOTS = flags.DEFINE_bool("plots", True, "Write a PNG of the results (matplotlib).")
WORKER_IN = flags.DEFINE_string("worker_in", None, "Internal: run as a worker on this JSON payload.")
WORKER_OUT = flags.DEFINE_string("worker_out", None, "Internal: where a worker writes its JSON result.")


# ------------------------------------------------------------------------------------------------------
# Devices and ceilings.


def device_info() -> dict[str, Any]:
    """The first JAX device: platform, kind, a short name for file names, its datasheet bf16 peak."""
    device = jax.devices()[0]
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        short=short_device_name(device.device_kind, device.platform),
        datasheet_flops=flops_lib.device_peak_flops(device),
        jax_version=jax.__version__,
        device_count=jax.device_count(),
    )


def short_device_name(kind: str, platform: str = "gpu") -> str:
    """'NVIDIA H100 80GB HBM3' → 'H100'; a CPU → 'cpu'; otherwise the kind with odd characters removed."""
    if platform == "cpu":
        return "cpu"
    for name in flops_lib.PEAK_BF16:
        if name.lower() in kind.lower():
            return name.replace(" ", "")
    return re.sub(r"[^A-Za-z0-9]+", "", kind) or platform


def measure_ceilings() -> dict[str, Any]:
    """Measured bf16 matmul rate (FLOP/s) and memory bandwidth (bytes/s) of the first device."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = MATMUL_N.value or (512 if on_cpu else 8192)
    copy_bytes = (COPY_MIB.value or (64 if on_cpu else 2048)) * 2**20
    keys = jax.random.split(jax.random.key(1234), 3)
    a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
    b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
    matmul, _, _ = compile_timed(jnp.dot, a, b)
    t_matmul = time_calls(lambda: matmul(a, b))
    x = jax.random.normal(keys[2], (copy_bytes // 4,), jnp.float32)
    # One read and one write per element; a trivial add keeps XLA from eliding the pass.
    passes, _, _ = compile_timed(lambda x: x + 1.0, x)
    t_copy = time_calls(lambda: passes(x))
    return dict(
        matmul_n=n,
        matmul_flops=2 * n**3 / t_matmul.median_s,
        matmul_timing=t_matmul.to_dict(),
        copy_bytes=copy_bytes,
        bandwidth=2 * copy_bytes / t_copy.median_s,
        copy_timing=t_copy.to_dict(),
    )


# ------------------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timing:
    """Seconds per call: median and quartiles over samples, and the raw samples."""

    samples: list[float]
    calls_per_sample: int = 1
    quartiles: tuple[float, float] | None = None  # given where only quantiles are known (do_bench)

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples))

    @property
    def iqr_pct(self) -> float:
        q1, q3 = self.quartiles or np.percentile(self.samples, [25, 75])
        return float(100 * (q3 - q1) / self.median_s) if self.median_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(
            median_s=self.median_s,
            iqr_pct=self.iqr_pct,
            min_s=float(min(self.samples)),
            max_s=float(max(self.samples)),
            samples=[float(s) for s in self.samples],
            calls_per_sample=self.calls_per_sample,
        )


def compile_timed(fn, *args, donate_argnums=(), **jit_kwargs):
    """Compiles ``fn`` for ``args``: (compiled, seconds to lower + compile, memory dict from XLA)."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - start, program_memory(compiled)


def program_memory(compiled) -> dict[str, int] | None:
    """Bytes a compiled program needs: XLA's peak estimate, else arguments + outputs + temps − aliased."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    peak = getattr(m, "peak_memory_in_bytes", 0) or 0
    return dict(
        bytes=int(max(peak, total)),
        argument_bytes=int(m.argument_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
    )


def program_flops(compiled) -> float | None:
    """FLOPs XLA counts for a compiled program (every op, elementwise too; a loop body counted once)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def time_calls(
    call: Callable[[], Any],
    *,
    repeats: int | None = None,
    min_sample_s: float | None = None,
    warmup: int = 2,
    calls_per_sample: int | None = None,
) -> Timing:
    """Times ``call()`` (which dispatches device work and returns arrays) after ``warmup`` calls.

    Each sample runs ``calls_per_sample`` calls back to back (by default as many as last
    ``min_sample_s``, from one timed call) and blocks on the last result; the sample is its time / calls.
    """
    repeats = REPEATS.value if repeats is None else repeats
    min_sample_s = MIN_SAMPLE_S.value if min_sample_s is None else min_sample_s
    for _ in range(warmup):
        jax.block_until_ready(call())
    if calls_per_sample is None:
        start = time.perf_counter()
        jax.block_until_ready(call())
        single = time.perf_counter() - start
        calls_per_sample = int(min(1000, max(1, math.ceil(min_sample_s / max(single, 1e-7)))))
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = None
        for _ in range(calls_per_sample):
            out = call()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls_per_sample)
    return Timing(samples, calls_per_sample)


def time_torch(
    fn: Callable[[], Any], *, grad_to_none=None, warmup_ms: int = 100, rep_ms: int = 500
) -> Timing:
    """Times a PyTorch callable on CUDA: triton.testing.do_bench quartiles, or CUDA events without Triton.

    With do_bench, the Timing holds its median as the one sample and its quartiles.
    """
    import torch

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q1, q2, q3 = do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.25, 0.5, 0.75]
        )
        return Timing([q2 / 1e3], quartiles=(q1 / 1e3, q3 / 1e3))
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(max(5, REPEATS.value)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return Timing(samples)


def peak_bytes_in_use(devices=None) -> int | None:
    """This process's peak device memory (JAX), where the backend reports it (GPU/TPU; not CPU): of the
    first device, or the most of any of ``devices``."""
    peaks = []
    for device in devices or jax.devices()[:1]:
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


# ------------------------------------------------------------------------------------------------------
# Guards, budgets and workers.


def is_oom(error: BaseException | str) -> bool:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return bool(re.search(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory|Out of memory|OOM", text))


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one configuration: its result dict with status "ok", or status "OOM" / "error" and the error."""
    try:
        result = fn()
    except Exception as error:  # noqa: BLE001 — any failure of one configuration is recorded, not raised
        text = f"{type(error).__name__}: {error}"
        status = "OOM" if is_oom(error) else "error"
        print(f"  -> {status}: {text.splitlines()[0][:300]}", flush=True)
        return dict(
            status=status, error=text[:4000], traceback=_relative_paths(traceback.format_exc())[-4000:]
        )
    return {"status": "ok", **(result or {})}


def _relative_paths(text: str) -> str:
    """Tracebacks without machine paths: the repository root and site-packages prefixes dropped."""
    text = text.replace(REPO_ROOT + os.sep, "")
    return re.sub(r'"[^"]*?site-packages/', '"site-packages/', text)


class Budget:
    """The wall-clock budget of a run (``--time_budget_s``), counted from construction."""

    def __init__(self, seconds: float | None = None):
        self.seconds = TIME_BUDGET_S.value if seconds is None else seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def exhausted(self, next_seconds: float = 0.0) -> bool:
        """True when the budget is spent, or would be by a task expected to take ``next_seconds``."""
        return self.left() <= next_seconds


def run_worker(
    module: str,
    payload: dict[str, Any],
    timeout_s: float,
    extra_flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
):
    """Runs ``python -m module --worker_in=... --worker_out=...`` in a fresh process; returns its result.

    ``env``: variables set in the worker's environment over this process's. A worker that crashes, is
    killed or times out gives {"status": "OOM" | "error" | "timeout", ...}.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path_in, path_out = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(path_in, "w") as f:
            json.dump(payload, f)
        cmd = [
            sys.executable,
            "-m",
            module,
            f"--worker_in={path_in}",
            f"--worker_out={path_out}",
            *extra_flags,
        ]
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=max(1.0, timeout_s),
                env={**os.environ, **env} if env else None,
            )
        except subprocess.TimeoutExpired as error:
            return dict(status="timeout", error=f"worker exceeded {timeout_s:.0f}s", log=_tail(error.stderr))
        if os.path.exists(path_out):
            with open(path_out) as f:
                return json.load(f)
        log = _tail(proc.stderr) + _tail(proc.stdout)
        status = "OOM" if is_oom(log) or proc.returncode in (-9, 137) else "error"
        return dict(status=status, error=f"worker exited with {proc.returncode}", log=log)


def _tail(text, chars: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


def maybe_run_worker(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """In a worker process: runs ``handlers[payload["kind"]](payload)``, writes its JSON; returns True."""
    if not WORKER_IN.value:
        return False
    with open(WORKER_IN.value) as f:
        payload = json.load(f)
    result = guarded(lambda: handlers[payload["kind"]](payload))
    with open(WORKER_OUT.value, "w") as f:
        json.dump(result, f, default=_json_default)
    return True


# ------------------------------------------------------------------------------------------------------
# Inputs.


def normal(key, shape, dtype, scale: float = 1.0) -> jax.Array:
    """Random normal values (never zeros: zeros can hide unwritten outputs and run faster)."""
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def random_tokens(seed: int, shape, vocab_size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, shape, dtype=np.int32)


def packed_segment_ids(batch: int, length: int, mean: int, seed: int = 0) -> np.ndarray:
    """[B, T] int32 segment ids of documents with geometric lengths (mean ``mean``), back to back, as the
    packer lays them out (a row's first document continues from before the row)."""
    rng = np.random.default_rng(seed)
    starts = rng.random((batch, length)) < 1.0 / mean
    starts[:, 0] = False
    return (1 + np.cumsum(starts, axis=1)).astype(np.int32)


def rel_error(x, ref) -> float:
    """‖x − ref‖ / ‖ref‖ in float64; NaN when x has a non-finite value."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("nan")
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def remat_policy(text: str, flag: str = "--remat") -> str:
    """A remat policy name (``nn.remat``) from a flag's text: true / yes / 1 mean full, false / no / 0
    none."""
    from retnet_jax.nn import remat as remat_lib

    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    return remat_lib.resolve(words.get(text.strip().lower(), text.strip()), flag)


# ------------------------------------------------------------------------------------------------------
# Reports.


def fmt(value, scale: float = 1.0, spec: str = ".3g") -> str:
    """A number for a table cell; "–" for None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value * scale, spec)


def fmt_count(n) -> str:
    """1414205440 → '1.41B', 5.6e6 → '5.6M'."""
    if not n:
        return "–"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def when_ok(cell: Callable[[dict], str]) -> Callable[[dict], str]:
    """A table cell that shows the row's status (OOM, error, skipped, n/a) when it did not run."""
    return lambda row: cell(row) if row.get("status") == "ok" else row.get("status", "?")


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict], str]]]
) -> str:
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def ceilings_markdown(device: dict[str, Any], ceilings: dict[str, Any] | None) -> str:
    lines = [
        f"Device: {device.get('device_kind')} ({device.get('platform')}), jax {device.get('jax_version')}."
    ]
    if device.get("datasheet_flops"):
        lines.append(f"Datasheet bf16 dense peak: {device['datasheet_flops'] / 1e12:.0f} TFLOP/s.")
    if ceilings:
        lines.append(
            f"Measured: bf16 matmul {ceilings['matmul_n']}³ at {ceilings['matmul_flops'] / 1e12:.4g} TFLOP/s "
            f"(iqr {ceilings['matmul_timing']['iqr_pct']:.1f}%); device-to-device pass over "
            f"{ceilings['copy_bytes'] / 2**20:.0f} MiB at {ceilings['bandwidth'] / 1e9:.4g} GB/s "
            f"(read + write)."
        )
    return " ".join(lines)


class Report:
    """Writes ``{out_dir}/{name}_{device}_{date}[_{tag}].{md,json,png}``; rewritten after every config."""

    def __init__(self, name: str, device_short: str):
        stem = f"{name}_{device_short}_{datetime.date.today().isoformat()}"
        stem += f"_{TAG.value}" if TAG.value else ""
        out_dir = OUT_DIR.value
        self.dir = out_dir if os.path.isabs(out_dir) else os.path.join(os.getcwd(), out_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.stem = os.path.join(self.dir, stem)
        self.command = "python -m " + " ".join([_module_name(), *sys.argv[1:]])

    @property
    def png(self) -> str:
        return self.stem + ".png"

    def write(self, title: str, sections: Sequence[str], raw: dict[str, Any]):
        text = "\n\n".join([f"# {title}", f"`{self.command}`", *sections]) + "\n"
        with open(self.stem + ".md", "w") as f:
            f.write(text)
        with open(self.stem + ".json", "w") as f:
            json.dump({"command": self.command, **raw}, f, indent=1, default=_json_default)
        return text

    def paths(self) -> list[str]:
        return [p for p in (self.stem + ".md", self.stem + ".json", self.png) if os.path.exists(p)]


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def figure(rows: int, cols: int, size=(5.0, 3.6)):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return fig, axes


def log2_xaxis(ax, values):
    """A base-2 log x axis with a plain tick at each value (1K, 2K, ... for powers of two >= 1024)."""
    values = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v) for v in values])
    ax.minorticks_off()


def save_figure(fig, path: str):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def jax_train_step(cfg: dict[str, Any], mesh=None):
    """(step, trainer, init_s, compile_s, compiled): ``step()`` runs one compiled train step of the
    configuration on alternating synthetic batches, carrying the donated state. ``cfg["documents"]``
    > 0 packs documents of that mean length into the rows (segment ids in the batches, resets on);
    ``cfg["overrides"]`` sets architecture fields of the preset. ``mesh``: the device mesh (default one
    device); ``cfg["B"]`` rows in all, split over its data and fsdp axes."""
    from retnet_jax.configs.default import get_config
    from retnet_jax.models.config import RetNetConfig
    from retnet_jax.training import trainer as train
    from retnet_jax.training.sharding import make_mesh

    config = get_config()
    config.arch, config.model = cfg["arch"], cfg["model"]
    if cfg.get("heads"):
        config.model_overrides.num_heads = cfg["heads"]
    for field, value in (cfg.get("overrides") or {}).items():
        config.model_overrides[field] = value
    config.model_overrides.dtype = "bfloat16"
    config.model_overrides.dropout = cfg.get("dropout", 0.0)
    config.seq_len, config.batch_size, config.remat = cfg["T"], cfg["B"], cfg["remat"]
    config.mode = "chunkwise" if cfg["chunk"] else "parallel"
    config.chunk_size = cfg["chunk"] or config.chunk_size
    config.steps, config.warmup_steps, config.learning_rate = 1000, 10, 3e-4
    documents = cfg.get("documents") or 0
    config.reset_at_documents = documents > 0
    vocab = RetNetConfig.preset(cfg["model"], **(cfg.get("overrides") or {})).vocab_size
    if mesh is None:
        mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])  # one device, whatever the host has

    start = time.perf_counter()
    trainer = train.Trainer(config, train.model_config(config, vocab), mesh)
    state = jax.block_until_ready(trainer.init(0))
    init_s = time.perf_counter() - start
    shape = (cfg["B"], cfg["T"])
    batches = []
    for i in range(2):
        batch = dict(
            inputs=random_tokens(2 * i, shape, vocab), targets=random_tokens(2 * i + 1, shape, vocab)
        )
        if documents:
            batch["segment_ids"] = packed_segment_ids(*shape, documents, seed=i)
        batches.append(trainer.global_batch(batch))
    start = time.perf_counter()
    compiled = trainer.lower_train_step(state, batches[0]).compile()  # the Trainer's own jitted step
    compile_s = time.perf_counter() - start

    carry = dict(state=state, step=0, loss=None)

    def step():
        carry["state"], metrics = compiled(carry["state"], batches[carry["step"] % 2])
        carry["step"] += 1
        carry["loss"] = metrics["loss"]
        return carry["state"], metrics

    step.carry = carry
    return step, trainer, init_s, compile_s, compiled


# ------------------------------------------------------------------------------------------------------
# Decoding programs (bench_inference and profile_steps).


def decode_model(arch: str, model_name: str, dtype: str):
    """(model, decoder, variables) with random parameters in ``dtype``: ``arch`` retnet, retnet-loop (the
    one-token step's layer loop not unrolled) or transformer (the baseline matching the preset)."""
    import flax.linen as nn

    from retnet_jax.inference.decoding import LMDecoder
    from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig

    cfg = RetNetConfig.preset(model_name, dtype=dtype, param_dtype=dtype, dropout=0.0)
    if arch.startswith("retnet"):
        model = DecoderLM(cfg, unroll_decode=arch == "retnet")
    else:
        model = DecoderLM(TransformerConfig.matching(cfg))
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = jax.jit(lambda key: nn.unbox(model.init(key, tokens)))(jax.random.key(0))
    return model, LMDecoder(model, "chunkwise"), variables


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def state_arrays(state) -> list[jax.Array]:
    """A decoding state's contents: every array but the position."""
    return [a for name, a in state._asdict().items() if name != "position"]


def decode_state(model, batch: int, context: int, *, extra_slots: int):
    """The model's own decoding state (whatever its layout) at position ``context``, with random contents
    (the work of a step does not depend on them); a KV cache gets ``context + extra_slots`` slots."""
    empty = jax.eval_shape(lambda: model.config.init_state(batch, max_length=context + extra_slots))
    # Jitted, so the values are drawn straight into the array's dtype without a float32 copy of it.
    fields = {
        name: jax.jit(lambda key, spec=spec: jax.random.normal(key, spec.shape, spec.dtype))(
            jax.random.key(i)
        )
        for i, (name, spec) in enumerate(empty._asdict().items())
        if name != "position"
    }
    return type(empty)(**fields, position=jnp.full(empty.position.shape, context, jnp.int32))


def at_position(state, context: int):
    """The state with every row's position set back to ``context``."""
    return state._replace(position=jnp.full(state.position.shape, context, jnp.int32))


def decode_program(decoder, steps: int):
    """f(variables, token [B], state) → (token, state) after ``steps`` greedy steps (a fori_loop)."""

    def decode(variables, token, state):
        def body(_, carry):
            token, state = carry
            logits, state = decoder.step(variables, token, state)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), state

        return jax.lax.fori_loop(0, steps, body, (token, state))

    return decode
