"""How the command-line tools end: exit statuses, and anticipated errors as short messages.

An anticipated error (a refused flag or config value, a bad workdir or dataset, a damaged checkpoint, no
network, a missing file, a diverged loss) is printed as its message alone, ``PROG: what, why, the fix``
in one or two lines on stderr, and the tool exits with ``EXIT_REFUSED``. ``--debug`` (or the environment
variable ``RETNET_DEBUG=1``) shows the traceback instead. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

__all__ = [
    "ANTICIPATED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_STOPPED",
    "UsageError",
    "debug_requested",
    "help_requested",
    "reported",
]

EXIT_OK = 0  # the run finished
EXIT_REFUSED = 2  # an anticipated error: the message says what, why and the fix
EXIT_STOPPED = 3  # stopped early by SIGTERM (preemption) or Ctrl-C, with a checkpoint saved: run again
EXIT_INTERRUPTED = 130  # a second Ctrl-C (or one before training started): quit without saving

DEBUG_ENV = "RETNET_DEBUG"
_HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


class UsageError(ValueError):
    """A command line the tool cannot run (a flag that does not exist, a bad value, a missing flag)."""


# ValueError covers refused values (and CorruptCheckpointError); OSError covers missing files, unwritable
# places and ConnectionError; ImportError a dataset that needs TensorFlow; FloatingPointError a NaN loss.
ANTICIPATED = (ValueError, OSError, ImportError, FloatingPointError)


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether --debug is on the command line (or RETNET_DEBUG is set), read before flags are parsed so
    that flag errors themselves can show their traceback."""
    flag = next((a for a in argv if a in ("--debug", "--nodebug") or a.startswith("--debug=")), None)
    if flag is not None:
        return flag == "--debug" or flag.split("=", 1)[-1].lower() in ("1", "true", "t", "yes")
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def help_requested(argv: Sequence[str]) -> str | None:
    """The help flag on the command line, if any."""
    return next((a for a in argv[1:] if a in _HELP_FLAGS), None)


@contextlib.contextmanager
def reported(prog: str, debug: bool) -> Iterator[None]:
    """Runs the body; an anticipated error becomes ``PROG: message`` on stderr and exit status 2, and
    Ctrl-C outside the training loop exits with 130 (no traceback either way unless ``debug``)."""
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted (Ctrl-C).", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except ANTICIPATED as err:
        if debug:
            raise
        message = str(err).strip() or type(err).__name__
        if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in message:
            message = f"{message}: {err.filename}"
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
