"""Which implementation runs a projection: XLA's product, or the few-row kernel where one decoding step
multiplies a handful of rows by a weight matrix (``ops.gpu.skinny``).

``project(x, kernel, in_axes, implementation=)``:

* ``"xla"``: ``jnp.einsum``, any backend, any number of rows.
* ``"auto"``: on one GPU whose JAX has the Triton backend, where a measurement shows the kernel faster:
  calls of at most ``AUTO_MAX_ROWS`` rows with weights of at most ``AUTO_MAX_WEIGHT_BYTES`` whose shapes
  the kernel takes run it; everything else is XLA's. No backend: XLA, with no warning (a product is
  never wrong through XLA; ``dispatch.chunkwise`` already warns once about the missing backend). With
  several devices XLA too: the kernel has no partitioning rule, and a sharded weight would be gathered.
* ``"pallas"``: as "auto", on any backend: on a CPU through the Pallas interpreter (how the tests check it).
  Calls of more rows are matmuls and stay XLA's.

The model's ``projections`` (``DecoderLM``) reaches here.

A projection's input may be a block norm not yet computed (``ops.norms.Normed``): where the kernel runs, its
prologue normalizes the rows (``skinny.matmul(norm=...)``) and no separate norm runs; elsewhere the norm is
materialized first, exactly as the norm layer computes it. ``defers_norm`` says where a norm may be left
to the kernel (a decoding step's few rows), ``fuses_norm`` where one projection takes it. Retention's head
norm and gate are one too (``Normed(gate=...)`` over [..., H, V], normalized over V): its output
projection, which contracts [H, V], computes them in the prologue (``skinny.matmul(group=V, gate=...)``).

A projection's kernel may be stored transposed, [*out, *in] instead of [*in, *out] (``transposed=True``; a
decoding loop's prepared weights, ``inference.decoding.LMDecoder``): the kernel is then
``ops.gpu.skinny_nd``'s, which reads Wᵀ [N, D] along D and needs no split of D at one row (one kernel per
product, no partials to sum), and XLA's product contracts the trailing axes ("...D,ND->...N").

A projection may also take what follows its product, act(x W + b) + r (``project(bias=, activation=,
residual=)``): in the kernel's epilogue where it runs (float32 on the accumulator, one cast), else by XLA
after its product, in float32 too. The model hands them over only where the kernel runs: its bias, an FFN's
activation, and in a call without dropout a block's residual stream (``nn.projection.Projection``).
"""

from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp

from retnet_jax.ops.gpu import common, skinny, skinny_nd
from retnet_jax.ops.norms import Normed

__all__ = [
    "ACTIVATIONS",
    "IMPLEMENTATIONS",
    "contract",
    "defers_norm",
    "dense_dot_general",
    "fuses_norm",
    "kernel_rows",
    "may_use_kernel",
    "project",
    "runs_kernel",
    "uses_kernel",
]

ACTIVATIONS = skinny.ACTIVATIONS  # the FFN's activations: one table for the model and the kernel

IMPLEMENTATIONS = ("xla", "auto", "pallas")

