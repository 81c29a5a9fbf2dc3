"""The decode loop: prefill a batch of prompts, then sample, step, repeat — inside one jitted while loop.

The loop sees a model only through a ``Decoder`` (``init_state``, ``prefill``, ``step``). ``LMDecoder``
is any ``DecoderLM``'s (RetNet or Transformer): the prompt but its last token goes through the model's
full-call form (chunkwise or parallel for a RetNet), the last token through a one-token step, which
gives the logits of the first new token (the head is never applied to the other prompt positions).

Each iteration emits one token: drawn by the sampler from ``fold_in(key, i)`` for token i of the call,
so a streamed call (``decode`` resumed block by block from the carry) draws exactly the tokens of the
one-shot call. The loop ends after ``limit`` tokens or as soon as every row has emitted a stop token;
rows that ended get ``pad_id``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from retnet_jax.models.lm import MODES, DecoderLM, decode_step, fuse_input_projections, transpose_projections
from retnet_jax.models.lm import prefill as stateless_prefill
from retnet_jax.models.state import KVCache
from retnet_jax.ops import products

__all__ = [
    "Buffers",
    "Carry",
    "Decoder",
    "LMDecoder",
    "Spec",
    "as_decoder",
    "decode",
    "prefill_and_decode",
    "prepare",
    "unstack_layers",
]


class Decoder(Protocol):
    """What the loop needs from a model. Implementations must be hashable (frozen dataclasses): they are
    static arguments of the jitted loop, and equal decoders share compiled programs."""

    @property
    def vocab_size(self) -> int: ...

    def init_state(self, pads: jax.Array, max_length: int) -> Any:
        """The empty state for rows whose first ``pads`` [B] tokens are padding; ``max_length`` bounds the
        positions the call will reach (a KV cache needs it; a recurrent state does not)."""

    def prefill(self, variables, tokens: jax.Array, state) -> tuple[jax.Array, Any]:
        """Consumes tokens [B, T] → (logits [B, N] float32 of the next token, the new state)."""

    def step(self, variables, tokens: jax.Array, state) -> tuple[jax.Array, Any]:
        """Consumes tokens [B] → (logits [B, N] float32 of the next token, the new state); ``variables``
        are the model's or what ``prepare`` made of them."""


def prepare(decoder: Decoder, variables, rows: int | None = None):
    """The variables the loop's steps take: ``decoder.prepare(variables, rows)`` where the decoder has one
    (run once per loop, before it; ``rows``: the loop's batch, None if unknown), else the variables as
    they are."""
    method = getattr(decoder, "prepare", None)
    return variables if method is None else method(variables, rows)


