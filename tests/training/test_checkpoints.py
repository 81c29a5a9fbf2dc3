"""Checkpoints: resumed equals uninterrupted (state bit for bit, same next batches), on any mesh.

Also: keep-last-K, config/tokenizer round trips, the compatibility check, errors, and a save killed
with SIGKILL leaving the previous checkpoint restorable.
"""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from retnet_jax.training.checkpoints import Checkpoints

CONFIG = {
    "seq_len": 128,
    "batch_size": 4,
    "dataset": "default",
    "tokenizer": "byte",
    "tokenizer_vocab_size": 4096,
    "steps": 300,
    "betas": (0.9, 0.98),  # a tuple reads back as a list; still compatible
}
MODEL = {"arch": "retnet", "d_model": 64, "num_layers": 2}
TOKENIZER = {"kind": "byte", "vocab_size": 264, "special": {"bos": 256, "eos": 257, "pad": 258}}


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def make_state(step: int, big: bool = False) -> TrainState:
    """A train state whose every value depends on ``step`` (params, Adam moments, step)."""
    return _make_state(step, big=big)


@functools.partial(jax.jit, static_argnames="big")  # one compilation for all steps
def _make_state(step, big):
    params = {
        "embed": jax.random.normal(jax.random.key(step), (16, 8), jnp.float32),  # [N, D]
        "head": {"w": jnp.full((8, 24), step, jnp.bfloat16), "b": jnp.arange(24.0) * step},
    }
    if big:  # 4 MB (12 MB with the Adam moments), so that writing it takes a while
        params["big"] = jnp.arange(2**20, dtype=jnp.float32) + step
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p.astype(jnp.float32)).astype(p.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=optax.apply_updates(params, updates),
        opt_state=opt_state,
    )


def make_iterator() -> grain.DatasetIterator:
    """A fresh iterator over 25 shuffled batches of 4 integers."""
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def abstract(state, sharding_fn=lambda x: SingleDeviceSharding(jax.devices()[0])):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def take(iterator, n):
    return [next(iterator).tolist() for _ in range(n)]


@pytest.mark.parametrize("async_save", [True, False])
def test_resume_restores_state_and_data_position_and_keeps_last_k(tmp_path, async_save):
    """Saves at steps 2, 4, 6, 8 (every=2, keep=2); only 6 and 8 remain and both restore exactly."""
    expected_batches = {}
    with Checkpoints(tmp_path, every=2, keep=2, async_save=async_save) as ckpt:
        assert ckpt.latest_step() is None
        iterator = make_iterator()
        for step in range(1, 9):
            take(iterator, 1)  # the batch of this step
            saved = ckpt.save(
                step,
                make_state(step),
                data_iterator=iterator,
                config=CONFIG,
                model=MODEL,
                tokenizer=TOKENIZER,
            )
            assert saved == (step % 2 == 0)
            if saved:
                # Read on at once: the position saved is the one at save() time even while writing.
                expected_batches[step] = take(iterator, 3)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "8"]

    with Checkpoints(tmp_path, every=2, keep=2) as ckpt:
        assert ckpt.latest_step() == 8
        assert ckpt.all_steps() == [6, 8]
        for step in (None, 6):
            iterator = make_iterator()
            state = ckpt.restore(abstract(make_state(0)), step=step, data_iterator=iterator)
            assert isinstance(state, TrainState)
            assert_trees_equal(state, make_state(step or 8))
            assert take(iterator, 3) == expected_batches[step or 8]
        assert ckpt.restore_config() == json.loads(json.dumps(CONFIG))
        assert ckpt.restore_tokenizer(step=6) == TOKENIZER


def test_should_save_every_and_force(tmp_path):
    with Checkpoints(tmp_path, every=5, keep=3) as ckpt:
        assert [s for s in range(1, 16) if ckpt.should_save(s)] == [5, 10, 15]
        kwargs = dict(data_iterator=make_iterator(), config=CONFIG, model=MODEL, tokenizer=TOKENIZER)
        assert not ckpt.save(3, make_state(3), **kwargs)
        assert ckpt.save(5, make_state(5), **kwargs)
        assert not ckpt.should_save(5)  # already saved
        assert ckpt.save(7, make_state(7), force=True, **kwargs)  # e.g. the final step, preemption
        assert not ckpt.save(7, make_state(7), force=True, **kwargs)  # an existing step is kept
        ckpt.wait()
        assert ckpt.all_steps() == [5, 7]
        assert_trees_equal(ckpt.restore(abstract(make_state(0))), make_state(7))