# Where "auto" runs the kernel on a GPU: calls of at most AUTO_MAX_ROWS rows (0: never) and weights of at
# most AUTO_MAX_WEIGHT_BYTES. Measured on the H200 (jax 0.11.2, paper-1.3b, context 8192, prepared loop,
# bench_inference_H200_2026-12-02_decodek2.md): with the kernel a decoding step took 1.368 ms at B = 1
# against 2.767 with XLA's products (both with the decode-step kernel), 2.161 against 1.779 at B = 8, and
# 5.145 against 5.142 at B = 64. The untied head (2048 × 50304, 206 MB) is the one product XLA reads
# faster at one row: 57.6 µs against 52.0 in the same profiles (profile_steps_H200_2026-12-02_
# decode-kernels2.md), and 67.3 / 55.8 (best plan) against 51.3 alone (bench_products_H200_2026-12-02_
# plans.md); every layer's product (≤ 50 MB) is faster through the kernel at one row. Batches 2–7 are not
# measured and stay XLA's.
AUTO_MAX_ROWS = 1
AUTO_MAX_WEIGHT_BYTES = 128 << 20
# Whether "auto" also leaves retention's head norm and gate to the output projection's kernel (its prologue:
# the norm over each head's V columns times swish(g), g read in place). It removes one XLA fusion a layer
# (about 1.5 µs at paper-1.3b, B1, H200 profile of 2026-12-02) but adds the heads' statistics and the
# gate's loads to that kernel: off until the decoding profile measures both (experiments/README.md).
# "pallas" products always take it. Measured since (experiments/results/ab_head_norm_H200_2026-12-02.md, the
# same loop both ways in one process): 1.894 ms a step with it against 1.797 without at B1 (5% slower);
# at B8 "auto" runs no kernel there, so both loops are the same program. Off.
AUTO_HEAD_NORM_PROLOGUE = False
# Whether a prepared decoding loop stores its layers' kernels transposed, [N, D] (``skinny_nd``), where the
# few-row kernel may run (``inference.decoding.LMDecoder(transpose_kernels=None)``). Off: in paper-1.3b's
# decoding loop on the H200 (bench_inference_H200_2026-12-02_nd.md, one run) [N, D] made the step slower
# than [D, N] at every batch the kernel ran at: B1 1.836 against 1.309 ms ("pallas" products), 1.905
# against 1.376 ("auto"); B8 3.792 against 2.444 ("pallas"). The profile (profile_steps_H200_2026-12-02_
# decode-nd.md) puts it in the joined q/k/v/g product: 36.7 µs against 18.3 on [D, N], 1.4 TB/s.
PREFER_TRANSPOSED = False


def _check_implementation(implementation: str):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"project: unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}."
        )


def may_use_kernel(implementation: str) -> bool:
    """Whether ``implementation`` runs the few-row kernel on this backend for some shapes (a decoding
    step's few rows): "pallas" anywhere, "auto" on one GPU with Triton (for the rows and weights that
    ``AUTO_MAX_ROWS`` and ``AUTO_MAX_WEIGHT_BYTES`` allow)."""
    _check_implementation(implementation)
    if implementation == "xla" or (implementation == "auto" and AUTO_MAX_ROWS < 1):
        return False
    return implementation == "pallas" or not (
        jax.default_backend() != "gpu" or jax.device_count() > 1 or common.triton_unavailable()
    )


def kernel_rows(implementation: str) -> int:
    """The most rows a call may have and still run the few-row kernel under ``implementation`` on this
    backend (0: none)."""
    if not may_use_kernel(implementation):
        return 0
    return min(AUTO_MAX_ROWS, skinny.MAX_ROWS) if implementation == "auto" else skinny.MAX_ROWS


def uses_kernel(implementation: str, rows: int, d: int, n: int, dtype, *, transposed: bool = False) -> bool:
    """Whether ``project`` runs the few-row kernel for x [rows, d] @ w [d, n] (``transposed``: w stored
    [n, d], ``skinny_nd``'s)."""
    _check_implementation(implementation)
    # The shape's rules first: a call they rule out never asks for the backend (which starts it).
    if rows > skinny.MAX_ROWS or implementation == "xla":
        return False
    if implementation == "auto" and (
        rows > AUTO_MAX_ROWS or d * n * jnp.dtype(dtype).itemsize > AUTO_MAX_WEIGHT_BYTES
    ):
        return False
    if not may_use_kernel(implementation):
        return False
    return not isinstance((skinny_nd if transposed else skinny).plan(rows, d, n, dtype), str)


