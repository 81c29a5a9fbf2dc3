"""Text corpora as tensorflow-datasets builds in ``array_record`` files, read without TensorFlow.

``text_source(dataset, split)`` returns a random-access sequence of documents (strings), building
the dataset on first use into ``data_dir`` (tfds's default, ``~/tensorflow_datasets``, when
``None``). Three kinds of ``dataset``:

* ``"default"``: offline and deterministic, the top-level ``*.py`` files of the running Python's
  standard library (about 170 files, 5 MB; built in a few seconds), one document per file.
* ``"text:DIR_OR_GLOB"``: your own text, a directory (searched recursively) or a glob of ``.txt``
  files (one document per file) and ``.jsonl`` files (one document per line, field ``"text"``);
  ``~`` and environment variables are expanded. Files that are not text (a NUL byte or invalid
  UTF-8 in their first 8 KiB) are skipped; ``check`` reports how many.
* any tfds catalog text dataset by name (``"tiny_shakespeare"``, ``"lm1b"``,
  ``"name/config:1.0.0"``), its text in ``text_feature``.

The first two are built by ``TextFiles``: documents go to ``validation`` when the CRC-32 of their
key (the relative path, plus ``:LINE`` for jsonl) falls in the lowest ``VALIDATION_PERCENT``
percent, so the split is fixed by the names alone and a document keeps its split when others are
added. A ``text:DIR`` whose DIR holds ``train/`` and ``validation/`` folders is split by those
folders instead (as ``code_corpus`` writes it), and only their files are read. The build is keyed
by a fingerprint of the file list (paths, sizes, modification times) in the builder config's name,
so an edited file set is rebuilt rather than read stale.

Builds are cached in ``data_dir``: ``DATA_DIR/retnet_text_files/KIND_FINGERPRINT/1.0.0`` for the
first two kinds, a new copy for each change of the file set (delete ``DATA_DIR/retnet_text_files``
to reclaim the space), ``DATA_DIR/NAME/CONFIG/VERSION`` for catalog datasets.

``check(dataset, ...)`` validates a dataset before anything is built or written: a text spec that
matches no file, an unknown catalog name, or a catalog dataset that is not built where there is no
network to download it (it fails within seconds instead of retrying for minutes).

Without TensorFlow tfds writes and reads ``array_record`` (the format is set explicitly: tfds
would otherwise pick TFRecord) and decodes ``Text`` features to ``bytes``. Catalog builders,
however, mostly generate their data with ``tf.io``: build those once where TensorFlow is installed,
``tfds build NAME --file_format=array_record --data_dir=DIR``, and point ``data_dir`` at ``DIR``.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import sys
import sysconfig
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

__all__ = [
    "DEFAULT",
    "NO_NETWORK_TIMEOUT",
    "TEXT_PREFIX",
    "VALIDATION_PERCENT",
    "TextFiles",
    "TextFilesConfig",
    "TextSource",
    "check",
    "text_source",
]

DEFAULT = "default"
TEXT_PREFIX = "text:"
VALIDATION_PERCENT = 5  # share of documents in the validation split
_TEXT_SUFFIXES = (".txt", ".jsonl")
_FOLDERS = ("train", "validation")  # a text:DIR holding both folders is split by them
_FILE_FORMAT = "array_record"  # random access, readable without TensorFlow
_SNIFF_BYTES = 8192  # read from each text file to tell text from binary
NO_NETWORK_TIMEOUT = 10.0  # seconds to wait for a catalog dataset's download host


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Which files ``TextFiles`` reads.

    Attributes:
        root: directory the relative paths (and so the document keys) start from.
        files: sorted paths relative to ``root``.
    """

    root: str = ""
    files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    split_folders: bool = False  # each path's first folder (train/, validation/) is its split


