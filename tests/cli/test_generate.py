"""`retnet-generate`: deterministic greedy output, streaming, interactive mode, flag errors."""

import subprocess
import sys

import numpy as np
import pytest

from retnet_jax.inference import generate, loading


def _cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "retnet_jax.cli.generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_greedy_cli_is_deterministic_and_matches_the_library(trained):
    workdir, _, _ = trained
    args = (
        f"--workdir={workdir}",
        "--prompt=def f(",
        "--max_new_tokens=24",
        "--temperature=0",
        "--block_size=5",
    )
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout
    model, variables, tokenizer = loading.load(workdir)
    result = generate.generate(
        model,
        variables,
        [tokenizer.encode("def f(")],
        max_new_tokens=24,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        stop_tokens=(tokenizer.eos_id,),
    )
    ids = np.asarray(result.tokens[0][: int(result.lengths[0])]).tolist()
    assert first.stdout == "def f(" + tokenizer.decode(ids) + "\n"


def test_interactive_mode_reads_prompts_from_stdin(trained):
    workdir, _, _ = trained
    out = _cli(f"--workdir={workdir}", "--max_new_tokens=8", "--seed=1", stdin="import\nclass\n")
    assert out.returncode == 0, out.stderr[-2000:]
    # Each prompt is echoed after the "> " prompt and continued on its line.
    assert out.stdout.startswith("> import") and "\n> class" in out.stdout, out.stdout


def test_bad_flags_and_missing_checkpoints_are_named(trained, tmp_path, capsys):
    from absl import flags

    from retnet_jax.cli import generate as generate_cli

    def fails(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["retnet-generate", *argv])
        try:
            with pytest.raises(SystemExit) as exit_info:
                generate_cli.main(["retnet-generate"])
        finally:
            flags.FLAGS.unparse_flags()
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    workdir, _, _ = trained
    for flag, message in (
        ("--temperature=-1", "--temperature must be a finite number >= 0"),
        ("--top_p=1.5", "--top_p must lie in (0, 1]"),
        ("--top_p=0", "--top_p must lie in (0, 1]"),
        ("--top_k=-2", "--top_k must be an integer >= 0"),
        ("--max_new_tokens=0", "--max_new_tokens must be an integer >= 1"),
        ("--block_size=0", "--block_size must be >= 1"),
    ):
        assert message in fails(f"--workdir={workdir}", "--prompt=x", flag), flag
    assert "No checkpoints in" in fails(f"--workdir={tmp_path}", "--prompt=x")
    assert "exactly one of --workdir or --checkpoint" in fails("--prompt=x")
