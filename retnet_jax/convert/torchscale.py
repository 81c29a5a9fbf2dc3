"""torchscale 0.3.0 ``RetNetDecoder`` state dicts (the official RetNet code, its "v2" architecture).

torchscale's conventions, each a ``RetNetConfig`` field here: interleaved rotation with
θ_j = base^(−j/(K/2 − 1)) ("interleaved"), decays 1 − 2^(−5−h) ("paper"), normalized retention, a
per-head RMSNorm without weight ("rms"), RMSNorm block norms with weight, a GLU feed-forward
fc2(act(fc1 x) ⊙ gate x), k scaled by K^−1/2, no biases, one eps (``layernorm_eps``) for every norm.

A state dict tells the sizes (from the tensors' shapes), the rotation base and the decays (from the
buffers ``retnet_rel_pos.angle`` and ``retnet_rel_pos.decay``, which are checked), and whether there is an
embedding norm. What it cannot tell comes from ``config``: the FFN activation (torchscale's RetNet
archs use swish, the default here), the norms' eps (default 1e-6, torchscale's), and the embedding scale
(``embed_scale=True`` for checkpoints trained with fairseq's ``no_scale_embedding=False``).

torchscale's parallel and chunkwise forms divide each row by extra positive factors that its head norm
cancels exactly only with eps 0; here every form computes the normalized retention, which is
torchscale's recurrent form for any eps.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from retnet_jax.convert import files, layout
from retnet_jax.convert.layout import Rule
from retnet_jax.models import RetNetConfig, RetNetLM
from retnet_jax.ops import retention, rotation

__all__ = ["load_torchscale", "torchscale_config"]

ANGLE, DECAY = "retnet_rel_pos.angle", "retnet_rel_pos.decay"
# A training checkpoint of fairseq's language model nests the decoder's keys under "decoder.".
_PREFIXES = ("decoder.", "model.decoder.")

GLOBAL_RULES = (
    Rule("embed/embedding", "embed_tokens.weight"),
    Rule("final_norm/scale", "layer_norm.weight"),
)
HEAD_RULE = Rule("head/kernel", "output_projection.weight", inputs=1)
EMBED_NORM_RULE = Rule("embed_norm/scale", "layernorm_embedding.weight")
LAYER = "layers.{i}."
LAYER_RULES = (
    Rule("retention_norm/scale", LAYER + "retention_layer_norm.weight"),
    Rule("retention/q_proj/kernel", LAYER + "retention.q_proj.weight", inputs=1),
    Rule("retention/k_proj/kernel", LAYER + "retention.k_proj.weight", inputs=1),
    Rule("retention/v_proj/kernel", LAYER + "retention.v_proj.weight", inputs=1),
    Rule("retention/g_proj/kernel", LAYER + "retention.g_proj.weight", inputs=1),
    Rule("retention/out_proj/kernel", LAYER + "retention.out_proj.weight", inputs=2),
    Rule("ffn_norm/scale", LAYER + "final_layer_norm.weight"),
    Rule("ffn/fc1/kernel", LAYER + "ffn.fc1.weight", inputs=1),
    Rule("ffn/gate/kernel", LAYER + "ffn.gate.weight", inputs=1),
    Rule("ffn/fc2/kernel", LAYER + "ffn.fc2.weight", inputs=1),
)
# Fields the state dict fixes: a caller's value must agree.
_INFERRED = ("vocab_size", "d_model", "num_layers", "num_heads", "value_dim", "ffn_dim", "embed_norm")
# torchscale's architecture: not a choice.
_FIXED = dict(
    ffn_type="glu",
    norm="rmsnorm",
    head_norm="rms",
    rotation="interleaved",
    decay="paper",
    normalize=True,
    use_bias=False,
)


def _shape(tensors: files.Tensors, key: str, rank: int, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise ValueError(f"{source} has no tensor {key!r}: it is not a torchscale RetNetDecoder state dict.")
    shape = tensors.shape(key)
    if len(shape) != rank:
        raise ValueError(f"{source}: tensor {key!r} has shape {list(shape)}; expected rank {rank}.")
    return shape


def _rotation_base(angle: np.ndarray, key_dim: int, source: str) -> float:
    """The base of torchscale's angles θ_j = base^(−j/(K/2 − 1)), each repeated for its pair."""
    angle = np.asarray(angle, np.float64)
    pairs = angle.reshape(-1, 2)
    if not np.array_equal(pairs[:, 0], pairs[:, 1]) or angle.shape != (key_dim,) or key_dim < 4:
        raise ValueError(
            f"{source}: {ANGLE} {np.array2string(angle[:6], precision=4)}... is not torchscale's interleaved "
            f"angle table for K = {key_dim} (one angle per feature pair, repeated for both)."
        )
    base = float(1.0 / pairs[-1, 0])
    expected = rotation.angles(key_dim, "interleaved", base)
    if not np.allclose(pairs[:, 0], expected, rtol=1e-5, atol=0):
        raise ValueError(
            f"{source}: {ANGLE} does not follow θ_j = base^(−j/(K/2 − 1)) for any base (got "
            f"{np.array2string(pairs[:4, 0], precision=6)}..., expected for base {base:g}: "
            f"{np.array2string(expected[:4], precision=6)}...). This converter handles torchscale 0.3.0's "
            "angles."
        )
    # float32 buffers round the base: snap to the usual value when it is within rounding.
    return 10000.0 if abs(base / 10000.0 - 1) < 1e-4 else base


