"""`retnet-train`: --help, refused input as one or two lines with status 2 and nothing created, both
architectures end to end with what the terminal shows, Ctrl-C (save and status 3; a second one quits at once
with 130)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from retnet_jax.training import reporting
from tests.cli import in_process

SMALL = (
    "--config.steps=4",
    "--config.seq_len=32",
    "--config.batch_size=8",
    "--config.eval_every=2",
    "--config.log_every=1",
    "--config.eval_batches=1",
    "--config.checkpoint_every=4",
)


def _train(*flags, env=None, timeout=300):
    """retnet-train in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "retnet_jax.cli.train", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def _train_here(capfd, *flags, env=None):
    """retnet-train in this process (tests/cli/in_process.py)."""
    return in_process.run("retnet_jax.cli.train", flags, capfd, env=env)


def test_help_documents_the_fields_and_the_exit_statuses():
    out = _train("--help")
    assert out.returncode == 0, out.stderr
    for text in (
        "--workdir",
        "--config.steps",
        "--config.checkpoint_every",
        "--config.seed",
        "--config.mesh",
        "--config.model_overrides",
        "--config.mode",
        "--config.implementation",
        "--config.tokenizer_bos",
        "--config.allow_schedule_change",
        "--[no]debug",
        "Exit status: 0 the run finished; 2 refused",
        "3 stopped early by SIGTERM or Ctrl-C",
    ):
        assert text in out.stdout, text


