"""A linear map over several axes whose kernel is created in its final shape with logical axis names.

flax's ``DenseGeneral`` initializes a flattened [in, out] kernel and reshapes it afterwards, which breaks
logical-axis sharding constraints applied at creation under a mesh. Here the kernel is born
[*in_axes, *features] (e.g. [D, H, K]), so its names always match its rank.

``FusedProjection`` is several projections of the same x as one kernel (a decoding step's q, k, v, g in
one product); ``fuse_projections`` makes its parameters from theirs.

A decoding loop may hand either one its kernel stored transposed, [*features, *in] (outputs first: Wᵀ
[N, D] once flattened), as the parameter ``kernel_transposed`` (``TRANSPOSED_KERNEL``) in place of
``kernel``: ``transpose_kernel`` makes it, and only ``inference.decoding.LMDecoder.prepare`` does (the
few-row kernel then reads Wᵀ along D, ``ops.gpu.skinny_nd``). A module whose scope holds it uses it; XLA's
product contracts its trailing axes. Nothing creates it: ``init`` makes ``kernel``, and training and
checkpoints see only that.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from retnet_jax.nn.axes import partitioned
from retnet_jax.ops import products
from retnet_jax.ops.norms import Normed

TRANSPOSED_KERNEL = "kernel_transposed"  # a projection's kernel as [*features, *in] (decoding loops only)


class Projection(nn.Module):
    """y = x·W (+ b) contracting the last ``len(in_names)`` axes of x into ``features``.

    Attributes:
        features: output axis sizes, e.g. (H, K).
        in_names, out_names: logical axis names of the contracted and the output axes.
        init_scale, init_mode, init_distribution: ``variance_scaling`` arguments; fans are computed over
            all contracted axes (fan in) and all output axes (fan out), as for the flat matrix.
        implementation: how the product runs (``ops.products``): "xla", or "auto" / "pallas" for the
            few-row kernel in calls of a decoding step's few rows.

    The input may be a norm not yet computed (``ops.norms.Normed``, from ``Norm(defer=...)`` or, gated,
    from ``HeadNorm(defer=...)``, normalized over its last axis): the
    kernel's prologue computes it where the kernel runs; elsewhere it is materialized first. A call may
    also take the activation and the residual that follow the product (``__call__``).
    """

    features: Sequence[int]
    in_names: Sequence[str]
    out_names: Sequence[str]
    init_scale: float = 1.0
    init_mode: str = "fan_avg"
    init_distribution: str = "uniform"
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable | None = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, *, activation: str | None = None, residual=None):
        """x [..., *in] → act(x W + b) + residual [..., *features] in the compute dtype.

        Args:
            x: [..., *in], or a norm of it not yet computed (``ops.norms.Normed``).
            activation: a key of ``ops.products.ACTIVATIONS`` or None, applied in float32 after the bias.
            residual: [..., *features] or None, added last.

        Where the call runs the few-row kernel, the bias, activation and residual are its epilogue (on the
        float32 accumulator, one cast); elsewhere XLA adds the bias in the compute dtype as without them.
        """
        n_in = len(self.in_names)
        in_shape = x.shape[x.ndim - n_in :]
        in_axes = tuple(range(n_in))
        out_axes = tuple(range(n_in, n_in + len(self.features)))
        transposed = self.has_variable("params", TRANSPOSED_KERNEL)
        if transposed:  # a decoding loop's prepared kernel, [*features, *in]
            kernel = _transposed_kernel(self, (*self.features, *in_shape))
        else:
            init = self.kernel_init or nn.initializers.variance_scaling(
                self.init_scale, self.init_mode, self.init_distribution, in_axis=in_axes, out_axis=out_axes
            )
            kernel = self.param(
                "kernel",
                partitioned(init, *self.in_names, *self.out_names),
                (*in_shape, *self.features),
                self.param_dtype,
            )
        n = math.prod(self.features)
        layout = dict(transposed=transposed)
        if isinstance(x, Normed):  # a (block or head) norm: left to the kernel's prologue if it runs
            if products.fuses_norm(self.implementation, x, n, self.dtype, in_axes=n_in, **layout):
                kernel = kernel.astype(self.dtype)
                return self._through_kernel(x, kernel, n_in, activation, residual, transposed)
            x = x.materialize()
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        rows, d = math.prod(x.shape[: x.ndim - n_in]), math.prod(in_shape)
        if products.uses_kernel(self.implementation, rows, d, n, x.dtype, **layout):
            return self._through_kernel(x, kernel, n_in, activation, residual, transposed)
        y = self._bias(products.contract(x, kernel, n_in, **layout))
        if activation is not None:  # as the FFN applies it: in float32, then the compute dtype
            y = products.ACTIVATIONS[activation](y.astype(jnp.promote_types(y.dtype, jnp.float32)))
            y = y.astype(self.dtype)
        return y if residual is None else residual + y

    def _through_kernel(self, x, kernel, n_in: int, activation, residual, transposed: bool):
        """The few-row kernel with the bias, activation and residual in its epilogue (float32, one cast)."""
        bias = self._bias_param() if self.use_bias else None
        return products.project(
            x,
            kernel,
            n_in,
            implementation=self.implementation,
            bias=bias,
            activation=activation,
            residual=residual,
            transposed=transposed,
        )

    def _bias_param(self):
        bias_init = partitioned(nn.initializers.zeros, *self.out_names)
        return self.param("bias", bias_init, tuple(self.features), self.param_dtype)

    def _bias(self, y):
        if self.use_bias:
            y = y + self._bias_param().astype(self.dtype)
        return y


class FusedProjection(nn.Module):
    """Several ``Projection``s of the same x as one kernel and one product: [*in, *lead, W₁ + … + Wₙ].

    Each output's features are (*lead, Wᵢ) with the same leading axes (the heads), and the kernel is
    their kernels joined along the last axis (``fuse_projections``), so one product makes all outputs
    and the heads stay an axis of their own: a kernel sharded over the heads stays sharded, and each
    head's outputs are one contiguous run of Σ Wᵢ columns. A decoding step's few rows read it in one
    pass (one few-row kernel, one XLA product) where the separate projections took one each.

    Attributes:
        parts: each output's features, e.g. ((H, K), (H, K), (H, V), (H, V)).
        in_names, out_names, init_scale, init_mode, init_distribution, use_bias, dtype, param_dtype,
            implementation: as ``Projection``'s. A fresh kernel's columns of output i are initialized as
            that output's own ``Projection`` would be (its own fans).
    """

    parts: Sequence[Sequence[int]]
    in_names: Sequence[str]
    out_names: Sequence[str]
    init_scale: float = 1.0
    init_mode: str = "fan_avg"
    init_distribution: str = "uniform"
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x):
        """x [..., *in] → the outputs [..., *lead, Wᵢ], one per part, in the compute dtype."""
        lead = tuple(self.parts[0][:-1])
        if any(tuple(part[:-1]) != lead for part in self.parts):
            raise ValueError(f"FusedProjection: parts must share their leading axes; got {self.parts}.")
        widths = [part[-1] for part in self.parts]
        n_in = len(self.in_names)
        in_shape = x.shape[x.ndim - n_in :]

        def init(key, shape, dtype):
            # Each part as its own Projection initializes it: fans over the part's own features.
            in_axes = tuple(range(n_in))
            out_axes = tuple(range(n_in, n_in + len(lead) + 1))
            scaling = nn.initializers.variance_scaling(
                self.init_scale, self.init_mode, self.init_distribution, in_axis=in_axes, out_axis=out_axes
            )
            keys = jax.random.split(key, len(widths))
            blocks = [scaling(k, (*shape[:-1], w), dtype) for k, w in zip(keys, widths, strict=True)]
            return jnp.concatenate(blocks, axis=-1)

        shape = (*in_shape, *lead, sum(widths))
        transposed = self.has_variable("params", TRANSPOSED_KERNEL)
        if transposed:  # a decoding loop's prepared kernel, [*lead, ΣWᵢ, *in]
            kernel = _transposed_kernel(self, (*lead, sum(widths), *in_shape))
        else:
            kernel_init = partitioned(init, *self.in_names, *self.out_names)
            kernel = self.param("kernel", kernel_init, shape, self.param_dtype)
        if not isinstance(x, Normed):  # a block norm not yet computed: ``project`` fuses or computes it
            x = x.astype(self.dtype)
        bias = None
        if self.use_bias:
            bias_init = partitioned(nn.initializers.zeros, *self.out_names)
            bias = self.param("bias", bias_init, (*lead, sum(widths)), self.param_dtype)
        # The bias in the few-row kernel's epilogue where it runs; else added by XLA as without it.
        n = math.prod(shape[n_in:])
        layout = dict(transposed=transposed)
        fused = bias is not None and products.runs_kernel(self.implementation, x, n, self.dtype, **layout)
        kernel = kernel.astype(self.dtype)
        implementation = self.implementation
        y = products.project(
            x, kernel, n_in, implementation=implementation, bias=bias if fused else None, **layout
        )
        if bias is not None and not fused:
            y = y + bias.astype(self.dtype)
        return tuple(jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1))


def fuse_projections(params, names: Sequence[str], fused: str):
    """A module's parameters with its ``Projection``s ``names`` (same x, same leading output axes) as the
    one ``FusedProjection`` ``fused`` in their place: kernels (and biases) joined along the last axis,
    in the order of ``names``. Leaves may carry leading axes of their own (a scanned stack's layers).

    Args:
        params: the module's parameter dict (e.g. one layer's ``retention`` scope).
        names: the projections' scopes, in the ``FusedProjection``'s order of parts.
        fused: the fused projection's scope.
    """
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"fuse_projections: no projection {missing} among {sorted(params)}.")
    parts = [nn.unbox(params[name]) for name in names]
    joined = {
        leaf: jnp.concatenate([part[leaf] for part in parts], axis=-1)
        for leaf in ("kernel", "bias")
        if leaf in parts[0]
    }
    rest = {key: value for key, value in params.items() if key not in names}
    return {**rest, fused: joined}


def _transposed_kernel(module: nn.Module, shape: tuple[int, ...]):
    """The module's ``kernel_transposed``, checked against the [*out, *in] its input and features give."""
    kernel = nn.unbox(module.get_variable("params", TRANSPOSED_KERNEL))
    if kernel.shape != shape:
        raise ValueError(
            f"{type(module).__name__} {module.name}: {TRANSPOSED_KERNEL} has shape {kernel.shape}; its input "
            f"and features make it {shape} ([*features, *in])."
        )
    return kernel