def _check_decay(decay: np.ndarray, heads: int, source: str):
    expected = np.asarray(retention.log_decays(heads, "paper"), np.float64)
    decay = np.asarray(decay, np.float64)
    if decay.shape != (heads,) or not np.allclose(decay, expected, rtol=1e-5, atol=0):
        raise ValueError(
            f"{source}: {DECAY} = {np.array2string(decay, precision=6)} is not the paper's schedule "
            f"log(1 − 2^(−5−h)) = {np.array2string(expected, precision=6)}. Retention with other decays "
            "cannot be loaded as this RetNet."
        )


def torchscale_config(
    tensors: files.Tensors, overrides: Mapping[str, Any] | RetNetConfig | None, source: str
):
    """The RetNetConfig of a torchscale state dict and the caller's settings.

    Raises:
        ValueError: the buffers are not torchscale's, or ``overrides`` contradicts the state dict or
            torchscale's architecture (naming the field).
    """
    if isinstance(overrides, RetNetConfig):
        overrides = dataclasses.asdict(overrides)
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(RetNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"load_torchscale: unknown config fields {unknown}; known: {sorted(known)}.")

    vocab, d_model = _shape(tensors, "embed_tokens.weight", 2, source)
    (heads,) = _shape(tensors, DECAY, 1, source)
    (key_dim,) = _shape(tensors, ANGLE, 1, source)
    if heads < 1 or d_model % heads or d_model // heads != key_dim:
        raise ValueError(
            f"{source}: {DECAY} has {heads} heads and {ANGLE} {key_dim} entries, but the embedding width is "
            f"{d_model}: K = d_model / heads must equal the angle table's length."
        )
    layers = {int(m.group(1)) for key in tensors.keys() if (m := re.match(r"layers\.(\d+)\.", key))}
    if not layers or layers != set(range(max(layers) + 1)):
        raise ValueError(f"{source}: layer indices {sorted(layers)} are not 0..L−1 without gaps.")
    value_dim, _ = _shape(tensors, "layers.0.retention.v_proj.weight", 2, source)
    ffn_dim, _ = _shape(tensors, "layers.0.ffn.fc1.weight", 2, source)
    inferred = dict(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=max(layers) + 1,
        num_heads=heads,
        value_dim=value_dim,
        ffn_dim=ffn_dim,
        embed_norm=EMBED_NORM_RULE.theirs in tensors,
    )
    for name in _INFERRED:
        if name in overrides and overrides[name] != inferred[name]:
            raise ValueError(
                f"load_torchscale: config {name}={overrides[name]!r}, but the state dict has {name}="
                f"{inferred[name]!r}. Leave {name} out: the tensors' shapes fix it."
            )
    for name, value in _FIXED.items():
        if name in overrides and overrides[name] != value:
            raise ValueError(
                f"load_torchscale: config {name}={overrides[name]!r}, but torchscale's RetNet has {name}="
                f"{value!r}. Leave {name} out."
            )
    base = _rotation_base(tensors.get(ANGLE), key_dim, source)
    _check_decay(tensors.get(DECAY), heads, source)
    if "rotation_base" in overrides and overrides["rotation_base"] != base:
        raise ValueError(
            f"load_torchscale: config rotation_base={overrides['rotation_base']!r}, but {ANGLE} has "
            f"base {base:g}."
        )
    if "norm_eps" in overrides and "head_norm_eps" not in overrides:
        overrides["head_norm_eps"] = overrides["norm_eps"]  # torchscale has one layernorm_eps
    tie = bool(overrides.get("tie_embeddings", False))
    values = dict(
        activation="swish",
        norm_eps=1e-6,
        head_norm_eps=1e-6,
        rotation_base=base,
        tie_embeddings=tie,
        embed_scale=False,
        dropout=0.0,
    )
    values.update(overrides)
    values.update(inferred)
    values.update(_FIXED)
    return RetNetConfig(**values)


