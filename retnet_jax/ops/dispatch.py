"""Which implementation runs the chunkwise form and the decoding step: the pure-JAX forms of
``ops.retention`` or the fused kernels.

``chunkwise(..., implementation=)`` and ``recurrent_step(..., implementation=)`` are the places that read the
backend and pick a path. For ``chunkwise``:

* ``"xla"``: ``ops.retention.chunkwise``, any backend.
* ``"pallas"``: the fused kernels of ``ops.gpu`` (Pallas, Triton backend), on a GPU; on a CPU through the
  Pallas interpreter, which is how the tests check them. The kernel family, chunk length and tiles come
  from ``ops.gpu.plan`` per head shape. What the kernels cannot run (a dtype, a shape whose tiles exceed
  shared memory, a JAX without the Triton backend, another backend) raises a one-line ``ValueError``.
* ``"pallas_tpu"``: the Pallas TPU kernels of ``ops.tpu`` (through the Pallas TPU interpreter on a CPU).
* ``"auto"``: on a GPU, the path ``AUTO_CHOICES`` names for the head shape (the fastest measured); on a
  TPU, the TPU kernels where they run (``ops.tpu.select``); else XLA. A JAX without the Triton (or TPU)
  backend gets XLA and one warning.

Every implementation computes the same function, packed documents (``segment_ids``) included (the TPU
kernels excepted: they do not reset yet, so "auto" takes XLA on a TPU then). The kernels compute
unnormalized retention continuing the incoming state (emptied at each document start) and return the
final state; the row factors 1/sqrt(c_n), which depend on the positions, are applied here. Under a
device mesh the kernel calls carry a partitioning rule (each batch row and head is independent,
``ops.gpu.partition``), so a mesh runs them on its shards.

``recurrent_step`` (one token, the decoding step): "xla" is ``ops.retention.recurrent_step``; "pallas" the
decode kernel of ``ops.gpu.decode_step`` (on a CPU through the interpreter); "auto" (the kernel is
measured faster: ``AUTO_DECODE_KERNEL``) the kernel on a GPU whose JAX has the Triton backend and where
the kernel takes the shapes and dtypes, else XLA (one warning when the backend is missing). "pallas_tpu"
has no decode kernel: it takes XLA. The step may be given a
``StackedState`` (one layer's view of every layer's state): the kernel then updates the layer inside the
array in place; XLA updates its slice.

``joined_step`` is the same step from a layer's joined q/k/v/g projection, unscaled and unrotated: where
``joined_kernel`` says the kernel runs (as ``decode_kernel``, and the kernel applies the layer's rotation)
the kernel splits, scales, masks and rotates q and k itself (``ops.gpu.decode_step.joined_step``);
elsewhere XLA does, then ``recurrent_step``.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from retnet_jax.ops import documents, retention, rotation, tpu
from retnet_jax.ops.gpu import common, fused, partition
from retnet_jax.ops.gpu import decode_step as decode_lib
from retnet_jax.ops.gpu import plan as plan_lib

__all__ = [
    "AUTO_CHOICES",
    "AUTO_DTYPES",
    "IMPLEMENTATIONS",
    "Choice",
    "chunkwise",
    "decode_kernel",
    "fused_chunkwise",
    "joined_kernel",
    "joined_step",
    "kernel_plan",
    "recurrent_step",
]

IMPLEMENTATIONS = ("xla", "pallas", "pallas_tpu", "auto")


class Choice(NamedTuple):
    """What ``implementation="auto"`` runs on a GPU for one head shape."""

    implementation: str  # "pallas" (the kernels of plan.make at this chunk length) or "xla"
    chunk: int | None  # the kernels' C (any C gives the same function); None: the caller's C (XLA)
    evidence: str  # the measurement behind the choice


# ------------------------------------------------------------------------------------------------------
# The table of choices of chunkwise(implementation="auto") on a GPU, per head shape (K, V): edit it after
# measuring (experiments/bench_retention.py --shapes=presets; the "impl" column with the lowest ms per
# shape and pass). Shapes not listed take AUTO_DEFAULT of their kernel family (plan.make).
AUTO_CHOICES: dict[tuple[int, int], Choice] = {
    (128, 128): Choice(
        "pallas",
        64,
        "register kernels on two 64-column tiles a head and 4 warps, H200 H32 fwd+bwd with a carried state, "
        "vs fla in one run (2026-12-03): B32 T2048 3.31 vs 6.60 ms, B8 T8192 3.19 vs 6.59, B2 T32768 4.40 "
        "vs 6.87; normalized 3.80, 3.69, 4.95",
    ),
    (64, 128): Choice("pallas", 64, "H100 paper-1.3b with H32 heads: 46.3K tokens/s vs 36.2K (XLA, H8)"),
    (64, 64): Choice(
        "pallas",
        64,
        "register kernels on 4 warps, H200 H32 fwd+bwd with a carried state, vs fla in one run (2026-12-03): "
        "B32 T2048 1.116 vs 2.220 ms, B8 T8192 1.116 vs 2.323; B2 T32768 (split kernels: 64 programs) 2.643 "
        "vs 3.637",
    ),
    (256, 512): Choice(
        "pallas",
        64,
        "H200 H8 fwd+bwd (2026-12-01): split kernels C=64 7.69 ms, XLA C=256 14.01 (B8 T8192); vs fla in one "
        "run 7.96 vs 13.75 (B8 T8192), 8.05 vs 13.59 (B32 T2048), 8.10 vs 14.75 (B2 T32768)",
    ),
    (256, 432): Choice(
        "pallas",
        64,
        "torchscale v2 heads, H200 H8 fwd+bwd with a carried state (2026-12-01): split kernels C=64 7.58 ms "
        "(B8 T8192), 7.80 (B32 T2048), 8.33 (B2 T32768); XLA is not faster than at V512 (14.01 ms B8 T8192)",
    ),
    (256, 428): Choice("pallas", 64, "torchscale v2 3b/13b heads: padded to the tiles of (256, 432)"),
}
AUTO_DEFAULT: dict[str, Choice] = {
    "register": Choice("pallas", 64, "whole state in registers: as (128, 128)"),
    "split": Choice("pallas", 64, "chunk states through device memory: as (256, 512) and (256, 432)"),
}
# Input dtypes "auto" sends to the kernels; float32 keeps XLA (exact float32 products in Triton run on
# the CUDA cores, not measured).
AUTO_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# ------------------------------------------------------------------------------------------------------

_warned_missing_backend = set()


def chunkwise(
    q,
    k,
    v,
    log_decay,
    *,
    chunk_size: int,
    state: retention.RetentionState | None = None,
    normalize: bool = True,
    implementation: str = "xla",
    segment_ids=None,
):
    """``ops.retention.chunkwise`` through the implementation named (see the module docstring).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] float32.
        chunk_size: C >= 1, a Python int.
        state: carried in (default empty); its count sets the absolute positions.
        normalize: divide row n by sqrt(c_n) or not.
        implementation: "xla", "pallas", "pallas_tpu" or "auto".
        segment_ids: [B, T] integers or None: document starts reset the state (``ops.retention``). The
            kernels (GPU and TPU) reset too.

    Returns:
        (o [B, T, H, V] in the input dtype, the state after the last token).
    """
    retention.check_inputs("chunkwise", q, k, v, log_decay, state)
    size = retention.check_chunk_size("chunkwise", chunk_size)
    if segment_ids is not None:
        documents.check_segment_ids("chunkwise", segment_ids, q.shape[0], q.shape[1])
    tpu_chunk = tpu.select("chunkwise", implementation, q, v, size)
    if tpu_chunk is not None:
        return tpu.chunkwise(
            q,
            k,
            v,
            log_decay,
            chunk_size=tpu_chunk,
            state=state,
            normalize=normalize,
            segment_ids=segment_ids,
        )
    rows = q.shape[0] * q.shape[2]
    plan = kernel_plan("chunkwise", implementation, q.shape[-1], v.shape[-1], size, q.dtype, rows=rows)
    if plan is None:
        return retention.chunkwise(
            q, k, v, log_decay, chunk_size=size, state=state, normalize=normalize, segment_ids=segment_ids
        )
    return fused_chunkwise(q, k, v, log_decay, plan, state, normalize, segment_ids)


def kernel_chunk(size: int) -> int:
    """The kernels' C for a caller's C: the same if the kernels take it, else the nearest they take (the
    chunk length only blocks the computation; every C gives the same function)."""
    chunk = 1 << (max(size, 1).bit_length() - 1)  # the largest power of two <= size
    return min(plan_lib.MAX_CHUNK, max(plan_lib.MIN_CHUNK, chunk))


def kernel_plan(
    fn: str, implementation: str, key_dim: int, value_dim: int, size: int, dtype, backend=None, rows=None
):
    """The kernel plan to run, or None for the XLA form (see the module docstring).

    Args:
        backend: the platform deciding (default ``jax.default_backend()``).
        rows: B·H of the call, or None: under "auto", rows too few to fill the register kernels'
            programs take the split kernels (``plan.MIN_REGISTER_PROGRAMS``); a forced "pallas" plans by
            the head shape alone.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{fn}: unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}."
        )
    backend = backend or jax.default_backend()
    if implementation == "xla":
        return None
    if implementation == "pallas":
        return _forced_plan(fn, key_dim, value_dim, size, dtype, backend)
    if backend != "gpu" or jnp.dtype(dtype) not in AUTO_DTYPES:
        return None
    default = AUTO_DEFAULT[plan_lib.family_of(key_dim, value_dim)]
    choice = AUTO_CHOICES.get((key_dim, value_dim), default)
    if choice.implementation != "pallas":
        return None
    missing = common.triton_unavailable()
    if missing is not None:
        _warn_missing_backend(missing)
        return None
    plan = plan_lib.make(key_dim, value_dim, choice.chunk, dtype, rows=rows)
    return plan if isinstance(plan, plan_lib.Plan) else None


