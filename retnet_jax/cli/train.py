"""`retnet-train`: train a RetNet language model from the command line.

    retnet-train --workdir=/tmp/retnet-tiny                          # all defaults (tiny, offline corpus)
    retnet-train --workdir=DIR --config=experiments/configs/paper_1p3b.py --config.steps=1000
    retnet-train --workdir=DIR --config.model=small --config.dataset=text:~/notes --config.seed=1

The config file (--config, default retnet_jax/configs/default.py) returns an ml_collections ConfigDict;
every field can be overridden as --config.FIELD=VALUE (the fields and their defaults are listed under
--config below). Running again with the same workdir resumes from its newest checkpoint that restores.

SIGTERM (preemption) or Ctrl-C saves a checkpoint after the current step and stops; a second Ctrl-C quits
at once without saving.

Exit status: 0 the run finished; 2 refused (a one- or two-line message says what, why and the fix; nothing
was created); 3 stopped early by SIGTERM or Ctrl-C with a checkpoint saved (run the same command again to
resume); 130 quit by a second Ctrl-C without saving. --debug (or RETNET_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from retnet_jax.cli import errors
from retnet_jax.configs import default as default_config

PROG = "retnet-train"
_DEFAULT_CONFIG = os.path.abspath(default_config.__file__)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")


def _fields_help() -> str:
    """The default config's fields with their defaults and comments, for --help."""
    lines = []
    for line in open(default_config.__file__).read().splitlines():
        line = line.strip()
        if line.startswith("c.") and "=" in line:
            field, rest = line[2:].split("=", 1)
            value, _, comment = rest.partition("#")
            lines.append(
                f"  --config.{field.strip()}={value.strip()}" + (f"  ({comment.strip()})" if comment else "")
            )
    return "\n".join(lines)


def _define_config_flag():
    """Defines --config. ml_collections applies the --config.FIELD overrides of sys.argv as soon as the
    flag is defined with a default file, so this runs after ``_check_fields`` has vetted them."""
    if "config" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config",
        _DEFAULT_CONFIG,
        "Experiment config file (a Python file with get_config()). Each field can be overridden with "
        "--config.FIELD=VALUE; the fields and their defaults:\n" + _fields_help(),
        lock_config=True,
    )


_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("RETNET_COORDINATOR_ADDRESS"),
    "Multi-host: host:port of process 0 (env RETNET_COORDINATOR_ADDRESS). Unset: one process, or "
    "'auto' to let JAX detect the cluster (SLURM, TPU pods, ...).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("RETNET_NUM_PROCESSES", "0")) or None, "Multi-host: processes."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    int(os.environ["RETNET_PROCESS_ID"]) if "RETNET_PROCESS_ID" in os.environ else None,
    "Multi-host: this process's index.",
)
_DEBUG = flags.DEFINE_bool(
    "debug", False, f"Show the traceback of an error instead of its message alone (env {errors.DEBUG_ENV}=1)."
)
_FLAGS = ("workdir", "config", "coordinator_address", "num_processes", "process_id", "debug")


def main(config, workdir: str) -> int:
    """Trains, prints a sample from the final checkpoint, and returns the exit status."""
    from retnet_jax.training import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    from retnet_jax.training import loop
    from retnet_jax.training.sharding import make_mesh

    loop.validate(config, make_mesh(config.mesh))  # a refused config is not printed first
    print(f"workdir: {workdir}\n{config}", flush=True)
    state = loop.train_and_evaluate(config, workdir)
    if int(state.step) < config.steps:
        return errors.EXIT_STOPPED
    if config.sample_tokens > 0:
        _sample(config, workdir)
    return errors.EXIT_OK


def _sample(config, workdir: str):
    """Continues ``config.sample_prompt`` with the trained model, read back from its final checkpoint."""
    import jax

    from retnet_jax.inference import generate, loading

    model, variables, tokenizer = loading.load(workdir)
    result = generate.generate(
        model,
        variables,
        [tokenizer.encode(config.sample_prompt)],
        max_new_tokens=config.sample_tokens,
        temperature=config.sample_temperature,
        seed=config.seed,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        stop_tokens=(tokenizer.eos_id,),
    )
    text = tokenizer.decode(result.to_lists()[0])
    if jax.process_index() == 0:
        print(f"\n--- sample (temperature {config.sample_temperature}) ---\n{config.sample_prompt}{text}\n")


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return _DEFAULT_CONFIG


def _field_names(config, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if hasattr(value, "items"):
            names += _field_names(value, f"{prefix}{key}.")
    return names


def _check_fields(argv: list[str]):
    """Names a missing config file or an unknown ``--config.FIELD`` (ml_collections would raise a bare
    AttributeError)."""
    path = _config_path(argv).split(":")[0]
    if not os.path.isfile(path):
        raise errors.UsageError(
            f"--config={path}: no such file. Pass a config file such as experiments/configs/default.py."
        )
    overrides = [m.group(1) for m in (re.match(r"--?(?:no)?config\.([^=]+)", a) for a in argv) if m]
    if not overrides:
        return
    try:
        spec = importlib.util.spec_from_file_location("_retnet_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fields = set(_field_names(module.get_config()))
    except Exception:  # a config that does not load is reported by the flag parser itself
        return
    for field in overrides:
        if field not in fields:
            close = difflib.get_close_matches(field, sorted(fields), n=1)
            hint = f" (did you mean --config.{close[0]}?)" if close else ""
            raise errors.UsageError(
                f"--config.{field}: no such config field{hint}. `{PROG} --help` lists the fields."
            )


def _help(argv: list[str]) -> str:
    if errors.help_requested(argv) == "--helpfull":
        return flags.FLAGS.get_help()
    return f"{__doc__.strip()}\n\nFlags:\n{flags.FLAGS.module_help(sys.argv[0])}"


def run(argv: list[str] | None = None):
    """The console script: parses the flags, trains, exits with the status the module doc lists."""
    argv = list(sys.argv if argv is None else argv)
    debug = errors.debug_requested(argv)
    if not debug:
        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds, orbax and XLA start-up chatter
    with errors.reported(PROG, debug):
        if not errors.help_requested(argv):
            _check_fields(argv)
        _define_config_flag()
        for name in _FLAGS:  # the console-script shim is the main module: list these flags in --help
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
        if errors.help_requested(argv):
            print(_help(argv))
            sys.exit(errors.EXIT_OK)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as err:
            raise errors.UsageError(f"{err}\n`{PROG} --help` lists the flags and config fields.") from err
        if len(rest) > 1:
            raise errors.UsageError(f"unexpected arguments {rest[1:]}; flags are written --name=value.")
        if not _WORKDIR.value:
            raise errors.UsageError("--workdir is required: the folder for checkpoints, logs and metrics.")
        status = main(flags.FLAGS.config, _WORKDIR.value)
    sys.exit(status)


if __name__ == "__main__":
    run()
