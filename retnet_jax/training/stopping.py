"""Stopping a run early without losing work: SIGTERM (preemption) and Ctrl-C.

The first SIGTERM or Ctrl-C asks the training loop to save a checkpoint after the current step and stop;
a second Ctrl-C quits at once. The loop polls ``requested(step, checkpoints)`` after every step.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import jax

__all__ = ["StopRequests"]


class StopRequests:
    """SIGTERM and a first Ctrl-C ask the loop to save and stop after the current step; a second Ctrl-C
    exits at once (status 130) without saving, or, in a notebook, raises KeyboardInterrupt (the kernel
    lives on). The previous handlers come back on ``close``.

    With several processes the signals are left to JAX's preemption service (every process must stop at
    the same step): ``requested`` then asks the checkpoint manager whether its sync point is reached.
    """

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        if jax.process_count() > 1:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: keep the default handlers
                pass

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.reason is not None:
            if "ipykernel" in sys.modules:  # a notebook: interrupt the cell, keep the kernel alive
                self.close()
                raise KeyboardInterrupt
            os.write(2, b"\nSecond Ctrl-C: exiting now, without saving.\n")
            os._exit(130)
        if self.reason is None:
            self.reason = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            if signum == signal.SIGINT:  # os.write: print() may be mid-write in the main thread
                os.write(
                    2,
                    b"\nCtrl-C: saving a checkpoint after this step, then stopping "
                    b"(Ctrl-C again exits at once, without saving).\n",
                )

    def requested(self, step: int, checkpoints) -> str | None:
        """Why to stop after ``step`` ("SIGTERM", "Ctrl-C", "preemption"), or None to go on. Every process
        calls it at the same steps; ``checkpoints`` is the run's ``Checkpoints``."""
        if jax.process_count() > 1 and checkpoints.reached_preemption(step):
            return "preemption"
        return self.reason

    def close(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