def _forced_plan(fn, key_dim, value_dim, size, dtype, backend):
    where = f"{fn}: implementation='pallas' cannot run"
    if backend not in ("gpu", "cpu"):
        raise ValueError(f"{where} on {backend} (GPU kernels); use implementation='xla' or 'auto'.")
    missing = common.triton_unavailable()
    if backend == "gpu" and missing is not None:
        raise ValueError(f"{where}: {missing}; use jax[cuda] 0.10-0.11, or implementation='xla' or 'auto'.")
    plan = plan_lib.make(key_dim, value_dim, kernel_chunk(size), dtype)
    if not isinstance(plan, plan_lib.Plan):
        raise ValueError(f"{where} {plan}; use implementation='xla' or 'auto'.")
    return plan


def _warn_missing_backend(reason: str, fn: str = "chunkwise"):
    if fn not in _warned_missing_backend:
        _warned_missing_backend.add(fn)
        warnings.warn(f"{fn}(implementation='auto'): {reason}; using the XLA form.", stacklevel=4)


def fused_chunkwise(q, k, v, log_decay, plan, state, normalize, segment_ids=None):
    """chunkwise through the kernels, which continue the state (resetting it at document starts) and
    return the final one; the row factors (they depend on the positions: the state's count, and the
    document starts) are applied here."""
    length = q.shape[1]
    interpret = jax.default_backend() == "cpu"
    acc = retention.accumulator(q.dtype)
    count = jnp.zeros((q.shape[0],), jnp.int32) if state is None else state.count
    h0 = None if state is None else state.kv.astype(jnp.float32)
    if segment_ids is None:
        starts, positions = None, count[:, None] + jnp.arange(length)  # [B, T]
    else:
        starts = documents.document_starts(segment_ids)
        positions = documents.positions_from_starts(starts, count)
    o, kv = fused.chunk_retention(q, k, v, log_decay, h0, starts=starts, plan=plan, interpret=interpret)
    if normalize:
        scale = retention.row_factors(positions, log_decay.astype(acc))
        o = (o.astype(acc) * scale[..., None]).astype(v.dtype)
    final_count = count + length if segment_ids is None else positions[:, -1] + 1
    return o, retention.RetentionState(kv.astype(acc), final_count)


