"""`retnet-train`: the help lists every config field; both architectures train end to end from the command
line and end with a sample generated from the saved checkpoint."""

import os
import subprocess
import sys

import pytest

from retnet_jax.training import reporting


def _train(workdir, *flags):
    return subprocess.run(
        [sys.executable, "-m", "retnet_jax.cli.train", f"--workdir={workdir}", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_documents_the_config_fields():
    out = subprocess.run(
        [sys.executable, "-m", "retnet_jax.cli.train", "--help"], capture_output=True, text=True
    ).stdout
    for flag in (
        "--workdir",
        "--config.steps",
        "--config.checkpoint_every",
        "--config.seed",
        "--config.mesh",
        "--config.model_overrides",
        "--config.mode",
        "--config.implementation",
    ):
        assert flag in out, flag


@pytest.mark.parametrize("arch", ["transformer", "retnet"])
def test_trains_end_to_end_with_a_sample(tmp_path, arch):
    workdir = tmp_path / arch
    run = _train(
        workdir,
        f"--config.arch={arch}",
        "--config.steps=4",
        "--config.seq_len=32",
        "--config.batch_size=8",
        "--config.eval_every=4",
        "--config.log_every=1",
        "--config.eval_batches=1",
        "--config.checkpoint_every=4",
        "--config.sample_tokens=12",
        "--config.sample_prompt=def ",
        "--config.mode=chunkwise",
        "--config.chunk_size=16",
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"{arch} 'tiny'" in run.stdout + run.stderr
    sample = run.stdout.split("--- sample (temperature 0.7) ---\n")[1]
    assert sample.startswith("def ") and len(sample.strip()) > len("def")
    assert os.listdir(workdir / "checkpoints") == ["4"]
    assert [r["step"] for r in reporting.read_metrics(str(workdir)) if "loss" in r] == [1, 2, 3, 4]
