"""`retnet-generate`: continue text with a trained model (RetNet or the Transformer), streaming it.

    retnet-generate --workdir=/tmp/retnet-tiny --prompt="def " --max_new_tokens=200
    retnet-generate --checkpoint=/tmp/retnet-tiny/checkpoints/300 --temperature=0.8 --top_p=0.95
    retnet-generate --workdir=/tmp/retnet-tiny          # interactive: one prompt per line
    retnet-generate --workdir=/tmp/retnet-tiny --prompts_file=prompts.txt --rows=16   # serve many
    cat prompts.txt | retnet-generate --workdir=/tmp/retnet-tiny --prompts_file=-

The prompt is prefilled with the chunkwise form, then tokens are decoded by the recurrent step inside
one jitted loop, in blocks of --block_size tokens that are printed as they arrive. With
--temperature=0 (greedy) the output is deterministic; otherwise --seed fixes it. Nothing is written:
the workdir may be read-only. A damaged checkpoint is named with the file, and the earlier step to
pass as --checkpoint.

With --prompts_file (a file, or - for stdin: one prompt per line) the prompts are served together by
continuous batching (``inference.batching``): --rows rows decode at once and a finished row takes the
next prompt at once. Each completion is printed as it finishes, as one JSON line: {"id": line number
from 0, "prompt", "completion", "tokens": ids generated, "stop_reason": "eos" or "length"}. A prompt's
output does not depend on the others: greedy, it is what --prompt gives (up to rounding); sampled, its
draws are keyed by --seed and its line number.

Exit status: 0 done; 2 refused (a one- or two-line message says what, why and the fix); 130 Ctrl-C.
--debug (or RETNET_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import json
import os
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
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file",
    None,
    "Serve many prompts: a file of one prompt per line ('-' = stdin); each completion is printed as one "
    "JSON line when it finishes.",
)
_ROWS = flags.DEFINE_integer(
    "rows", 8, "With --prompts_file: prompts decoded together (continuous batching)."
)
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
    "prompts_file",
    "rows",
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
    if _PROMPTS_FILE.value is not None:
        if _PROMPT.value is not None:
            _fail("pass --prompt (one prompt) or --prompts_file (many), not both.")
        if _ROWS.value < 1:
            _fail(f"--rows must be >= 1; got {_ROWS.value}.")
        path = _PROMPTS_FILE.value
        if path != "-" and not os.path.isfile(path):
            _fail(
                f"--prompts_file={path}: no such file (pass a file of one prompt per line, or - for stdin)."
            )


def _read_prompts(path: str) -> list[str]:
    """The lines of the file (or stdin for -), without their line ends: one prompt each."""
    if path == "-":
        return [line.rstrip("\r\n") for line in sys.stdin]
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\r\n") for line in f]


def _serve(model, variables, tokenizer, texts: list[str]):
    """Serves every prompt through the scheduler; prints a JSON line per completion as it finishes."""
    from retnet_jax.inference import batching

    ids = [tokenizer.encode(text) for text in texts]
    requests = [
        batching.Request(
            i,
            prompt,
            _MAX_NEW.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            stop_tokens=(tokenizer.eos_id,),
        )
        for i, prompt in enumerate(ids)
    ]
    # A KV cache holds the longest request; a RetNet's state ignores the bound.
    longest = max(len(prompt) for prompt in ids) + _MAX_NEW.value
    scheduler = batching.Scheduler(
        model,
        variables,
        rows=min(_ROWS.value, len(requests)),
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        max_length=max(2, longest),
        seed=_SEED.value,
        block_size=_BLOCK.value,
    )
    generated: dict[int, list[int]] = {}
    for event in scheduler.serve(requests):
        generated.setdefault(event.id, []).extend(event.tokens)
        if not event.finished:
            continue
        tokens = generated.pop(event.id)
        stopped = event.reason == "stop"
        line = dict(
            id=event.id,
            prompt=texts[event.id],
            completion=tokenizer.decode(tokens[:-1] if stopped else tokens),
            tokens=len(tokens),
            stop_reason="eos" if stopped else "length",
        )
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        sys.stdout.flush()


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
    texts = None if _PROMPTS_FILE.value is None else _read_prompts(_PROMPTS_FILE.value)
    from retnet_jax.inference import loading

    model, variables, tokenizer = loading.load(_WORKDIR.value, checkpoint=_CHECKPOINT.value)
    if tokenizer is None:
        _fail(
            "this checkpoint holds weights imported without a tokenizer, so text cannot be encoded; "
            "convert them again with retnet-convert --tokenizer=PATH."
        )
    if texts is not None:
        if texts:
            _serve(model, variables, tokenizer, texts)
        return
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
