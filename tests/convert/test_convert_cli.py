"""`retnet-convert` and ``convert_checkpoint``: a workdir holding the weights, the model config and the
tokenizer; flag errors named."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from retnet_jax import convert
from retnet_jax.convert import checkpoint, layout
from retnet_jax.models import RetNetConfig
from tests.cli import in_process
from tests.convert.common import fla_style_model, same_tree

TORCHSCALE = pathlib.Path(__file__).parent / "fixtures" / "torchscale"


def _tokenizer_json(path: pathlib.Path, size: int) -> pathlib.Path:
    """A word-level tokenizer.json with ``size`` tokens, <s> and </s> among them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def read_checkpoint(workdir: str):
    """(model config, params, tokenizer dict) of a converted workdir."""
    from retnet_jax.training.checkpoints import Checkpoints
    from retnet_jax.training.trainer import TrainState

    checkpoints = Checkpoints(workdir, every=1, keep=1, async_save=False)
    try:
        config = RetNetConfig.from_dict(checkpoints.restore_model_config())
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            layout.abstract_params(config),
        )
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)
        state = checkpoints.restore(TrainState(step=step, params=params, opt_state=None))
        return config, state.params, checkpoints.restore_tokenizer()
    finally:
        checkpoints.close()


def test_fla_checkpoint_converts_with_its_tokenizer(tmp_path):
    model, variables = fla_style_model()
    convert.export_fla(model, variables, str(tmp_path / "fla"))
    _tokenizer_json(tmp_path / "fla" / "tokenizer.json", size=30)
    workdir, loaded, tokenizer = checkpoint.convert_checkpoint(
        "fla", str(tmp_path / "fla"), str(tmp_path / "w")
    )
    config, params, tokenizer_dict = read_checkpoint(workdir)
    assert config == model.config == loaded.config
    assert same_tree(params, variables["params"])
    assert tokenizer_dict["kind"] == "huggingface" and tokenizer.vocab_size == 30
    assert tokenizer.bos_id == 0 and tokenizer.eos_id == 1


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    model, variables = fla_style_model()
    convert.export_fla(model, variables, str(tmp_path / "fla"))
    _tokenizer_json(tmp_path / "fla" / "tokenizer.json", size=model.config.vocab_size + 1)
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        checkpoint.convert_checkpoint("fla", str(tmp_path / "fla"), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def _cli(*args):
    """retnet-convert in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "retnet_jax.cli.convert", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_converts_a_torchscale_state_dict_and_names_bad_flags(tmp_path, capfd):
    """The conversion in a process of its own, the refusals in this one (tests/cli/in_process.py)."""
    tokenizer = _tokenizer_json(tmp_path / "tokenizer.json", size=20)
    args = (
        "--from=torchscale",
        f"--src={TORCHSCALE / 'fairseq.safetensors'}",
        f"--workdir={tmp_path / 'w'}",
        '--model_config={"embed_scale": true}',
        f"--tokenizer={tokenizer}",
    )
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    config, params, tokenizer_dict = read_checkpoint(str(tmp_path / "w"))
    model, variables = convert.load_torchscale(
        str(TORCHSCALE / "fairseq.safetensors"), config={"embed_scale": True}
    )
    assert config == model.config and config.embed_scale
    assert same_tree(params, variables["params"])
    assert json.loads(tokenizer_dict["tokenizer_json"])["model"]["type"] == "WordLevel"

    def here(*args):
        return in_process.run("retnet_jax.cli.convert", args, capfd)

    again = here(*args)  # the workdir is no longer empty
    assert again.returncode == 2 and "not empty" in again.stderr
    missing = here("--from=fla", f"--workdir={tmp_path / 'other'}")
    assert missing.returncode == 2 and "--src is required" in missing.stderr
    bad_json = here("--from=torchscale", "--src=x", f"--workdir={tmp_path / 'other'}", "--model_config={oops")
    assert bad_json.returncode == 2 and "--model_config is not JSON" in bad_json.stderr
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_a_converted_workdir_is_served_and_fine_tuned(tmp_path):
    """retnet-generate's loader reads it; retnet-train fine-tunes it from step 0 with a fresh optimizer
    and the imported architecture, and resumes that fine-tuning like any run."""
    from retnet_jax.configs.default import get_config
    from retnet_jax.inference import generate, loading
    from retnet_jax.training import loop
    from retnet_jax.training.tokenizers import ByteTokenizer

    model, variables = fla_style_model()
    workdir = checkpoint.write_checkpoint(
        str(tmp_path / "w"),
        model.config.replace(vocab_size=264),
        _byte_params(model, variables),
        ByteTokenizer(),
    )
    served, served_variables, tokenizer = loading.load(workdir)
    assert served.config == model.config.replace(vocab_size=264) and isinstance(tokenizer, ByteTokenizer)
    result = generate.generate(
        served,
        served_variables,
        [[1, 2, 3]],
        max_new_tokens=4,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
    )
    assert result.tokens.shape == (1, 4)

    config = get_config()
    config.update(
        steps=2, seq_len=16, batch_size=8, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2
    )
    state = loop.train_and_evaluate(config, workdir)
    assert int(state.step) == 2
    assert jax.tree.structure(state.params) == jax.tree.structure(served_variables["params"])
    config.steps = 3
    config.allow_schedule_change = True  # a longer run re-shapes the learning-rate schedule
    assert int(loop.train_and_evaluate(config, workdir).step) == 3  # resumes the fine-tuning
    config.model_overrides.num_heads = 4
    with pytest.raises(ValueError, match="imported from weights.*model_overrides \\(num_heads\\)"):
        loop.train_and_evaluate(config, workdir)


def _byte_params(model, variables):
    """The model's parameters with the vocabulary resized to the byte tokenizer's 264 rows."""
    params = jax.tree.map(jnp.asarray, variables["params"])
    vocab = model.config.vocab_size

    def resize(x):
        if x.ndim == 2 and x.shape[0] == vocab:  # embedding [N, D]
            return jnp.resize(x, (264, x.shape[1]))
        if x.ndim == 2 and x.shape[1] == vocab:  # head [D, N]
            return jnp.resize(x, (x.shape[0], 264))
        return x

    return jax.tree.map(resize, params)
