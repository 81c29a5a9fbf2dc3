"""Device traces summed by kernel: the shared part of ``profile_steps`` and ``bench_retention --profile_top``.

A warm program is run under ``jax.profiler.trace``; the trace's device plane (GPU streams; on a CPU, the
XLA executor threads) is read back with ``jax.profiler.ProfileData`` and every kernel's time is summed by
name and by kind (matrix products, cuDNN attention, Pallas/Triton kernels, copies, other XLA fusions)."""

from __future__ import annotations

import collections
import glob
import os
import tempfile
import time

import jax

from experiments import benchreport as br

KINDS = (
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash")),
    ("Pallas / Triton", ("triton", "_kernel", "pallas")),  # a Pallas kernel is named by its function
    ("copy / memset", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other XLA fusions"


def device_events(trace_dir: str):
    """(name, duration_ns) of every kernel on the first device's streams (CPU: the XLA threads)."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    planes = {p.name: p for p in profile.planes}
    gpu = sorted(n for n in planes if n.startswith("/device:GPU"))
    if gpu:
        plane = planes[gpu[0]]
        lines = [line for line in plane.lines if line.name.startswith("Stream")]
    else:
        plane = planes["/host:CPU"]
        lines = [line for line in plane.lines if "XLA" in line.name and "Client" not in line.name]
    return [(e.name, e.duration_ns) for line in lines for e in line.events]


def profile(name: str, run, calls: int = 1, top: int = 12):
    """Traces ``calls`` calls of ``run`` (already warm); returns the summary dict with the ``top`` longest
    kernels."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(run())
            wall = (time.perf_counter() - start) / calls
        events = device_events(tmp)
    return summarize(name, [(kernel, ns, 1) for kernel, ns in events], wall, calls, top)


def summarize(name: str, events, wall_s: float, calls: int, top: int = 12):
    """The summary dict of ``profile`` from (kernel name, duration_ns, launches) over ``calls`` calls."""
    by_name = collections.defaultdict(lambda: [0, 0])
    by_kind = collections.defaultdict(int)
    for kernel, ns, count in events:
        by_name[kernel][0] += ns / calls
        by_name[kernel][1] += count
        by_kind[kind_of(kernel)] += ns / calls
    busy = sum(by_kind.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(
        name=name,
        wall_s=wall_s,
        busy_s=busy * 1e-9,
        launches=sum(count for _, _, count in events) / calls,
        kinds=sorted(((k, v * 1e-9) for k, v in by_kind.items()), key=lambda kv: -kv[1]),
        top=[(k, v[0] * 1e-9, v[1] // calls) for k, v in ranked],
    )


def torch_profile(name: str, run, calls: int = 3, top: int = 12):
    """``profile`` for a PyTorch callable on CUDA (already warm), from ``torch.profiler``'s kernel times."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_trace

    torch.cuda.synchronize()
    with torch_trace(activities=[ProfilerActivity.CUDA]) as trace:
        start = time.perf_counter()
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / calls
    events = []
    for average in trace.key_averages():
        # Microseconds; the attribute was ``self_cuda_time_total`` before PyTorch 2.4.
        us = getattr(average, "self_device_time_total", None)
        if us is None:
            us = getattr(average, "self_cuda_time_total", 0)
        if us > 0:
            events.append((average.key, us * 1e3, average.count))
    return summarize(name, events, wall, calls, top)


def markdown(result, level: int = 2) -> str:
    """The summary as a markdown section under a heading of ``level``."""
    busy = result["busy_s"]
    kinds = br.markdown_table(
        [dict(kind=k, s=v) for k, v in result["kinds"]],
        [
            ("kind", lambda r: r["kind"]),
            ("ms", lambda r: br.fmt(r["s"], 1e3, ".2f")),
            ("% of busy", lambda r: br.fmt(100 * r["s"] / busy if busy else None, 1, ".1f")),
        ],
    )
    top = br.markdown_table(
        [dict(kernel=k, s=v, n=n) for k, v, n in result["top"]],
        [
            ("kernel", lambda r: f"`{r['kernel'][:90]}`"),
            ("ms", lambda r: br.fmt(r["s"], 1e3, ".3f")),
            ("launches", lambda r: str(r["n"])),
            ("kind", lambda r: kind_of(r["kernel"])),
        ],
    )
    return (
        f"{'#' * level} {result['name']}\n\nWall time of the traced call {result['wall_s'] * 1e3:.2f} ms; "
        f"device busy {busy * 1e3:.2f} ms in {result['launches']:.0f} kernel launches.\n\n{kinds}\n\n{top}"
    )
