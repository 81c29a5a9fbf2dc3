"""Weights in and out: fla and torchscale checkpoints load as RetNetLM models; our models export to fla.

    from retnet_jax import convert
    model, variables = convert.load_fla("fla-hub/retnet-1.3B-100B")      # or a local HF-format directory
    model, variables = convert.load_torchscale("retnet.safetensors", config={"embed_scale": True})
    convert.export_fla(model, variables, "exported/")                    # config.json + model.safetensors

``model.apply(variables, tokens)`` returns the logits first, in every mode, as for any model here.
"""

from retnet_jax.convert.checkpoint import write_checkpoint
from retnet_jax.convert.fla import export_fla, load_fla
from retnet_jax.convert.torchscale import load_torchscale

__all__ = ["export_fla", "load_fla", "load_torchscale", "write_checkpoint"]
