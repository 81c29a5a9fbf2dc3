"""fla's ``chunk_retention`` (PyTorch/Triton), the peer of ``bench_retention``: measured in a worker
process (``python -m experiments.bench_retention`` answering the payload kind "fla") started before the
parent's JAX touches the GPU, so that the two allocators do not share it."""

from __future__ import annotations

import contextlib
import importlib.util
import time

import numpy as np

from experiments import benchlib as bl
from experiments import profiling
from experiments.retention import sweep


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

    # The timings come first: the checks' head shapes autotune on their own (minutes at wide heads), so
    # they run only with the time left, and a worker stopped during them still returns every timing.
    check = dict(status="timeout", error="the fla worker was stopped by its time limit")
    results = []
    unfinished = dict(status="timeout", error="the fla worker was stopped by its time limit")
    for n, cfg in enumerate(payload["configs"]):
        # What the parent gets if the worker is killed during this configuration: the ones done so far.
        rest = [unfinished] * (len(payload["configs"]) - n)
        device = torch.cuda.get_device_name()
        bl.save_partial(dict(available=True, device=device, check=check, results=results + rest))
        label = " ".join(f"{key}={cfg[key]}" for key in ("B", "T", "H", "K", "V", "passes", "state"))
        print(f"fla worker: {label} ...", flush=True)
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
            result = dict(compile_s=first_s, memory=memory, timing=timing.to_dict())
            if payload.get("profile_top", 0) > 0:  # fla's kernels, as the JAX rows' trace lists ours
                with torch.no_grad() if cfg["passes"] == "fwd" else contextlib.nullcontext():
                    kernels = bl.guarded(lambda: profiling.torch_profile("", fn, 3, payload["profile_top"]))
                if kernels.pop("status") == "ok":
                    result["kernels"] = kernels
            return result

        results.append(bl.guarded(one))
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    bl.save_partial(dict(available=True, device=device, check=check, results=results))
    if time.monotonic() > deadline:
        check = dict(status="skipped", error="time budget of the fla worker")
    else:
        print("fla worker: correctness checks ...", flush=True)
        check = bl.guarded(run_check)
    return dict(available=True, device=device, check=check, results=results)


def measure_fla(fla_configs, files, budget):
    """fla's timings and check outputs, from a PyTorch worker process (before JAX takes the GPU)."""
    if "fla" not in sweep.IMPLS.value:
        return dict(status="ok", available=False, reason="not requested")
    if not all(importlib.util.find_spec(m) for m in ("torch", "fla")):
        return dict(status="ok", available=False, reason="torch or fla not installed")
    print(f"fla worker: {len(fla_configs)} configurations ...", flush=True)
    share = sweep.PEER_SHARE.value * budget.left()
    payload = dict(
        kind="fla", configs=fla_configs, checks=files, budget_s=share, profile_top=sweep.PROFILE_TOP.value
    )
    # The worker stops starting configurations after its share; the margin lets a started one finish.
    fla = bl.run_worker("experiments.bench_retention", payload, share + 90, [f"--repeats={bl.REPEATS.value}"])
    if fla.get("status") != "ok" or not fla.get("available"):
        print(
            f"fla: not measured ({fla.get('reason') or fla.get('error')})\n{fla.get('log', '')}", flush=True
        )
    return fla
