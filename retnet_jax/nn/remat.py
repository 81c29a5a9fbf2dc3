"""Remat policies: what a block keeps from its forward pass for the backward, and what it reruns.

A block under remat keeps its input and, in the backward pass, reruns its forward to get the
activations the gradient needs. A policy keeps some of them instead, trading memory for work:

* ``"none"``: no remat. The backward reads every activation the forward left (the most memory).
* ``"full"``: keep nothing inside a block; the backward reruns the whole block (projections, the token
  mixer's forward, the FFN). The least memory: one [B, T, D] input per layer.
* ``"projections"``: keep the outputs of the block's input projections (retention's q, k, v, g;
  attention's q, k, v; the FFN's first projection, and its gate for a GLU). The backward reruns no
  projection; it reruns the token mixer's forward (the retention kernel, or attention) and the
  elementwise work (rotation, head norm, gate, activation).
* ``"mixer"``: the projections and the token mixer's outputs: retention's or attention's own output
  (before the head norm / output projection) with what its backward needs from its forward (the fused
  retention kernels' final state, ``ops.retention.KERNEL_STATE_NAME``; cuDNN attention's softmax
  statistics), and the mixer sublayer's output y [B, T, D] (the FFN norm's backward needs x + y). The
  backward reruns no matmul and no kernel, only elementwise work. The XLA forms of retention and attention
  keep their output but still rerun their inner products for their backward.

Per layer and token, in the compute dtype, "projections" keeps 2·H·K + 2·H·V + F values for a RetNet
(3·D + F for the Transformer; 2·F for a GLU), "mixer" H·V + D (2·D) more. For paper-1.3b (D 2048, H·K
2048, H·V 4096, F 4096) that is 16,384 and 22,528 values: 0.54 and 0.74 GB per layer at B·T = 16,384 in
bfloat16 (13 and 18 GB over its 24 layers), where "full" keeps the block's input, 0.07 GB.

``True`` and ``False`` mean "full" and "none" (the options before policies had names).
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from retnet_jax.ops.retention import KERNEL_STATE_NAME

__all__ = [
    "MIXER_OUTPUT",
    "POLICIES",
    "PROJECTION",
    "TOKEN_MIXING",
    "name_mixer_output",
    "name_projection",
    "name_token_mixing",
    "policy",
    "resolve",
]

POLICIES = ("none", "full", "projections", "mixer")

# checkpoint_name tags that the layers give their activations (several arrays may share one).
PROJECTION = "block_projection"  # the input projections' outputs
TOKEN_MIXING = "token_mixing"  # retention's / attention's output, [B, T, H, V]
MIXER_OUTPUT = "mixer_output"  # the mixer sublayer's output, [B, T, D]

# jax's cuDNN attention is a custom_vjp whose residuals (its output and softmax statistics) are the
# outputs of this primitive and carry no name; a policy keeps them by the primitive. A jax that renames it
# loses only the saving: the forward reruns, the gradient is unchanged.
_KERNEL_FORWARDS = frozenset({"dot_product_attention_fwd_wrapper"})


def name_projection(x):
    """Tags an input projection's output [B, T, ...] for the "projections" and "mixer" policies."""
    return checkpoint_name(x, PROJECTION)


def name_token_mixing(x):
    """Tags retention's / attention's output (before the head norm / output projection) for "mixer"."""
    return checkpoint_name(x, TOKEN_MIXING)


def name_mixer_output(x):
    """Tags the mixer sublayer's output [B, T, D] for "mixer"."""
    return checkpoint_name(x, MIXER_OUTPUT)


def resolve(remat: bool | str, where: str = "remat") -> str:
    """The policy name of a ``remat`` option: one of ``POLICIES``, or True ("full") / False ("none").

    Raises:
        ValueError: anything else, naming the choices (``where`` says which option).
    """
    if remat is True or remat is False:
        return "full" if remat else "none"
    if isinstance(remat, str) and remat in POLICIES:
        return remat
    raise ValueError(
        f"{where} must be one of {POLICIES} (or True / False for 'full' / 'none'); got {remat!r}."
    )


def _saves_kernel_forward(primitive, *_, **__) -> bool:
    return primitive.name in _KERNEL_FORWARDS


def policy(name: str):
    """The ``jax.checkpoint`` policy of a remat policy name other than "none" (None for "full": keep
    nothing, ``jax.checkpoint``'s default)."""
    name = resolve(name)
    if name == "none":
        raise ValueError("remat='none' runs without jax.checkpoint; it has no policy.")
    if name == "full":
        return None
    saved = jax.checkpoint_policies.save_only_these_names
    if name == "projections":
        return saved(PROJECTION)
    return jax.checkpoint_policies.save_from_both_policies(
        saved(PROJECTION, TOKEN_MIXING, KERNEL_STATE_NAME, MIXER_OUTPUT), _saves_kernel_forward
    )
