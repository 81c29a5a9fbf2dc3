"""Bad checkpoints and directories get one clear error naming the key or file; nothing half-written."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from retnet_jax import convert
from retnet_jax.convert import checkpoint, files
from tests.convert.common import fla_style_model

TORCHSCALE = pathlib.Path(__file__).parent / "fixtures" / "torchscale" / "base.safetensors"


@pytest.fixture(scope="module")
def fla_dir(tmp_path_factory) -> pathlib.Path:
    """A valid tiny fla checkpoint directory (exported by the library)."""
    path = tmp_path_factory.mktemp("fla") / "model"
    convert.export_fla(*fla_style_model(), str(path))
    return path


def _copy(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path: pathlib.Path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(path: pathlib.Path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


# -- fla ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
        (
            lambda t: t.update({"model.layers.0.attn.q_conv1d.weight": np.zeros((32, 1, 4), np.float32)}),
            "model.layers.0.attn.q_conv1d.weight",
        ),
        (
            lambda t: t.update({"lm_head.weight": np.zeros((40, 31), np.float32)}),
            r"'lm_head.weight' has shape \[40, 31\]",
        ),
        (
            lambda t: t.update({"model.layers.0.attn.o_proj.weight": np.zeros((64, 32), np.float32)}),
            r"model.layers.0.attn.o_proj.weight.*\[32, 64\]",
        ),
    ],
    ids=["missing", "extra", "wrong-shape", "transposed"],
)
def test_fla_tensor_problems_are_named(fla_dir, tmp_path, edit, named):
    path = _copy(fla_dir, tmp_path)
    _edit_tensors(path / "model.safetensors", edit)
    with pytest.raises(ValueError, match=named):
        convert.load_fla(str(path))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rope_theta": 500000.0}, "rope_theta"),
        ({"use_short_conv": True}, "use_short_conv"),
        ({"num_kv_heads": 1}, "num_kv_heads"),
        ({"feature_map": "elu"}, "feature_map"),
        ({"expand_k": 0.5}, "expand_k"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attn": {"layers": [1], "num_heads": 2}}, "attn"),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
        ({"decoder_embed_dim": 32}, "torchscale-style"),
        ({"intermediate_size": 64}, "mlp.gate_proj.weight"),
    ],
)
def test_fla_config_problems_are_named(fla_dir, tmp_path, changes, named):
    path = _copy(fla_dir, tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=named):
        convert.load_fla(str(path))


def test_fla_config_without_fla_keys(fla_dir, tmp_path):
    path = _copy(fla_dir, tmp_path)
    (path / "config.json").write_text(json.dumps({"model_type": "retnet", "hidden_size": 32}))
    with pytest.raises(ValueError, match="not an fla RetNet config.*num_hidden_layers"):
        convert.load_fla(str(path))


def test_pickle_where_safetensors_was_expected(fla_dir, tmp_path):
    path = _copy(fla_dir, tmp_path)
    (path / "model.safetensors").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    with pytest.raises(ValueError, match=r"model\.safetensors.*pickle"):
        convert.load_fla(str(path))
    (path / "model.safetensors").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"model\.safetensors.*zip archive"):
        convert.load_fla(str(path))


def test_pickled_weights_alone_are_refused(fla_dir, tmp_path):
    path = _copy(fla_dir, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never loaded"):
        convert.load_fla(str(path))


def test_index_naming_a_missing_shard(fla_dir, tmp_path):
    path = _copy(fla_dir, tmp_path)
    keys = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        convert.load_fla(str(path))


def test_missing_config(fla_dir, tmp_path):
    path = _copy(fla_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        convert.load_fla(str(path))


# -- torchscale --------------------------------------------------------------------------------


def _torchscale_copy(tmp_path, edit) -> str:
    tensors = load_file(str(TORCHSCALE))
    edit(tensors)
    path = str(tmp_path / "state.safetensors")
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: t.pop("layers.1.ffn.gate.weight"), "layers.1.ffn.gate.weight"),
        (
            lambda t: t.update({"layers.0.retention.q_proj.bias": np.zeros(32, np.float32)}),
            "layers.0.retention.q_proj.bias",
        ),
        (
            lambda t: t.update({"layers.0.ffn.fc2.weight": np.zeros((40, 32), np.float32)}),
            "layers.0.ffn.fc2.weight",
        ),
        (
            lambda t: t.update(
                {"retnet_rel_pos.decay": np.log(1 - np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), 2)))}
            ),
            "retnet_rel_pos.decay.*paper",
        ),
        (
            lambda t: t.update({"retnet_rel_pos.angle": np.tile(10000.0 ** -(np.arange(8) / 8), 2)}),
            "retnet_rel_pos.angle",
        ),
        (lambda t: t.pop("retnet_rel_pos.decay"), "retnet_rel_pos.decay"),
        (lambda t: t.pop("layers.1.retention_layer_norm.weight"), "layers.1.retention_layer_norm.weight"),
    ],
    ids=["missing", "extra", "wrong-shape", "decay", "angle", "no-decay", "missing-norm"],
)
def test_torchscale_tensor_problems_are_named(tmp_path, edit, named):
    path = _torchscale_copy(tmp_path, edit)
    with pytest.raises(ValueError, match=named):
        convert.load_torchscale(path)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"num_heads": 4}, "num_heads"),
        ({"rotation": "rotate_half"}, "rotation"),
        ({"normalize": False}, "normalize"),
        ({"eps": 0.0}, "eps"),
        ({"activation": "relu"}, "activation"),
    ],
)
def test_torchscale_config_problems_are_named(config, named):
    with pytest.raises(ValueError, match=named):
        convert.load_torchscale(str(TORCHSCALE), config=config)


def test_torchscale_pickle_where_safetensors_was_expected(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(pickle.dumps({"embed_tokens.weight": [0.0]}))
    with pytest.raises(ValueError, match=r"state\.safetensors.*pickle"):
        convert.load_torchscale(str(path))


def test_torchscale_pt_holding_objects_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"model": {"w": torch.zeros(2)}, "args": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt"):
        convert.load_torchscale(str(tmp_path / "ckpt.pt"))


# -- output directories ------------------------------------------------------------------------


def test_export_into_a_non_empty_directory_is_refused(tmp_path):
    model, variables = fla_style_model()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert.export_fla(model, variables, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_export_into_an_unwritable_place_is_refused(tmp_path):
    model, variables = fla_style_model()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="Cannot write"):
        convert.export_fla(model, variables, str(tmp_path / "file" / "out"))


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model, variables = fla_style_model()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.export_fla(model, variables, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_export_of_variables_from_another_model_is_refused(tmp_path):
    model, _ = fla_style_model()
    _, other = fla_style_model(d_model=16)
    with pytest.raises(ValueError, match="do not fit"):
        convert.export_fla(model, other, str(tmp_path / "out"))


def test_conversion_checks_the_workdir_before_reading_weights(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        checkpoint.convert_checkpoint(
            "torchscale", str(tmp_path / "missing.safetensors"), str(tmp_path / "work")
        )


def test_a_failed_conversion_leaves_no_workdir(tmp_path, monkeypatch):
    from retnet_jax.training import checkpoints

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.Checkpoints, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.convert_checkpoint("torchscale", str(TORCHSCALE), str(tmp_path / "work"))
    assert os.listdir(tmp_path) == []