def _is_validation(key: str) -> bool:
    # crc32 rather than hash(): stable across processes, machines and Python versions.
    return zlib.crc32(key.encode("utf-8")) % 100 < VALIDATION_PERCENT


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents from text files: ``.jsonl`` one per line (field ``"text"``), others one per file.

    Not registered in the tfds catalog: ``text_source`` constructs it with a ``TextFilesConfig``.
    """

    name = "retnet_text_files"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train/validation split by CRC-32 of the document key."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text documents of {len(self.builder_config.files)} files under "
            f"{self.builder_config.root}.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _log_download_bytes(self) -> None:
        # tfds would print "Downloading and preparing dataset Unknown size": nothing is downloaded.
        print(
            f"Building the dataset of {len(self.builder_config.files)} files under "
            f"{self.builder_config.root} into {self.data_dir} (once per change of the files)...",
            flush=True,
        )

    def _log_download_done(self) -> None:
        pass

    def _documents(self) -> Iterator[tuple[str, str]]:
        """Yields (key, text) for every document, in file order."""
        root = self.builder_config.root
        for rel in self.builder_config.files:
            path = os.path.join(root, rel)
            if not rel.endswith(".jsonl"):
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield rel, f.read()
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        raise ValueError(
                            f"{path}:{number}: each line of a .jsonl file must be a JSON object "
                            f'with a string field "text"; got {line.strip()[:80]!r}.'
                        )
                    yield f"{rel}:{number}", text

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
        del dl_manager  # Everything is local.
        if self.builder_config.split_folders:
            return {s: self._generate_examples(lambda key, s=s: key.startswith(s + os.sep)) for s in _FOLDERS}
        # One pass over the keys, in constant memory (a .jsonl may hold millions of lines).
        count, in_split, lowest, highest = 0, 0, (2**32, ""), (-1, "")
        for key, _ in self._documents():
            crc = zlib.crc32(key.encode("utf-8"))
            count += 1
            in_split += _is_validation(key)
            lowest, highest = min(lowest, (crc, key)), max(highest, (crc, key))
        if count < 2:
            raise ValueError(
                f"{self.builder_config.root}: found {count} document(s); a train and a "
                "validation split need at least 2. Add files (or .jsonl lines)."
            )

        # tfds refuses an empty split. A small corpus may hash no document (or every one) into
        # validation; then the lowest-CRC document goes there (or the highest-CRC one to train),
        # which keeps the split a function of the names alone.
        def in_validation(key: str) -> bool:
            if in_split == 0:
                return key == lowest[1]
            if in_split == count:
                return key != highest[1]
            return _is_validation(key)

        return {
            "train": self._generate_examples(lambda key: not in_validation(key)),
            "validation": self._generate_examples(in_validation),
        }

    def _generate_examples(self, keep: Callable[[str], bool]) -> Iterator[tuple[str, dict]]:
        for key, text in self._documents():
            if keep(key):
                yield key, {"text": text}


def _files_config(kind: str, root: str, paths: Sequence[str], **fields: Any) -> TextFilesConfig:
    """A config whose name fingerprints the file set, so that a changed set gets a new build."""
    files = tuple(sorted(os.path.relpath(p, root) for p in paths))
    digest = hashlib.sha256(os.path.abspath(root).encode())
    for rel in files:
        stat = os.stat(os.path.join(root, rel))
        digest.update(f"\0{rel}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return TextFilesConfig(name=f"{kind}_{digest.hexdigest()[:16]}", root=root, files=files, **fields)


def _stdlib_config() -> TextFilesConfig:
    """The default corpus: this interpreter's top-level standard-library modules."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(glob.escape(root), "*.py")))
    version = f"python{sys.version_info.major}_{sys.version_info.minor}"
    return _files_config(f"{version}_stdlib", root, paths)


def _text_config(spec: str, skipped: list[str] | None = None) -> TextFilesConfig:
    """The files of ``"text:DIR_OR_GLOB"`` (``spec`` already expanded); binary files are left out and
    appended to ``skipped``. A DIR holding ``train/`` and ``validation/`` is split by those folders."""
    folders = all(os.path.isdir(os.path.join(spec, split)) for split in _FOLDERS)
    if folders:
        root = spec
        escaped = glob.escape(spec)
        paths = [p for s in _FOLDERS for p in glob.glob(os.path.join(escaped, s, "**", "*"), recursive=True)]
    elif os.path.isdir(spec):
        root = spec
        paths = glob.glob(os.path.join(glob.escape(spec), "**", "*"), recursive=True)
    else:
        # Keys are relative to the glob's leading directories without wildcards, e.g. /data for
        # /data/*/x.txt, so they do not depend on where the corpus is mounted.
        fixed = itertools.takewhile(lambda part: not set("*?[") & set(part), spec.split(os.sep)[:-1])
        root = os.sep.join(fixed) or (os.sep if spec.startswith(os.sep) else ".")
        paths = glob.glob(spec, recursive=True)
    paths = [p for p in paths if p.endswith(_TEXT_SUFFIXES) and os.path.isfile(p)]
    binary = [p for p in paths if _is_binary(p)]
    if binary:
        paths = sorted(set(paths) - set(binary))
        if skipped is not None:
            skipped.extend(sorted(binary))
    if not paths:
        raise ValueError(
            f"dataset 'text:{spec}' matched no .txt or .jsonl files. Give a directory (searched "
            "recursively) or a glob, e.g. 'text:/data/books' or 'text:/data/**/*.jsonl'."
        )
    return _files_config("text_splits" if folders else "text", root, paths, split_folders=folders)


