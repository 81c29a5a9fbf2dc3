"""The PyTorch peers of bench_training are sized like our presets (experiments/peer_configs.py).

The counts need no PyTorch: fla's RetNet count is computed from its config; where torch and fla are
installed, the last test builds fla's model on the meta device and checks that count against it.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from experiments.peer_configs import (
    fla_num_params,
    fla_retnet_config,
    matched_ffn,
    ours_num_params,
)
from retnet_jax.models.config import RetNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fla 0.6.0's RetNetForCausalLM built on the meta device from fla_retnet_config, parameters counted.
FLA_COUNTS = {"tiny": 148_928, "paper-1.3b": 1_413_724_160, "paper-2.7b": 2_774_977_024}


def test_matched_ffn():
    """A GLU keeps its width; an MLP of width F becomes a GLU of 2F/3 (a multiple of 8): same parameters."""
    assert matched_ffn(RetNetConfig.preset("tiny")) == 128  # already a GLU
    paper = RetNetConfig.preset("paper-1.3b")  # MLP, F = 4096
    assert matched_ffn(paper) == 2728
    assert abs(3 * matched_ffn(paper) / (2 * paper.ffn_dim) - 1) < 1e-3


def test_fla_config_paper_1_3b():
    kwargs = fla_retnet_config(RetNetConfig.preset("paper-1.3b"))
    expected = dict(
        attn_mode="chunk",
        hidden_size=2048,
        num_hidden_layers=24,
        num_heads=8,  # K = 256 per head, as ours
        expand_k=1.0,
        expand_v=2.0,  # value width 2D = 4096, V = 512 per head
        intermediate_size=2728,
        hidden_act="swish",
        vocab_size=50304,
        tie_word_embeddings=False,
        norm_eps=1e-6,
        fuse_norm=True,
        fuse_cross_entropy=True,
        fuse_linear_cross_entropy=False,
    )
    assert {k: kwargs[k] for k in expected} == expected


@pytest.mark.parametrize("model", ["paper-1.3b", "paper-2.7b"])
def test_fla_params_match_ours(model):
    """fla's count (computed, and as fla builds it) is within 0.1% of our RetNet's (the brief allows 1%)."""
    fla = fla_num_params(fla_retnet_config(RetNetConfig.preset(model)))
    assert fla == FLA_COUNTS[model]
    assert abs(fla / ours_num_params(model) - 1) < 1e-3, (fla, ours_num_params(model))


def test_ours_num_params_starts_no_backend():
    """bench_training's parent calls it while its workers hold the GPU: shapes only, no device backend."""
    code = (
        "from jax._src import xla_bridge\n"
        "from experiments.peer_configs import ours_num_params\n"
        "assert ours_num_params('tiny') == 148_800\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_fla_config_refuses_wide_keys():
    with pytest.raises(ValueError, match="K = d_model / num_heads <= 256"):
        fla_retnet_config(RetNetConfig.preset("paper-1.3b", num_heads=4))  # K = 512


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "fla", "transformers", "triton")),
    reason="torch, fla, transformers or triton not installed",
)
@pytest.mark.parametrize("model", sorted(FLA_COUNTS))
def test_fla_builds_the_counted_model(model):
    import torch
    from fla.models import RetNetConfig as FlaConfig
    from fla.models import RetNetForCausalLM

    kwargs = fla_retnet_config(RetNetConfig.preset(model))
    with torch.device("meta"):  # shapes only: no memory for 2.7B parameters
        built = RetNetForCausalLM(FlaConfig(**kwargs))
    assert sum(p.numel() for p in built.parameters()) == fla_num_params(kwargs) == FLA_COUNTS[model]
    assert built.config.intermediate_size == kwargs["intermediate_size"]
    retention = built.model.layers[0].attn
    assert (retention.head_k_dim, retention.head_v_dim) == (
        RetNetConfig.preset(model).key_dim,
        RetNetConfig.preset(model).head_value_dim,
    )
