"""The replication study end to end on a CPU at toy sizes: corpus from a fake site-packages tree → BPE →
a tiny RetNet and Transformer trained a few steps and measured → MQAR → the report with its plots.

One subprocess runs the parts in order (as the device calls would, but in one process to pay JAX's
start-up once); about 45 s on 2 CPU cores, compilation included.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from experiments.replication import recipe
from tests.training.test_code_corpus import fake_site_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED = os.path.join(ROOT, "experiments", "results", "replication")


def _recorded(tmp_path, kind: str, size: str):
    """Both architectures' committed results of one kind and size, copied into a folder of their own:
    (the folder, {arch: result})."""
    results = tmp_path / "recorded"
    results.mkdir(exist_ok=True)
    runs = {}
    for arch in recipe.ARCHS:
        with open(os.path.join(RECORDED, f"{kind}_{arch}_{size}.json")) as f:
            runs[arch] = json.load(f)
        (results / f"{kind}_{arch}_{size}.json").write_text(json.dumps(runs[arch]))
    return results, runs


@pytest.mark.slow
def test_pipeline(tmp_path):
    site = fake_site_packages(str(tmp_path / "site"), packages=30, modules=4)
    results, reports = tmp_path / "results", tmp_path / "reports"
    env = dict(os.environ)
    # One CPU device (the test set-up's 8 fake devices would split the 4-row toy batches).
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    # The parts run as ``python -m experiments.replicate`` would, with a spy on the training loop that
    # says which functions drove it.
    script = f"""
import inspect, sys
from absl import app
import experiments.replicate as replicate
from experiments.replication import loop

real_loop = loop.training_loop

def spy(*args, **kwargs):
    print("LOOP CALLED BY", inspect.stack()[1].function, flush=True)
    return real_loop(*args, **kwargs)

loop.training_loop = spy
sys.argv = ["replicate", "--smoke", "--part=corpus,calibrate,train,mqar,report", "--roots={site}",
            "--work_dir={tmp_path / "work"}", "--results_dir={results}", "--report_dir={reports}",
            "--validation_fraction=0.25", "--date=2000-01-01"]
