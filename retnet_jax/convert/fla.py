"""fla (flash-linear-attention) RetNet checkpoints: load them, and export our models to them.

fla's ``RetNetForCausalLM`` is a RetNet with these conventions, each a ``RetNetConfig`` field here:

    rotation="rotate_half"  RoPE over the key head dim, pairs (x_j, x_j+K/2), base 10000
    decay="paper"           γ_h = 1 − 2^(−5−h)
    normalize=False         unnormalized retention (no 1/sqrt(c_n))
    head_norm="rms_weight"  per-head RMSNorm with a weight [V] shared by the heads, then × swish(g)
                            ("rms" when the config has elementwise_affine=False)
    norm="rmsnorm"          block and final norms; one eps (norm_eps) for all norms
    ffn_type="glu"          SwiGLU: down(swish(gate_proj x) ⊙ up_proj x)
    tie_embeddings          from tie_word_embeddings (untied by default)

fla scales q by K^−1/2 where our layer scales k: retention is bilinear in q and k, so the outputs are the
same (only the recurrent state differs by that constant factor, and it is never exchanged).

The checkpoint format is recognized by its config's keys, not by ``model_type`` (other RetNet ports reuse
the name "retnet" with other keys).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.convert import files, layout
from retnet_jax.convert.layout import Rule
from retnet_jax.models import RetNetConfig, RetNetLM
from retnet_jax.models.config import DTYPES

__all__ = ["export_fla", "fla_config", "load_fla", "retnet_config"]

CONFIG_FILE = "config.json"
ROTARY_BASE = 10000.0  # fla's retention layer builds its RotaryEmbedding with the default base
MAX_HEAD_K_DIM = 256  # fla's rotary kernel handles head dims up to 256

# The keys that identify fla's RetNet config.
_IDENTIFYING = ("hidden_size", "num_hidden_layers", "num_heads", "expand_k", "expand_v", "vocab_size")
# Keys read here, with fla's defaults for a config that leaves them out.
_DEFAULTS: dict[str, Any] = {
    "hidden_ratio": 2,
    "intermediate_size": None,
    "norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "elementwise_affine": True,
    "fuse_norm": True,
    "hidden_act": "swish",
    "use_output_gate": True,
    "num_kv_heads": None,
    "feature_map": None,
    "use_short_conv": False,
    "attn": None,
    "attnres_block_size": None,
}
# Options of fla's model that RetNetConfig cannot express: the only values accepted, and what they mean.
_REQUIRED = {
    "hidden_act": ("swish", "the output gate and FFN activation"),
    "use_output_gate": (True, "the swish output gate of retention"),
    "feature_map": (None, "a feature map on q and k"),
    "use_short_conv": (False, "short convolutions on q, k and v"),
    "attn": (None, "hybrid models with attention layers"),
    "attnres_block_size": (None, "attention residuals across layers"),
}
# Keys that change neither the weights nor the function: kernels, fusion, training and generation settings.
_IGNORED = frozenset(
    {
        "attn_mode",
        "conv_size",
        "fuse_swiglu",
        "fuse_cross_entropy",
        "fuse_linear_cross_entropy",
        "use_l2warp",
        "use_cache",
        "initializer_range",
        "max_position_embeddings",
        # Hugging Face's own config keys.
        "model_type",
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "is_decoder",
        "is_encoder_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
        "chunk_size_feed_forward",
        "pruned_heads",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "num_return_sequences",
    }
)
# Keys of early fla releases (before its "norm_eps"/"num_heads" names), whose head norm eps is not recorded.
_LEGACY = frozenset({"num_attention_heads", "num_key_value_heads", "rms_norm_eps", "use_gk", "use_gv"})
# Keys of torchscale-style RetNet configs (e.g. syncdoth's port), which reuse model_type "retnet".
_TORCHSCALE_STYLE = frozenset({"decoder_embed_dim", "decoder_layers", "decoder_retention_heads"})

GLOBAL_RULES = (
    Rule("embed/embedding", "model.embeddings.weight"),
    Rule("final_norm/scale", "model.norm.weight"),
)
HEAD_RULE = Rule("head/kernel", "lm_head.weight", inputs=1)
LAYER = "model.layers.{i}."
LAYER_RULES = (
    Rule("retention_norm/scale", LAYER + "attn_norm.weight"),
    Rule("retention/q_proj/kernel", LAYER + "attn.q_proj.weight", inputs=1),
    Rule("retention/k_proj/kernel", LAYER + "attn.k_proj.weight", inputs=1),
    Rule("retention/v_proj/kernel", LAYER + "attn.v_proj.weight", inputs=1),
    Rule("retention/g_proj/kernel", LAYER + "attn.g_proj.weight", inputs=1),
    Rule("retention/out_proj/kernel", LAYER + "attn.o_proj.weight", inputs=2),
    Rule("ffn_norm/scale", LAYER + "mlp_norm.weight"),
    # SwiGLU: gate_proj is the activated branch (our fc1), up_proj the linear one (our gate).
    Rule("ffn/fc1/kernel", LAYER + "mlp.gate_proj.weight", inputs=1),
    Rule("ffn/gate/kernel", LAYER + "mlp.up_proj.weight", inputs=1),
    Rule("ffn/fc2/kernel", LAYER + "mlp.down_proj.weight", inputs=1),
)


def _head_norm_rule(fuse_norm: bool) -> Rule:
    # With fuse_norm fla fuses the head norm and the swish gate into one module; the weight is the same.
    name = "g_norm_swish_gate" if fuse_norm else "g_norm"
    return Rule("retention/head_norm/scale", LAYER + f"attn.{name}.weight")


def _rules(config: RetNetConfig, fuse_norm: bool = True) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
    rules = GLOBAL_RULES + (() if config.tie_embeddings else (HEAD_RULE,))
    layer_rules = LAYER_RULES + ((_head_norm_rule(fuse_norm),) if config.head_norm == "rms_weight" else ())
    return rules, layer_rules


def _ffn_width(hidden_size: int, hidden_ratio, intermediate_size) -> int:
    """fla's GatedMLP width: intermediate_size, or 2/3 · hidden_ratio · D rounded up to a multiple of 256."""
    if intermediate_size is not None:
        return int(intermediate_size)
    ratio = 4 if hidden_ratio is None else hidden_ratio
    width = int(hidden_size * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


def retnet_config(fla: dict[str, Any], *, dtype: str = "float32", source: str = CONFIG_FILE) -> RetNetConfig:
    """The RetNetConfig of an fla RetNet config dict (the content of its config.json).

    Raises:
        ValueError: the dict is not fla's RetNet config, has a key this converter does not know, or an
            option RetNetConfig cannot express (naming the key).
    """
    if not isinstance(fla, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(fla).__name__}.")
    keys = set(fla)
    if _TORCHSCALE_STYLE & keys:
        raise ValueError(
            f"{source} is a torchscale-style RetNet config (keys {sorted(_TORCHSCALE_STYLE & keys)}), "
            "not fla's. Export its state dict to safetensors and use convert.load_torchscale."
        )
    legacy = sorted(_LEGACY & keys)
    if legacy:
        raise ValueError(
            f"{source} comes from an early fla release (keys {legacy}), whose head-norm eps is not recorded "
            "in the config; it is not supported. Load it with a current fla and save_pretrained it again."
        )
    absent = [k for k in _IDENTIFYING if k not in keys]
    if absent:
        raise ValueError(f"{source} is not an fla RetNet config: it lacks the keys {absent}.")
    # A key set to null is an option left unset; any other unknown key may change the model.
    unknown = sorted(k for k in keys - set(_IDENTIFYING) - set(_DEFAULTS) - _IGNORED if fla[k] is not None)
    if unknown:
        raise ValueError(
            f"{source}: unknown config fields {unknown}. They are not part of fla's RetNet config as known "
            "here and may change the model; remove them if they do not, or convert with a matching fla."
        )
    c = {**_DEFAULTS, **fla}
    for key, (allowed, meaning) in _REQUIRED.items():
        if c[key] != allowed:
            raise ValueError(
                f"{source}: {key}={c[key]!r} ({meaning}) has no equivalent in RetNetConfig; "
                f"only {key}={allowed!r} can be converted."
            )
    hidden, heads = int(c["hidden_size"]), int(c["num_heads"])
    if c["num_kv_heads"] not in (None, heads):
        raise ValueError(
            f"{source}: num_kv_heads={c['num_kv_heads']} (grouped keys and values) has no equivalent in "
            f"RetNetConfig; only num_kv_heads=null or {heads} can be converted."
        )
    key_width = int(hidden * c["expand_k"])
    if key_width != hidden:
        raise ValueError(
            f"{source}: expand_k={c['expand_k']} gives a key width of {key_width}; RetNetConfig has "
            f"K = d_model / num_heads, so only expand_k=1 (key width {hidden}) can be converted."
        )
    if hidden // heads > MAX_HEAD_K_DIM:
        raise ValueError(
            f"{source}: head key dim {hidden // heads} > {MAX_HEAD_K_DIM}, which fla cannot run."
        )
    return RetNetConfig(
        vocab_size=int(c["vocab_size"]),
        d_model=hidden,
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        value_dim=int(hidden * c["expand_v"]),
        ffn_dim=_ffn_width(hidden, c["hidden_ratio"], c["intermediate_size"]),
        ffn_type="glu",
        activation="swish",
        norm="rmsnorm",
        norm_eps=float(c["norm_eps"]),
        head_norm="rms_weight" if c["elementwise_affine"] else "rms",
        head_norm_eps=float(c["norm_eps"]),
        rotation="rotate_half",
        rotation_base=ROTARY_BASE,
        decay="paper",
        normalize=False,
        use_bias=False,
        tie_embeddings=bool(c["tie_word_embeddings"]),
        embed_scale=False,
        embed_norm=False,
        dropout=0.0,
        dtype=dtype,
        param_dtype=dtype,
    )


def _dtype_name(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {name}.")
    return name


def load_fla(path: str, *, dtype=None) -> tuple[RetNetLM, dict]:
    """Loads an fla ``RetNetForCausalLM`` checkpoint.

    Args:
        path: a local Hugging Face-format directory (config.json and model.safetensors, or shards with
            model.safetensors.index.json), or a hub id such as "fla-hub/retnet-1.3B-100B" (downloaded
            with huggingface_hub, which must be installed and online).
        dtype: parameter and compute dtype (e.g. "float32", jnp.bfloat16); None keeps the checkpoint's.

    Returns:
        (model, variables): ``model.apply(variables, tokens)`` returns (logits [B, T, N] float32, state).

    Raises:
        ValueError: the directory is not an fla RetNet checkpoint, or its weights do not match its config
            (naming the key or file).
    """
    path = files.resolve_source(path, ["*.json", "*.safetensors", "tokenizer.model"])
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} has no {CONFIG_FILE}: give the directory of an fla checkpoint.")
    try:
        with open(config_path, encoding="utf-8") as f:
            fla = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path} is not readable JSON: {err}") from None
    with files.open_safetensors(path) as tensors:
        if dtype is None:  # the checkpoint's (its embedding's) dtype
            embedding = GLOBAL_RULES[0].theirs
            dtype = tensors.dtype(embedding) if embedding in tensors else "float32"
        name = _dtype_name(dtype)
        config = retnet_config(fla, dtype=name, source=config_path)
        fuse_norm = bool(fla.get("fuse_norm", _DEFAULTS["fuse_norm"]))
        rules, layer_rules = _rules(config, fuse_norm)
        # A tied head may be saved too (as a copy of the embedding); it must then equal it.
        tied_copy = ("lm_head.weight",) if config.tie_embeddings and "lm_head.weight" in tensors else ()
        abstract = layout.abstract_params(config)
        layout.check(abstract, tensors, rules, layer_rules, config.num_layers, source=path, ignored=tied_copy)
        if tied_copy and not np.array_equal(
            tensors.get("lm_head.weight"), tensors.get("model.embeddings.weight")
        ):
            raise ValueError(
                f"{path}: tie_word_embeddings is true but lm_head.weight differs from "
                "model.embeddings.weight. "
                "Set tie_word_embeddings to false in config.json to load the head as it is."
            )
        params = layout.load(abstract, tensors, rules, layer_rules, config.num_layers, name)
    return RetNetLM(config), {"params": params}