# ------------------------------------------------------------------------------------------------------
# The decoding step.

# Whether "auto" runs the decode kernel on a GPU. Measured faster than XLA's step at every batch, beside
# it in one run (paper-1.3b, context 8192, H200, jax 0.11.2, 2026-12-01, bench_inference --tag=decodek):
# B1 2.73 against 2.82 ms per token, B8 2.91 / 3.37, B64 6.34 / 9.71, B256 18.04 / 28.61.
AUTO_DECODE_KERNEL = True


def decode_kernel(
    implementation: str, key_dim: int, value_dim: int, dtype, state_dtype, backend=None
) -> bool:
    """Whether ``recurrent_step`` runs the decode kernel (see the module docstring); a forced "pallas"
    that cannot run raises a one-line ValueError."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"recurrent_step: unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}."
        )
    backend = backend or jax.default_backend()
    if implementation in ("xla", "pallas_tpu"):
        return False
    why = decode_lib.unsupported(key_dim, value_dim, dtype, state_dtype)
    missing = common.triton_unavailable()
    if implementation == "pallas":
        where = "recurrent_step: implementation='pallas' cannot run"
        if backend not in ("gpu", "cpu"):
            raise ValueError(f"{where} on {backend} (a GPU kernel); use implementation='xla' or 'auto'.")
        if backend == "gpu" and missing is not None:
            raise ValueError(
                f"{where}: {missing}; use jax[cuda] 0.10-0.11, or implementation='xla' or 'auto'."
            )
        if why is not None:
            raise ValueError(f"{where} {why}; use implementation='xla' or 'auto'.")
        return True
    if backend != "gpu" or why is not None or not AUTO_DECODE_KERNEL:
        return False
    if missing is not None:
        _warn_missing_backend(missing, "recurrent_step")
        return False
    return True


# Axes of the decode kernel's operands for the partitioning rule (b, h kept; the others whole).
_DECODE_IN = ("b h two bv", "b h k", "b h k", "b h v")
_DECODE_STATE = {4: "b h k v", 5: "l b h k v"}


@functools.cache
def _decode_call(interpret: bool):
    """The kernel call as one hashable callable per mode (the partitioning rule is cached by it)."""

    def call(factors, q, k, v, kv, *layer):
        return tuple(decode_lib.launch(factors, q, k, v, kv, *layer, interpret=interpret))

    return call


def recurrent_step(
    q,
    k,
    v,
    log_decay,
    state: retention.RetentionState | retention.StackedState,
    *,
    normalize: bool = True,
    reset=None,
    implementation: str = "xla",
):
    """``ops.retention.recurrent_step`` through the implementation named (see the module docstring).

    Args:
        q, k: [B, H, K]; v: [B, H, V]; log_decay: [H] float32.
        state: the layer's ``RetentionState``, or a ``StackedState`` (its view in every layer's state:
            the kernel updates it in place there).
        normalize, reset: as ``ops.retention.recurrent_step``.
        implementation: "xla", "pallas", "pallas_tpu" (XLA: no TPU decode kernel) or "auto".

    Returns:
        (o [B, H, V] in the input dtype, the new state of the kind given). A kernel's state keeps the
        stored dtype (float32 or bfloat16); XLA's is float32 for a ``RetentionState`` (as
        ``ops.retention``), stored in the array's dtype for a ``StackedState``.
    """
    stacked = isinstance(state, retention.StackedState)
    layer_state = state.current() if stacked else state
    retention.check_inputs("recurrent_step", q, k, v, log_decay, layer_state, step=True)
    if reset is not None and tuple(reset.shape) != (q.shape[0],):
        raise ValueError(
            f"recurrent_step: reset must have shape [B] = ({q.shape[0]},), one flag per row; "
            f"got shape {tuple(reset.shape)}."
        )
    if not decode_kernel(implementation, q.shape[-1], v.shape[-1], q.dtype, state.kv.dtype):
        o, new = retention.recurrent_step(q, k, v, log_decay, layer_state, normalize=normalize, reset=reset)
        return o, (state.put(new) if stacked else new)
    interpret = jax.default_backend() == "cpu"
    reset = None if reset is None else reset.astype(bool)
    factors = decode_lib.factors(log_decay, state.count, v.shape[-1], normalize=normalize, reset=reset)
    operands = [factors, q, k, v, state.kv]
    rules = [*_DECODE_IN, _DECODE_STATE[state.kv.ndim]]
    if stacked:
        operands.append(jnp.reshape(jnp.asarray(state.layer, jnp.int32), (1,)))
        rules.append("one")
    o, kv = partition.call(_decode_call(interpret), rules, ("b h v", rules[4]), *operands)
    count = state.count + 1 if reset is None else jnp.where(reset, 1, state.count + 1)
    count = count.astype(state.count.dtype)
    if stacked:
        return o, retention.StackedState(kv, state.layer, count)
    return o, retention.RetentionState(kv, count)


# ------------------------------------------------------------------------------------------------------
# The decoding step from a layer's joined projection.


# Whether "auto" takes the joined projection into the decode kernel where the decode kernel runs. It does
# the decode kernel's work plus loads of a few hundred values per program, and removes the three XLA
# kernels between the product and the step (~4 µs a layer at paper-1.3b B1 on the H200, 2026-12-02
# profile). Measured on its own (experiments/results/ab_joined_step_H200_2026-12-02.md: the same loop
# with and without it, one process, paper-1.3b): 0.977× the step without it at B1 and 0.962× at B8 with
# "auto" products, 0.964× and 0.992× with "pallas" products. On.
AUTO_JOINED_KERNEL = True


def joined_kernel(
    implementation: str, key_dim: int, value_dim: int, dtype, state_dtype, rotation_kind: str, backend=None
) -> bool:
    """Whether ``joined_step`` runs the kernel: where ``decode_kernel`` says the decode kernel runs and the
    kernel applies the rotation itself ("auto": also ``AUTO_JOINED_KERNEL``). A forced "pallas" that
    cannot run raises a one-line ValueError."""
    if not decode_kernel(implementation, key_dim, value_dim, dtype, state_dtype, backend):
        return False
    if implementation == "auto" and not AUTO_JOINED_KERNEL:
        return False
    why = decode_lib.joined_unsupported(key_dim, value_dim, dtype, state_dtype, rotation_kind)
    if why is not None and implementation == "pallas":
        raise ValueError(f"joined_step: implementation='pallas' cannot run {why}; use 'xla' or 'auto'.")
    return why is None


_JOINED_IN = {3: "b h w", 4: "s b h w"}


@functools.cache
def _joined_call(interpret: bool, key_dim: int, rotation_kind: str, dtype):
    """The joined kernel's call as one hashable callable per configuration (see ``_decode_call``)."""

    def call(factors, *operands):
        angles, operands = (None, operands) if rotation_kind == "none" else (operands[0], operands[1:])
        options = dict(key_dim=key_dim, rotation_kind=rotation_kind, dtype=dtype, interpret=interpret)
        return tuple(decode_lib.launch_joined(factors, angles, *operands, **options))

    return call


