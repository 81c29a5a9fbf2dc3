"""Reading and writing named tensors: safetensors files (single or sharded), torch state dicts, hub ids.

Every checkpoint is seen through ``Tensors``: the names, shapes and dtypes of its tensors, and each
tensor as a NumPy array on request. Shapes are known before any tensor is read, so a layout is checked
completely (every key, every shape) before a byte of weights is loaded.

safetensors files are read with the ``safetensors`` package's NumPy API (bfloat16 through ``ml_dtypes``).
A torch ``.pt`` file is read only with ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects; nothing else is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

__all__ = [
    "ShapeOnly",
    "Tensors",
    "atomic_directory",
    "check_new_directory",
    "open_safetensors",
    "open_state_dict",
    "resolve_source",
    "write_safetensors",
]

# safetensors dtype names → NumPy dtype names (bfloat16 is ml_dtypes', which jax registers).
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


class Tensors:
    """Named tensors of one checkpoint: ``keys()``, ``shape(key)``, ``dtype(key)``, ``get(key)``.

    Args:
        shapes: key → shape (a tuple of ints).
        dtypes: key → NumPy dtype name ("float32", "bfloat16", ...).
        read: key → the tensor as a NumPy array (called only for keys in ``shapes``).
        origin: key → where it lives (a file name), for error messages.
    """

    def __init__(self, shapes, dtypes, read, origin):
        self._shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self._dtypes = dict(dtypes)
        self._read = read
        self._origin = origin

    def keys(self) -> list[str]:
        return sorted(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        return self._dtypes[key]

    def origin(self, key: str) -> str:
        return self._origin(key)

    def get(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a NumPy array (read from disk now)."""
        array = np.asarray(self._read(key))
        if array.shape != self._shapes[key]:  # a file whose header disagrees with its data
            raise ValueError(
                f"{self.origin(key)}: tensor {key!r} has shape {array.shape}, but the file's header says "
                f"{self._shapes[key]}. The file is damaged; download or export it again."
            )
        return array

    def renamed(self, prefix: str) -> Tensors:
        """The same tensors with ``prefix`` removed from every key (all keys must start with it)."""
        return Tensors(
            {k[len(prefix) :]: s for k, s in self._shapes.items()},
            {k[len(prefix) :]: d for k, d in self._dtypes.items()},
            lambda key: self._read(prefix + key),
            lambda key: self._origin(prefix + key),
        )


class ShapeOnly(Tensors):
    """Tensors known only by shape and dtype (``get`` raises): for checking a layout without weights."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], dtype: str = "float32", origin: str = "<shapes>"
    ):
        def read(key):
            raise RuntimeError(f"ShapeOnly holds no data (asked for {key!r}).")

        super().__init__(shapes, {k: dtype for k in shapes}, read, lambda key: origin)


def _describe_foreign(path: str) -> str:
    """What a file that is not safetensors looks like, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return " It is a zip archive: probably a torch.save() checkpoint (.pt / .bin)."
    if head[:1] == b"\x80":
        return " It starts like a Python pickle: probably a torch.save() checkpoint (.pt / .bin)."
    return ""


def _safetensors_file(path: str):
    """Opens one safetensors file for NumPy reads; a clear error for anything else."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}).{_describe_foreign(path)} "
            "Only safetensors files are read here (pickles are never loaded): save the weights with "
            "safetensors, e.g. safetensors.torch.save_file(state_dict, 'model.safetensors')."
        ) from None


@contextlib.contextmanager
def open_safetensors(path: str) -> Iterator[Tensors]:
    """The tensors of a safetensors checkpoint, open for reading while the context lasts.

    Args:
        path: a ``.safetensors`` file, or a directory holding ``model.safetensors`` or a sharded
            checkpoint (``model.safetensors.index.json`` and the shards it names).

    Raises:
        ValueError: no safetensors weights in ``path``, a file that is not safetensors, an index naming
            a missing file or a tensor its shard does not hold, or a tensor in two files.
    """
    files: dict[str, list[str] | None] = {}  # file → the keys the index assigns to it (None: all)
    if os.path.isdir(path):
        index = os.path.join(path, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            weight_map = _read_index(index)
            for key, name in weight_map.items():
                files.setdefault(os.path.join(path, name), []).append(key)
        elif os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
            files[os.path.join(path, SAFETENSORS_FILE)] = None
        else:
            found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if len(found) != 1:
                pickles = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
                raise ValueError(
                    f"{path}: expected {SAFETENSORS_FILE} or a sharded checkpoint with "
                    f"{SAFETENSORS_INDEX}; found "
                    + (
                        f"several .safetensors files {found} and no index"
                        if found
                        else "no .safetensors file"
                    )
                    + (f" (and {pickles}, which are not read: pickles are never loaded)" if pickles else "")
                    + "."
                )
            files[os.path.join(path, found[0])] = None
    elif os.path.isfile(path):
        files[path] = None
    else:
        raise ValueError(f"{path} does not exist: give a .safetensors file or a directory holding one.")

    with contextlib.ExitStack() as stack:
        shapes, dtypes, where, handles = {}, {}, {}, {}
        for file, wanted in files.items():
            if not os.path.isfile(file):
                raise ValueError(
                    f"{path}: the index names {os.path.basename(file)}, which does not exist. "
                    "Download the missing shard."
                )
            handle = stack.enter_context(_safetensors_file(file))
            present = set(handle.keys())
            if wanted is not None:
                absent = sorted(set(wanted) - present)
                if absent:
                    raise ValueError(
                        f"{file}: the index says it holds {absent[:3]}"
                        + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
                        + ", but it does not. The shard or the index is damaged."
                    )
                present = set(wanted)
            for key in present:
                if key in where:
                    raise ValueError(
                        f"Tensor {key!r} is in both {where[key]} and {file}; a checkpoint names each once."
                    )
                part = handle.get_slice(key)
                dtype = part.get_dtype()
                if dtype not in _DTYPES:
                    raise ValueError(
                        f"{file}: tensor {key!r} has dtype {dtype}, which is not a weight dtype."
                    )
                shapes[key], dtypes[key], where[key], handles[key] = (
                    part.get_shape(),
                    _DTYPES[dtype],
                    file,
                    handle,
                )
        yield Tensors(shapes, dtypes, lambda key: handles[key].get_tensor(key), lambda key: where[key])


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a safetensors index with a 'weight_map' ({err}).") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to file names.")
    return weight_map


@contextlib.contextmanager
def open_state_dict(path: str) -> Iterator[Tensors]:
    """The tensors of a torch state dict: a ``.safetensors`` file, or a ``.pt`` file (needs torch).

    A ``.pt`` file is read with ``torch.load(weights_only=True)``: plain tensors in (nested) dicts only.
    A dict whose tensors sit under one key ``"model"`` (a training checkpoint) is accepted.

    Raises:
        ValueError: the file is missing, is not a state dict, or holds non-tensor objects.
        ImportError: a ``.pt`` file without torch installed.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: give a .safetensors or .pt file of a state dict.")
    if path.endswith((".pt", ".pth", ".bin")):
        yield _torch_state_dict(path)
    else:
        with open_safetensors(path) as tensors:
            yield tensors