def _is_binary(path: str) -> bool:
    """Whether the file's first bytes hold a NUL byte or are not UTF-8 (a character cut at the end of
    the sample is fine). Remembered per path, size and modification time: every split and evaluation
    lists the files again."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _BINARY:
        _BINARY[key] = _sniff_binary(path)
    return _BINARY[key]


_BINARY: dict[tuple[str, int, int], bool] = {}


def _sniff_binary(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _expand(path: str) -> str:
    """``~`` and ``$VARS`` expanded, as a shell would."""
    return os.path.expandvars(os.path.expanduser(path))


@contextlib.contextmanager
def _quiet_tfds():
    """Hides tfds's notices that say nothing wrong: "Using custom data configuration" (every text build
    has its own config) and "Variant folder ... has no dataset_info.json" (not built yet)."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = str(record.msg)
            return not (
                message.startswith("Using custom data configuration")
                or (message.startswith("Variant folder") and "dataset_info.json" in message)
            )

    logger = logging.getLogger("absl")
    drop = _Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _download_host(builder: tfds.core.DatasetBuilder) -> str | None:
    """The host the builder downloads from (its first http(s) URL), or None when it names none."""
    try:
        urls = list(builder.url_infos or ())
    except Exception:  # builders without a checksums file
        return None
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme in ("http", "https") and parsed.hostname:
            return f"{parsed.scheme}://{parsed.hostname}"
    return None


def _reachable(url: str, timeout: float) -> bool:
    """Whether an HTTP request to ``url`` gets any answer within ``timeout`` seconds (through the
    environment's proxy, as tfds's downloads would). Runs in a thread: name resolution may hang past
    a socket's own timeout."""
    import requests

    answered = threading.Event()

    def probe():
        try:
            requests.head(url, timeout=timeout, allow_redirects=False)
            answered.set()
        except Exception:  # any failure to connect means no usable network
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return answered.is_set()


def _require_network(builder: tfds.core.DatasetBuilder, dataset: str) -> None:
    """Raises ConnectionError at once when ``builder`` must download and its host does not answer.

    tfds would retry each download for minutes and end in a long traceback."""
    host = _download_host(builder)
    if host is None or _reachable(host, NO_NETWORK_TIMEOUT):
        return
    raise ConnectionError(
        f"Dataset {dataset!r} is not built in {builder.data_dir} and cannot be downloaded: no network "
        f"({host} does not answer).\nBuild it on a machine with a network: `tfds build {dataset} "
        f"--file_format={_FILE_FORMAT} --data_dir=DIR`, copy DIR here and pass --config.data_dir=DIR."
    )


def _catalog_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir, file_format=_FILE_FORMAT)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}. Use {DEFAULT!r} (the offline Python standard-library "
            f"corpus), '{TEXT_PREFIX}DIR_OR_GLOB' (your .txt / .jsonl files), or the name of a "
            "tfds catalog text dataset such as 'tiny_shakespeare' or 'lm1b' (also "
            "'name/config:version'; tfds.list_builders() lists them)."
        ) from None


def _prepare(builder: tfds.core.DatasetBuilder, dataset: str) -> None:
    if builder.is_prepared():
        return
    if not isinstance(builder, TextFiles):
        _require_network(builder, dataset)
    try:
        builder.download_and_prepare()
    except ImportError as e:
        if "importlib_resources" in str(e):
            # tfds imports it on every build but declares it only for Python < 3.9 (issue 11212).
            raise ImportError(
                "Building tfds datasets needs the package importlib_resources, which "
                "tensorflow-datasets uses without declaring it: pip install importlib_resources."
            ) from e
        if "tensorflow" not in str(e).lower():
            raise
        raise ImportError(
            f"Building tfds dataset {dataset!r} needs TensorFlow, which this project does not "
            "install. Build it once where TensorFlow is installed with `tfds build "
            f"{dataset} --file_format={_FILE_FORMAT} --data_dir=DIR`, then set data_dir=DIR."
        ) from e


