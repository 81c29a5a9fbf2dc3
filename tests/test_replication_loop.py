"""The study's training loop (experiments/replication/loop.py) with a fake trainer: the step path never
waits for the device, the next batch is sent before anything waits, metrics are read a log point late,
evaluations see the state of their step, and the deadline and a non-finite loss stop it."""

import collections
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.replication import loop

State = collections.namedtuple("State", "params")


class FakeTrainer:
    """Steps add 1 to the params; the loss is 1 / params, or NaN from step ``nan_from`` on."""

    def __init__(self, events: list, nan_from: int | None = None):
        self.events, self.nan_from = events, nan_from

    def global_batch(self, batch):
        self.events.append(("put", batch["index"]))
        return batch

    def train_step(self, state, batch):
        self.events.append(("step", batch["index"]))
        params = state.params + 1
        bad = self.nan_from is not None and batch["index"] + 1 >= self.nan_from
        loss = jnp.float32(np.nan) if bad else 1.0 / params
        return State(params), {"loss": loss, "learning_rate": jnp.float32(0.1)}


def batches():
    return ({"index": i} for i in itertools.count())


@pytest.fixture
def spied(monkeypatch):
    """The events of a loop: puts, steps, and every read ("fetch", [steps read]) or wait of the host."""
    events: list = []
    fetch, wait = loop._fetch, loop._wait

    def counted_fetch(tree):
        events.append(("fetch", len(tree)))
        return fetch(tree)

    def counted_wait(tree):
        events.append(("wait", None))
        return wait(tree)

    monkeypatch.setattr(loop, "_fetch", counted_fetch)
    monkeypatch.setattr(loop, "_wait", counted_wait)
    return events


def test_no_wait_in_the_step_path(spied):
    trainer = FakeTrainer(spied)
    done = loop.training_loop(
        trainer, State(jnp.float32(0)), batches(), steps=40, step_tokens=8, log_every=10, log=lambda _: None
    )
    assert done.steps_done == 40 and not done.truncated and not done.diverged
    assert float(done.state.params) == 40
    # Points at the first step, every 10th and the last; each read a log point later, the last two at the end.
    assert [p["step"] for p in done.train_curve] == [1, 10, 20, 30, 40]
    assert done.train_curve[-1]["loss"] == pytest.approx(1 / 40)
    reads = [(i, e) for i, e in enumerate(spied) if e[0] in ("fetch", "wait")]
    # One wait after the first step (its compilation is timed apart), four reads for 40 steps, one final wait.
    assert [e[0] for _, e in reads] == ["wait", "fetch", "fetch", "fetch", "fetch", "wait"]
    assert [e[1] for _, e in reads if e[0] == "fetch"] == [1, 1, 1, 2]
    steps = [e[1] for e in spied if e[0] == "step"]
    assert steps == list(range(40))
    # The next batch is sent right after a step is dispatched, before anything reads or waits.
    for i in range(39):
        at = spied.index(("step", i))
        assert spied[at + 1] == ("put", i + 1)
    # A read at log point k only reads steps dispatched a log interval earlier (never the newest step).
    fetched_after = [sum(1 for e in spied[:i] if e[0] == "step") for i, e in reads if e[0] == "fetch"]
    assert fetched_after == [10, 20, 30, 40]
    assert done.timed_steps == 39 and done.tokens_per_s > 0
    assert set(done.summary()["host"]) == {"batch_s", "dispatch_s", "wait_s"}
    assert done.summary()["version"] == loop.LOOP_VERSION


def test_evaluations_see_their_steps_params(spied):
    trainer = FakeTrainer(spied)
    seen = []

    def evaluate(params):
        seen.append(float(params))
        return 2.0 * float(params)

    done = loop.training_loop(
        trainer,
        State(jnp.float32(0)),
        batches(),
        steps=12,
        step_tokens=8,
        log_every=5,
        eval_every=4,
        evaluate=evaluate,
        log=lambda _: None,
    )
    assert seen == [4.0, 8.0, 12.0]
    assert done.eval_curve == [dict(step=s, tokens=8 * s, loss=2.0 * s) for s in (4, 8, 12)]
    assert [p["step"] for p in done.train_curve] == [1, 4, 5, 8, 10, 12]


def test_deadline_stops_and_evaluates(spied):
    done = loop.training_loop(
        FakeTrainer(spied),
        State(jnp.float32(0)),
        batches(),
        steps=50,
        step_tokens=8,
        log_every=5,
        eval_every=25,
        evaluate=lambda params: float(params),
        deadline=0.0,  # long past: stops at the first check
        log=lambda _: None,
    )
    assert done.truncated and done.steps_done == 1
    assert done.eval_curve == [dict(step=1, tokens=8, loss=1.0)]


def test_non_finite_loss_stops(spied):
    done = loop.training_loop(
        FakeTrainer(spied, nan_from=7),
        State(jnp.float32(0)),
        batches(),
        steps=100,
        step_tokens=8,
        log_every=5,
        log=lambda _: None,
    )
    # Step 10's NaN is read at step 15's log point: the loop stops at most two log intervals late.
    assert done.diverged and done.steps_done == 15
    assert np.isnan(done.train_curve[-1]["loss"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="log_every"):
        loop.training_loop(FakeTrainer([]), State(0), batches(), steps=5, step_tokens=1, log_every=0)


def test_log_every():
    assert loop.log_every(3439) == 17 and loop.log_every(50) == 1
