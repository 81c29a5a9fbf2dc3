"""Damaged checkpoints: what is wrong, named by file, and setting a damaged step aside.

A committed step can still be damaged afterwards: a truncated or garbled array file, an empty
``state/_METADATA``, a garbled JSON item, a deleted ``state/``. Reading it fails deep inside orbax and
TensorStore, whose exceptions carry a multi-line dump of the store's spec; ``damage`` turns them into a
``CorruptCheckpointError`` that names the file and says what is wrong in one line. ``set_aside`` moves
such a step out of orbax's sight without deleting anything.
"""

from __future__ import annotations

import os
import re
import sys

from etils import epath

__all__ = ["CorruptCheckpointError", "damage", "is_transient", "set_aside"]


class CorruptCheckpointError(ValueError):
    """A committed checkpoint step that cannot be read: one of its files is missing, truncated or garbled.

    Attributes:
        directory: the checkpoints directory (``WORKDIR/checkpoints``).
        step: the damaged step.
        file: the damaged file or folder, relative to the step's directory (``"state/_METADATA"``,
            ``"config/metadata"``, ``"state/ (array params.embed.embedding)"``, ...).
        item: the checkpoint item it belongs to: state, data, config, model or tokenizer.
        reason: what is wrong with it, in a few words.
    """

    def __init__(self, directory: epath.Path, step: int, file: str, reason: str, hint: str = ""):
        self.directory = directory
        self.step = step
        self.file = file
        self.item = file.split("/")[0].split(" ")[0]
        self.reason = reason
        self.hint = hint
        super().__init__(
            f"Checkpoint step {step} in {directory} is damaged: {file}: {reason}"
            + (f"\n{hint}" if hint else "")
        )

    def with_hint(self, hint: str) -> CorruptCheckpointError:
        """The same error with a second line saying what to do."""
        return CorruptCheckpointError(self.directory, self.step, self.file, self.reason, hint)


def set_aside(error: CorruptCheckpointError) -> epath.Path:
    """Renames the damaged step to ``checkpoints/STEP.corrupt-ITEM`` (``-2``, ``-3``... if taken).

    Nothing is deleted; orbax lists only integer-named steps, so the renamed folder is left alone
    (no keep-last-K deletion, no temporary-directory clean-up) and a new checkpoint of that step
    can be saved. Needs write access; call it where no ``Checkpoints`` is open on the workdir.

    Returns:
        The new path.
    """
    source = error.directory / str(error.step)
    target = error.directory / f"{error.step}.corrupt-{error.item}"
    number = 1
    while target.exists():
        number += 1
        target = error.directory / f"{error.step}.corrupt-{error.item}-{number}"
    source.rename(target)
    return target


# Storage errors worth retrying rather than calling the checkpoint damaged.
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED")


# TensorStore status codes of damaged files, in words.
_KINDS = {
    "OUT_OF_RANGE": "truncated",
    "DATA_LOSS": "garbled",
    "NOT_FOUND": "missing",
    "INVALID_ARGUMENT": "garbled",
}


def is_transient(err: BaseException) -> bool:
    """Whether a read error says the storage is busy or unreachable: worth retrying, not damage."""
    text = " ".join(str(e) for e in _chain(err))
    return any(code in text for code in _TRANSIENT)


def damage(
    directory: epath.Path, step: int, item: str, err: BaseException | str, file: str | None = None
) -> CorruptCheckpointError:
    """The error for a failure to read ``item`` of step ``step`` in ``directory``.

    Args:
        err: the exception the read raised, or a description of what was read instead.
        file: the file to name when the exception does not say (e.g. ``"state/_METADATA"``).
    """
    step_dir = directory / str(step)
    item_dir = step_dir / item
    if not item_dir.exists():
        return CorruptCheckpointError(directory, step, f"{item}/", "missing")
    if isinstance(err, str):
        named, reason = None, err
    else:
        named, reason = _describe(err, step_dir)
        if item == "state":
            _ignore_late_read_callbacks()
    return CorruptCheckpointError(directory, step, named or file or _single_file(item_dir, item), reason)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return chain


def _describe(err: BaseException, step_dir: epath.Path) -> tuple[str | None, str]:
    """(damaged file relative to ``step_dir`` or None, a one-line reason) from a read error.

    TensorStore's messages name the local file (or the OCDBT database folder and the array key)
    somewhere in the chain of exceptions; the outermost one is a multi-line dump of its spec.
    """
    messages = [" ".join(str(e).split()) for e in _chain(err)]
    status = [m for m in messages if re.match(r"[A-Z_]{4,}: ", m)]
    text = status[-1] if status else next((m for m in messages if m), type(err).__name__)
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", text)
    code = re.match(r"([A-Z_]{4,}): ", text)
    files = re.findall(r'local file "([^"]+)"', text)
    file = None
    if files:
        path = files[-1]
        relative = os.path.relpath(path, os.fspath(step_dir)) + ("/" if path.endswith("/") else "")
        arrays = re.findall(r'Error reading "([^"/]+)/', text)
        file = f"{relative} (array {arrays[-1]})" if relative.endswith("/") and arrays else relative
        text = text.split(f'local file "{path}"')[-1].lstrip(": ")
    if not text:
        text = type(err).__name__
    if code and code.group(1) in _KINDS:
        text = f"{_KINDS[code.group(1)]} ({text})"
    elif "decompress" in text.lower():
        text = f"garbled ({text})"
    return file, text if len(text) <= 200 else text[:197] + "..."


def _ignore_late_read_callbacks():
    """Silences the reads still in flight when one array of a restore failed.

    orbax reads arrays concurrently inside ``asyncio.run``; when one read fails the event loop closes
    while TensorStore still completes the others, and each completion reports "RuntimeError: Event
    loop is closed" through ``sys.unraisablehook`` (a traceback on stderr, possibly minutes later in a
    resumed run). Only that exception is dropped; every other one reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_retnet_ignores_closed_loop", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._retnet_ignores_closed_loop = True
    sys.unraisablehook = hook


def _single_file(item_dir: epath.Path, item: str) -> str:
    """``item/FILE`` when the item's folder holds one data file (JSON items), else ``item/``."""
    files = [p.name for p in item_dir.iterdir() if p.name != "commit_success.txt"]
    return f"{item}/{files[0]}" if len(files) == 1 else f"{item}/"