class TextSource(Sequence[str]):
    """Random-access documents of one split: ``len(source)``, ``source[i] -> str``.

    Picklable (grain worker processes reopen the files), so it can feed a grain ``MapDataset``.

    Args:
        records: a tfds data source of feature dicts.
        feature: the feature holding the text.
        name: for messages, e.g. ``"default/train"``.
    """

    def __init__(self, records: Sequence[dict[str, Any]], feature: str, name: str):
        self._records = records
        self._feature = feature
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {self!r}")
        text = self._records[index % len(self)][self._feature]
        # tfds decodes Text features to bytes when TensorFlow is absent.
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)

    def __iter__(self) -> Iterator[str]:
        return (self[index] for index in range(len(self)))

    def __repr__(self) -> str:
        return f"TextSource({self.name!r}, {len(self)} documents)"


def _builder(
    dataset: str, data_dir: str | None, skipped: list[str] | None = None
) -> tfds.core.DatasetBuilder:
    data_dir = _expand(data_dir) if data_dir else None
    with _quiet_tfds():
        if dataset == DEFAULT:
            return TextFiles(config=_stdlib_config(), data_dir=data_dir, file_format=_FILE_FORMAT)
        if dataset.startswith(TEXT_PREFIX):
            config = _text_config(_expand(dataset[len(TEXT_PREFIX) :]), skipped)
            return TextFiles(config=config, data_dir=data_dir, file_format=_FILE_FORMAT)
        return _catalog_builder(dataset, data_dir)


def check(dataset: str, *, data_dir: str | None = None) -> list[str]:
    """Checks that ``dataset`` can be read or built here, building and writing nothing.

    Args:
        dataset: as for ``text_source``.
        data_dir: where tfds builds and reads datasets; ``None`` or ``""`` for tfds's default.

    Returns:
        Notes for the user (e.g. how many binary files a text folder had that will be skipped).

    Raises:
        ValueError: an unknown dataset, or a text spec matching no text file.
        ConnectionError: a catalog dataset that is not built and cannot be downloaded (no network).
    """
    skipped: list[str] = []
    builder = _builder(dataset, data_dir, skipped)
    if not isinstance(builder, TextFiles) and not builder.is_prepared():
        _require_network(builder, dataset)
    if not skipped:
        return []
    names = ", ".join(os.path.basename(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    return [f"Skipped {len(skipped)} binary file(s) in {dataset} (not UTF-8 text): {names}."]


def text_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    text_feature: str = "text",
) -> TextSource:
    """Returns the documents of one split of a corpus, building it on first use.

    Args:
        dataset: ``"default"``, ``"text:DIR_OR_GLOB"`` or a tfds catalog name (see the module doc).
        split: a split name (``"train"``, ``"validation"``, ...) or a tfds slice
            (``"train[:10%]"``).
        data_dir: where tfds builds and reads datasets; ``None`` or ``""`` for tfds's default.
        text_feature: the feature holding the text in a catalog dataset (the first two kinds always
            use ``"text"``).

    Returns:
        The split's documents.

    Raises:
        ValueError: unknown dataset, a text spec matching no files, an unknown split or feature.
        ConnectionError: a catalog dataset that is not built and cannot be downloaded (no network).
        ImportError: a catalog dataset that is not built yet needs TensorFlow to build.
    """
    builder = _builder(dataset, data_dir)
    if isinstance(builder, TextFiles):
        text_feature = "text"
    _prepare(builder, dataset)

    splits = sorted(builder.info.splits.keys())
    if split.split("[")[0] not in splits:
        raise ValueError(
            f"Dataset {dataset!r} has no split {split!r}; its splits are {splits}. Set "
            "config.train_split / config.eval_split to one of them."
        )
    features = list(builder.info.features.keys())
    if text_feature not in features:
        raise ValueError(
            f"Dataset {dataset!r} has no feature {text_feature!r}; its features are {features}. "
            "Set config.text_feature to the one holding the text."
        )
    return TextSource(builder.as_data_source(split=split), text_feature, f"{dataset}/{split}")
