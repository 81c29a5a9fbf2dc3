"""Checkpoints of a training run: train state, data position, config and tokenizer, per step.

The training loop talks to checkpoints only through ``Checkpoints``; orbax and grain's orbax
integration stay behind this file, so changing either library touches nothing else. Each saved
step is one directory ``WORKDIR/checkpoints/STEP`` holding five items:

* ``state``: the train state pytree (params, optimizer state, step), written by orbax shard by
  shard and read back onto whatever mesh the restoring run asks for (``restore``'s shardings);
  ``restore_params`` reads the parameters alone (serving needs no optimizer);
* ``data``: the grain iterator's position, one JSON file per process, so a resumed run sees
  exactly the batches an uninterrupted run would;
* ``model``: the resolved model config (``ModelConfig.to_dict()``: the architecture, whatever preset
  and overrides produced it), enough to rebuild the model;
* ``config`` and ``tokenizer``: the experiment config and the tokenizer as JSON dicts, readable
  without loading any array.

Saves are asynchronous by default: ``save`` copies the arrays off the devices and returns while a
background thread writes them. A step is written to a temporary directory that is renamed when
complete (orbax's atomic commit), so a run killed mid-save leaves the earlier steps intact and the
half-written one invisible; the next ``Checkpoints`` that writes to that workdir deletes it.

``Checkpoints(workdir, read_only=True)`` reads without ever writing (no directory created, no
temporary step cleaned up), so a model can be served from a read-only mount.

A step whose files were damaged after it was committed (a truncated or garbled array file, an empty
``state/_METADATA``, a garbled JSON item, a deleted ``state/``) raises ``CorruptCheckpointError``
naming the file, never the storage layer's dump. ``set_aside`` renames such a step to
``checkpoints/STEP.corrupt-ITEM``, which orbax does not list, so a run can resume from the previous
step while the damaged one is kept for inspection. A checkpoint that is intact but holds another
model or optimizer raises a plain ``ValueError`` instead: it is compared with the restore target
through the saved tree metadata before any array is read.

Typical use::

    ckpt = Checkpoints(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints)
    ckpt.check_compatible(config.to_dict(), model=model_config.to_dict())
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(abstract_state, data_iterator=train_iter)
    for step in range(start + 1, config.steps + 1):
        state = update_fn(state, next(train_iter))
        ckpt.save(step, state, data_iterator=train_iter, config=config.to_dict(),
                  model=model_config.to_dict(), tokenizer=tokenizer.to_dict(),
                  force=step == config.steps)
    ckpt.close()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from retnet_jax.training import checkpoint_damage as damage_lib
from retnet_jax.training.checkpoint_damage import CorruptCheckpointError, set_aside

__all__ = [
    "COMPATIBILITY_KEYS",
    "Checkpoints",
    "CorruptCheckpointError",
    "check_can_write",
    "set_aside",
]

# Experiment-config fields that must match to resume a run: they fix the meaning of the saved data
# position (dataset, tokenizer, sequence and batch size). The model is compared whole (its resolved
# config), since it fixes the shapes of the state.
COMPATIBILITY_KEYS = (
    "tokenizer",
    "tokenizer_vocab_size",
    "dataset",
    "seq_len",
    "batch_size",
)

_ITEMS = ("state", "data", "config", "model", "tokenizer")
_MISSING = "<not set>"


class _IteratorPosition:
    """A grain iterator's position, frozen when a save is requested.

    grain's orbax handler writes ``get_state()`` of the object it is handed, one JSON file per
    process. Handing it this snapshot rather than the live iterator pins the saved position to the
    step being saved, however late orbax runs the handler. On restore the handler fills ``state``
    and ``Checkpoints`` applies it to the real iterator (the handler's own branch for dataset
    iterators has changed between grain releases).
    """

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes):
        self.state = json.loads(state)

    def start_prefetch(self):
        """Nothing to prefetch: the real iterator starts when the loop asks for a batch."""


class Checkpoints:
    """Saves and restores a training run's checkpoints under ``workdir/checkpoints``.

    Args:
        workdir: the run's directory: a local path or any path ``etils.epath`` opens (``gs://``).
        every: save at steps that are multiples of ``every``; ``save(force=True)`` saves other
            steps too (the final step, preemption). Needed unless ``read_only``.
        keep: how many of the latest checkpoints to keep; older ones are deleted after a save.
            Needed unless ``read_only``.
        async_save: write arrays in a background thread so that ``save`` returns promptly;
            ``wait()`` blocks until they are on disk.
        read_only: only read: nothing is created, cleaned up or written, so the workdir may lie
            on a read-only mount; ``save`` raises. A missing ``checkpoints`` folder reads as no
            checkpoint.

    Raises:
        ValueError: ``every`` or ``keep`` is not a positive integer, or ``workdir`` cannot be
            written (checked here, before any compute), unless ``read_only``.
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        every: int | None = None,
        keep: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.read_only = read_only
        self.every = every
        self.keep = keep
        self._manager = None
        if read_only:
            if self.directory.is_dir():
                options = ocp.CheckpointManagerOptions(
                    read_only=True,
                    enable_async_checkpointing=False,
                    save_interval_steps=0,
                    create=False,
                    cleanup_tmp_directories=False,
                )
                with _quiet_absl("Given directory is read only"):
                    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
            return
        for name, flag, value in (
            ("every", "checkpoint_every", every),
            ("keep", "keep_checkpoints", keep),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Checkpoints: {name} must be an integer >= 1; got {value!r}. "
                    f"Set --config.{flag} to a positive integer."
                )
        _check_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # Temporary directories are steps killed mid-save: never committed, safe to delete.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The steps of all kept checkpoints, oldest first."""
        return sorted(self._manager.all_steps()) if self._manager is not None else []

    def step_directory(self, step: int) -> epath.Path:
        """Where ``step`` is (or would be) saved: ``workdir/checkpoints/STEP``."""
        return self.directory / str(step)

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write a checkpoint without ``force``.

        True when ``step`` is newer than the latest checkpoint and either a multiple of ``every``
        or a preemption sync point that every process has reached (JAX's preemption service,
        where it is enabled). Every process must call it at the same steps.
        """
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        return step % self.every == 0 or self._manager.reached_preemption(step)

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has reached the preemption sync point at ``step`` (multi-host runs
        with JAX's preemption service); False otherwise. Every process must call it at the same steps."""
        return bool(self._manager.reached_preemption(step))

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: grain.DatasetIterator,
        config: dict[str, Any],
        model: dict[str, Any],
        tokenizer: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint of ``step`` if ``should_save(step)`` or ``force``.

        With ``async_save`` this returns once the arrays are copied off the devices and the data
        position, config and tokenizer are written; the arrays are written in the background
        (see ``wait()``). A save still running from before is waited for first. A step already
        saved is not written again, so forcing the final step after a periodic save of it is safe.

        Args:
            step: the training step the state belongs to (the directory's name).
            state: the train state, a pytree of jax arrays with any sharding.
            data_iterator: the training data iterator, positioned at the next batch to consume.
            config: the experiment config, a JSON-serializable dict.
            model: the resolved model config (``ModelConfig.to_dict()``).
            tokenizer: the tokenizer's description, a JSON-serializable dict.
            force: save even when ``should_save(step)`` is False.

        Returns:
            Whether a checkpoint was started.

        Raises:
            TypeError: ``config``, ``model`` or ``tokenizer`` is not JSON-serializable.
            ValueError: this ``Checkpoints`` is read-only.
        """
        if self.read_only:
            raise ValueError(f"Checkpoints of {self.directory} were opened read-only; nothing can be saved.")
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        config = _as_json(config, "config")
        model = _as_json(model, "model")
        tokenizer = _as_json(tokenizer, "tokenizer")
        position = _IteratorPosition(data_iterator.get_state())
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(position),
            config=ocp.args.JsonSave(config),
            model=ocp.args.JsonSave(model),
            tokenizer=ocp.args.JsonSave(tokenizer),
        )
        return self._manager.save(step, args=args, force=True)

    def restore(
        self,
        abstract_state: Any,
        *,
        step: int | None = None,
        data_iterator: grain.DatasetIterator | None = None,
    ) -> Any:
        """Restores the train state of ``step`` (default: the latest) onto the given shardings.

        The arrays are read straight into ``abstract_state``'s shardings, which may lie on another
        mesh (or another number of devices) than the one the checkpoint was saved from.

        Args:
            abstract_state: the train state's structure, with a ``jax.ShapeDtypeStruct`` carrying
                a ``sharding`` at every leaf (``jax.eval_shape`` of the init function plus the
                trainer's shardings). A ``jax.Array`` leaf stands for its own shape, dtype and
                sharding.
            step: the step to restore; None for the latest.
            data_iterator: if given, a fresh iterator over the same dataset; it is moved (in
                place) to the position saved with ``step`` once the whole state has been read.

        Returns:
            The train state: the pytree type of ``abstract_state``, arrays on its shardings.

        Raises:
            FileNotFoundError: there is no checkpoint, or none of ``step``.
            CorruptCheckpointError: a file of the step is missing, truncated or garbled.
            ValueError: a leaf of ``abstract_state`` has no sharding, or the checkpoint holds
                another state (another model or optimizer).
        """
        step = self._existing_step(step)
        abstract_state = jax.tree_util.tree_map_with_path(_with_sharding, abstract_state)
        self._check_fits(step, abstract_state, exact=True)
        position = None
        if data_iterator is not None:
            position = _IteratorPosition()
            args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(position))
            with self._reading(step, "data"):
                self._manager.restore(step, args=args)
            if not isinstance(position.state, dict):
                raise self._damage(step, "data", f"holds {type(position.state).__name__}, not a position")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        with self._reading(step, "state"):
            restored = self._manager.restore(step, args=args)
        if position is not None:
            data_iterator.set_state(position.state)
        return restored["state"]

    def restore_params(self, abstract_params: Any, *, step: int | None = None) -> Any:
        """The parameters alone of ``step`` (default: the latest), read onto ``abstract_params``'
        shardings; the optimizer state is not read.

        Args:
            abstract_params: the parameters' structure, ``jax.ShapeDtypeStruct`` leaves with shardings
                (e.g. ``jax.eval_shape`` of the model's init, placed on one device). A leaf's dtype may
                differ from the saved one: it is cast while reading.

        Raises:
            FileNotFoundError: there is no checkpoint, or none of ``step``.
            CorruptCheckpointError: a file the parameters are read from is missing, truncated or
                garbled.
            ValueError: the checkpoint's parameters do not fit ``abstract_params``.
        """
        step = self._existing_step(step)
        target = {"params": jax.tree_util.tree_map_with_path(_with_sharding, abstract_params)}
        self._check_fits(step, target, exact=False)
        restore_args = jax.tree.map(
            lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype), target
        )
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        # A checkpointer of its own: the manager keeps one handler per item, and "state" is saved whole.
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            with self._reading(step, "state"):
                restored = checkpointer.restore(self.step_directory(step) / "state", args=args)
        finally:
            checkpointer.close()
        return restored["params"]

    def restore_model_config(self, step: int | None = None) -> dict[str, Any]:
        """The resolved model config saved with ``step`` (default: the latest); loads no arrays.
        Raises ``CorruptCheckpointError`` when its file is damaged."""
        return self._restore_json("model", step)

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The experiment config saved with ``step`` (default: the latest); loads no arrays.
        Raises ``CorruptCheckpointError`` when its file is damaged."""
        return self._restore_json("config", step)

    def restore_tokenizer(self, step: int | None = None) -> dict[str, Any]:
        """The tokenizer dict saved with ``step`` (default: the latest); loads no arrays.
        Raises ``CorruptCheckpointError`` when its file is damaged."""
        return self._restore_json("tokenizer", step)

    def readable(self, step: int) -> CorruptCheckpointError | None:
        """A quick check of ``step`` that reads no array: its JSON items and the state's tree
        metadata. Returns the damage found, or None (array files are only checked by reading them)."""
        try:
            for item in ("model", "tokenizer", "config"):
                self._restore_json(item, step)
            self._saved_shapes(step)
        except CorruptCheckpointError as err:
            return err
        return None

    def check_compatible(
        self,
        config: dict[str, Any],
        *,
        model: dict[str, Any] | None = None,
        keys: Sequence[str] = COMPATIBILITY_KEYS,
        step: int | None = None,
    ):
        """Checks that the workdir's checkpoints come from a run like this one.

        Call it before the first save, so that a run with other settings never overwrites another
        run's checkpoints. Passes when the workdir has no checkpoint.

        Args:
            config: this run's experiment config, as a dict.
            model: this run's resolved model config; every field must match the saved one.
            keys: the experiment-config fields that must match; dotted paths reach into nested dicts
                (``"model.d_model"``). A field missing from both configs matches.
            step: the checkpoint to compare with; None for the latest.

        Raises:
            ValueError: naming each differing field with the checkpoint's and this run's values.
            CorruptCheckpointError: the checkpoint's config (or model config) file is damaged.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return
        saved = self.restore_config(step)
        config = _as_json(config, "config")
        differences = [
            f"{key}: checkpoint has {_lookup(saved, key)!r}, this run has {_lookup(config, key)!r}"
            for key in keys
            if _lookup(saved, key) != _lookup(config, key)
        ]
        if model is not None:
            saved_model, model = self.restore_model_config(step), _as_json(model, "model")
            differences += [
                f"model {key}: checkpoint has {saved_model.get(key, _MISSING)!r}, this run has "
                f"{model.get(key, _MISSING)!r}"
                for key in sorted(set(saved_model) | set(model))
                if saved_model.get(key, _MISSING) != model.get(key, _MISSING)
            ]
        if differences:
            raise ValueError(
                f"{self.directory} holds checkpoints (latest step {step}) of another experiment: "
                + "; ".join(differences)
                + ".\nNothing was overwritten. Use another --workdir for this experiment, or pass "
                "flags matching the checkpoint's values to resume it."
            )

    def wait(self):
        """Blocks until all saves are written (and raises their errors, if any)."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self):
        """Waits for pending saves, then releases the manager's threads."""
        if self._manager is not None:
            self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _existing_step(self, step: int | None) -> int:
        self.wait()  # a step still being written cannot be read yet
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory} to restore. Check that latest_step() is not "
                "None before restoring, or point --workdir at a run that has checkpoints."
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {self.directory}; the kept steps are {steps}. "
                "Pass one of those, or None for the latest."
            )
        return step

    def _restore_json(self, item: str, step: int | None) -> dict[str, Any]:
        step = self._existing_step(step)
        args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        with self._reading(step, item):
            value = self._manager.restore(step, args=args)[item]
        if not isinstance(value, dict):
            raise self._damage(step, item, f"holds {type(value).__name__}, not a JSON object")
        return value

    def _saved_shapes(self, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
        """The saved state's leaf paths and shapes, from its tree metadata (no array is read)."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            with self._reading(step, "state", file="state/_METADATA"):
                metadata = handler.metadata(self.step_directory(step) / "state")
        finally:
            handler.close()
        tree = getattr(metadata, "tree", metadata)
        return {_names(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    def _check_fits(self, step: int, target: Any, *, exact: bool):
        """Raises ValueError naming the differences when the saved state does not have the leaves and
        shapes of ``target`` (all of them when ``exact``, else those of ``target`` alone)."""
        saved = self._saved_shapes(step)
        wanted = {
            _names(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(target)
        }
        keys = set(wanted) | (set(saved) if exact else set())
        # Leaves of other shapes first, then leaves one side lacks.
        differences = [
            f"{'.'.join(key)}: checkpoint {saved.get(key, 'missing')}, wanted {wanted.get(key, 'missing')}"
            for key in sorted(keys, key=lambda k: (k not in saved or k not in wanted, k))
            if saved.get(key) != wanted.get(key)
        ]
        if differences:
            more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
            raise ValueError(
                f"Step {step} of {self.directory} holds another model or optimizer state: "
                + "; ".join(differences[:3])
                + f"{more}.\nResume with the flags it was saved with (see its config/metadata), or use "
                "another --workdir."
            )

    @contextlib.contextmanager
    def _reading(self, step: int, item: str, file: str | None = None):
        """Turns a failure to read ``item`` of ``step`` into a CorruptCheckpointError naming the file
        (``file`` when the error does not say); errors that say the storage is busy or unreachable
        (worth retrying) pass through."""
        try:
            yield
        except CorruptCheckpointError:
            raise
        except Exception as err:
            if damage_lib.is_transient(err):
                raise
            raise self._damage(step, item, err, file) from err

    def _damage(
        self, step: int, item: str, err: BaseException | str, file: str | None = None
    ) -> CorruptCheckpointError:
        return damage_lib.damage(self.directory, step, item, err, file)


def check_can_write(workdir: str | epath.PathLike):
    """Raises ValueError when checkpoints could not be created under ``workdir``; creates nothing.

    Checks the nearest existing folder on the way to ``workdir/checkpoints``: it must be a folder
    this process may write into. Paths that are not local (``gs://``) are not checked here.
    """
    directory = epath.Path(workdir) / "checkpoints"
    if "://" in os.fspath(directory):
        return
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    # os.access also answers "no" on a read-only mount, even to root.
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    why = "is not a folder" if not existing.is_dir() else "is not writable"
    raise ValueError(
        f"Cannot write checkpoints to {directory}: {existing} {why}. Pass a --workdir that you can write to."
    )


def _names(path) -> tuple[str, ...]:
    """A tree path as plain names, so that a dataclass's attributes, a dict's keys and a named
    tuple's fields (as saved: dict keys or sequence indices) compare equal."""
    names = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            names.append(str(key))
    return tuple(names)


@contextlib.contextmanager
def _quiet_absl(prefix: str):
    """Drops absl log records starting with ``prefix`` (orbax's notices about what it was asked)."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    logger = logging.getLogger("absl")
    drop = _Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _check_writable(directory: epath.Path):
    """Creates ``directory`` and writes a file in it, so that a bad workdir fails at once."""
    probe = directory / f".write-probe-{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"Cannot write checkpoints to {directory}: {err}. Pass a --workdir that you can write to."
        ) from err


def _with_sharding(path, leaf):
    """The restore target of one leaf: its shape, dtype and the sharding to read it onto."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
        raise ValueError(
            f"restore: abstract_state{jax.tree_util.keystr(path)} has no sharding, so there is no "
            "telling where to put it. Build the abstract state from jax.ShapeDtypeStruct(shape, "
            "dtype, sharding=...) with the trainer's shardings (a SingleDeviceSharding without a "
            "mesh)."
        )
    return leaf


def _as_json(value: dict[str, Any], name: str) -> dict[str, Any]:
    """``value`` as JSON reads it back (tuples become lists), so saved and live values compare."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Checkpoints: {name} must be a JSON-serializable dict; {err}. Pass plain values "
            "(e.g. ConfigDict.to_dict(), the tokenizer's to_dict())."
        ) from err


def _lookup(values: dict[str, Any], key: str) -> Any:
    """``values[a][b]`` for the dotted ``key`` "a.b", or ``_MISSING``."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return _MISSING
        values = values[part]
    return values