def _torch_state_dict(path: str) -> Tensors:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path} needs torch: install the extra with `pip install 'retnet-jax[torch]'`, "
            "or convert the file to safetensors first (safetensors.torch.save_file)."
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for foreign content
        raise ValueError(
            f"{path} could not be read as a plain state dict with torch.load(weights_only=True): {err}. "
            "Only tensors (in dicts) are accepted; save `model.state_dict()` alone, e.g. "
            "torch.save(checkpoint['model'], 'state_dict.pt')."
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]  # a training checkpoint: {"model": state_dict, ...}
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (a dict of tensors).")
    arrays = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor. Save the model's "
                "state_dict() alone."
            )
        arrays[key] = _torch_to_numpy(value)
    return Tensors(
        {k: a.shape for k, a in arrays.items()},
        {k: a.dtype.name for k, a in arrays.items()},
        arrays.__getitem__,
        lambda key: path,
    )


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: move the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def write_safetensors(arrays: Mapping[str, np.ndarray], path: str, metadata: dict[str, str] | None = None):
    """Writes ``arrays`` (contiguous NumPy arrays, any float dtype incl. bfloat16) to ``path``."""
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path, metadata=metadata)


def check_new_directory(target: str) -> str:
    """``target`` as an absolute path, after checking that it is new (or an empty directory).

    Raises:
        ValueError: ``target`` is a file or a non-empty directory.
    """
    target = os.path.abspath(os.path.expanduser(target))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"{target} exists and is not a directory; choose a new directory.")
    if os.path.isdir(target) and os.listdir(target):
        raise ValueError(
            f"{target} is not empty; nothing was written. Choose a new (or empty) directory, or delete it."
        )
    return target


@contextlib.contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """A temporary directory beside ``target`` that becomes ``target`` when the context exits cleanly.

    ``target`` must not exist or be an empty directory. On an error the temporary directory is removed
    and ``target`` is left as it was, so nothing half-written is ever visible there.

    Raises:
        ValueError: ``target`` is a file or a non-empty directory, or its parent cannot be written.
    """
    target = check_new_directory(target)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=parent)
    except OSError as err:
        raise ValueError(f"Cannot write to {parent}: {err}. Choose a directory you can write to.") from None
    try:
        yield temporary
        _apply_umask(temporary)
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked above); a rename cannot replace it otherwise on every OS
        os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _apply_umask(directory: str):
    """Gives a finished directory the permissions of a normal mkdir/open (mkdtemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, names in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_source(path: str, patterns: list[str]) -> str:
    """A local path as is; a Hugging Face hub id (``owner/name``) downloaded with huggingface_hub.

    Args:
        path: a local file or directory, or a hub id such as ``fla-hub/retnet-1.3B-100B``.
        patterns: the file patterns to download for a hub id (e.g. ``["*.json", "*.safetensors"]``).

    Raises:
        ValueError: ``path`` is neither an existing path nor a hub id.
        ImportError: a hub id without huggingface_hub installed.
    """
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        return expanded
    if not _HUB_ID.match(path):
        raise ValueError(f"{path} does not exist (and is not a hub id such as 'fla-hub/retnet-1.3B-100B').")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(
            f"{path} is not a local path; downloading it as a hub id needs huggingface_hub "
            "(`pip install huggingface_hub`) and a network connection. Or pass a local directory."
        ) from None
    try:
        return snapshot_download(repo_id=path, allow_patterns=patterns)
    except Exception as err:  # network, authentication, unknown repository
        raise ValueError(f"Could not download {path} from the Hugging Face hub: {err}") from None
