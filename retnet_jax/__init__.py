"""retnet-jax: Retentive Networks in JAX/Flax.

from retnet_jax import retention                      # the three forms, as functions of arrays
from retnet_jax import RetNetConfig, RetNetLM          # the language model (DecoderLM over retention)
from retnet_jax import generate, stream                # decoding, for any DecoderLM
from retnet_jax import convert                         # weights in and out (fla, torchscale)
"""

from retnet_jax import retention
from retnet_jax.inference.generate import generate, stream
from retnet_jax.models import DecoderLM, RetNetConfig, RetNetLM, TransformerConfig, TransformerLM

__all__ = [
    "DecoderLM",
    "RetNetConfig",
    "RetNetLM",
    "TransformerConfig",
    "TransformerLM",
    "generate",
    "retention",
    "stream",
]
__version__ = "0.1.0"
