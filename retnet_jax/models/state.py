"""Decoding states: what a model carries from one call to the next, behind one protocol.

Both kinds are NamedTuples whose arrays put the layer axis first and the batch second (a layer's slice is
contiguous, so the layer loop reads and writes it in place), and both have:

* ``position`` [B] int32: the absolute position of each row's next token. A negative start −p announces p
  left pads: they never enter the state and the row's first real token sits at position 0.
* ``take(rows)``: the state of batch rows ``rows`` (int [R]), in that order (beam search, dropping rows).
* ``put(rows, other)``: the state with batch rows ``rows`` (int [R]) replaced by ``other``'s R rows (a new
  request takes a free row of a serving batch); ``put(rows, take(rows))`` changes nothing.
* ``layer(i)`` → the mixer's view of layer ``i``; ``write(i, new, positions)`` → the state with the
  mixer's new layer state written; ``from_layers(new, length)`` → a state built from every layer's new
  state of a call that started empty (stacked over layers); ``reserve(max_length)``; ``check(...)``.

``RecurrentState`` (RetNet): every layer's retention state S [B, H, K, V] in float32 — the same size at
any context. It may be stored in bfloat16 instead (``state_dtype="bfloat16"``: half the bytes a decoding
step reads and writes, twice the rows in the same memory); each step still reads it into float32, updates
it in float32 and rounds once when it writes the layer back, so only the storage between steps is bf16.
That rounding is not exact: bf16 keeps 8 significant bits, so an update smaller than half a unit in the
last place of S is lost, which is what a slow head's decay (γ = 1 − 2^−12 in paper-1.3b) asks of S at
every step; its error is measured (``experiments/bench_inference.py``), not assumed.

``KVCache`` (Transformer): every layer's rotated keys and values, S slots each — it grows with the context,
which is the cost RetNet's O(1) state avoids. A mixer's new layer state is its whole state for retention,
and the call's own keys and values for attention (the cache appends them).
Configs build empty ones: ``config.init_state(batch, max_length=...)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.ops.attention import write_cache
from retnet_jax.ops.retention import RetentionState, StackedState

__all__ = ["STATE_DTYPES", "KVCache", "RecurrentState", "check_state_dtype"]

# What a RecurrentState may be stored in between steps: float32 (the default), bfloat16 (half the bytes),
# float64 (models run under jax's x64 mode, e.g. checks against a float64 reference).
STATE_DTYPES = ("float32", "bfloat16", "float64")


def check_state_dtype(name: str, dtype) -> jnp.dtype:
    """``dtype`` as a jnp.dtype if a recurrent state may be stored in it, else a ValueError."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in STATE_DTYPES:
        raise ValueError(
            f"{name}: state_dtype must be one of {STATE_DTYPES} (float32 is exact; bfloat16 halves the "
            f"state's bytes; float64 under x64); got {dtype!r}."
        )
    return resolved


def _put_rows(array, rows, values, axis: int):
    """``array`` with indices ``rows`` of ``axis`` set to ``values``; an index >= the axis size is skipped."""
    index = (slice(None),) * axis + (rows,)
    return array.at[index].set(values.astype(array.dtype), mode="drop")


def _check_put(name: str, state, rows, other):
    """Raises ValueError unless ``other`` is a state of the same kind with one row per index of ``rows``."""
    rows = jnp.asarray(rows)
    if type(other) is not type(state) or rows.ndim != 1:
        raise ValueError(
            f"{name}.put(rows, other): rows must be int [R] and other a {name} of R rows; got rows of shape "
            f"{tuple(rows.shape)} and a {type(other).__name__}."
        )
    for field, a, b in zip(state._fields, state, other, strict=True):
        axis = 0 if field == "position" else 1
        expected = (*a.shape[:axis], rows.shape[0], *a.shape[axis + 1 :])
        if b.shape != expected:
            raise ValueError(
                f"{name}.put(rows, other): other.{field} must have shape {expected} (this state's, with "
                f"{rows.shape[0]} rows); got {tuple(b.shape)}. Build it with the same config and max_length."
            )
    return rows


def _check_position(name: str, position, batch: int):
    if position.shape != (batch,):
        raise ValueError(f"{name}.position must have shape [B] = ({batch},); got {tuple(position.shape)}.")


