"""The training loop: its outputs, exact resumption after SIGTERM and SIGKILL, damaged checkpoints skipped,
the schedule kept on resume, NaN, bad input refused before anything is created, two processes."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from retnet_jax.configs.default import get_config
from retnet_jax.training import loop, reporting
from tests.conftest import small_config


def _cli_args(config, workdir):
    args = [sys.executable, "-m", "retnet_jax.cli.train", f"--workdir={workdir}"]
    defaults = get_config()
    for key, value in config.items():
        if key == "model_overrides":
            args += [f"--config.{key}.{k}={v}" for k, v in value.items() if v is not None]
        elif defaults[key] != value:
            args.append(f"--config.{key}={value}")
    return args


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in reporting.read_metrics(workdir) if "loss" in r}


def test_run_writes_metrics_plot_events_and_checkpoints(trained):
    workdir, config, state = trained
    records = reporting.read_metrics(workdir)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, config.steps + 1))
    assert [r["step"] for r in eval_lines] == [0, 6, 12]
    for r in train_lines:
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["param_norm"] > 0
        assert 0 <= r["learning_rate"] <= config.learning_rate * (1 + 1e-6)
    # Throughput is reported after the compiling first step.
    assert all("tokens_per_sec" in r for r in train_lines[1:])
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 0.5
    assert eval_lines[-1]["eval_loss"] < eval_lines[0]["eval_loss"]
    assert np.isclose(eval_lines[0]["eval_perplexity"], np.exp(eval_lines[0]["eval_loss"]))
    assert os.path.getsize(os.path.join(workdir, reporting.PLOT_FILE)) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6", "9"]
    assert int(state.step) == config.steps


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_is_bit_exact(trained, tmp_path):
    """SIGTERM saves and exits within seconds; SIGKILL loses only unsaved steps; losses equal bit for bit."""
    reference_dir, config, _ = trained
    expected = _train_losses(reference_dir)
    workdir = str(tmp_path / "run")
    args = _cli_args(config, workdir)
    rng = random.Random(0)

    def run_until(step, sig):
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while max(_train_losses(workdir), default=0) < step:
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.time() < deadline, "training did not reach the step in time"
            time.sleep(0.05)
        seen = max(_train_losses(workdir))
        process.send_signal(sig)
        out = process.communicate(timeout=60)[0]
        return seen, out, process.returncode

    term_step = rng.randint(2, 6)
    seen, out, status = run_until(term_step, signal.SIGTERM)
    assert status == 3, out[-3000:]  # stopped early with a checkpoint: a scheduler can tell
    assert "(SIGTERM)" in out and "run the same command again to resume" in out
    saved = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    # It stopped at once (within the step or two in flight), not at the end of the run.
    assert term_step <= saved <= seen + 2 and saved < config.steps - 1, (term_step, seen, saved)

    kill_step = rng.randint(saved + 1, config.steps - 1)
    run_until(kill_step, signal.SIGKILL)

    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "resumed at step" in done.stdout + done.stderr
    assert _train_losses(workdir) == expected  # bit for bit, every step


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(learning_rate=1e9, grad_clip=0.0, warmup_steps=0, steps=12, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"the loss became (nan|inf) at step (\d+)") as info:
        loop.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    bad_step = int(message.split(" at step ")[1].split(".")[0])
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert saved and max(saved) < bad_step
    assert f"last good checkpoint is step {max(saved)}" in message


def test_bad_input_is_named_before_anything_is_created(tmp_path):
    for overrides, message in (
        (dict(batch_size=12), r"batch_size=12 is not divisible by the data-parallel size 8"),
        (dict(dataset="no_such_corpus_xyz"), "Unknown dataset 'no_such_corpus_xyz'"),
        (dict(mesh="3,1,1"), "--config.mesh"),
        (dict(arch="lstm"), "--config.arch must be one of"),
        (dict(chunk_size=-4), r"--config.chunk_size must be an integer >= 1 \(e.g. 64\); got -4"),
        (dict(mode="recurrent"), r"--config.mode must be one of \('parallel', 'chunkwise'\) for training"),
        (dict(implementation="cuda"), "--config.implementation must be one of"),
        (dict(remat="some"), r"--config.remat must be one of \('none', 'full', 'projections', 'mixer'\)"),
        (dict(eval_batches=0), "--config.eval_batches must be an integer >= 1; got 0"),
        (dict(schedule="step"), "--config.schedule must be one of"),
        (dict(tokenizer_bos="[BOS]"), "tokenizer_bos='\\[BOS\\]' names special tokens of a tokenizer file"),
    ):
        workdir = tmp_path / "new" / "run"
        with pytest.raises(ValueError, match=message):
            loop.train_and_evaluate(small_config(**overrides), str(workdir))
        assert not (tmp_path / "new").exists(), overrides
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="Cannot write checkpoints to"):
        loop.train_and_evaluate(small_config(), str(blocker / "run"))


def _corrupt_config(step_dir):
    (step_dir / "config" / "metadata").write_text("{garbled")


def _truncate_arrays(step_dir):
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(data, key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)


@pytest.mark.parametrize(
    "damage, file",
    [
        (_truncate_arrays, r"state/ \(array [\w.]+\): truncated \(.*\)"),
        (_corrupt_config, "config/metadata: .*"),
    ],
    ids=["truncated arrays", "garbled config"],
)
def test_resume_skips_a_damaged_checkpoint(trained, tmp_path, capsys, damage, file):
    """The newest checkpoint is damaged: the run says so in one line, keeps it as 12.corrupt-ITEM, resumes
    from step 9 and trains steps 10-12 to the uninterrupted run's losses, bit for bit."""
    reference, config, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    damage(workdir / "checkpoints" / "12")
    capsys.readouterr()
    state = loop.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("Skipped checkpoint")]
    assert len(skipped) == 1, out
    item = "state" if "state" in file else "config"
    assert re.fullmatch(
        f"Skipped checkpoint step 12: {file}; kept as checkpoints/12.corrupt-{item}.", skipped[0]
    )
    assert "resumed at step 9" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", f"12.corrupt-{item}", "6", "9"]
    assert int(state.step) == 12
    assert _train_losses(str(workdir)) == _train_losses(reference)