def holds_transposed(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s child projection ``name`` has its kernel stored transposed (a decoding loop's
    prepared variables)."""
    child = module.variables.get("params", {}).get(name, {})
    return TRANSPOSED_KERNEL in child


def transpose_kernel(params, in_axes: int, lead: int = 0):
    """A projection's parameters with its kernel stored transposed: ``kernel`` [*lead, *in, *out] becomes
    ``kernel_transposed`` [*lead, *out, *in] (contiguous along the contracted axes); the bias stays.

    Args:
        params: one ``Projection``'s or ``FusedProjection``'s parameters ({"kernel", maybe "bias"}).
        in_axes: how many axes the projection contracts (``len(in_names)``).
        lead: leading axes of the leaves that are not the kernel's (a scanned stack's layers).
    """
    params = dict(params)
    if "kernel" not in params:
        raise ValueError(f"transpose_kernel: no kernel among {sorted(params)}.")
    kernel = nn.unbox(params.pop("kernel"))
    if not 1 <= in_axes < kernel.ndim - lead:
        raise ValueError(
            f"transpose_kernel: in_axes = {in_axes} for a kernel of shape {kernel.shape} with {lead} "
            "leading axes (it needs at least one axis out)."
        )
    order = [*range(lead), *range(lead + in_axes, kernel.ndim), *range(lead, lead + in_axes)]
    return {**params, TRANSPOSED_KERNEL: jnp.transpose(kernel, order)}