class RecurrentState(NamedTuple):
    """RetNet's decoding state.

    Attributes:
        kv: [L, B, H, K, V] float32 (or bfloat16, see the module doc): each layer's
            S = Σ_m γ^(n−m) k_mᵀ v_m.
        position: [B] int32: tokens seen per row (the absolute position of the next token).
    """

    kv: jax.Array
    position: jax.Array

    @classmethod
    def empty(
        cls, layers: int, batch: int, heads: int, key_dim: int, value_dim: int, dtype="float32"
    ) -> RecurrentState:
        """The state of no tokens, stored in ``dtype`` ("float32" or "bfloat16")."""
        dtype = check_state_dtype("RecurrentState.empty", dtype)
        return cls(
            kv=jnp.zeros((layers, batch, heads, key_dim, value_dim), dtype),
            position=jnp.zeros((batch,), jnp.int32),
        )

    def take(self, rows) -> RecurrentState:
        return RecurrentState(jnp.take(self.kv, rows, axis=1), jnp.take(self.position, rows, axis=0))

    def put(self, rows, other: RecurrentState) -> RecurrentState:
        """The state with batch rows ``rows`` (int [R]) replaced by ``other``'s R rows, in that order.

        A row's state is its whole history, so a new sequence simply overwrites it. Indices >= B are
        skipped (a batch of new rows padded to a fixed size writes in one call).
        """
        rows = _check_put("RecurrentState", self, rows, other)
        return RecurrentState(
            _put_rows(self.kv, rows, other.kv, 1), _put_rows(self.position, rows, other.position, 0)
        )

    def layer(self, index) -> StackedState:
        """Layer ``index``'s view: the whole array and the index, so that a decode kernel can update the
        layer in place inside it (``ops.dispatch.recurrent_step``); ``view.current()`` is its slice."""
        return StackedState(self.kv, index, self.position)

    def write(self, index, new: StackedState | RetentionState, positions) -> RecurrentState:
        """The state with the mixer's new view (every layer's array, layer ``index`` updated in it), or
        with layer ``index`` replaced by a new ``RetentionState``."""
        del positions  # the layer's whole state is replaced
        if isinstance(new, StackedState):  # a bf16 state was rounded once, as the view took the layer in
            return self._replace(kv=new.kv.astype(self.kv.dtype))
        # The new state was computed in float32; a bf16 state rounds it here, once per layer and step.
        kv = jax.lax.dynamic_update_index_in_dim(self.kv, new.kv.astype(self.kv.dtype), index, 0)
        return self._replace(kv=kv)

    @classmethod
    def from_layers(cls, new: RetentionState, length: int) -> RecurrentState:
        """From the stacked new states (kv [L, B, H, K, V]) of a call of ``length`` tokens from empty."""
        return cls(new.kv, jnp.full(new.kv.shape[1:2], length, jnp.int32))

    def advance(self, length: int) -> RecurrentState:
        return self._replace(position=self.position + length)

    def reserve(self, max_length: int) -> RecurrentState:
        del max_length  # nothing grows
        return self

    def overflows(self, length: int):
        """Rows the call of ``length`` tokens would run past the state's capacity: none."""
        return None

    def check(self, config, batch: int, length: int):
        """Raises ValueError (outside jit) if this state does not fit ``config``'s model and the batch."""
        del length  # any number of tokens fits
        expected = (config.num_layers, batch, config.num_heads, config.key_dim, config.head_value_dim)
        if self.kv.shape != expected:
            raise ValueError(
                f"The state does not fit this model and batch: expected kv of shape {expected}; got "
                f"{tuple(self.kv.shape)}. Was it made for another config or batch size? Build one with "
                f"config.init_state({batch})."
            )
        if self.kv.dtype.name not in STATE_DTYPES:
            raise ValueError(
                f"The state holds {self.kv.dtype.name}; a recurrent state is stored in one of "
                f"{STATE_DTYPES}. Build it with config.init_state({batch}, state_dtype=...)."
            )
        _check_position("RecurrentState", self.position, batch)


