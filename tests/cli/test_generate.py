"""`retnet-generate`: deterministic greedy output, streaming, interactive mode, serving many prompts,
flag errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from retnet_jax.inference import batching, generate, loading
from tests.cli import in_process


def _cli(*args, stdin=None):
    """retnet-generate in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "retnet_jax.cli.generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _here(capfd, *args, stdin=""):
    """retnet-generate in this process (tests/cli/in_process.py)."""
    return in_process.run("retnet_jax.cli.generate", args, capfd, stdin=stdin)


def test_greedy_cli_is_deterministic_and_matches_the_library(trained, capfd):
    """The same text from a process of its own and from a second run (here), and from the library."""
    workdir, _, _ = trained
    args = (
        f"--workdir={workdir}",
        "--prompt=def f(",
        "--max_new_tokens=24",
        "--temperature=0",
        "--block_size=5",
    )
    first, second = _cli(*args), _here(capfd, *args)
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


def test_interactive_mode_reads_prompts_from_stdin(trained, capfd):
    workdir, _, _ = trained
    out = _here(capfd, f"--workdir={workdir}", "--max_new_tokens=8", "--seed=1", stdin="import\nclass\n")
    assert out.returncode == 0, out.stderr[-2000:]
    # Each prompt is echoed after the "> " prompt and continued on its line.
    assert out.stdout.startswith("> import") and "\n> class" in out.stdout, out.stdout


def test_serving_many_prompts_writes_a_json_line_per_completion(trained, tmp_path, capfd):
    """--prompts_file (a file, or - for stdin): one JSON line per prompt, as each finishes, with what the
    library's scheduler gives for the same requests; the empty line is the empty prompt."""
    workdir, _, _ = trained
    texts = ["def f(", "", "import numpy as np", "class A:", "x = 1"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(texts) + "\n")
    args = (f"--workdir={workdir}", "--max_new_tokens=12", "--temperature=0", "--rows=2", "--block_size=4")
    from_file = _cli(*args, f"--prompts_file={path}")
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    lines = [json.loads(line) for line in from_file.stdout.splitlines()]
    assert sorted(line["id"] for line in lines) == list(range(len(texts)))
    from_stdin = _here(capfd, *args, "--prompts_file=-", stdin=path.read_text())
    assert from_stdin.returncode == 0, from_stdin.stderr[-2000:]
    assert from_stdin.stdout == from_file.stdout

    model, variables, tokenizer = loading.load(workdir)
    eos = tokenizer.eos_id
    requests = [batching.Request(i, tokenizer.encode(t), 12, stop_tokens=(eos,)) for i, t in enumerate(texts)]
    scheduler = batching.Scheduler(
        model,
        variables,
        rows=2,
        block_size=4,
        max_length=30,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
    )
    expected = {}
    for event in scheduler.serve(requests):
        expected.setdefault(event.id, []).extend(event.tokens)
    for line in lines:
        ids = expected[line["id"]]
        stopped = ids[-1] == eos
        assert line == dict(
            id=line["id"],
            prompt=texts[line["id"]],
            completion=tokenizer.decode(ids[:-1] if stopped else ids),
            tokens=len(ids),
            stop_reason="eos" if stopped else "length",
        )


def test_bad_flags_and_missing_or_damaged_checkpoints_are_named(trained, tmp_path, capfd):
    """Each refusal is one or two lines on stderr and status 2; a damaged checkpoint names the file and the
    exact --checkpoint= of the previous step."""

    def fails(*argv):
        out = _here(capfd, *argv)
        err = out.stderr
        assert out.returncode == 2 and 1 <= len(err.strip().splitlines()) <= 2, err
        assert err.startswith("retnet-generate: ") and "Traceback" not in err
        return err

    help_ = _here(capfd, "--help")
    assert help_.returncode == 0 and "--checkpoint" in help_.stdout

    workdir, _, _ = trained
    for flag, message in (
        ("--temperature=-1", "--temperature must be a finite number >= 0"),
        ("--top_p=1.5", "--top_p must lie in (0, 1]"),
        ("--top_p=0", "--top_p must lie in (0, 1]"),
        ("--top_k=-2", "--top_k must be an integer >= 0"),
        ("--max_new_tokens=0", "--max_new_tokens must be an integer >= 1"),
        ("--block_size=0", "--block_size must be >= 1"),
        ("--max_new_tokens=many", "flag --max_new_tokens=many: invalid literal"),
    ):
        assert message in fails(f"--workdir={workdir}", "--prompt=x", flag), flag
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\n")
    for flag, message in (
        (f"--prompts_file={tmp_path}/missing.txt", "missing.txt: no such file"),
        (f"--prompts_file={prompts} --rows=0", "--rows must be >= 1"),
        (f"--prompts_file={prompts} --prompt=x", "pass --prompt (one prompt) or --prompts_file (many)"),
    ):
        assert message in fails(f"--workdir={workdir}", *flag.split()), flag
    assert "No checkpoints in" in fails(f"--workdir={tmp_path}", "--prompt=x")
    assert "exactly one of --workdir or --checkpoint" in fails("--prompt=x")
    assert "its steps are [6, 9, 12]" in fails(f"--checkpoint={workdir}/checkpoints/7", "--prompt=x")

    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    (damaged / "checkpoints" / "12" / "state" / "_METADATA").write_text("")
    assert fails(f"--workdir={damaged}", "--prompt=x").splitlines() == [
        f"retnet-generate: Checkpoint step 12 in {damaged}/checkpoints is damaged: state/_METADATA: "
        "Expecting value: line 1 column 1 (char 0)",
        f"Step 9, the previous one, reads: pass --checkpoint={damaged}/checkpoints/9",
    ]


def _listing(root):
    return {
        os.path.relpath(os.path.join(d, name), root): os.lstat(os.path.join(d, name))[6:9]
        for d, folders, files in os.walk(root)
        for name in [".", *folders, *files]
    }


def _read_only_mount_works() -> bool:
    """Whether this process may bind-mount read-only in a private mount namespace (root with
    CAP_SYS_ADMIN, as in CI containers): then the read-only test is a real read-only file system."""
    probe = (
        subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount --bind -o ro / /mnt 2>/dev/null"], capture_output=True
        )
        if shutil.which("unshare")
        else None
    )
    return probe is not None and probe.returncode == 0


def test_serves_from_a_read_only_workdir(trained, tmp_path):
    """--workdir and --checkpoint on a read-only copy: on a read-only bind mount where the machine allows
    one (root in a private mount namespace), else chmod -R a-w (which binds a non-root user); either way no
    path is created, modified or removed (sizes, modes and mtimes compared before and after)."""
    workdir, _, _ = trained
    copy = tmp_path / "served"
    shutil.copytree(workdir, copy)
    subprocess.run(["chmod", "-R", "a-w", str(copy)], check=True)
    before = _listing(copy)
    generate = f"{sys.executable} -m retnet_jax.cli.generate --prompt=def --max_new_tokens=4 --temperature=0"
    commands = f"{generate} --workdir={copy} && {generate} --checkpoint={copy}/checkpoints/6"
    if _read_only_mount_works():
        # The mount must refuse writes, root's included, before serving from it.
        commands = f"mount --bind -o ro {copy} {copy} && ! touch {copy}/probe 2>/dev/null && {commands}"
        argv = ["unshare", "-m", "sh", "-c", commands]
    else:
        argv = ["sh", "-c", commands]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.count("def") == 2 and "Cannot write" not in out.stderr
        assert _listing(copy) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)
