"""What the benchmark scripts share: flags, the timing method, device ceilings, workers and inputs. Their
reports (files, tables, plots) are in ``benchreport``; the model programs they measure (a train step,
decoding) in ``benchprograms``.

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

from experiments import benchreport
from retnet_jax.training import flops as flops_lib

# Read when JAX creates its GPU client (at the first device use, not at import), so this is in time.
# JAX's default (75% of the GPU) would turn large configurations into spurious OOMs.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPEATS = flags.DEFINE_integer("repeats", 10, "Timed samples per configuration (the median is reported).")
MIN_SAMPLE_S = flags.DEFINE_float("min_sample_s", 0.05, "Each sample runs calls back to back for this long.")
TIME_BUDGET_S = flags.DEFINE_float(
    "time_budget_s", 450.0, "Wall-clock budget: configurations not started by then are recorded as skipped."
)
MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "n of the n³ bf16 peak matmul (0: 8192 on GPU, 512 on CPU).")
COPY_MIB = flags.DEFINE_integer("copy_mib", 0, "MiB of the bandwidth pass (0: 2048 on GPU, 64 on CPU).")
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


def free_bytes() -> int | None:
    """Device memory JAX can still allocate (its limit minus what is in use), where the backend reports
    it (GPU/TPU; None on a CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


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
    killed or times out gives {"status": "OOM" | "error" | "timeout", ...}, unless it saved a partial
    result (``save_partial``): then that, with ``partial`` saying why the rest is missing.
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
            timeout = dict(status="timeout", error=f"worker exceeded {timeout_s:.0f}s")
            return _failed(path_out, timeout, error.stderr)
        if os.path.exists(path_out):
            with open(path_out) as f:
                return json.load(f)
        log = _tail(proc.stderr) + _tail(proc.stdout)
        status = "OOM" if is_oom(log) or proc.returncode in (-9, 137) else "error"
        return _failed(path_out, dict(status=status, error=f"worker exited with {proc.returncode}"), log)


def _failed(path_out: str, failure: dict[str, Any], log) -> dict[str, Any]:
    """A worker that ended without its result: the partial one it saved, with ``partial`` saying why it is
    partial, or the failure."""
    if os.path.exists(path_out + ".partial"):
        with open(path_out + ".partial") as f:
            return {**json.load(f), "partial": f"{failure['status']}: {failure['error']}", "log": _tail(log)}
    return {**failure, "log": _tail(log)}


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
        json.dump(result, f, default=benchreport.json_default)
    return True


def save_partial(result: dict[str, Any]) -> None:
    """In a worker process: what ``run_worker`` returns if the worker is then killed by its timeout (a
    long sweep keeps the configurations it finished). Written whole, then renamed: never half a file."""
    if not WORKER_OUT.value:
        return
    path = WORKER_OUT.value + ".partial"
    with open(path + ".tmp", "w") as f:
        json.dump({"status": "ok", **result}, f, default=benchreport.json_default)
    os.replace(path + ".tmp", path)


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
