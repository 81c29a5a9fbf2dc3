"""Corpus checks before anything is built: binary files skipped with a count, ``~`` and ``$VARS`` expanded,
a catalog dataset without network refused within seconds, tfds's misleading notices replaced."""

import logging
import time

import pytest

from retnet_jax.training import corpus


def _write(root, texts):
    root.mkdir(parents=True, exist_ok=True)
    for name, content in texts.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def test_binary_files_in_a_text_folder_are_skipped_and_counted(tmp_path, capsys):
    # A UTF-8 file whose first 8 KiB end inside a character is text; NUL bytes or Latin-1 are not.
    cut = "a" * (corpus._SNIFF_BYTES - 1) + "é and more"
    _write(
        tmp_path / "notes",
        {
            "one.txt": "first document\n",
            "two.txt": "second document\n",
            "cut.txt": cut,
            "image.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "latin1.txt": "café crème".encode("latin-1"),
        },
    )
    dataset = f"text:{tmp_path / 'notes'}"
    assert corpus.check(dataset, data_dir=str(tmp_path / "tfds")) == [
        f"Skipped 2 binary file(s) in {dataset} (not UTF-8 text): image.txt, latin1.txt."
    ]
    assert not (tmp_path / "tfds").exists()  # check builds nothing
    docs = [*corpus.text_source(dataset, "train", data_dir=str(tmp_path / "tfds"))]
    docs += corpus.text_source(dataset, "validation", data_dir=str(tmp_path / "tfds"))
    assert sorted(docs) == sorted(["first document\n", "second document\n", cut])
    out = capsys.readouterr().out
    # tfds's "Downloading and preparing dataset Unknown size" is replaced: nothing is downloaded.
    assert "Downloading" not in out and "Unknown size" not in out
    assert f"Building the dataset of 3 files under {tmp_path / 'notes'} into {tmp_path / 'tfds'}" in out


def test_home_and_variables_are_expanded(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CORPUS", "notes")
    _write(tmp_path / "home" / "notes", {"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "gamma\n"})
    data_dir = "~/tfds"
    with caplog.at_level(logging.WARNING):
        for spec in ("text:~/notes", "text:$HOME/$CORPUS", "text:~/${CORPUS}/*.txt"):
            assert corpus.check(spec, data_dir=data_dir) == []
            docs = [*corpus.text_source(spec, "train", data_dir=data_dir)]
            docs += corpus.text_source(spec, "validation", data_dir=data_dir)
            assert sorted(docs) == ["alpha\n", "beta\n", "gamma\n"], spec
    assert (tmp_path / "home" / "tfds" / "retnet_text_files").is_dir()  # data_dir expanded too
    assert "Using custom data configuration" not in caplog.text


def test_a_catalog_dataset_without_network_is_refused_at_once(tmp_path, monkeypatch):
    """Not built in data_dir and the download host does not answer: ConnectionError in seconds (tfds
    would retry for minutes), naming the command that builds it elsewhere."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a proxy that refuses: no network
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    started = time.perf_counter()
    for call in (
        lambda: corpus.check("tiny_shakespeare", data_dir=str(tmp_path)),
        lambda: corpus.text_source("tiny_shakespeare", "train", data_dir=str(tmp_path)),
    ):
        with pytest.raises(ConnectionError) as info:
            call()
        first, second = str(info.value).splitlines()
        assert first.startswith(f"Dataset 'tiny_shakespeare' is not built in {tmp_path}/tiny_shakespeare/")
        assert first.endswith(
            "cannot be downloaded: no network (https://raw.githubusercontent.com does not answer)."
        )
        assert "`tfds build tiny_shakespeare --file_format=array_record --data_dir=DIR`" in second
        assert "--config.data_dir=DIR" in second
    assert time.perf_counter() - started < 30