def test_async_saves_back_to_back_then_wait(tmp_path):
    """Back-to-back async saves of a 12 MB state all land; after wait() a new reader sees them."""
    ckpt = Checkpoints(tmp_path, every=1, keep=3, async_save=True)
    iterator = make_iterator()
    for step in (1, 2, 3):
        ckpt.save(
            step,
            make_state(step, big=True),
            data_iterator=iterator,
            config=CONFIG,
            model=MODEL,
            tokenizer=TOKENIZER,
        )
    ckpt.wait()
    with Checkpoints(tmp_path, every=1, keep=3) as reader:
        assert reader.all_steps() == [1, 2, 3]
        assert_trees_equal(reader.restore(abstract(make_state(0, big=True)), step=2), make_state(2, big=True))
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved sharded over 8 devices on a (8,) mesh, restored onto a (2, 4) mesh with other specs."""
    mesh8 = jax.make_mesh((8,), ("data",))
    mesh24 = jax.make_mesh((2, 4), ("data", "model"))

    def on_mesh8(x):  # shard the leading axis where it divides, replicate the rest
        return NamedSharding(mesh8, P("data") if x.ndim and x.shape[0] % 8 == 0 else P())

    def on_mesh24(x):
        if x.ndim == 2:
            return NamedSharding(mesh24, P(None, "model") if x.shape[1] % 4 == 0 else P("data"))
        return NamedSharding(mesh24, P())

    expected = make_state(4)
    saved_state = jax.tree.map(lambda x: jax.device_put(x, on_mesh8(x)), expected)
    assert saved_state.params["embed"].sharding.spec == P("data")
    with Checkpoints(tmp_path, every=1, keep=1) as ckpt:
        ckpt.save(
            4, saved_state, data_iterator=make_iterator(), config=CONFIG, model=MODEL, tokenizer=TOKENIZER
        )
        target = abstract(expected, on_mesh24)
        state = ckpt.restore(target)
    assert_trees_equal(state, expected)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding
    assert state.params["head"]["w"].sharding.spec == P(None, "model")
    assert len(state.params["head"]["w"].addressable_shards) == 8


def test_check_compatible_names_the_differing_fields_and_overwrites_nothing(tmp_path):
    with Checkpoints(tmp_path, every=1, keep=2) as ckpt:
        ckpt.check_compatible(CONFIG)  # empty workdir: anything goes
        ckpt.save(
            1, make_state(1), data_iterator=make_iterator(), config=CONFIG, model=MODEL, tokenizer=TOKENIZER
        )
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with Checkpoints(tmp_path, every=1, keep=2) as ckpt:
        ckpt.check_compatible(CONFIG)
        ckpt.check_compatible({**CONFIG, "steps": 1000, "learning_rate": 1e-3})  # not checked
        ckpt.check_compatible(CONFIG, model=MODEL)
        other = {**CONFIG, "seq_len": 256}
        with pytest.raises(ValueError) as err:
            ckpt.check_compatible(other, model={**MODEL, "d_model": 128})
        message = str(err.value)
        for text in (
            "model d_model",
            "64",
            "128",
            "seq_len",
            "128",
            "256",
            "--workdir",
            str(tmp_path),
        ):
            assert text in message
        assert "batch_size" not in message and "num_layers" not in message
        with pytest.raises(ValueError, match=r"vocab_size.*<not set>.*264"):
            ckpt.check_compatible({**CONFIG, "model": {"vocab_size": 264}}, keys=("model.vocab_size",))
        assert ckpt.all_steps() == [1]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_unwritable_workdir_fails_at_construction_naming_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=f"Cannot write checkpoints to {blocker}/run/checkpoints"):
        Checkpoints(blocker / "run", every=1, keep=1)


def test_config_and_tokenizer_read_without_the_arrays(tmp_path):
    with Checkpoints(tmp_path, every=1, keep=1) as ckpt:
        ckpt.save(
            3, make_state(3), data_iterator=make_iterator(), config=CONFIG, model=MODEL, tokenizer=TOKENIZER
        )
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "state")
    with Checkpoints(tmp_path, every=1, keep=1) as ckpt:
        assert ckpt.restore_tokenizer() == TOKENIZER
        assert ckpt.restore_model_config() == MODEL
        assert ckpt.restore_config(step=3)["betas"] == [0.9, 0.98]
        ckpt.check_compatible(CONFIG)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="every must be an integer >= 1; got 0"):
        Checkpoints(tmp_path, every=0, keep=1)
    with Checkpoints(tmp_path, every=1, keep=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="No checkpoint in"):
            ckpt.restore(abstract(make_state(0)))
        with pytest.raises(TypeError, match="tokenizer must be a JSON-serializable dict"):
            ckpt.save(
                1,
                make_state(1),
                data_iterator=make_iterator(),
                config=CONFIG,
                model=MODEL,
                tokenizer={"table": np.zeros(3)},
            )
        ckpt.save(
            1, make_state(1), data_iterator=make_iterator(), config=CONFIG, model=MODEL, tokenizer=TOKENIZER
        )
        with pytest.raises(FileNotFoundError, match=r"kept steps are \[1\]"):
            ckpt.restore(abstract(make_state(0)), step=2)
        unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_state(0))
        with pytest.raises(ValueError, match=r"abstract_state.step has no sharding"):
            ckpt.restore(unsharded)


# Saves step 1, then step 2, and is killed with SIGKILL while writing step 2: in the blocking phase
# (while the data position is written) or in the background phase (while 12 MB of arrays are).
_KILLED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import test_checkpoints as t
from retnet_jax.training import checkpoints as checkpoint

ckpt = checkpoint.Checkpoints({workdir!r}, every=1, keep=5, async_save=True)
iterator = t.make_iterator()
next(iterator)
kwargs = dict(data_iterator=iterator, config=t.CONFIG, model=t.MODEL, tokenizer=t.TOKENIZER)
ckpt.save(1, t.make_state(1, big=True), **kwargs)
ckpt.wait()
next(iterator)
if {phase!r} == "blocking":
    def hang(self):
        print("writing step 2", flush=True)
        time.sleep(600)
    checkpoint._IteratorPosition.get_state = hang
ckpt.save(2, t.make_state(2, big=True), **kwargs)
print("writing step 2", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("phase", ["blocking", "background"])
def test_save_killed_midway_leaves_previous_checkpoint_restorable(tmp_path, phase):
    tests = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")]),
    }
    script = textwrap.dedent(_KILLED_RUN).format(tests=str(tests), workdir=str(tmp_path), phase=phase)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    watchdog = threading.Timer(120, child.kill)  # a child stuck before step 2 fails the test
    watchdog.start()
    try:
        assert child.stdout.readline().strip() == "writing step 2", "the child failed early"
        if phase == "blocking":
            child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()

    leftovers = sorted(os.listdir(tmp_path / "checkpoints"))
    big = make_state(0, big=True)
    with Checkpoints(tmp_path, every=1, keep=5) as ckpt:
        latest = ckpt.latest_step()
        if phase == "blocking":
            assert latest == 1
        # The background writes may, rarely, beat the kill; either way latest is complete.
        assert latest in (1, 2)
        if latest == 1:  # the half-written step was never committed under its own name
            assert "2" not in leftovers, leftovers
        iterator = make_iterator()
        assert_trees_equal(ckpt.restore(abstract(big), data_iterator=iterator), make_state(latest, big=True))
        assert take(iterator, 1) == take(make_iterator(), latest + 1)[-1:]

        # The run goes on: the next step is saved and the temporary directory is gone.
        ckpt.save(
            latest + 1,
            make_state(latest + 1, big=True),
            data_iterator=iterator,
            config=CONFIG,
            model=MODEL,
            tokenizer=TOKENIZER,
        )
        ckpt.wait()
        assert ckpt.latest_step() == latest + 1
        assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(s) for s in range(1, latest + 2)]
        assert_trees_equal(ckpt.restore(abstract(big)), make_state(latest + 1, big=True))


def _listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under ``root`` with its size, mode and modification time (ns)."""
    entries = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        entries[str(path.relative_to(root))] = (info.st_size, info.st_mode, info.st_mtime_ns)
    return entries


