"""`retnet-convert`: turn an fla or torchscale RetNet checkpoint into a workdir of this library.

    retnet-convert --from=fla --src=fla-hub/retnet-1.3B-100B --workdir=/tmp/retnet-1.3b   # needs network
    retnet-convert --from=fla --src=~/models/retnet-1.3B-100B --workdir=/tmp/retnet-1.3b --dtype=float32
    retnet-convert --from=torchscale --src=retnet.safetensors --workdir=DIR \
        --model_config='{"embed_scale": true}'

The workdir gets a checkpoint that ``retnet-generate`` serves and ``retnet-train`` fine-tunes, with the
tokenizer found beside the weights (tokenizer.json, else tokenizer.model) or given by ``--tokenizer``.
The workdir must be new or empty; it appears complete or not at all.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from absl import logging as absl_logging

_FROM = flags.DEFINE_enum("from", None, ["fla", "torchscale"], "Format of the source checkpoint.")
_SRC = flags.DEFINE_string(
    "src",
    None,
    "fla: a Hugging Face-format directory or hub id; torchscale: a .safetensors or .pt state dict.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "New (or empty) directory for the converted checkpoint.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Parameter dtype (default: fla: the checkpoint's; float32).",
)
_CONFIG = flags.DEFINE_string(
    "model_config",
    None,
    "torchscale only: JSON object of RetNetConfig fields the state dict cannot tell, e.g. "
    '\'{"embed_scale": true, "norm_eps": 1e-5}\'.',
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "A tokenizer.json or SentencePiece .model (default: the one beside the weights)."
)
_FLAGS = ("from", "src", "workdir", "dtype", "model_config", "tokenizer")


def _fail(message: str):
    print(f"retnet-convert: {message}", file=sys.stderr)
    sys.exit(2)


def _config() -> dict | None:
    if _CONFIG.value is None:
        return None
    try:
        value = json.loads(_CONFIG.value)
    except ValueError as err:
        _fail(f"--model_config is not JSON: {err}.")
    if not isinstance(value, dict):
        _fail("--model_config must be a JSON object of RetNetConfig fields, e.g. '{\"embed_scale\": true}'.")
    return value


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in ("from", "src", "workdir"):
        if flags.FLAGS[name].value is None:
            _fail(f"--{name} is required.")
    config = _config()
    absl_logging.set_verbosity(absl_logging.ERROR)
    from retnet_jax.convert.checkpoint import convert_checkpoint

    try:
        workdir, model, tokenizer = convert_checkpoint(
            _FROM.value,
            _SRC.value,
            _WORKDIR.value,
            dtype=_DTYPE.value,
            config=config,
            tokenizer=_TOKENIZER.value,
        )
    except (ValueError, ImportError) as err:
        _fail(str(err))
    print(f"Converted {_FROM.value} checkpoint {_SRC.value} into {workdir}")
    print(f"  model: {json.dumps(model.config.to_dict())}")
    if tokenizer is None:
        print(
            "  tokenizer: none found beside the weights; generation needs one: convert again with "
            "--tokenizer=PATH (tokenizer.json or .model)."
        )
    else:
        print(f"  tokenizer: {tokenizer!r}")


def run():
    for name in _FLAGS:  # the console-script shim is the main module: list these flags in --help
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    app.run(main)


if __name__ == "__main__":
    run()