def _check_joined(joined, key_dim: int, value_dim: int, log_decay, state, dtype):
    width = 2 * key_dim + 2 * value_dim
    kv = state.kv
    lead = kv.shape[-4:-2]  # (B, H)
    expected = (*lead, width)
    if joined.ndim not in (3, 4) or tuple(joined.shape[-3:]) != expected:
        raise ValueError(
            f"joined_step: joined must have shape [B, H, 2K + 2V] = {expected} (or [S, B, H, 2K + 2V] "
            f"float32 partials) for the state's kv {tuple(kv.shape)}; got {tuple(joined.shape)}."
        )
    if joined.ndim == 4 and jnp.dtype(joined.dtype) != jnp.dtype(jnp.float32):
        raise ValueError(f"joined_step: partials [S, B, H, 2K + 2V] must be float32; got {joined.dtype}.")
    shapes = [jax.ShapeDtypeStruct((*lead, size), dtype) for size in (key_dim, key_dim, value_dim)]
    layer_state = state.current() if isinstance(state, retention.StackedState) else state
    retention.check_inputs("joined_step", *shapes, log_decay, layer_state, step=True)


def joined_step(
    joined,
    log_decay,
    state: retention.RetentionState | retention.StackedState,
    *,
    key_dim: int,
    value_dim: int,
    rotation_kind: str = "interleaved",
    rotation_base: float = 10000.0,
    normalize: bool = True,
    reset=None,
    implementation: str = "xla",
    dtype=None,
):
    """One token of retention from a layer's joined projection (see the module docstring).

    Computes, with n the row's position (the state's count; 0 where ``reset``):

        q, k, v, g = split(joined);   k = K^-1/2 k, 0 for a pad (n < 0);
        q, k = rotate(q, n), rotate(k, n);   recurrent_step(q, k, v, ...)

    Args:
        joined: [B, H, 2K + 2V], each head's q | k | v | g as the product made them, in the compute dtype;
            or the product's float32 partials [S, B, H, 2K + 2V] (summed, then rounded to ``dtype``).
        log_decay: [H] float32. state: as ``recurrent_step``'s.
        key_dim, value_dim: K and V. rotation_kind: "interleaved", "rotate_half" or "none"; rotation_base:
            its base.
        normalize, reset, implementation: as ``recurrent_step``'s.
        dtype: the compute dtype (o's); default ``joined``'s.

    Returns:
        (o [B, H, V] in ``dtype``, the new state of the kind given, as ``recurrent_step``'s). g is
        ``joined[..., 2K + V:]`` (summed over S for partials).
    """
    dtype = jnp.dtype(dtype or joined.dtype)
    stacked = isinstance(state, retention.StackedState)
    _check_joined(joined, key_dim, value_dim, log_decay, state, dtype)
    if reset is not None and tuple(reset.shape) != (joined.shape[-3],):
        raise ValueError(
            f"joined_step: reset must have shape [B] = ({joined.shape[-3]},), one flag per row; "
            f"got shape {tuple(reset.shape)}."
        )
    reset = None if reset is None else reset.astype(bool)
    dims = (key_dim, value_dim, dtype, state.kv.dtype, rotation_kind)
    if not joined_kernel(implementation, *dims):
        return _joined_step_xla(
            joined, log_decay, state, key_dim, value_dim, rotation_kind, rotation_base, normalize, reset,
            implementation, dtype,
        )  # fmt: skip
    interpret = jax.default_backend() == "cpu"
    factors = decode_lib.joined_factors(
        log_decay, state.count, key_dim, value_dim, normalize=normalize, reset=reset
    )
    positions = decode_lib.positions_of(state.count, reset)
    angles = decode_lib.rotation_factors(positions, key_dim, rotation_kind, rotation_base)
    operands, rules = [factors], ["b h three bv"]
    if angles is not None:
        operands.append(angles)
        rules.append("b two half")
    operands += [joined, state.kv]
    rules += [_JOINED_IN[joined.ndim], _DECODE_STATE[state.kv.ndim]]
    if stacked:
        operands.append(jnp.reshape(jnp.asarray(state.layer, jnp.int32), (1,)))
        rules.append("one")
    call = _joined_call(interpret, key_dim, rotation_kind, dtype)
    o, kv = partition.call(call, rules, ("b h v", _DECODE_STATE[state.kv.ndim]), *operands)
    count = state.count + 1 if reset is None else jnp.where(reset, 1, state.count + 1)
    count = count.astype(state.count.dtype)
    if stacked:
        return o, retention.StackedState(kv, state.layer, count)
    return o, retention.RetentionState(kv, count)


def _joined_step_xla(
    joined, log_decay, state, key_dim, value_dim, rotation_kind, rotation_base, normalize, reset,
    implementation, dtype,
):  # fmt: skip
    """``joined_step`` as XLA ops before ``recurrent_step`` (the layer's own order: scale, mask, rotate)."""
    if joined.ndim == 4:
        joined = joined.sum(0)
    joined = joined.astype(dtype)
    q = joined[..., :key_dim]
    k = joined[..., key_dim : 2 * key_dim] * key_dim**-0.5
    v = joined[..., 2 * key_dim : 2 * key_dim + value_dim]
    positions = decode_lib.positions_of(state.count, reset)[:, None]  # [B, T = 1]
    k = jnp.where((positions >= 0)[..., None], k, 0)
    if rotation_kind != "none":
        q = rotation.rotate(q[:, None], positions, rotation_kind, rotation_base)[:, 0]
        k = rotation.rotate(k[:, None], positions, rotation_kind, rotation_base)[:, 0]
    return recurrent_step(
        q, k, v, log_decay, state, normalize=normalize, reset=reset, implementation=implementation
    )
