"""The parent of ``bench_inference``: the groups in order, each in a worker process with its share of the
time budget (or in this process with ``--in_process``), its rows gathered as they arrive."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from experiments import benchlib as bl
from experiments.inference import plan
from experiments.inference.worker import run_group

_GRACE_S = 30.0  # a worker is killed this long after its deadline


def run_groups(groups, budget, on_group_done, module: str) -> dict[str, Any]:
    """Runs every group (a worker each: ``python -m module``, which must answer ``maybe_run_worker``);
    calls ``on_group_done(results)`` after each. Tasks a worker never reported get its status."""
    results: dict[str, Any] = dict(rows=[], hlo=[], device=None, ceilings=None, setups={})
    shares_left = sum(g["share"] for g in groups)
    for group in groups:
        left = budget.left()
        deadline_s = max(0.0, left * group["share"] / shares_left)
        shares_left -= group["share"]
        in_process = plan.IN_PROCESS.value and not group["xla_flags"]
        with tempfile.TemporaryDirectory() as tmp:
            rows_path = os.path.join(tmp, "rows.jsonl")
            payload = dict(
                kind="group",
                group=group,
                deadline=time.time() + deadline_s,
                rows_path=rows_path,
                ceilings=results["ceilings"],
            )
            worker: dict[str, Any] = {"status": "ok"}
            if left <= 0:
                worker = {"status": "skipped"}
            elif in_process:
                run_group(payload)
            else:
                env = dict(os.environ)
                env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), group["xla_flags"]]).strip()
                print(f"worker [{group['name']}]: {deadline_s:.0f} s", flush=True)
                worker = bl.run_worker(
                    module, payload, deadline_s + _GRACE_S, extra_flags=sys.argv[1:], env=env
                )
            lines = []
            if os.path.exists(rows_path):
                with open(rows_path) as f:
                    lines = [json.loads(line) for line in f if line.strip()]
        done = []
        for line in lines:
            kind = line.pop("type")
            if kind == "row":
                done.append(line)
            elif kind == "device":
                results["device"] = results["device"] or line
            elif kind == "ceilings":
                results["ceilings"] = results["ceilings"] or line
            elif kind == "hlo":
                results["hlo"].append(line)
            elif kind == "setup":
                results["setups"][group["name"]] = line
        for task in group["tasks"][len(done) :]:  # what the worker never reported
            status = worker.get("status", "error") if worker.get("status") != "ok" else "skipped"
            done.append(
                dict(
                    task,
                    flags=group["flags"],
                    status=status,
                    error=worker.get("error"),
                    log=worker.get("log"),
                )
            )
        results["rows"] += done
        on_group_done(results)
    return results