class KVCache(NamedTuple):
    """The Transformer's decoding state.

    Attributes:
        k: [L, B, H, S, K] rotated keys of every layer, in the compute dtype; slots >= position unused.
            Layers first and heads before S: a layer's [B, H, S, K] slice is read by the attention
            products without a transpose.
        v: [L, B, H, S, K] values.
        position: [B] int32: tokens cached per row (the absolute position of the next token).
    """

    k: jax.Array
    v: jax.Array
    position: jax.Array

    @classmethod
    def empty(cls, layers: int, batch: int, heads: int, max_length: int, head_dim: int, dtype) -> KVCache:
        """2·L·B·S·D values of ``dtype``."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"KVCache: max_length must be an integer >= 1; got {max_length!r}.")
        shape = (layers, batch, heads, max_length, head_dim)
        # Two arrays, not one shared: a jitted step that donates the cache must not donate a buffer twice.
        k, v = (jnp.zeros(shape, dtype) for _ in range(2))
        return cls(k, v, jnp.zeros((batch,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def take(self, rows) -> KVCache:
        return KVCache(jnp.take(self.k, rows, axis=1), jnp.take(self.v, rows, axis=1), self.position[rows])

    def put(self, rows, other: KVCache) -> KVCache:
        """The cache with batch rows ``rows`` (int [R]) replaced by ``other``'s R rows, all S slots of them
        (``other`` has this cache's max_length). Indices >= B are skipped."""
        rows = _check_put("KVCache", self, rows, other)
        return KVCache(
            _put_rows(self.k, rows, other.k, 1),
            _put_rows(self.v, rows, other.v, 1),
            _put_rows(self.position, rows, other.position, 0),
        )

    def layer(self, index) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v) [B, H, S, K] of layer ``index`` and the rows' positions [B]."""
        k = jax.lax.dynamic_index_in_dim(self.k, index, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(self.v, index, 0, keepdims=False)
        return k, v, self.position

    def write(self, index, new: tuple[jax.Array, jax.Array], positions) -> KVCache:
        """The call's keys and values new = (k, v) [B, T, H, K] written at (layer, row, positions [B, T]).

        Pads (negative positions) and positions >= S are dropped, not wrapped.
        """
        k, v = new
        return self._replace(
            k=write_cache(self.k, k, index, positions), v=write_cache(self.v, v, index, positions)
        )

    @classmethod
    def from_layers(cls, new: tuple[jax.Array, jax.Array], length: int) -> KVCache:
        """From the stacked (k, v) [L, B, T, H, K] of a call of ``length`` tokens from empty: S = T."""
        k, v = (jnp.swapaxes(a, 2, 3) for a in new)  # [L, B, H, T, K]
        return cls(k, v, jnp.full(k.shape[1:2], length, jnp.int32))

    def advance(self, length: int) -> KVCache:
        return self._replace(position=self.position + length)

    def reserve(self, max_length: int) -> KVCache:
        """The cache with room for ``max_length`` tokens (padded with empty slots)."""
        if max_length < self.max_length:
            raise ValueError(f"KVCache.reserve: max_length {max_length} < the cache's {self.max_length}.")
        pad = [(0, 0), (0, 0), (0, 0), (0, max_length - self.max_length), (0, 0)]
        return self._replace(k=jnp.pad(self.k, pad), v=jnp.pad(self.v, pad))

    def overflows(self, length: int):
        """[B] bool: rows whose call of ``length`` tokens runs past the cache (their keys are dropped)."""
        return self.position + length > self.max_length

    def check(self, config, batch: int, length: int):
        """Raises ValueError (outside jit) if this cache does not fit ``config``'s model, the batch and a
        call of ``length`` tokens."""
        layers, heads, head_dim, dtype = (
            config.num_layers,
            config.num_heads,
            config.head_dim,
            config.compute_dtype,
        )
        if (
            self.k.ndim != 5
            or (*self.k.shape[:3], self.k.shape[4]) != (layers, batch, heads, head_dim)
            or self.v.shape != self.k.shape
        ):
            raise ValueError(
                f"The cache does not fit this model and batch: expected k and v of shape ({layers}, "
                f"{batch}, {heads}, max_length, {head_dim}); got k {tuple(self.k.shape)}, v "
                f"{tuple(self.v.shape)}. Was it made for another config or batch size? Build one with "
                f"config.init_state({batch}, max_length=...)."
            )
        _check_position("KVCache", self.position, batch)
        if self.k.dtype != dtype or self.v.dtype != dtype:
            raise ValueError(
                f"The cache holds {self.k.dtype} but the model computes in {jnp.dtype(dtype).name}; build "
                f"it with config.init_state."
            )
        if length > self.max_length:
            raise ValueError(
                f"{length} tokens do not fit a cache of max_length {self.max_length}; build a larger one "
                f"with config.init_state(batch, max_length=...)."
            )
        if not isinstance(self.position, jax.core.Tracer):
            longest = int(np.max(np.asarray(self.position)))
            if longest + length > self.max_length:
                raise ValueError(
                    f"A cache row already holds {longest} tokens, so {length} more exceed its max_length "
                    f"{self.max_length}; build a larger cache with config.init_state(..., max_length=...)."
                )