def _save_steps(workdir, steps, big=False):
    with Checkpoints(workdir, every=1, keep=5, async_save=False) as ckpt:
        iterator = make_iterator()
        for step in steps:
            next(iterator)
            ckpt.save(
                step,
                make_state(step, big=big),
                data_iterator=iterator,
                config=CONFIG,
                model=MODEL,
                tokenizer=TOKENIZER,
            )


def test_read_only_checkpoints_write_nothing(tmp_path):
    """Read-only: no folder created, no temporary step cleaned up, nothing written or touched, even where
    the process could write (tests run as root, which chmod does not stop: the listing is the check)."""
    _save_steps(tmp_path, (1, 2))
    leftover = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1"  # a save killed mid-way
    leftover.mkdir()
    subprocess.run(["chmod", "-R", "a-w", str(tmp_path)], check=True)
    try:
        before = _listing(tmp_path)
        with Checkpoints(tmp_path, read_only=True) as ckpt:
            assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
            assert_trees_equal(ckpt.restore(abstract(make_state(0)), step=1), make_state(1))
            params = ckpt.restore_params(abstract(make_state(0).params))
            assert_trees_equal(params, make_state(2).params)
            assert ckpt.restore_config() == json.loads(json.dumps(CONFIG))
            assert ckpt.readable(2) is None
            with pytest.raises(ValueError, match="opened read-only"):
                ckpt.save(
                    3,
                    make_state(3),
                    data_iterator=make_iterator(),
                    config=CONFIG,
                    model=MODEL,
                    tokenizer=TOKENIZER,
                )
        assert _listing(tmp_path) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=True)
    with Checkpoints(tmp_path / "absent", read_only=True) as ckpt:
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
    assert not (tmp_path / "absent").exists()


