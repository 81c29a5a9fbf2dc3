"""A benchmark worker for tests/test_benchmarks.py that saves a partial result, then dies."""

import os

from absl import app

from experiments import benchlib as bl


def dies(payload):
    bl.save_partial(dict(done=payload["done"]))
    os._exit(3)  # as a kill or an out-of-memory abort would end it: no result written


def main(argv):
    del argv
    bl.maybe_run_worker({"dies": dies})


if __name__ == "__main__":
    app.run(main)
