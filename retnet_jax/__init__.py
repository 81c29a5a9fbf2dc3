"""retnet-jax: Retentive Networks in JAX/Flax."""

from retnet_jax import retention

__all__ = ["retention"]
__version__ = "0.1.0"