def load_torchscale(path: str, *, config: Mapping[str, Any] | RetNetConfig | None = None):
    """Loads a torchscale 0.3.0 ``RetNetDecoder`` state dict.

    Args:
        path: a ``.safetensors`` file, or a ``.pt`` file of the state dict (read with
            ``torch.load(weights_only=True)``; needs the ``torch`` extra). Keys may carry fairseq's
            "decoder." prefix.
        config: what the state dict cannot tell, as RetNetConfig fields, e.g.
            ``{"embed_scale": True}`` (fairseq's no_scale_embedding=False), ``{"norm_eps": 1e-5}``
            (torchscale's layernorm_eps; the head norm follows unless ``head_norm_eps`` is given),
            ``{"activation": "gelu"}``, ``{"tie_embeddings": True}``, ``{"dtype": "bfloat16"}``.
            Sizes come from the tensors; a given size must agree.

    Returns:
        (model, variables): ``model.apply(variables, tokens)`` returns (logits [B, T, N] float32, state).

    Raises:
        ValueError: a missing or unexpected key, a wrong shape, buffers that are not torchscale's, a
            file that is not a state dict, or a config field that contradicts the checkpoint.
        ImportError: a ``.pt`` file without torch.
    """
    path = os.path.expanduser(path)
    with files.open_state_dict(path) as tensors:
        for prefix in _PREFIXES:
            if tensors.keys() and all(k.startswith(prefix) for k in tensors.keys()):
                tensors = tensors.renamed(prefix)
                break
        cfg = torchscale_config(tensors, config, path)
        if GLOBAL_RULES[1].theirs not in tensors:
            raise ValueError(
                f"{path} has no {GLOBAL_RULES[1].theirs!r}: a post-norm (DeepNorm, decoder_normalize_before="
                "False) decoder, which is not supported; only pre-norm RetNetDecoders load."
            )
        if not cfg.tie_embeddings and HEAD_RULE.theirs not in tensors:
            raise ValueError(
                f"{path} has no {HEAD_RULE.theirs!r}. If the decoder shares its input and output embeddings "
                "(share_decoder_input_output_embed), pass config={'tie_embeddings': True}."
            )
        rules = GLOBAL_RULES + ((EMBED_NORM_RULE,) if cfg.embed_norm else ())
        ignored = [ANGLE, DECAY]
        if cfg.tie_embeddings:
            # torch shares the tensor; a state dict may hold it under both names.
            if HEAD_RULE.theirs in tensors:
                if not np.array_equal(tensors.get(HEAD_RULE.theirs), tensors.get("embed_tokens.weight")):
                    raise ValueError(
                        f"{path}: tie_embeddings=True, but output_projection.weight differs from "
                        "embed_tokens.weight. Load it untied (leave tie_embeddings out)."
                    )
                ignored.append(HEAD_RULE.theirs)
        else:
            rules += (HEAD_RULE,)
        abstract = layout.abstract_params(cfg)
        layout.check(abstract, tensors, rules, LAYER_RULES, cfg.num_layers, source=path, ignored=ignored)
        params = layout.load(abstract, tensors, rules, LAYER_RULES, cfg.num_layers, cfg.param_dtype)
    return RetNetLM(cfg), {"params": params}
