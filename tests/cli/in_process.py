"""A console command run in the test's own process, as ``python -m MODULE ARGS`` would run it: its exit
status, stdout and stderr, without the seconds a fresh interpreter spends importing JAX.

Each command module defines its absl flags when imported, and the commands share names (--workdir), so a
run imports the module afresh and removes the flags defined meanwhile. Every command keeps at least one
test that starts it in a process of its own (what a new interpreter prints is checked there).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings

from absl import flags


@contextlib.contextmanager
def own_flags(module_name: str):
    """Imports ``module_name`` afresh; afterwards removes it and every flag defined meanwhile."""
    before = set(flags.FLAGS)
    sys.modules.pop(module_name, None)
    try:
        yield importlib.import_module(module_name)
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        sys.modules.pop(module_name, None)


def run(module_name: str, args, capfd, *, stdin: str = "", env: dict | None = None):
    """Runs the command's ``run()`` on ``args`` (as sys.argv), stdin and the environment variables ``env``.

    Returns a CompletedProcess: the status it exits with (an uncaught exception ends it as the
    interpreter would: its traceback on stderr, status 1) and what reached file descriptors 1 and 2
    (``capfd``: what libraries write there too).
    """
    argv = [importlib.util.find_spec(module_name).origin, *args]  # sys.argv[0] under python -m
    saved_argv, saved_stdin = sys.argv, sys.stdin
    saved_env = {name: os.environ.get(name) for name in env or {}}
    saved_handlers = list(logging.getLogger().handlers)  # absl's app.run adds its own
    capfd.readouterr()  # only the command's output
    try:
        sys.argv, sys.stdin = argv, io.StringIO(stdin)
        os.environ.update(env or {})
        # As the interpreter's default filters: no DeprecationWarning from library code.
        with own_flags(module_name) as module, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                module.run()
                status = 0
            except SystemExit as exit_:
                status = exit_.code
                if isinstance(status, str):  # sys.exit("message"): printed, status 1
                    print(status, file=sys.stderr)
                    status = 1
                status = status or 0
            except Exception:
                traceback.print_exc()
                status = 1
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
        logging.getLogger().handlers[:] = saved_handlers
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.stdout.flush()
        sys.stderr.flush()
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, status, out, err)
