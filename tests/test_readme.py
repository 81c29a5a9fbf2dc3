"""The README's code runs as written: every ```python block, each on its own (a fresh namespace, as a reader
pastes one), in order; every flag its ```bash blocks pass to retnet-train / retnet-generate exists.

The substitutions: the loading example reads the workdir of the README's first command,
/tmp/retnet-tiny; here it reads the workdir the ``trained`` fixture trained (the same default config,
shrunk), so that the test neither needs nor touches a shared /tmp path. The fla example's hub id and
converted workdir become a tiny fla-format export with a tokenizer, and its conversion (no network).
"""

import os
import re
import shlex

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
WORKDIR = "/tmp/retnet-tiny"
FLA_HUB_ID = "fla-hub/retnet-1.3B-100B"
FLA_WORKDIR = "/tmp/retnet-1.3b"


@pytest.fixture(scope="module")
def fla_export(tmp_path_factory):
    """(a tiny fla-format directory with a tokenizer.json, its retnet-convert workdir)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from retnet_jax import convert
    from retnet_jax.convert.checkpoint import convert_checkpoint
    from tests.convert.common import fla_style_model

    root = tmp_path_factory.mktemp("fla")
    model, variables = fla_style_model()
    convert.export_fla(model, variables, str(root / "fla"))
    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 30)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "fla" / "tokenizer.json"))
    workdir, _, _ = convert_checkpoint("fla", str(root / "fla"), str(root / "workdir"))
    return str(root / "fla"), workdir


def _blocks(language: str) -> list[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def test_the_readme_has_python_and_bash_blocks():
    python = _blocks("python")
    assert len(python) >= 3
    assert any("loading.load(" in block and "generate.generate(" in block for block in python)
    assert _blocks("bash")


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs_on_its_own(index, request, capsys):
    code = _blocks("python")[index]
    if WORKDIR in code:  # only then train (the session's shared run)
        workdir, _, _ = request.getfixturevalue("trained")
        code = code.replace(WORKDIR, workdir)
    if FLA_HUB_ID in code:
        local, converted = request.getfixturevalue("fla_export")
        code = code.replace(FLA_HUB_ID, local).replace(FLA_WORKDIR, converted)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": f"readme_{index}"})
    capsys.readouterr()


def _commands(program: str) -> list[list[str]]:
    """Each ``program`` command line of the bash blocks, as argv (continuation lines joined)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            for part in re.split(r"&&|\|\||;", line):
                words = shlex.split(part)
                if words and words[0] == program:
                    commands.append(words)
    return commands


def _flag_names(program: str) -> set[str]:
    """The flags a CLI module defines, read from its source (importing both CLIs into one process would
    define their shared flag names twice)."""
    module = {"retnet-train": "train", "retnet-generate": "generate"}[program]
    path = os.path.join(os.path.dirname(README), "retnet_jax", "cli", f"{module}.py")
    with open(path, encoding="utf-8") as f:
        names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", f.read()))
    return names | {"help", "helpfull", "helpshort"}


def _fields(config, prefix=""):
    for key, value in config.items():
        yield prefix + key
        if hasattr(value, "items"):
            yield from _fields(value, f"{prefix}{key}.")


def test_bash_blocks_use_only_flags_that_exist():
    from retnet_jax.configs.default import get_config

    fields = set(_fields(get_config()))
    used = {"retnet-train": 0, "retnet-generate": 0}
    for program in used:
        known = _flag_names(program)
        assert {"workdir", "debug"} <= known, known
        for argv in _commands(program):
            used[program] += 1
            for word in argv[1:]:
                assert word.startswith("--"), (program, word)
                name = word[2:].split("=", 1)[0]
                if name.startswith("config."):
                    assert name.removeprefix("config.") in fields, (program, word)
                elif name == "config" and program == "retnet-train":
                    path = word.split("=", 1)[1]
                    assert os.path.isfile(os.path.join(os.path.dirname(README), path)), word
                else:
                    assert name in known, (program, word)
    assert used["retnet-train"] >= 3 and used["retnet-generate"] >= 3, used