def _largest_array_file(step_dir: Path) -> Path:
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(data, key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garble(step_dir: Path):
    with open(_largest_array_file(step_dir), "r+b") as f:
        f.write(bytes(range(64)))  # over the compressed stream's header


# How each damage is done, and the file the error must name (relative to the step's folder).
DAMAGES = {
    "truncated array file": (_truncate, r"state/ \(array [\w.]+\)|state/.*", "truncated"),
    "garbled array file": (_garble, r"state/ \(array [\w.]+\)|state/.*", ""),
    "empty _METADATA": (lambda d: (d / "state" / "_METADATA").write_text(""), "state/_METADATA", ""),
    "deleted state": (lambda d: shutil.rmtree(d / "state"), "state/", "missing"),
    "garbled config": (lambda d: (d / "config" / "metadata").write_text("{oops"), "config/metadata", ""),
    "garbled model": (lambda d: (d / "model" / "metadata").write_text("[1, "), "model/metadata", ""),
    "garbled tokenizer": (lambda d: (d / "tokenizer" / "metadata").write_text(""), "tokenizer/metadata", ""),
    "garbled data position": (
        lambda d: (d / "data" / "process_0-of-1.json").write_text("{"),
        "data/process_0-of-1.json",
        "",
    ),
}


# A failed array read leaves TensorStore reads completing into orbax's closed event loop; the checkpoint
# module silences those, but pytest swaps sys.unraisablehook per test phase and may see one.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_step_names_its_file_and_is_set_aside(tmp_path, damage):
    """Each kind of damage raises CorruptCheckpointError naming the file (never a storage dump); the step
    before restores; set_aside keeps the damaged step as STEP.corrupt-ITEM, which orbax then ignores."""
    from retnet_jax.training.checkpoints import CorruptCheckpointError, set_aside

    _save_steps(tmp_path, (1, 2), big=True)
    do, file, reason = DAMAGES[damage]
    do(tmp_path / "checkpoints" / "2")
    big = make_state(0, big=True)
    with Checkpoints(tmp_path, read_only=True) as ckpt:
        with pytest.raises(CorruptCheckpointError) as info:
            ckpt.restore_config(2)
            ckpt.restore_model_config(2)
            ckpt.restore_tokenizer(2)
            ckpt.restore(abstract(big), step=2, data_iterator=make_iterator())
        err = info.value
        assert (err.step, err.directory) == (2, tmp_path / "checkpoints")
        assert re.fullmatch(file, err.file), err.file
        assert reason in err.reason
        message = str(err)
        assert message.count("\n") == 0 and len(message) < 400 and "tensorstore_spec" not in message
        assert message.startswith(f"Checkpoint step 2 in {tmp_path}/checkpoints is damaged: {err.file}: ")
        iterator = make_iterator()
        assert_trees_equal(
            ckpt.restore(abstract(big), step=1, data_iterator=iterator), make_state(1, big=True)
        )
        assert take(iterator, 1) == take(make_iterator(), 2)[-1:]
    moved = set_aside(err)
    assert moved == tmp_path / "checkpoints" / f"2.corrupt-{err.item}"
    with Checkpoints(tmp_path, every=1, keep=1) as ckpt:  # keep=1: a save must not delete the aside folder
        assert ckpt.all_steps() == [1]
        ckpt.save(
            2, make_state(2), data_iterator=make_iterator(), config=CONFIG, model=MODEL, tokenizer=TOKENIZER
        )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", moved.name]


def test_another_state_is_refused_not_called_damaged(tmp_path):
    """A target with other leaves or shapes is named from the saved tree metadata, before any array is
    read, and is a plain ValueError: nothing is set aside."""
    from retnet_jax.training.checkpoints import CorruptCheckpointError

    _save_steps(tmp_path, (1,))
    other = make_state(0)
    other = other.replace(params={**other.params, "embed": jnp.zeros((32, 8))}, opt_state=None)
    with Checkpoints(tmp_path, read_only=True) as ckpt:
        with pytest.raises(ValueError, match=r"another model or optimizer state: params\.embed") as info:
            ckpt.restore(abstract(other))
        assert not isinstance(info.value, CorruptCheckpointError)
        assert "checkpoint (16, 8), wanted (32, 8)" in str(info.value)
        assert "opt_state" in str(info.value)  # saved leaves the target lacks


def test_check_can_write_creates_nothing(tmp_path):
    from retnet_jax.training.checkpoints import check_can_write

    check_can_write(tmp_path / "new" / "run")
    assert os.listdir(tmp_path) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(
        ValueError, match=f"Cannot write checkpoints to {blocker}/run/checkpoints: {blocker} is not"
    ):
        check_can_write(blocker / "run")