# Representative refusals: (flags, what the message says). Each exits with 2 after at most two stderr lines,
# with no traceback, and creates nothing.
REFUSED = {
    "unknown field": (
        ["--config.nonexistent=1"],
        "retnet-train: --config.nonexistent: no such config field. `retnet-train --help` lists the fields.",
    ),
    "misspelt field": (
        ["--config.model_overrides.num_head=4"],
        "did you mean --config.model_overrides.num_heads?",
    ),
    "bad value": (["--config.seq_len=abc"], "--config.seq_len=abc: invalid literal for int()"),
    "bad mesh": (["--config.mesh=3,1,1"], "--config.mesh '3,1,1' asks for 3 devices"),
    "bad dataset": (["--config.dataset=no_such_corpus_xyz"], "Unknown dataset 'no_such_corpus_xyz'"),
    "bad run option": (["--config.chunk_size=-4"], "--config.chunk_size must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_input_is_one_or_two_lines_status_2_and_nothing_created(tmp_path, capfd, case):
    flags, message = REFUSED[case]
    out = _train_here(capfd, f"--workdir={tmp_path / 'new' / 'run'}", *flags)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and 1 <= len(lines) <= 2, out.stderr[-3000:]
    assert lines[0].startswith("retnet-train: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "cannot schedule new futures" not in out.stderr
    assert not (tmp_path / "new").exists()


def test_an_unwritable_workdir_and_the_debug_traceback(tmp_path, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = _train_here(capfd, f"--workdir={blocker}/run")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"retnet-train: Cannot write checkpoints to {blocker}/run/checkpoints: {blocker} is not a folder. "
        "Pass a --workdir that you can write to."
    ]
    debug = _train_here(capfd, f"--workdir={blocker}/run", env={"RETNET_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().endswith("Pass a --workdir that you can write to.")


def test_a_catalog_dataset_without_network_fails_within_seconds(tmp_path, capfd):
    """tiny_shakespeare is not built in a fresh data_dir and its host cannot be reached (a proxy that
    refuses, so the test holds on machines with a network too): one message, no minutes of retries."""
    refusing_proxy = "http://127.0.0.1:9"
    env = {name: refusing_proxy for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    env.update(no_proxy="", NO_PROXY="")
    started = time.perf_counter()
    out = _train_here(
        capfd,
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=tiny_shakespeare",
        f"--config.data_dir={tmp_path / 'tfds'}",
        env=env,
    )
    assert time.perf_counter() - started < 30
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2, out.stderr[-3000:]
    assert lines[0].startswith(
        f"retnet-train: Dataset 'tiny_shakespeare' is not built in {tmp_path}/tfds/tiny_shakespeare/"
    )
    assert "cannot be downloaded: no network (https://raw.githubusercontent.com does not answer)" in lines[0]
    assert lines[1] == (
        "Build it on a machine with a network: `tfds build tiny_shakespeare --file_format=array_record "
        "--data_dir=DIR`, copy DIR here and pass --config.data_dir=DIR."
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transformer", "retnet"])
def test_trains_end_to_end_telling_the_story(tmp_path, capfd, arch):
    """Eval results as they come, the bar's loss labelled as the train loss, "evaluating…" while an
    evaluation runs, a closing summary with the paths and the command to sample, then the sample. The
    RetNet trains in a process of its own, the Transformer in this one."""
    workdir = tmp_path / arch
    flags = (
        f"--workdir={workdir}",
        *SMALL,
        f"--config.arch={arch}",
        "--config.sample_tokens=12",
        "--config.sample_prompt=def ",
        "--config.mode=chunkwise",
        "--config.chunk_size=16",
    )
    run = _train(*flags) if arch == "retnet" else _train_here(capfd, *flags)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = run.stdout
    assert f"{arch} 'tiny'" in out
    evals = re.findall(r"^step (\d+): validation loss (\d+\.\d{3}) \(perplexity [\d,.]+\)$", out, re.M)
    assert [int(step) for step, _ in evals] == [0, 2, 4]
    assert "train loss " in run.stderr and "evaluating…" in run.stderr  # the bar
    summary = out[out.index("Finished step 4 of 4: 1,024 tokens in ") :]
    for line in (
        r"  train loss       \d+\.\d{3} \(perplexity [\d,.]+; mean of the last 4 steps\)",
        rf"  validation loss  {evals[-1][1]} \(perplexity [\d,.]+; step 4\)",
        rf"  checkpoints      {workdir}/checkpoints \(steps 4\)",
        rf"  metrics          {workdir}/metrics.jsonl, {workdir}/tensorboard/",
        rf"  plot             {workdir}/loss.png",
        rf"  generate         retnet-generate --workdir={workdir} --prompt='def '",
    ):
        assert re.search(f"^{line}$", summary, re.M), (line, summary)
    sample = out.split("--- sample (temperature 0.7) ---\n")[1]
    assert sample.startswith("def ") and len(sample.strip()) > len("def")
    assert os.listdir(workdir / "checkpoints") == ["4"]
    assert [r["step"] for r in reporting.read_metrics(str(workdir)) if "loss" in r] == [1, 2, 3, 4]
    assert os.path.getsize(workdir / reporting.PLOT_FILE) > 1000


def _start(workdir, *flags):
    return subprocess.Popen(
        [sys.executable, "-m", "retnet_jax.cli.train", f"--workdir={workdir}", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_ctrl_c_saves_and_exits_3(tmp_path):
    workdir = tmp_path / "run"
    process = _start(workdir, *SMALL[1:], "--config.steps=2000", "--config.checkpoint_every=1000")
    deadline = time.time() + 240
    while len([r for r in reporting.read_metrics(str(workdir)) if "loss" in r]) < 3:
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out = process.communicate(timeout=60)[0]
    assert process.returncode == 3, out[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step, then stopping" in out
    stopped = re.search(
        r"^Stopped at step (\d+) of 2000 \(Ctrl-C\) after [\d,]+ tokens in \S+; step \1 is saved", out, re.M
    )
    assert stopped, out[-3000:]
    assert os.listdir(workdir / "checkpoints") == [stopped.group(1)]
    assert os.path.getsize(workdir / reporting.PLOT_FILE) > 1000
    assert "Traceback" not in out and "KeyboardInterrupt" not in out


def test_a_second_ctrl_c_quits_at_once_without_saving(tmp_path):
    """The first Ctrl-C arrives while step 0 is evaluated (compiling: seconds), the second right after its
    notice: the process exits with 130 without saving, and a new run leaves no workdir behind."""
    workdir = tmp_path / "run"
    process = _start(workdir, *SMALL)
    deadline = time.time() + 240
    lines = []

    def read_until(text):
        while True:
            line = process.stdout.readline()
            assert line and time.time() < deadline, "".join(lines)[-3000:]
            lines.append(line)
            if text in line:
                return

    read_until("evaluating step 0…")
    process.send_signal(signal.SIGINT)
    read_until("Ctrl-C: saving a checkpoint after this step")
    process.send_signal(signal.SIGINT)
    started = time.perf_counter()
    out = process.communicate(timeout=30)[0]
    assert process.returncode == 130, "".join(lines) + out
    assert time.perf_counter() - started < 5
    assert "Second Ctrl-C: exiting now, without saving." in out
    assert not workdir.exists()