def _prologue_taken(normed: Normed, d: int) -> bool:
    """Whether the kernel's prologue computes this norm as ``ops.norms.normalize`` does: inputs, parameters
    and gate of dtypes the kernel takes, so that the statistics and affine are float32 there too, and
    groups (its last axis) of a multiple of 16 columns within the d contracted."""
    arrays = (normed.x, normed.scale, normed.bias, normed.gate)
    group = normed.shape[-1]
    taken = all(jnp.dtype(a.dtype) in common.DTYPES for a in arrays if a is not None)
    return taken and group % 16 == 0 and d % group == 0


def _rows_and_width(normed: Normed, in_axes: int) -> tuple[int, int]:
    return math.prod(normed.shape[: normed.ndim - in_axes]), math.prod(normed.shape[normed.ndim - in_axes :])


def defers_norm(implementation: str, normed: Normed, *, in_axes: int = 1) -> bool:
    """Whether a norm of these rows may be left to the projections that take it (contracting its last
    ``in_axes`` axes): they may run the kernel (at most ``skinny.MAX_ROWS`` rows through it; whether a
    given projection does also depends on its N, ``fuses_norm``), and its prologue computes the norm in
    float32 as XLA would."""
    rows, d = _rows_and_width(normed, in_axes)
    # N = 16: the widths the kernel takes are multiples of 16, so this asks about everything but N.
    return uses_kernel(implementation, rows, d, 16, normed.dtype) and _prologue_taken(normed, d)


def head_norm_prologue(implementation: str) -> bool:
    """Whether retention's head norm and gate may be left to an output projection of this implementation
    (where its kernel runs, ``defers_norm(..., in_axes=2)``): "pallas" yes, "auto" where
    ``AUTO_HEAD_NORM_PROLOGUE``, "xla" never."""
    return implementation == "pallas" or (implementation == "auto" and AUTO_HEAD_NORM_PROLOGUE)


def fuses_norm(
    implementation: str, normed: Normed, n: int, dtype, *, in_axes: int = 1, transposed: bool = False
) -> bool:
    """Whether ``project(normed, kernel, in_axes, ...)`` with a kernel [*in, *out] of ``dtype`` (its N
    outputs flattened; [*out, *in] if ``transposed``) runs the norm inside the kernel; else it
    materializes the norm first."""
    rows, d = _rows_and_width(normed, in_axes)
    return (
        jnp.dtype(dtype) == jnp.dtype(normed.dtype)
        and uses_kernel(implementation, rows, d, n, dtype, transposed=transposed)
        and _prologue_taken(normed, d)
    )


def runs_kernel(implementation: str, x, n: int, dtype, *, transposed: bool = False) -> bool:
    """Whether ``project(x, w)`` with w [D, n] (or [n, D], ``transposed``) of ``dtype`` (x an array cast to
    ``dtype``, or a block norm not yet computed) runs the few-row kernel: what a layer asks before it
    hands the kernel an epilogue."""
    if isinstance(x, Normed) and fuses_norm(implementation, x, n, dtype, transposed=transposed):
        return True
    rows = math.prod(x.shape[:-1])
    return uses_kernel(implementation, rows, x.shape[-1], n, dtype, transposed=transposed)


def contract(x, kernel, in_axes: int = 1, *, transposed: bool = False):
    """XLA's product: x [..., *in] with kernel [*in, *out] (or [*out, *in], ``transposed``) → [..., *out]."""
    n_in, n_out = in_axes, kernel.ndim - in_axes
    letters = string.ascii_lowercase
    batch = letters[: x.ndim - n_in]
    contracted = letters[x.ndim - n_in : x.ndim]
    produced = letters[x.ndim : x.ndim + n_out]
    weights = produced + contracted if transposed else contracted + produced
    return jnp.einsum(f"{batch}{contracted},{weights}->{batch}{produced}", x, kernel)


