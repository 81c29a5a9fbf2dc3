"""`retnet-train`: train a RetNet language model from the command line.

    retnet-train --workdir=/tmp/retnet-tiny                          # all defaults (tiny, offline corpus)
    retnet-train --workdir=DIR --config=experiments/configs/paper_1p3b.py --config.steps=1000
    retnet-train --workdir=DIR --config.model=small --config.dataset=text:~/notes --config.seed=1

The config file (``--config``, default ``retnet_jax/configs/default.py``) returns an ml_collections
ConfigDict; every field can be overridden as ``--config.FIELD=VALUE``. Running again with the same
workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from retnet_jax.configs import default as default_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.", required=True)


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


config_flags.DEFINE_config_file(
    "config",
    os.path.abspath(default_config.__file__),
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from retnet_jax.training import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds and XLA start-up chatter
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    from retnet_jax.training import loop

    config = flags.FLAGS.config
    print(f"workdir: {_WORKDIR.value}\n{config}")
    state = loop.train_and_evaluate(config, _WORKDIR.value)
    if int(state.step) >= config.steps and config.sample_tokens > 0:
        _sample(config, _WORKDIR.value)


def _sample(config, workdir: str):
    """Continues ``config.sample_prompt`` with the trained model, read back from its final checkpoint."""
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


def run():
    # The console-script shim is the main module: show this module's flags in --help.
    for name in ("workdir", "config", "coordinator_address", "num_processes", "process_id"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    app.run(main)


if __name__ == "__main__":
    run()
