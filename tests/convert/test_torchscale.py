"""torchscale 0.3.0 RetNetDecoder state dicts load with the same logits in every mode.

The fixtures (tests/convert/fixtures/torchscale, made by make_torchscale_fixtures.py with torchscale
itself) hold two tiny random decoders and torchscale's float64 logits in its parallel, chunkwise and
recurrent forms, for layernorm eps 0 and 1e-6. Our model runs in float64 (its logits come out float32).

Tolerances (normwise relative error of the logits):
* ``EXACT``: where both compute the same function. Our logits are rounded once to float32, which is
  all that is left (measured 2.6e-8); the forms agree to 1e-15 before that rounding.
* torchscale's chunkwise form with eps 1e-6: its per-row rescalings are cancelled by its head norm only
  at eps 0, so it is another function (its own chunkwise-vs-recurrent spread, measured 1.2e-2 and
  2.2e-3 on these fixtures). Our forms all equal torchscale's recurrent form; the chunkwise fixture is
  held to the spread it shows against torchscale's own recurrent form, ``TORCHSCALE_CHUNKWISE_SPREAD``.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import convert
from tests.convert.common import all_modes, same_tree
from tests.helpers import relative_error

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torchscale"
EXACT = 1e-7
TORCHSCALE_CHUNKWISE_SPREAD = 3e-2
EPSILONS = {"eps0": 0.0, "eps1e-6": 1e-6}
# What the state dict cannot tell: fairseq-trained checkpoints scale embeddings by sqrt(D).
CALLER_CONFIG = {"base": {}, "fairseq": {"embed_scale": True}}
PREFILL = 10


@functools.cache
def our_logits(name: str, tag: str) -> dict[str, np.ndarray]:
    """Our float64 model's logits in every mode, for the fixture ``name`` at eps ``tag``."""
    tokens = np.load(FIXTURES / f"{name}.npz")["tokens"]
    config = {"norm_eps": EPSILONS[tag], "dtype": "float64", "param_dtype": "float64", **CALLER_CONFIG[name]}
    with jax.enable_x64(True):
        model, variables = convert.load_torchscale(str(FIXTURES / f"{name}.safetensors"), config=config)
        return all_modes(model, variables, tokens, chunk_sizes=(8, 5), prefill=PREFILL)


@pytest.mark.parametrize("name", sorted(CALLER_CONFIG))
@pytest.mark.parametrize("tag", sorted(EPSILONS))
@pytest.mark.parametrize(
    "ours", ["parallel", "chunkwise", "chunkwise-partial", "recurrent", "prefill+decode"]
)
def test_logits_match_torchscale(name, tag, ours):
    reference = np.load(FIXTURES / f"{name}.npz")
    logits = our_logits(name, tag)[ours]
    for form in ("parallel", "recurrent") + (("chunkwise",) if tag == "eps0" else ()):
        error = relative_error(logits, reference[f"{form}_{tag}"])
        assert error < EXACT, f"{name} {tag}: ours {ours} vs torchscale {form}: {error:.2e}"


@pytest.mark.parametrize("name", sorted(CALLER_CONFIG))
def test_torchscale_chunkwise_with_eps_is_its_own_function(name):
    """With eps > 0 torchscale's chunkwise form departs from its recurrent form; ours does not."""
    reference = np.load(FIXTURES / f"{name}.npz")
    spread = relative_error(reference["chunkwise_eps1e-6"], reference["recurrent_eps1e-6"])
    ours = relative_error(our_logits(name, "eps1e-6")["chunkwise"], reference["chunkwise_eps1e-6"])
    assert 1e-4 < spread < TORCHSCALE_CHUNKWISE_SPREAD
    assert abs(ours - spread) < 0.01 * spread


def test_config_is_read_from_the_state_dict():
    info = json.loads((FIXTURES / "fixtures.json").read_text())
    model, variables = convert.load_torchscale(
        str(FIXTURES / "fairseq.safetensors"), config={"embed_scale": True}
    )
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.value_dim, cfg.ffn_dim) == (
        info["vocab_size"],
        info["d_model"],
        info["num_layers"],
        info["num_heads"],
        info["value_dim"],
        info["ffn_dim"],
    )
    assert (cfg.rotation, cfg.rotation_base, cfg.decay, cfg.normalize, cfg.head_norm) == (
        "interleaved",
        10000.0,
        "paper",
        True,
        "rms",
    )
    assert cfg.embed_norm and cfg.embed_scale and not cfg.tie_embeddings
    assert cfg.norm_eps == cfg.head_norm_eps == 1e-6
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    base, _ = convert.load_torchscale(str(FIXTURES / "base.safetensors"))
    assert not base.config.embed_norm and not base.config.embed_scale


def test_decoder_prefix_is_accepted(tmp_path):
    """fairseq's language model nests the decoder's keys under "decoder."."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(FIXTURES / "base.safetensors"))
    save_file({f"decoder.{k}": v for k, v in tensors.items()}, str(tmp_path / "lm.safetensors"))
    _, ours = convert.load_torchscale(str(tmp_path / "lm.safetensors"))
    _, plain = convert.load_torchscale(str(FIXTURES / "base.safetensors"))
    assert same_tree(ours, plain)


def test_pt_file_is_read_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    torch.save(load_file(str(FIXTURES / "base.safetensors")), tmp_path / "state.pt")
    _, from_pt = convert.load_torchscale(str(tmp_path / "state.pt"))
    _, plain = convert.load_torchscale(str(FIXTURES / "base.safetensors"))
    assert same_tree(from_pt, plain)


def test_pt_file_without_torch_says_to_install_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04 not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match=r"retnet-jax\[torch\]"):
        convert.load_torchscale(str(tmp_path / "state.pt"))


def test_shared_input_output_embeddings(tmp_path):
    """A decoder with share_decoder_input_output_embed: the head is the embedding (saved once or twice)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(FIXTURES / "base.safetensors"))
    tensors.pop("output_projection.weight")
    save_file(tensors, str(tmp_path / "once.safetensors"))
    with pytest.raises(ValueError, match="tie_embeddings"):
        convert.load_torchscale(str(tmp_path / "once.safetensors"))
    model, variables = convert.load_torchscale(
        str(tmp_path / "once.safetensors"), config={"tie_embeddings": True}
    )
    assert model.config.tie_embeddings and "head" not in variables["params"]
    save_file(
        {**tensors, "output_projection.weight": tensors["embed_tokens.weight"]}, str(tmp_path / "twice.st")
    )
    _, twice = convert.load_torchscale(str(tmp_path / "twice.st"), config={"tie_embeddings": True})
    assert same_tree(twice, variables)
    save_file(
        {**tensors, "output_projection.weight": 2 * tensors["embed_tokens.weight"]}, str(tmp_path / "bad.st")
    )
    with pytest.raises(ValueError, match="differs"):
        convert.load_torchscale(str(tmp_path / "bad.st"), config={"tie_embeddings": True})


def test_post_norm_decoders_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(FIXTURES / "base.safetensors"))
    tensors.pop("layer_norm.weight")
    save_file(tensors, str(tmp_path / "deepnorm.safetensors"))
    with pytest.raises(ValueError, match="DeepNorm"):
        convert.load_torchscale(str(tmp_path / "deepnorm.safetensors"))