app.run(replicate.main)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # Calibration and training time the same loop function.
    callers = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("LOOP CALLED BY")]
    assert callers == ["calibrate", "calibrate", "train", "train"]

    assert sorted(os.listdir(results)) == [
        "calibrate.json",
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

    with open(results / "calibrate.json") as f:
        calibration = json.load(f)
    for arch in ("retnet", "transformer"):
        measured = calibration["runs"]["smoke"][arch]
        assert measured["status"] == "ok" and measured["loop"]["timed_steps"] == 2  # 3 steps, 1 compiles
        assert measured["step_tokens_per_s"] == pytest.approx(4 * 32 / measured["step_s"])

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
        assert set(run["decode"]["by_batch"]) == {"2"}
        assert run["decode"]["by_batch"]["2"]["tokens_per_s"] > 0
        assert run["loop"]["version"] == calibration["runs"]["smoke"][arch]["loop"]["version"]
        assert run["tokenizer_digest"] == corpus["tokenizer"]["digest"]
        # The corpus was tokenized once, before the first run, and the runs know their epochs.
        assert run["startup"]["tokens"]["train"] == corpus["tokens"]["train"]
        assert run["epochs_done"] == run["tokens_done"] / corpus["tokens"]["train"] > 0
        assert run["budget"]["epochs"] == run["epochs_done"]
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

    # Time-limited: 1000 tokens/s for 100 s, caps far away; whole steps of 64 tokens.
    plan = recipe.token_budget(
        params=10, step_tokens=64, tokens_per_second=1000, train_seconds=100, tokens_per_param=1e6
    )
    assert plan == dict(steps=1562, tokens=99968, tokens_per_param=9996.8, epochs=None, limited_by="time")
    # With a margin of 1.25 the time cap is 100 s / 1.25 = 80 s of the measured speed: 80000 tokens.
    plan = recipe.token_budget(
        params=10,
        step_tokens=64,
        tokens_per_second=1000,
        train_seconds=100,
        tokens_per_param=1e6,
        margin=1.25,
    )
    assert plan["steps"] == 1250 and plan["steps"] * 64 / 1000 <= 100 / 1.25
    with pytest.raises(ValueError, match="margin"):
        recipe.token_budget(
            params=10, step_tokens=64, tokens_per_second=1, train_seconds=1, tokens_per_param=1, margin=0.5
        )
    # Capped at 20 tokens per parameter.
    plan = recipe.token_budget(
        params=1000, step_tokens=64, tokens_per_second=1e6, train_seconds=100, tokens_per_param=20
    )
    assert plan["steps"] == 312 and plan["limited_by"] == "tokens_per_param"
    # Capped at max_epochs passes over a corpus of 1000 tokens: 4000 tokens, 62 steps.
    plan = recipe.token_budget(
        params=1000,
        step_tokens=64,
        tokens_per_second=1e6,
        train_seconds=100,
        tokens_per_param=20,
        corpus_tokens=1000,
        max_epochs=4,
    )
    assert plan == dict(steps=62, tokens=3968, tokens_per_param=3.968, epochs=3.968, limited_by="epochs")
    # A large corpus leaves the other caps to bind, and the epochs are reported.
    plan = recipe.token_budget(
        params=1000,
        step_tokens=64,
        tokens_per_second=1e6,
        train_seconds=100,
        tokens_per_param=20,
        corpus_tokens=10_000,
    )
    assert plan["limited_by"] == "tokens_per_param" and plan["epochs"] == 312 * 64 / 10_000
    # Never less than one step.
    assert (
        recipe.token_budget(
            params=1, step_tokens=64, tokens_per_second=1, train_seconds=1, tokens_per_param=20
        )["steps"]
        == 1
    )


def test_call_schedule():
    from experiments.replication import schedule

    runs = [
        schedule.RunTime("retnet", train_s=100, setup_s=40, measure_s=60),
        schedule.RunTime("transformer", train_s=200, setup_s=40, measure_s=60),
    ]
    assert schedule.call_seconds(70, runs) == 70 + 200 + 300
    # With the 10% margin on training: 70 + 210 = 280, then + 320 = 600.
    assert schedule.runs_that_fit(70, runs, 600) == 2
    assert schedule.runs_that_fit(70, runs, 599) == 1
    assert schedule.runs_that_fit(70, runs, 100) == 1  # one run is always tried
    assert schedule.fits(280, 600, runs[1]) and not schedule.fits(281, 600, runs[1])


@pytest.mark.slow
def test_one_failed_run_keeps_the_others_results(tmp_path):
    """Two runs in one train call: the first raises, the second still trains and writes its results."""
    site = fake_site_packages(str(tmp_path / "site"), packages=30, modules=4)
    results = tmp_path / "results"
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    script = f"""
import sys
from absl import app
import experiments.replicate as replicate

real_train = replicate.lm.train

def train(size, arch, *args, **kwargs):
    if arch == "retnet":
        raise RuntimeError("injected failure")
    return real_train(size, arch, *args, **kwargs)

replicate.lm.train = train
sys.argv = ["replicate", "--smoke", "--part=corpus,train", "--arch=retnet,transformer",
            "--roots={site}", "--work_dir={tmp_path / "work"}", "--results_dir={results}",
            "--validation_fraction=0.25"]
app.run(replicate.main)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(results / "train_retnet_smoke.json") as f:
        failed = json.load(f)
    with open(results / "train_transformer_smoke.json") as f:
        done = json.load(f)
    assert failed["status"] == "error" and "injected failure" in failed["error"]
    assert done["status"] == "ok" and done["steps_done"] == 6
    assert "train: retnet smoke: error; transformer smoke: ok" in proc.stdout


def test_plan_keeps_a_recorded_budget(tmp_path):
    """A size whose first run finished keeps that run's budget; a truncated run sets none but its speed
    lowers the budget; corpus.json's tokens give the epochs."""
    from experiments.replication.loop import LOOP_VERSION

    results = tmp_path / "results"
    results.mkdir()
    device = dict(platform="cpu", device_kind="cpu", short="cpu", device_count=1, jax_version="0")
    (results / "corpus.json").write_text(json.dumps(dict(device=device, tokens=dict(train=10_000_000))))
    budget = dict(steps=123, tokens=123 * 65536, tokens_per_param=0.5, epochs=0.8, limited_by="time")
    run = dict(status="ok", device=device, date="2000-01-01", budget=budget)
    (results / "train_retnet_m.json").write_text(json.dumps(run))
    # A run of l stopped by its deadline: its budget is not kept, its measured speed (this loop's) caps the
    # next budget: 100,000 tokens/s × 300 s / 1.1 = 27.3M tokens = 416 steps of 65,536.
    truncated = dict(run, truncated=True, tokens_per_s=100_000.0, loop=dict(version=LOOP_VERSION))
    (results / "train_transformer_l.json").write_text(json.dumps(truncated))
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    cmd = [
        sys.executable,
        "-m",
        "experiments.replicate",
        "--part=plan",
        "--size=s,m,l",
        f"--results_dir={results}",
    ]

    def plan(*flags):
        proc = subprocess.run([*cmd, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return {line.split(":")[0]: line for line in proc.stdout.splitlines() if line.startswith("size ")}

    # By default every size trains on the study's tokens, whatever a size's earlier runs recorded; the
    # speeds still come from them (l's truncated run: 100,000 tokens/s).
    lines = plan()
    steps = recipe.STUDY_TOKENS // 65536
    for size in ("s", "m", "l"):
        assert lines[f"size {size}"].startswith(f"size {size}: {steps} steps"), lines[f"size {size}"]
        assert "the study's tokens" in lines[f"size {size}"]
    assert "measured by an earlier run of the size: 100,000 tokens/s" in lines["size l"]

    lines = plan("--tokens=0")  # each size its own budget
    # s: 20 tokens per parameter would be 28 passes over 10M tokens; the cap is 4 (40M tokens).
    assert "(limited by epochs)" in lines["size s"] and "4.00 epochs" in lines["size s"]
    assert (
        lines["size m"].startswith("size m: 123 steps")
        and "as the retnet run of 2000-01-01" in lines["size m"]
    )
    assert lines["size l"].startswith("size l: 416 steps") and "measured by an earlier run" in lines["size l"]


def test_head_ablation_is_compared_with_its_base_sizes_transformer(tmp_path):
    """s-k128 is size s with K = 128 heads (H = 3): a RetNet-only run whose report row is compared with
    size s's Transformer and whose curves go into size s's panels; a Transformer of it is refused before
    anything runs."""
    from experiments.replication import report

    s, ablation = recipe.LM_SIZES["s"], recipe.LM_SIZES["s-k128"]
    assert (ablation.d_model, ablation.num_layers, ablation.num_heads) == (s.d_model, s.num_layers, 3)
    assert recipe.base_size("s-k128") == "s" and recipe.base_size("m") == "m"
    with pytest.raises(ValueError, match="--arch=retnet"):
        recipe.check_arch_for_size("transformer", "s-k128")
    recipe.check_arch_for_size("retnet", "s-k128")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.replicate",
            "--part=train",
            "--size=s-k128",
            "--arch=transformer",
            f"--results_dir={tmp_path / 'results'}",
            f"--work_dir={tmp_path / 'work'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--arch=retnet" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()

    # The report from recorded runs (the committed size-s results, the ablation's a copy with its own loss).
    results, runs = _recorded(tmp_path, "train", "s")
    run = dict(runs["retnet"], size="s-k128", final_eval_loss=runs["retnet"]["final_eval_loss"] + 0.25)
    (results / "train_retnet_s-k128.json").write_text(json.dumps(run))
    path = report.write_report(str(results), str(tmp_path / "report"), "2000-01-01")
    text = open(path).read()
    transformer = runs["transformer"]["final_eval_loss"]
    row = next(line for line in text.splitlines() if line.startswith("| s-k128 | retnet |"))
    assert f"{run['final_eval_loss'] - transformer:+.4f}" in row, row
    found = report.load_results(str(results))
    assert report._panel_sizes(found["train"], report._ok) == ["s"]
    labels = [label for label, _, _ in report._panel_runs(found["train"], "s")]
    assert labels == ["retnet", "transformer", "retnet (s-k128)"]
    assert os.path.isfile(str(tmp_path / "report" / "replication_H200_2000-01-01_loss.png"))


def test_mqar_variants_are_reported_apart_from_the_study(tmp_path):
    """An MQAR set-up other than the study's (another task, steps or learning rates) writes files of its
    own (``mqar_{arch}_{size}@{variant}.json``) that the report shows in a table of their own, never mixed
    into the study's."""
    from experiments.replication import report

    assert recipe.mqar_variant("full") == recipe.mqar_variant("smoke") == ""
    assert recipe.mqar_variant("small") == "@small"
    assert recipe.mqar_variant("full", steps=12000) == "@full-12000steps"
    assert recipe.mqar_variant("small", learning_rates=["0.003"]) == "@small-lr0.003"
    assert recipe.MQAR_SETUPS["small"].vocab_size < recipe.MQAR_SETUPS["full"].vocab_size

    results, runs = _recorded(tmp_path, "mqar", "s")
    for arch, run in runs.items():
        run["setup"] = dict(run["setup"], seq_len=64, vocab_size=256)
        run["best"]["accuracy"] = {"4": 0.25 if arch == "retnet" else 0.75}
        (results / f"mqar_{arch}_xs@small.json").write_text(json.dumps(run))
    found = report.load_results(str(results))
    assert set(found["mqar"]) == {(arch, "s") for arch in recipe.ARCHS}
    assert set(found["mqar_variants"]) == {"small"}
    assert set(found["mqar_variants"]["small"]) == {(arch, "xs") for arch in recipe.ARCHS}
    text = report.mqar_section(found["mqar"], found["mqar_variants"])
    study, small = text.split("### Set-up `small`")
    assert "Rows of 256 tokens, vocabulary 8192" in study and "| xs |" not in study
    assert "Rows of 64 tokens, vocabulary 256" in small and "| s |" not in small
    assert "| xs | retnet | d128 |" in small and "| 0.250 |" in small and "| 0.750 |" in small
    # The study's table gives each learning rate's final train loss (ln 4096 = 8.32: answers only known
    # to be values).
    assert "ln 4096 = 8.32" in study


def test_learning_rate_variants_compare_both_architectures_at_one_rate(tmp_path):
    """s-lr3e-3 is size s at a peak rate of 3e-3, for both architectures: a RetNet row is compared with the
    Transformer at the same rate where that ran, else with the base size's; both go into size s's panels."""
    from experiments.replication import report

    assert recipe.LM_SIZES["s-lr3e-3"] == dataclasses.replace(recipe.LM_SIZES["s"], learning_rate=3e-3)
    assert recipe.LM_SIZES["m-lr3e-4"].learning_rate == 3e-4 and recipe.base_size("m-lr3e-4") == "m"
    recipe.check_arch_for_size("transformer", "s-lr3e-3")  # not refused

    results, runs = _recorded(tmp_path, "train", "s")
    variant = dict(runs["retnet"], size="s-lr3e-3", final_eval_loss=runs["retnet"]["final_eval_loss"] - 0.125)
    (results / "train_retnet_s-lr3e-3.json").write_text(json.dumps(variant))

    def retnet_row():
        text = open(report.write_report(str(results), str(tmp_path / "report"), "2000-01-01")).read()
        return next(line for line in text.splitlines() if line.startswith("| s-lr3e-3 | retnet |"))

    # Only the base size's Transformer: compared with it.
    gap = variant["final_eval_loss"] - runs["transformer"]["final_eval_loss"]
    assert f"{gap:+.4f}" in retnet_row()
    # The Transformer at the same rate: compared with that one.
    other = dict(
        runs["transformer"], size="s-lr3e-3", final_eval_loss=runs["transformer"]["final_eval_loss"] - 0.5
    )
    (results / "train_transformer_s-lr3e-3.json").write_text(json.dumps(other))
    assert f"{variant['final_eval_loss'] - other['final_eval_loss']:+.4f}" in retnet_row()

    found = report.load_results(str(results))
    assert report._panel_sizes(found["train"], report._ok) == ["s"]
    labels = [label for label, _, _ in report._panel_runs(found["train"], "s")]
    assert labels == ["retnet", "transformer", "retnet (s-lr3e-3)", "transformer (s-lr3e-3)"]