def test_the_schedule_is_part_of_the_run(trained, tmp_path):
    """Raising steps on resume would re-stretch the cosine schedule: refused, naming the change and the
    learning-rate jump, unless allow_schedule_change says it is meant."""
    reference, config, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    longer = small_config(steps=14)
    with pytest.raises(
        ValueError, match=r"steps=12 → 14\): the learning rate at step 12 would be \S+ instead "
    ):
        loop.train_and_evaluate(longer, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "6", "9"]
    longer.allow_schedule_change = True
    assert int(loop.train_and_evaluate(longer, str(workdir)).step) == 14


def test_workdir_of_another_config_is_refused_untouched(trained):
    workdir, config, _ = trained

    def files():
        return {
            os.path.join(root, f): os.path.getmtime(os.path.join(root, f))
            for root, _, names in os.walk(workdir)
            for f in names
        }

    before = files()
    with pytest.raises(ValueError, match="seq_len"):
        loop.train_and_evaluate(small_config(seq_len=64), workdir)
    assert files() == before


DRIVER = """
import sys
import jax, jax.numpy as jnp
from retnet_jax.training import distributed
from retnet_jax.configs.default import get_config
from retnet_jax.training import loop
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
config = get_config()
config.update(dict(seq_len=16, batch_size=4, steps=2, warmup_steps=1, log_every=1, eval_every=2,
                   eval_batches=1, checkpoint_every=2))
state = loop.train_and_evaluate(config, sys.argv[3])
total = sum(jnp.sum(x) for x in jax.tree.leaves(state.params))
print("PROCESSES", jax.process_count(), "DEVICES", jax.device_count(), "CHECKSUM", repr(float(total)))
"""


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
    """Two CPU processes on localhost (one device each) train 2 steps as one mesh and agree."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    # One device each; the test set-up's other XLA flags (cheaper compilation) kept.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
    }
    workdir = str(tmp_path / "run")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, f"localhost:{port}", str(i), workdir],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    summaries = [next(line for line in out.splitlines() if line.startswith("PROCESSES")) for out in outs]
    assert summaries[0] == summaries[1]
    assert summaries[0].startswith("PROCESSES 2 DEVICES 2 CHECKSUM")
    assert [r["step"] for r in reporting.read_metrics(workdir) if "loss" in r] == [1, 2]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
