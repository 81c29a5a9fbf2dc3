"""The replication study end to end on a CPU at toy sizes: corpus from a fake site-packages tree → BPE →
a tiny RetNet and Transformer trained a few steps and measured → MQAR → the report with its plots.

One subprocess runs the parts in order (as the device calls would, but in one process to pay JAX's
start-up once); about 40 s on 2 CPU cores, compilation included.
"""

import json
import os
import subprocess
import sys

from tests.training.test_code_corpus import fake_site_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pipeline(tmp_path):
    site = fake_site_packages(str(tmp_path / "site"), packages=30, modules=4)
    results, reports = tmp_path / "results", tmp_path / "reports"
    env = dict(os.environ)
    # One CPU device (the test set-up's 8 fake devices would split the 4-row toy batches).
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    cmd = [
        sys.executable,
        "-m",
        "experiments.replicate",
        "--smoke",
        "--part=corpus,train,mqar,report",
        f"--roots={site}",
        f"--work_dir={tmp_path / 'work'}",
        f"--results_dir={results}",
        f"--report_dir={reports}",
        "--validation_fraction=0.25",
        "--date=2000-01-01",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    assert sorted(os.listdir(results)) == [
        "corpus.json",
        "mqar_retnet_smoke.json",
        "mqar_transformer_smoke.json",
        "tokenizer.json",
        "train_retnet_smoke.json",
        "train_transformer_smoke.json",
    ]
    with open(results / "corpus.json") as f:
        corpus = json.load(f)
    assert corpus["tokens"]["train"] > corpus["tokens"]["validation"] > 0
    assert corpus["device"]["short"] == "cpu"

    runs = {}
    for arch in ("retnet", "transformer"):
        with open(results / f"train_{arch}_smoke.json") as f:
            runs[arch] = json.load(f)
        run = runs[arch]
        assert run["status"] == "ok", run.get("error")
        assert run["steps_done"] == run["budget"]["steps"] == 6 and not run["truncated"]
        assert [p["step"] for p in run["eval_curve"]] == [0, 3, 6]
        assert run["eval_curve"][-1]["loss"] < run["eval_curve"][0]["loss"]  # it learns
        e = run["extrapolation"]
        assert e["documents"] >= 1 and len(e["binned"]) == 4 * e["seq_len"] // e["bin_width"]
        assert set(run["decode"]["by_batch"]) == {"1", "2"}
        assert run["decode"]["by_batch"]["1"]["tokens_per_s"] > 0
        assert run["tokenizer_digest"] == corpus["tokenizer"]["digest"]
    # Same size, same data: equal parameter counts and tokens.
    assert runs["retnet"]["params"] == runs["transformer"]["params"]
    assert runs["retnet"]["tokens_done"] == runs["transformer"]["tokens_done"]

    with open(results / "mqar_transformer_smoke.json") as f:
        mqar = json.load(f)
    assert set(mqar["best"]["accuracy"]) == {"2", "4", "8"}
    assert all(0 <= a <= 1 for a in mqar["best"]["accuracy"].values())

    stem = "replication_cpu_2000-01-01"
    assert sorted(os.listdir(reports)) == sorted(
        [f"{stem}.md"] + [f"{stem}_{name}.png" for name in ("extrapolation", "loss", "mqar", "scaling")]
    )
    text = (reports / f"{stem}.md").read_text()
    for heading in (
        "## Corpus",
        "## Language models",
        "## Length extrapolation",
        "## Decoding speed",
        "## Associative",
    ):
        assert heading in text
    assert "different" not in text  # no consistency warning: same corpus, tokenizer and tokens


def test_token_budget():
    from experiments.replication import recipe

    # Time-limited: 1000 tokens/s for 100 s, cap far away; whole steps of 64 tokens.
    plan = recipe.token_budget(
        params=10, step_tokens=64, tokens_per_second=1000, train_seconds=100, tokens_per_param=1e6
    )
    assert plan == dict(steps=1562, tokens=99968, tokens_per_param=9996.8, limited_by="time")
    # Capped at 20 tokens per parameter.
    plan = recipe.token_budget(
        params=1000, step_tokens=64, tokens_per_second=1e6, train_seconds=100, tokens_per_param=20
    )
    assert plan["steps"] == 312 and plan["limited_by"] == "tokens_per_param"
    # Never less than one step.
    assert (
        recipe.token_budget(
            params=1, step_tokens=64, tokens_per_second=1, train_seconds=1, tokens_per_param=20
        )["steps"]
        == 1
    )
