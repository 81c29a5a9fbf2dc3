"""The language models: configs, presets and the decoder LM over a retention or attention mixer."""

from retnet_jax.models.config import PRESETS, RetNetConfig
from retnet_jax.models.retnet import RetNetLM
from retnet_jax.models.transformer import TransformerConfig, TransformerLM

__all__ = ["PRESETS", "RetNetConfig", "RetNetLM", "TransformerConfig", "TransformerLM"]
