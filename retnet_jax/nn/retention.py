"""Multi-scale retention (the paper's §2.2): projections, rotation, retention, head norm, gate.

    q, k: D → H·K    v, g: D → H·V    out: H·V → D
    Y = out( swish(g) ⊙ HeadNorm(Retention(rotate(q), rotate(k)·K^−1/2, v)) )

The layer owns the parameters; the numerics live in ``ops`` (``retention`` for the forms, ``dispatch`` for
the kernel choice, ``rotation``). It is the RetNet's token mixer, called as every mixer of the library is:
``(x, positions, state) → (y, state)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from retnet_jax.nn.axes import EMBED, HEAD_DIM, HEADS
from retnet_jax.nn.norms import HeadNorm
from retnet_jax.nn.projection import FusedProjection, Projection
from retnet_jax.nn.remat import name_projection, name_token_mixing
from retnet_jax.ops import dispatch, products, retention, rotation

MODES = ("parallel", "chunkwise", "recurrent")


class MultiScaleRetention(nn.Module):
    """One retention layer over [B, T, D].

    Attributes:
        num_heads, key_dim, value_dim: H, K and V (per head).
        rotation: "interleaved", "rotate_half" or "none"; rotation_base: its base.
        decay: the γ schedule ("paper" or "linspace").
        normalize: normalized retention (divide by sqrt(c_n)) or fla's unnormalized.
        head_norm, head_norm_eps: the per-head norm ("rms", "layernorm", "rms_weight").
        use_bias, dtype, param_dtype: projections' bias, compute and parameter dtypes.
        mode: the form of a full call: "parallel", "chunkwise" or "recurrent" (T = 1 with a state always
            runs one recurrent step).
        chunk_size: C for the chunkwise form.
        implementation: how the chunkwise form and the one-token step run ("auto", "xla", "pallas":
            ``ops.dispatch``).
        projections: how the projections' products run ("auto", "xla", "pallas": ``ops.products``).
        return_state: compute the state after the call when none came in (the parallel form computes it
            apart; a call with a state always returns the new one).
        fused_projections: q, k, v and g through one ``FusedProjection`` (``qkvg_proj``, kernel
            [D, H, 2K + 2V]: each head's q, k, v, g columns side by side) instead of four ``Projection``s:
            one product per call. The parameters are ``fuse_projections``' of the four (a decoding loop's
            prepared variables: ``inference.decoding.LMDecoder``); checkpoints keep the four. A one-token
            step through the decode kernel hands the kernel the joined output as it is, to split, scale
            and rotate q and k itself (``dispatch.joined_step``).
    """

    INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "g_proj")  # of the same x: fusable
    FUSED_PROJECTION = "qkvg_proj"

    num_heads: int
    key_dim: int
    value_dim: int
    rotation: str = "interleaved"
    rotation_base: float = 10000.0
    decay: str = "paper"
    normalize: bool = True
    head_norm: str = "rms"
    head_norm_eps: float = 1e-6
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    mode: str = "parallel"
    chunk_size: int = 64
    implementation: str = "auto"
    projections: str = "auto"
    return_state: bool = False
    fused_projections: bool = False

    @nn.compact
    def __call__(
        self, x, positions, state: retention.RetentionState | None = None, *, segment_ids=None, residual=None
    ):
        """Retention over the call, continuing ``state`` if given.

        Args:
            x: [B, T, D], or its block norm not yet computed (``ops.norms.Normed``, which only the
                projections read; a decoding step through the few-row kernel).
            positions: [B or 1, T] int absolute positions of the call's tokens; negative = left pads.
            state: this layer's ``RetentionState`` (kv [B, H, K, V], count [B] = positions[:, 0]), or its
                ``StackedState`` (its view in every layer's state, a decoding state's), or None (the call
                starts at position 0).
            segment_ids: [B, T] document ids of packed rows, or None (``ops.retention``): the state is
                emptied at every document start; ``positions`` then restart there too.
            residual: [B, T, D] or None: returned y is residual + the layer's output, added in the output
                projection's epilogue where it runs the few-row kernel (the block's residual stream).

        Returns:
            (y [B, T, D] in the compute dtype, the new state of the kind given: None when none came in
            and ``return_state`` is False).
        """
        heads, key_dim, value_dim = self.num_heads, self.key_dim, self.value_dim

        features = [(heads, key_dim), (heads, key_dim), (heads, value_dim), (heads, value_dim)]
        options = dict(
            in_names=(EMBED,),
            out_names=(HEADS, HEAD_DIM),
            init_scale=(2**-2.5) ** 2,  # torchscale: xavier-uniform, gain 2^-2.5
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=self.projections,
        )
        stack = state if isinstance(state, retention.StackedState) else None
        # A one-token step through the decode kernel updates the layer inside every layer's array; any
        # other call works on the layer's slice and writes it back at the end.
        in_place = stack is not None and self._kernel_step(x.shape[1], stack)
        incoming = state is not None
        width = 2 * key_dim + 2 * value_dim  # a head's q, k, v, g in the joined product
        joined = None
        if in_place and self._joined_step(stack):
            # The kernel takes the joined product as it is: it splits, scales, masks and rotates q and k
            # itself, where XLA would run three kernels between the product and the step.
            (joined,) = FusedProjection([(heads, width)], **options, name=self.FUSED_PROJECTION)(x)
            o, state = dispatch.joined_step(
                jnp.squeeze(joined, 1),  # [B, H, 2K + 2V]
                retention.log_decays(heads, self.decay),
                stack,
                key_dim=key_dim,
                value_dim=value_dim,
                rotation_kind=self.rotation,
                rotation_base=self.rotation_base,
                normalize=self.normalize,
                implementation=self.implementation,
                dtype=self.dtype,
            )
            o, g = o[:, None], joined  # [B, 1, H, V]; g at [2K + V, 2K + 2V) of the joined [B, 1, H, 2K + 2V]
        else:
            if self.fused_projections and self._gate_in_place(x):
                (joined,) = FusedProjection([(heads, width)], **options, name=self.FUSED_PROJECTION)(x)
                outputs = jnp.split(joined, [key_dim, 2 * key_dim, 2 * key_dim + value_dim], axis=-1)
            elif self.fused_projections:
                outputs = FusedProjection(features, **options, name=self.FUSED_PROJECTION)(x)
            else:
                outputs = [
                    Projection(part, **options, name=name)(x)
                    for part, name in zip(features, self.INPUT_PROJECTIONS, strict=True)
                ]
            # q, k [B, T, H, K]; v, g [B, T, H, V]: what a remat policy may keep
            q, k, v, g = (name_projection(y) for y in outputs)
            k = k * key_dim**-0.5

            if incoming:
                k = jnp.where((positions >= 0)[..., None, None], k, 0)  # pads never enter the state
            if self.rotation != "none":
                q = rotation.rotate(q, positions, self.rotation, self.rotation_base)
                k = rotation.rotate(k, positions, self.rotation, self.rotation_base)
            if stack is not None and not in_place:
                state = stack.current()
            o, state = self._retention(q, k, v, state, segment_ids)  # [B, T, H, V]
            if joined is not None:  # the out projection's kernel reads g from the joined product
                g = joined
        o = name_token_mixing(o)
        # swish(g) ⊙ HeadNorm(o) in the compute dtype; left to the output projection's kernel where it
        # runs one (a decoding step's few rows), so that no XLA kernel runs between the step and it.
        head_norm = HeadNorm(
            self.head_norm,
            self.head_norm_eps,
            self.param_dtype,
            dtype=self.dtype,
            defer=self.projections,
            name="head_norm",
        )
        o = head_norm(o, g, 2 * key_dim + value_dim if g.shape[-1] != value_dim else 0)
        y = Projection(
            (x.shape[-1],),
            (HEADS, HEAD_DIM),
            (EMBED,),
            init_scale=(2**-1) ** 2,  # torchscale: xavier-uniform, gain 2^-1
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=self.projections,
            name="out_proj",
        )(o, residual=residual)
        if incoming and not in_place:  # (the kernel reads and writes the state in one call: no order to tie)
            state = _after(state, y)
            if stack is not None:
                state = stack.put(state)
        return y, state

    def _gate_in_place(self, x) -> bool:
        """Whether the joined q, k, v, g product stays whole for the output projection's kernel to read g
        from in place (where it may run the kernel; not while initializing: the joined kernel is then made
        part by part). Elsewhere the projection's outputs are split as before."""
        if self.is_initializing() or not products.head_norm_prologue(self.projections):
            return False
        rows, width = x.shape[0] * x.shape[1], self.num_heads * self.value_dim
        return products.uses_kernel(self.projections, rows, width, 16, self.dtype)

    def _one_step(self, length: int, state) -> bool:
        return self.mode == "recurrent" and length == 1 and state is not None

    def _kernel_step(self, length: int, state) -> bool:
        """Whether this call of ``length`` tokens is one through the decode kernel
        (``dispatch.decode_kernel``)."""
        if not self._one_step(length, state):
            return False
        dims = (self.key_dim, self.value_dim, jnp.dtype(self.dtype), state.kv.dtype)
        return dispatch.decode_kernel(self.implementation, *dims)

    def _joined_step(self, state) -> bool:
        """Whether a kernel step takes the joined projection as it is (``dispatch.joined_kernel``): with
        ``fused_projections``, where the kernel applies the rotation, not while initializing (the joined
        kernel is then made part by part, with each part's fans)."""
        if not self.fused_projections or self.is_initializing():
            return False
        dims = (self.key_dim, self.value_dim, jnp.dtype(self.dtype), state.kv.dtype, self.rotation)
        return dispatch.joined_kernel(self.implementation, *dims)

    def _retention(self, q, k, v, state, segment_ids):
        log_decay = retention.log_decays(self.num_heads, self.decay)
        norm = self.normalize
        docs = {} if segment_ids is None else {"segment_ids": segment_ids}
        wants_state = self.return_state or state is not None
        if self.mode == "recurrent":
            if self._one_step(q.shape[1], state):
                impl = self.implementation
                o, state = dispatch.recurrent_step(
                    q[:, 0], k[:, 0], v[:, 0], log_decay, state, normalize=norm, implementation=impl
                )
                return o[:, None], state
            o, state = retention.recurrent(q, k, v, log_decay, state=state, normalize=norm, **docs)
        elif self.mode == "chunkwise":
            o, state = dispatch.chunkwise(
                q,
                k,
                v,
                log_decay,
                chunk_size=self.chunk_size,
                state=state,
                normalize=norm,
                implementation=self.implementation,
                **docs,
            )
        elif state is not None:
            # Parallel over the whole call, continuing a state: one chunk of the chunkwise form.
            o, state = retention.chunkwise(
                q, k, v, log_decay, chunk_size=q.shape[1], state=state, normalize=norm, **docs
            )
        else:
            o = retention.parallel(q, k, v, log_decay, normalize=norm, **docs)
            if wants_state:
                empty = retention.init_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
                state = retention.update_state(k, v, log_decay, empty, **docs)
        return o, (state if wants_state else None)


def _after(state: retention.RetentionState, y) -> retention.RetentionState:
    """The state, made to depend on the layer's output y (its value unchanged: + 0 · y[0]).

    The caller writes the new state over the old one in a buffer of every layer's state. That write is in
    place only if every read of the old state comes before it, and XLA orders only what data orders: the
    read-out o = q·S (whose fusion reads the old S, the update recomputed inside it) is not an input of
    the write, so XLA copied the whole buffer instead — three copies of the state per decoding step at
    B = 1 on the CPU, two per layer in a prefill's layer loop. Through y, every read is an input of the
    write. One element of y suffices (the product that makes y makes all of it) and costs no kernel,
    where a sum would. (A non-finite y[0] makes the state NaN; the state behind it is garbage already.)
    """
    tie = jnp.zeros((), jnp.float32) * y.reshape(-1)[0].astype(jnp.float32)
    return state._replace(kv=state.kv + tie.astype(state.kv.dtype))