def project(
    x,
    kernel,
    in_axes: int = 1,
    *,
    implementation: str = "xla",
    bias=None,
    activation: str | None = None,
    residual=None,
    transposed: bool = False,
):
    """x [..., *in] contracted with kernel [*in, *out] → [..., *out], in x's dtype; with an epilogue,
    act(x · kernel + bias) + residual computed in float32 and cast once.

    Args:
        x: the inputs; their last ``in_axes`` axes are contracted. Or a norm of them not yet computed
            (``ops.norms.Normed``, normalized over its last axis): computed in the kernel's prologue where
            the kernel runs, else materialized first.
        kernel: the weights, [*in, *out], or [*out, *in] where ``transposed`` (``skinny_nd``'s kernel), in
            x's dtype.
        in_axes: how many axes of ``kernel`` are contracted (its leading ones; its trailing ones if
            ``transposed``).
        implementation: see the module docstring.
        bias: [*out] or None; activation: a key of ``ACTIVATIONS`` or None; residual: [..., *out] or None.
        transposed: the kernel's layout.
    """
    n_in = in_axes
    out_shape = kernel.shape[: kernel.ndim - n_in] if transposed else kernel.shape[n_in:]
    in_shape = kernel.shape[kernel.ndim - n_in :] if transposed else kernel.shape[:n_in]
    d, n = math.prod(in_shape), math.prod(out_shape)
    finish = dict(bias=bias, activation=activation, residual=residual, transposed=transposed)
    if isinstance(x, Normed):
        if fuses_norm(implementation, x, n, kernel.dtype, in_axes=n_in, transposed=transposed):
            return _kernel_product(x, kernel, n_in, **finish)
        x = x.materialize()
    rows = math.prod(x.shape[: x.ndim - n_in])
    if uses_kernel(implementation, rows, d, n, x.dtype, transposed=transposed):
        return _kernel_product(x, kernel, n_in, **finish)
    y = contract(x, kernel, n_in, transposed=transposed)
    if bias is None and activation is None and residual is None:
        return y
    return skinny.epilogue(y.astype(jnp.float32), bias, activation, residual).astype(y.dtype)


def dense_dot_general(implementation: str):
    """A ``dot_general`` for ``flax.linen.Dense`` (``Dense(dot_general=...)``): its product through
    ``project`` where that runs the few-row kernel, ``lax.dot_general`` as before everywhere else."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        standard = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
        rows = math.prod(lhs.shape[:-1])
        if standard and preferred_element_type is None and lhs.dtype == rhs.dtype:
            if uses_kernel(implementation, rows, rhs.shape[0], rhs.shape[1], lhs.dtype):
                return project(lhs, rhs, 1, implementation=implementation)
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
        )

    return dot_general


def _kernel_product(x, kernel, n_in: int, *, bias, activation, residual, transposed: bool):
    """x [..., *in] (or normalize(x) through the kernel's prologue) @ kernel [*in, *out] (or [*out, *in],
    ``transposed``), and the epilogue, through the few-row kernel."""
    batch_shape = x.shape[: x.ndim - n_in]
    out_shape = kernel.shape[: kernel.ndim - n_in] if transposed else kernel.shape[n_in:]
    rows, n = math.prod(batch_shape), math.prod(out_shape)
    d = kernel.size // n
    prologue = {}
    if isinstance(x, Normed):  # normalized over its last axis: groups of that many columns
        gate = None if x.gate is None else x.gate.reshape(rows, -1)  # [M, H·W]: read in place
        prologue = dict(norm=x.kind, scale=x.scale, bias=x.bias, eps=x.eps, gate=gate, group=x.shape[-1])
        prologue["gate_offset"] = x.gate_offset
        x = x.x
    product = skinny_nd.matmul if transposed else skinny.matmul
    y = product(
        x.reshape(rows, d),
        kernel.reshape((n, d) if transposed else (d, n)),
        **prologue,
        output_bias=None if bias is None else bias.reshape(n),
        activation=activation,
        residual=None if residual is None else residual.reshape(rows, n),
        interpret=jax.default_backend() != "gpu",
    )
    return y.reshape(*batch_shape, *out_shape)
