"""`retnet-generate`: continue text with a trained model (RetNet or the Transformer), streaming it.

    retnet-generate --workdir=/tmp/retnet-tiny --prompt="def " --max_new_tokens=200
    retnet-generate --checkpoint=/tmp/retnet-tiny/checkpoints/300 --temperature=0.8 --top_p=0.95
    retnet-generate --workdir=/tmp/retnet-tiny          # interactive: one prompt per line

The prompt is prefilled with the chunkwise form, then tokens are decoded by the recurrent step inside
one jitted loop, in blocks of --block_size tokens that are printed as they arrive. With
--temperature=0 (greedy) the output is deterministic; otherwise --seed fixes it. Nothing is written:
the workdir may be read-only. A damaged checkpoint is named with the file, and the earlier step to
pass as --checkpoint.

Exit status: 0 done; 2 refused (a one- or two-line message says what, why and the fix); 130 Ctrl-C.
--debug (or RETNET_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import sys

from absl import flags
from absl import logging as absl_logging

from retnet_jax.cli import errors

PROG = "retnet-generate"

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: its latest checkpoint is used.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A checkpoint step directory (WORKDIR/checkpoints/STEP), instead of --workdir."
)
_PROMPT = flags.DEFINE_string(
    "prompt", None, "Text to continue ('' starts from BOS). Unset: interactive, one prompt per line."
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate (at most).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy (deterministic).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this mass, in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
_BLOCK = flags.DEFINE_integer("block_size", 16, "Tokens decoded per jitted call between prints.")
_DEBUG = flags.DEFINE_bool(
    "debug", False, f"Show the traceback of an error instead of its message alone (env {errors.DEBUG_ENV}=1)."
)
_FLAGS = (
    "workdir",
    "checkpoint",
    "prompt",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "block_size",
    "debug",
)


def _fail(message: str):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(errors.EXIT_REFUSED)


def _check_flags():
    from retnet_jax.inference import sampling

    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        _fail("pass exactly one of --workdir or --checkpoint.")
    try:
        sampling.check_sampling(
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            max_new_tokens=_MAX_NEW.value,
        )
    except ValueError as e:
        _fail(f"--{e}")
    if _BLOCK.value < 1:
        _fail(f"--block_size must be >= 1; got {_BLOCK.value}.")


def _continue(model, variables, tokenizer, text: str):
    """Streams the continuation of ``text`` to stdout."""
    from retnet_jax.inference import generate

    blocks = generate.stream(
        model,
        variables,
        [tokenizer.encode(text)],
        max_new_tokens=_MAX_NEW.value,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        block_size=_BLOCK.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        stop_tokens=(tokenizer.eos_id,),
        seed=_SEED.value,
    )
    sys.stdout.write(text)
    for pieces in generate.decode_text(blocks, tokenizer):
        sys.stdout.write(pieces[0])
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def main(argv):
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
    _check_flags()
    from retnet_jax.inference import loading

    model, variables, tokenizer = loading.load(_WORKDIR.value, checkpoint=_CHECKPOINT.value)
    if tokenizer is None:
        _fail(
            "this checkpoint holds weights imported without a tokenizer, so text cannot be encoded; "
            "convert them again with retnet-convert --tokenizer=PATH."
        )
    if _PROMPT.value is not None:
        _continue(model, variables, tokenizer, _PROMPT.value)
        return
    print("Interactive generation: type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        _continue(model, variables, tokenizer, line)


def run(argv: list[str] | None = None):
    """The console script: parses the flags, generates, exits with the status the module doc lists."""
    argv = list(sys.argv if argv is None else argv)
    for name in _FLAGS:  # the console-script shim is the main module: list these flags in --help
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    if errors.help_requested(argv):
        help_all = errors.help_requested(argv) == "--helpfull"
        flags_help = flags.FLAGS.get_help() if help_all else flags.FLAGS.module_help(sys.argv[0])
        print(f"{__doc__.strip()}\n\nFlags:\n{flags_help}")
        sys.exit(errors.EXIT_OK)
    debug = errors.debug_requested(argv)
    if not debug:
        absl_logging.set_verbosity(absl_logging.ERROR)
    with errors.reported(PROG, debug):
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as err:
            raise errors.UsageError(f"{err}\n`{PROG} --help` lists the flags.") from err
        main(rest)
    sys.exit(errors.EXIT_OK)


if __name__ == "__main__":
    run()