def fla_config(config: RetNetConfig, dtype: str = "float32") -> dict[str, Any]:
    """The fla config.json dict of a RetNetConfig.

    Raises:
        ValueError: naming the first RetNetConfig field whose value fla cannot express.
    """
    fixed = (
        ("normalize", False, "fla's retention is unnormalized"),
        ("rotation", "rotate_half", "fla rotates q and k by rotate-half RoPE"),
        ("rotation_base", ROTARY_BASE, "fla's retention RoPE has base 10000"),
        ("decay", "paper", "fla's decays are 1 − 2^(−5−h)"),
        ("norm", "rmsnorm", "fla's block norms are RMSNorm"),
        ("ffn_type", "glu", "fla's FFN is SwiGLU"),
        ("activation", "swish", "fla's FFN is SwiGLU"),
        ("use_bias", False, "fla's projections have no bias"),
        ("embed_scale", False, "fla does not scale embeddings"),
        ("embed_norm", False, "fla has no embedding norm"),
    )
    for field, value, why in fixed:
        if getattr(config, field) != value:
            raise ValueError(
                f"export_fla: RetNetConfig.{field}={getattr(config, field)!r} cannot be expressed in fla "
                f"({why}); only {field}={value!r} can be exported."
            )
    if config.head_norm not in ("rms_weight", "rms"):
        raise ValueError(
            f"export_fla: RetNetConfig.head_norm={config.head_norm!r} cannot be expressed in fla "
            "(its head norm is RMSNorm, with or without weight); only 'rms_weight' or 'rms' can be exported."
        )
    if config.norm_eps != config.head_norm_eps:
        raise ValueError(
            f"export_fla: fla uses one eps for all norms, but RetNetConfig.norm_eps={config.norm_eps} and "
            f"head_norm_eps={config.head_norm_eps} differ."
        )
    if config.key_dim > MAX_HEAD_K_DIM:
        raise ValueError(
            f"export_fla: K = d_model / num_heads = {config.key_dim} exceeds {MAX_HEAD_K_DIM}, the "
            "largest head dim fla's rotary kernel runs; raise RetNetConfig.num_heads."
        )
    expand_v = config.value_dim / config.d_model
    if int(config.d_model * expand_v) != config.value_dim:
        raise ValueError(
            f"export_fla: RetNetConfig.value_dim={config.value_dim} is not int(d_model · expand_v) for "
            "any float expand_v fla could read back; choose another value_dim (e.g. a multiple of d_model)."
        )
    return {
        "model_type": "retnet",
        "architectures": ["RetNetForCausalLM"],
        "attn_mode": "chunk",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": None,
        "expand_k": 1.0,
        "expand_v": expand_v,
        "hidden_ratio": 2,
        "intermediate_size": config.ffn_dim,
        "hidden_act": "swish",
        "feature_map": None,
        "use_short_conv": False,
        "use_output_gate": True,
        "elementwise_affine": config.head_norm == "rms_weight",
        "norm_eps": config.norm_eps,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "fuse_norm": True,
        "fuse_swiglu": True,
        "fuse_cross_entropy": True,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def export_fla(model: RetNetLM, variables: dict, out_dir: str) -> None:
    """Writes ``out_dir/config.json`` and ``out_dir/model.safetensors`` that fla's RetNetForCausalLM loads.

    Parameters keep their dtype. ``out_dir`` must be new or empty; it appears complete or not at all.

    Raises:
        ValueError: the model uses an option fla cannot express (naming the RetNetConfig field), the
            variables do not fit the model, or ``out_dir`` is not empty or not writable.
    """
    config = model.config
    fla = fla_config(config)  # refuses what fla cannot express, before anything else
    params = nn.unbox(variables["params"] if "params" in variables else variables)
    expected = layout.abstract_params(config)
    got_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    want_shapes = jax.tree.map(lambda x: tuple(x.shape), expected)
    if got_shapes != want_shapes:
        raise ValueError(
            "export_fla: the variables do not fit the model's config (another size or layout); pass the "
            "variables of this model."
        )
    fla["torch_dtype"] = np.dtype(params["embed"]["embedding"].dtype).name
    rules, layer_rules = _rules(config)
    tensors = layout.export(params, rules, layer_rules, config.num_layers)
    with files.atomic_directory(out_dir) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(fla, f, indent=2)
            f.write("\n")
        # transformers refuses safetensors files whose metadata does not name the framework.
        files.write_safetensors(tensors, os.path.join(tmp, files.SAFETENSORS_FILE), metadata={"format": "pt"})
