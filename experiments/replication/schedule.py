"""The time model of one device call: how long its start-up and each run take, and whether another run fits.

A call (at most 600 s of wall clock; ``--time_limit_s`` = 560 leaves the rest for the process's start
and the copy of its results) spends

    start-up     the corpus copied out of site-packages (12 s measured on the H200 machine) and
                 tokenized into arrays (the corpus part counted the same tokens in 49 s there), the
                 Python and JAX imports: ``STARTUP_S`` until a call measures it
    per run      set-up (model, first evaluation) and compilation: ``SETUP_S`` until ``--part=calibrate``
                 measures it; the training (tokens / the architecture's tokens/s, as the calibration
                 measured them on the runs' own loop, ``loop.training_loop``); the evaluations and the
                 final measurements (loss by position, decoding): ``MEASURE_S`` until a run measures them

Estimates are used only until a measurement exists: ``calibrate.json`` gives the set-up and each
architecture's tokens/s, a finished run gives the measurements' time of the next run in the same call.
``MARGIN`` is applied twice, for one uncertainty (a run slower than measured): a size's token budget is
the tokens of ``train_seconds / MARGIN`` at the measured speed (so that a run 10% slower still ends in
``train_seconds``), and a later run of a call starts only if it ends within the call with its training
``MARGIN`` times longer than expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

STARTUP_S = 75.0  # start-up of a call on a fresh machine (see the module docstring)
SETUP_S = 45.0  # a run's set-up and compilation, before calibration measures it
# A run's evaluations and final measurements, before a run measures them: 35 s measured at size s on the
# H200 (evaluations 1 s, loss by position 5 s, decoding 30 s, nearly all of it compiling two batch sizes;
# decoding now measures one).
MEASURE_S = 40.0
MARGIN = 1.1  # factor on expected training times when deciding whether a run still fits


@dataclasses.dataclass(frozen=True)
class RunTime:
    """Expected seconds of one run."""

    arch: str
    train_s: float
    setup_s: float = SETUP_S
    measure_s: float = MEASURE_S

    @property
    def total_s(self) -> float:
        return self.setup_s + self.train_s + self.measure_s

    def with_margin(self) -> float:
        """``total_s`` with the training time scaled by ``MARGIN``."""
        return self.setup_s + MARGIN * self.train_s + self.measure_s


def call_seconds(startup_s: float, runs: Sequence[RunTime]) -> float:
    """Expected seconds of a call that starts up once, then does ``runs`` one after another."""
    return startup_s + sum(run.total_s for run in runs)


def runs_that_fit(startup_s: float, runs: Sequence[RunTime], limit_s: float) -> int:
    """How many of ``runs``, taken in order, fit a call of ``limit_s`` seconds (with ``MARGIN``); at least
    one (a single run is always tried: its deadline stops its training in time)."""
    used, count = startup_s, 0
    for run in runs:
        used += run.with_margin()
        if used > limit_s:
            break
        count += 1
    return max(1, count)


def fits(now_s: float, limit_s: float, run: RunTime) -> bool:
    """Whether ``run``, begun ``now_s`` seconds into the call, ends (with ``MARGIN``) within ``limit_s``."""
    return now_s + run.with_margin() <= limit_s