@dataclasses.dataclass(frozen=True)
class LMDecoder:
    """A ``DecoderLM`` as a ``Decoder``.

    Attributes:
        model: the LM (RetNet or Transformer).
        prefill_mode: the form that consumes the prompt: "chunkwise", "parallel" or "recurrent" (a
            RetNet's; attention has one form).
        chunk_size: C for a chunkwise prefill (default: the model's).
        state_dtype: what the decoding state is stored in between steps: None for the model's own (a
            RetNet's float32 state, a Transformer's cache in the compute dtype), or "bfloat16" for a
            RetNet state of half the bytes (each step still computes in float32; ``models.state``).
        unstack_layers: the loop's steps take each layer's weights as arrays of their own (``prepare``
            copies them out of the layer-stacked parameters of ``scan_layers`` once per loop). A step
            that takes them from the stack gives each library matmul or kernel a slice of it, which XLA
            copies: at B = 64 paper-1.3b's compiled step copied all 2.3 GB of its layers' weights every
            step (H200, jax 0.11.2). The price is a second copy of the layers' weights while the loop
            runs; False reads the stack.
        fuse_projections: where ``prepare`` copies the layers out (``unstack_layers``), each layer's mixer
            input projections of the same x (a RetNet's q, k, v, g; attention's q, k, v) are joined into
            one parameter (``models.lm.fuse_input_projections``) and the steps run the model with
            ``fused_projections``: one product for them a layer, where the separate projections took one
            each (with the few-row kernel, each is a kernel and a sum of its partials). The copy costs
            no more memory than the unstacked one. False keeps them apart.
        transpose_kernels: where ``prepare`` copies the layers out, each layer's projection kernels are
            stored transposed, [N, D] with D contiguous (``models.lm.transpose_projections``): the
            few-row kernel then reads whole rows of Wᵀ (``ops.gpu.skinny_nd``) and makes each product in
            one kernel at any N, bias, activation and residual included, where [D, N] at one row splits D
            and leaves XLA a sum of float32 partials and the epilogue (two more kernels a product). XLA's
            products take the transposed kernels too (at more rows than the kernel takes). None (the
            default): as measured faster (``ops.products.PREFER_TRANSPOSED``, off since [N, D] measured
            slower on the H200); where it is on, on where the model's ``projections`` run the kernel at
            the loop's batch (``ops.products.kernel_rows``: "pallas" up to 16 rows, "auto" on one GPU up
            to the rows it was measured faster at; with the batch unknown, wherever they may run it);
            the copy costs no more memory than the unstacked one.
    """

    model: DecoderLM
    prefill_mode: str = "chunkwise"
    chunk_size: int | None = None
    state_dtype: str | None = None
    unstack_layers: bool = True
    fuse_projections: bool = True
    transpose_kernels: bool | None = None

    def __post_init__(self):
        if self.prefill_mode not in MODES:
            raise ValueError(f"prefill_mode must be one of {MODES}; got {self.prefill_mode!r}.")
        chunk = self.chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None (the model's); got {chunk!r}.")
        if self.state_dtype is not None:  # the config says whether its state may be stored so
            jax.eval_shape(
                lambda: self.model.config.init_state(1, max_length=1, state_dtype=self.state_dtype)
            )

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def init_state(self, pads, max_length):
        state = self.model.config.init_state(
            pads.shape[0], max_length=max_length, state_dtype=self.state_dtype
        )
        return state._replace(position=-pads.astype(jnp.int32))

    def prefill(self, variables, tokens, state):
        """The prompt tokens [B, T] from the empty ``init_state`` (left pads in ``state.position``)."""
        if tokens.shape[1] > 1:  # the logits of these tokens are unused: jit drops the head for them
            if isinstance(state, KVCache):
                state = self._prefill_cache(variables, tokens[:, :-1], state)
            else:
                _, state = self.model.apply(
                    variables,
                    tokens[:, :-1],
                    state=state,
                    mode=self.prefill_mode,
                    chunk_size=self.chunk_size,
                )
        return self.step(variables, tokens[:, -1], state)

    def _prefill_cache(self, variables, prompt, state: KVCache) -> KVCache:
        """A KV cache's prompt through the model's stateless call (cuDNN's flash attention on a GPU),
        not through the cached form, which scores every query against all S slots of the empty cache
        (at T = 8192 on the H200: 390 ms against the stateless call's 49 ms). The rows' left pads are
        moved behind their prompts first, so every prompt starts at position 0 and slot 0; the model is
        causal, so the pads after a prompt change nothing, and the cache's position is set to the
        prompt's end (the pads' slots are unused, and overwritten by the tokens that follow)."""
        pads = -state.position  # [B]
        length = prompt.shape[1]
        index = (jnp.arange(length)[None, :] + pads[:, None]) % length  # [B, T]
        aligned = jnp.take_along_axis(prompt, index, axis=1)
        _, cache = stateless_prefill(self.model, variables, aligned, max_length=state.max_length)
        return cache._replace(position=(length - pads).astype(state.position.dtype))

    @property
    def transposes_kernels(self) -> bool:
        """Whether ``prepare`` stores the layers' kernels transposed for a loop of unknown batch."""
        return self.transposes_for(None)

    def transposes_for(self, rows: int | None) -> bool:
        """Whether ``prepare`` stores the layers' kernels transposed for a loop of ``rows`` rows
        (``transpose_kernels`` resolved)."""
        if self.transpose_kernels is None:
            if not products.PREFER_TRANSPOSED:
                return False
            most = products.kernel_rows(self.model.projections)
            return most > 0 and (rows is None or rows <= most)
        return self.transpose_kernels

    def prepare(self, variables, rows: int | None = None):
        """Each layer's parameters as arrays of their own (``unstack_layers``), its mixer's input
        projections joined (``fuse_projections``), its kernels transposed (``transpose_kernels``), else
        the variables."""
        if not (self.unstack_layers and self.model.scan_layers):
            return variables
        prepared = unstack_layers(variables, self.model.config.num_layers)
        if self.fuse_projections and not self.model.fused_projections:
            prepared = fuse_input_projections(self.model.config, prepared)
        if self.transposes_for(rows):
            prepared = transpose_projections(self.model.config, prepared)
        # The barrier keeps XLA from moving the slices (and joins) back into the loop that takes the copies.
        return jax.lax.optimization_barrier(prepared)

    def step(self, variables, tokens, state):
        """One token; ``variables`` as the model's, or ``prepare``'s (the step's model is set to them)."""
        return decode_step(self._model_of(variables), variables, tokens, state)

    def _model_of(self, variables) -> DecoderLM:
        """The model that takes ``variables``: ``prepare``'s have a scope a layer and may be fused."""
        model, params = self.model, variables["params"]
        if model.scan_layers and LAYERS_SCOPE not in params:  # prepared: one scope a layer
            model = model.clone(scan_layers=False)
            mixer = params[f"{LAYERS_SCOPE}_0"][model.config.mixer_name]
            if not model.fused_projections and model.config.mixer().FUSED_PROJECTION in mixer:
                model = model.clone(fused_projections=True)
        return model


LAYERS_SCOPE = "layers"  # the parameters' scope of a DecoderLM's scanned blocks (layer axis first)


def unstack_layers(variables, num_layers: int):
    """A scanned DecoderLM's variables as the same model's without ``scan_layers``: the layer-stacked
    scope ``layers`` (every leaf [L, ...]) becomes ``layers_0`` … ``layers_{L-1}``."""
    params = dict(variables["params"])
    stacked = params.pop(LAYERS_SCOPE)
    for i in range(num_layers):
        params[f"{LAYERS_SCOPE}_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return {**variables, "params": params}


def as_decoder(
    model,
    *,
    prefill_mode: str = "chunkwise",
    chunk_size: int | None = None,
    state_dtype: str | None = None,
    caller: str,
):
    """``model`` as a ``Decoder``: a ``DecoderLM`` wrapped in ``LMDecoder``, a ``Decoder`` as it is."""
    if isinstance(model, DecoderLM):
        try:
            return LMDecoder(model, prefill_mode, chunk_size, state_dtype)
        except ValueError as err:
            raise ValueError(f"{caller}: {err}") from None
    if all(hasattr(model, name) for name in ("init_state", "prefill", "step", "vocab_size")):
        if state_dtype is not None:
            raise ValueError(
                f"{caller}: state_dtype applies to a DecoderLM; a Decoder builds its own state (got "
                f"state_dtype={state_dtype!r} with a {type(model).__name__})."
            )
        return model
    raise ValueError(
        f"{caller}: model must be a DecoderLM (RetNetLM, TransformerLM) or a decoding.Decoder; got "
        f"{type(model).__name__}."
    )


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static choices of a call (each distinct value compiles once)."""

    width: int  # columns of the output buffer
    pad_id: int
    logprobs: bool


class Carry(NamedTuple):
    index: jax.Array  # [] int32: tokens emitted so far (the next token's index)
    token: jax.Array  # [B] int32: the last emitted token, not yet consumed by the state
    state: Any  # the decoder's state
    done: jax.Array  # [B] bool: the row has emitted a stop token
    lengths: jax.Array  # [B] int32: tokens emitted per row, the stop token included


class Buffers(NamedTuple):
    tokens: jax.Array  # [B, W] int32
    logprobs: jax.Array | None  # [B, W] float32


class Sampling(NamedTuple):
    """The traced inputs of a call's draws."""

    sampler: Any  # a ``sampling`` sampler
    key: jax.Array  # the call's PRNG key
    stops: jax.Array  # [S] int32 stop-token ids


def _emit(carry: Carry, logits, buffers: Buffers, offset, draw: Sampling, spec: Spec):
    """Samples token ``carry.index`` from logits [B, N] and writes it at column index − offset."""
    i = carry.index
    token = draw.sampler(jax.random.fold_in(draw.key, i), logits)
    token = jnp.where(carry.done, spec.pad_id, token)
    column = (0, i - offset)
    out_tokens = jax.lax.dynamic_update_slice(buffers.tokens, token[:, None], column)
    out_logprobs = buffers.logprobs
    if spec.logprobs:
        # Under the model's distribution, before temperature and filtering.
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        logprob = jnp.where(carry.done, 0.0, logprob)
        out_logprobs = jax.lax.dynamic_update_slice(out_logprobs, logprob[:, None], column)
    lengths = carry.lengths + (~carry.done).astype(jnp.int32)
    done = carry.done | jnp.isin(token, draw.stops) if draw.stops.shape[0] else carry.done
    carry = carry._replace(index=i + 1, token=token, done=done, lengths=lengths)
    return carry, Buffers(out_tokens, out_logprobs)


def _empty_buffers(batch: int, spec: Spec) -> Buffers:
    tokens = jnp.full((batch, spec.width), spec.pad_id, jnp.int32)
    return Buffers(tokens, jnp.zeros((batch, spec.width), jnp.float32) if spec.logprobs else None)


def _loop(
    decoder: Decoder, variables, carry: Carry, buffers: Buffers, offset, limit, draw: Sampling, spec: Spec
):
    """Emits tokens until index == limit or every row is done, token i into column i − offset; each
    iteration is one decoder step."""
    variables = prepare(decoder, variables, carry.token.shape[0])  # once, before the loop

    def cond(loop):
        carry, _ = loop
        return (carry.index < limit) & ~jnp.all(carry.done)

    def body(loop):
        carry, buffers = loop
        logits, state = decoder.step(variables, carry.token, carry.state)
        return _emit(carry._replace(state=state), logits, buffers, offset, draw, spec)

    return jax.lax.while_loop(cond, body, (carry, buffers))


@functools.partial(jax.jit, static_argnames=("decoder", "max_length", "spec"))
def prefill_and_decode(decoder: Decoder, variables, tokens, pads, limit, draw: Sampling, *, max_length, spec):
    """Prefills tokens [B, T] (``pads`` [B] left pads each) and emits tokens 0 .. limit−1.

    Returns:
        (the ``Carry`` after the last token, ``Buffers`` of [B, spec.width]).
    """
    batch = tokens.shape[0]
    state = decoder.init_state(pads, max_length)
    logits, state = decoder.prefill(variables, tokens, state)
    carry = Carry(
        index=jnp.zeros((), jnp.int32),
        token=jnp.zeros((batch,), jnp.int32),
        state=state,
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
    )
    carry, buffers = _emit(carry, logits, _empty_buffers(batch, spec), 0, draw, spec)
    return _loop(decoder, variables, carry, buffers, 0, limit, draw, spec)


@functools.partial(jax.jit, static_argnames=("decoder", "spec"), donate_argnames=("carry",))
def decode(decoder: Decoder, variables, carry: Carry, limit, draw: Sampling, *, spec):
    """Continues from ``carry``: emits tokens carry.index .. limit−1 into a fresh [B, spec.width] buffer."""
    buffers = _empty_buffers(carry.token.shape[0], spec)
    return _loop(decoder, variables, carry, buffers, carry.index, limit, draw, spec)
