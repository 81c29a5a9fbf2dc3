"""What the convert tests share: every way to run a model over a sequence, and tiny fla-style models."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.models import RetNetConfig, RetNetLM, decode_step


def all_modes(
    model, variables, tokens, *, chunk_sizes: tuple[int, int], prefill: int
) -> dict[str, np.ndarray]:
    """Logits [B, T, N] of every way to run ``model`` over ``tokens`` [B, T].

    The parallel and recurrent forms; the chunkwise form with a chunk dividing T and one leaving a
    partial last chunk (``chunk_sizes``); and a chunkwise prefill of ``prefill`` tokens continued one
    token at a time by ``decode_step``.
    """
    apply, step = _compiled(model.config)
    tokens = jnp.asarray(tokens)
    whole, partial = chunk_sizes
    out = {
        "parallel": apply(variables, tokens, mode="parallel")[0],
        "chunkwise": apply(variables, tokens, mode="chunkwise", chunk_size=whole)[0],
        "chunkwise-partial": apply(variables, tokens, mode="chunkwise", chunk_size=partial)[0],
        "recurrent": apply(variables, tokens, mode="recurrent")[0],
    }
    logits, state = apply(
        variables, tokens[:, :prefill], mode="chunkwise", chunk_size=whole, return_state=True
    )
    steps = [logits]
    for t in range(prefill, tokens.shape[1]):
        logits, state = step(variables, tokens[:, t], state)
        steps.append(logits[:, None])
    out["prefill+decode"] = jnp.concatenate(steps, axis=1)
    return {k: np.asarray(v) for k, v in out.items()}


@functools.cache
def _compiled(config: RetNetConfig):
    """The jitted model call and decode step of a config (shared by models of equal configs)."""
    model = RetNetLM(config)
    apply = jax.jit(model.apply, static_argnames=("mode", "chunk_size", "return_state"))
    return apply, jax.jit(functools.partial(decode_step, model))


MODES = ("parallel", "chunkwise", "chunkwise-partial", "recurrent", "prefill+decode")


def fla_style_config(dtype: str = "float32", **overrides) -> RetNetConfig:
    """A tiny RetNetConfig with fla's conventions."""
    fields = dict(
        vocab_size=40,
        d_model=32,
        num_layers=2,
        num_heads=2,
        value_dim=64,
        ffn_dim=48,
        head_norm="rms_weight",
        rotation="rotate_half",
        normalize=False,
        dtype=dtype,
        param_dtype=dtype,
    )
    return RetNetConfig(**{**fields, **overrides})


def fla_style_model(seed: int = 0, **overrides):
    """A tiny random RetNetLM with fla's conventions; every norm weight perturbed from 1, and the kernels and
    embeddings scaled up from their small initial values so that every sublayer moves the residual stream.
    Returns (model, variables); the same arguments give the same (cached) objects."""
    return _fla_style_model(seed, tuple(sorted(overrides.items())))


@functools.cache
def _fla_style_model(seed: int, overrides: tuple):
    model = RetNetLM(fla_style_config(**dict(overrides)))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))["params"]
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return (1 + 0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return (4 * leaf).astype(leaf.dtype)

    return model, {"params": jax.tree_util.tree_map_with_path(perturb, params)}


def same_tree(a, b) -> bool:
    """Equal structure, shapes, dtypes and values."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(np.asarray(x), np.asarray(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
