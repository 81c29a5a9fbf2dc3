"""A partitioning rule for the kernel calls: each (batch row, head) is independent, so a device mesh runs
them on its own shard of batch rows and heads, with no communication.

A ``pallas_call`` has no rule of its own: under a mesh of several devices XLA would gather every operand
onto every device. ``over_batch_and_heads`` wraps a kernel call in ``custom_partitioning``: the partitioner
hands it the shardings its operands arrived with, and the call keeps their batch and head axes, asks for
the other axes (T, K, V) whole, and runs the kernels on the local shapes. With one device (or inside a
``shard_map``) the call is inlined.
"""

from __future__ import annotations

import functools

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["over_batch_and_heads"]

# Factor names of the sharding rules: b (batch) and h (heads) keep their sharding, every other axis is
# replicated.
_KEPT = ("b", "h")


def _spec(rule: str, batch, heads) -> PartitionSpec:
    return PartitionSpec(*({"b": batch, "h": heads}.get(f) for f in rule.split()))


def _axes(arg_shapes, in_rules):
    """The mesh axes of the batch and head axes of the first operand that has both."""
    for shape, rule in zip(arg_shapes, in_rules, strict=True):
        factors = rule.split()
        if "b" in factors and "h" in factors and isinstance(shape.sharding, NamedSharding):
            spec = tuple(shape.sharding.spec) + (None,) * (len(factors) - len(shape.sharding.spec))
            return spec[factors.index("b")], spec[factors.index("h")]
    return None, None


@functools.cache
def over_batch_and_heads(fn, in_rules: tuple[str, ...], out_rules: tuple[str, ...]):
    """``fn`` (arrays → tuple of arrays, independent per batch row and head) with a partitioning rule.

    Args:
        fn: a hashable callable (e.g. a ``functools.partial`` of a module-level function).
        in_rules, out_rules: per operand / result, its axes as factor names, e.g. "b t h k" for
            [B, T, H, K] or "h" for [H]; "b" and "h" mark the batch and head axes.
    """
    wrapped = custom_partitioning(fn)
    # Every factor but b and h, in order of first appearance (Shardy wants them sorted by index).
    factors = dict.fromkeys(f for rule in in_rules + out_rules for f in rule.split())
    others = [f for f in factors if f not in _KEPT]

    def shardings(mesh, arg_shapes):
        batch, heads = _axes(arg_shapes, in_rules)
        args = tuple(NamedSharding(mesh, _spec(r, batch, heads)) for r in in_rules)
        outs = tuple(NamedSharding(mesh, _spec(r, batch, heads)) for r in out_rules)
        return args, outs

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        args, outs = shardings(mesh, arg_shapes)
        return mesh, fn, outs, args

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        del result_shape
        return shardings(mesh, arg_shapes)[1]

    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=", ".join(in_rules) + " -> " + ", ".join(out_rules),
        need_replication_factors=tuple(others),
    )
    return wrapped


def call(fn, in_rules, out_rules, *args):
    """Calls ``fn(*args)`` through its partitioning rule."""
    return over_batch_and_heads(fn, tuple(in_rules), tuple(out_rules))(*args)
