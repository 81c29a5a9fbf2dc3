"""Shared test helpers: error measures and tolerances, written down per dtype."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Normwise relative error ‖a − b‖ / ‖b‖ allowed between two forms of the same function.
FORM_RTOL = {"float64": 1e-12, "float32": 1e-5}
# Gradients pass through one more product; the same bound holds in practice (measured ~1e-7 in f32).
GRAD_RTOL = {"float64": 1e-12, "float32": 2e-5}


def relative_error(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "non-finite values"
    scale = np.linalg.norm(b.ravel())
    return float(np.linalg.norm((a - b).ravel()) / (scale if scale > 0 else 1.0))


def random_inputs(rng, batch, length, heads, key_dim, value_dim, dtype):
    """q, k, v drawn from N(0, 1), k scaled by K^-1/2 as the model does."""
    q = rng.standard_normal((batch, length, heads, key_dim))
    k = rng.standard_normal((batch, length, heads, key_dim)) * key_dim**-0.5
    v = rng.standard_normal((batch, length, heads, value_dim))
    return tuple(np.asarray(x, dtype) for x in (q, k, v))


def assert_logical_axes(variables):
    """Every parameter is boxed with one logical axis name per dimension."""
    boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    for x in boxed:
        assert len(x.names) == len(x.value.shape), x


def random_variables(model, seed: int, scale: float = 0.1):
    """The model's unboxed variables with every parameter random (a zero bias would hide a misplaced one):
    its initialization (key ``seed``, compiled: run eagerly, each operation would compile apart) plus
    N(0, scale²) noise drawn by NumPy (generator ``seed + 1``; JAX's draws compile for every shape)."""
    variables = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 4), jnp.int32))))(
        jax.random.key(seed)
    )
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(
        lambda x: jnp.asarray((np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(x.dtype)),
        variables,
    )
