"""The language models: architecture configs, presets, decoding states and the decoder LM skeleton."""

from retnet_jax.models.config import ModelConfig, RetNetConfig, TransformerConfig, from_dict
from retnet_jax.models.lm import DecoderLM, RetNetLM, TransformerLM, cast_params, decode_step, prefill
from retnet_jax.models.presets import PRESETS
from retnet_jax.models.state import KVCache, RecurrentState

__all__ = [
    "PRESETS",
    "DecoderLM",
    "KVCache",
    "ModelConfig",
    "RecurrentState",
    "RetNetConfig",
    "RetNetLM",
    "TransformerConfig",
    "TransformerLM",
    "cast_params",
    "decode_step",
    "from_dict",
    "prefill",
]
