"""Model configs: validation names the field, presets and dicts round-trip, sizes match the paper's."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.models import PRESETS, DecoderLM, RetNetConfig, TransformerConfig, from_dict

TINY = RetNetConfig.preset("tiny")
TRANSFORMER = TransformerConfig.matching(TINY)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(value_dim=130, num_heads=4), r"value_dim \(130\) must be divisible by num_heads \(4\)"),
        (dict(d_model=66, num_heads=4), r"d_model \(66\) must be divisible by num_heads"),
        (dict(ffn_type="moe"), r"ffn_type must be one of \('glu', 'mlp'\)"),
        (dict(rotation="xpos"), "rotation must be one of"),
        (dict(head_norm="group"), "head_norm must be one of"),
        (dict(decay="cosine"), "decay must be one of"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(dropout=1.0), r"dropout must be a rate in \[0, 1\)"),
        (dict(num_layers=0), "RetNetConfig.num_layers must be an integer >= 1"),
        (dict(norm_eps=-1.0), "norm_eps must be a value >= 0"),
        (dict(d_model=4, num_heads=2, value_dim=4), "K >= 4"),
        (dict(d_model=66, num_heads=22, value_dim=66), "K = d_model / num_heads must be even"),
    ],
)
def test_retnet_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(d_model=66, num_heads=4), r"d_model \(66\) must be divisible by num_heads \(4\)"),
        (dict(d_model=66, num_heads=22), "K = d_model / num_heads must be even"),
        (dict(ffn_type="moe"), "ffn_type must be one of"),
        (dict(num_layers=0), "TransformerConfig.num_layers must be an integer >= 1"),
        (dict(dropout=1.0), r"dropout must be a rate in \[0, 1\)"),
    ],
)
def test_transformer_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        TRANSFORMER.replace(**changes)


def test_run_options_are_not_architecture():
    """How a model runs is set where it runs (DecoderLM), never in the config."""
    fields = {f.name for f in dataclasses.fields(RetNetConfig)} | {
        f.name for f in dataclasses.fields(TransformerConfig)
    }
    assert not fields & {"mode", "chunk_size", "retention_impl", "attention_impl", "scan_layers", "remat"}
    model = DecoderLM(TINY, mode="chunkwise", chunk_size=16, implementation="xla", remat=True)
    assert model.config == TINY


def test_presets_and_dicts_round_trip():
    with pytest.raises(ValueError, match="Unknown model preset 'huge'; available"):
        RetNetConfig.preset("huge")
    with pytest.raises(ValueError, match="Unknown model preset 'huge'; available"):
        TransformerConfig.preset("huge")
    config = RetNetConfig.preset("small", num_layers=3)
    assert config.num_layers == 3 and config.key_dim == 64 and config.head_value_dim == 128
    for c in (config, TransformerConfig.preset("small")):
        assert from_dict(c.to_dict()) == c and type(c).from_dict(c.to_dict()) == c
    assert config.to_dict()["arch"] == "retnet"
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        RetNetConfig.from_dict({**config.to_dict(), "depth": 2})
    with pytest.raises(ValueError, match="describes arch 'retnet', not 'transformer'"):
        TransformerConfig.from_dict(config.to_dict())
    with pytest.raises(ValueError, match="needs 'arch' in"):
        from_dict({"d_model": 64})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 4


def _params(config):
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda t: DecoderLM(config).init(jax.random.key(0), t), tokens)
    return nn.unbox(shapes)["params"]


def _count(config):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_params(config)))


@pytest.mark.parametrize("name", ["paper-1.3b", "paper-2.7b", "paper-6.7b", "paper-13b"])
def test_paper_parameter_counts(name):
    """12·D²·L plus embedding and head (N·D each) plus the norms' scales and biases; no memory used."""
    config = RetNetConfig.preset(name)
    d, layers, n = config.d_model, config.num_layers, config.vocab_size
    norms = 2 * d * (2 * layers + 1)  # LayerNorm scale + bias: two per block and the final one
    total = _count(config)
    assert total == 12 * d * d * layers + 2 * n * d + norms
    expected_billions = {"paper-1.3b": 1.3, "paper-2.7b": 2.7, "paper-6.7b": 6.7, "paper-13b": 13}
    assert abs(total / 1e9 - expected_billions[name]) / expected_billions[name] < 0.1


@pytest.mark.parametrize("name,expected", [("paper-1.3b", 1_414_205_440), ("paper-2.7b", 2_774_471_680)])
def test_the_matching_transformer_has_the_same_size(name, expected):
    """12·D²·L in both (attention 4·D² + MLP with F = 4D, against MSR 8·D² + MLP with F = 2D), plus the
    embedding and head and the same LayerNorms: equal counts, no memory used."""
    retnet = RetNetConfig.preset(name)
    config = TransformerConfig.preset(name)
    assert config == TransformerConfig.matching(retnet)
    d = retnet.d_model
    assert (config.ffn_dim, config.head_dim, config.num_heads) == (4 * d, 128, d // 128)
    assert (config.norm, config.ffn_type, config.dtype) == ("layernorm", "mlp", "bfloat16")
    assert _count(config) == _count(retnet) == expected


def test_torchscale_presets_and_matching_glu_width():
    for name in PRESETS:
        if name.startswith("torchscale-"):
            config = RetNetConfig.preset(name)
            layer = _params(config)["layers"]["retention"]
            assert layer["q_proj"]["kernel"].shape == (
                config.num_layers,
                config.d_model,
                config.num_heads,
                config.key_dim,
            )
            v = layer["v_proj"]["kernel"].shape
            assert v[2] * v[3] == config.ffn_dim  # torchscale v2: value width = F
    # torchscale-xl (swish GLU, F = 3456, value width F): 2D² + 6·D·F per RetNet layer; the Transformer's
    # GLU takes (2D² + 6·D·F − 4D²) / 3D = 5546.7, rounded to 5504 = 43·128.
    config = TransformerConfig.preset("torchscale-xl")
    assert (config.ffn_type, config.ffn_dim, config.norm, config.num_heads) == ("glu", 5504, "rmsnorm", 16)
    assert TRANSFORMER.ffn_dim == 256 and TRANSFORMER.head_dim == 32  # 128 does not divide D = 64


def test_mixer_flops():
    """Per token and layer: the parallel form scores all T keys, the chunkwise form C plus the state."""
    h, k, v = TINY.num_heads, TINY.key_dim, TINY.head_value_dim
    assert TINY.mixer_flops_per_token(128) == 2 * 128 * h * (k + v)
    assert TINY.mixer_flops_per_token(128, 32) == 2 * 32 * h * (k + v) + 4 * h * k * v
    assert TRANSFORMER.mixer_flops_per_token(128) == 4 * 128 * TRANSFORMER.num_heads * TRANSFORMER.head_dim
