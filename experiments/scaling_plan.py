"""What ``bench_scaling`` runs: model specs, meshes of a number of devices, whether a configuration fits,
and XLA's collective-overlap flags.

A model spec is a preset with optional architecture fields, ``NAME[:FIELD=VALUE]...`` (e.g.
``paper-13b:num_layers=80``); a scaling spec adds a strategy, ``MODEL_SPEC/STRATEGY`` (e.g.
``paper-6.7b/fsdp``). Strategies name (data, fsdp, tensor) meshes of n devices:

    dp (n, 1, 1)   fsdp (1, n, 1)   tp (1, 1, n)
    dp_fsdp (2, n/2, 1)   dp_tp (n/2, 1, 2)   fsdp_tp (1, n/2, 2)   dp_fsdp_tp (2, n/4, 2)

A mix exists only where each of its axes has more than one device (from 4 devices; dp_fsdp_tp from 8).
"""

from __future__ import annotations

import dataclasses
import functools

from retnet_jax.models.config import RetNetConfig, TransformerConfig

STRATEGIES = ("dp", "fsdp", "tp", "dp_fsdp", "dp_tp", "fsdp_tp", "dp_fsdp_tp")

# Bytes per parameter of a training state: float32 parameters, AdamW's two moments and the gradients.
STATE_BYTES_PER_PARAM = 16

# XLA flag variants (each checked against the XLA of the run before use: XLA rejects unknown flags).
# "default" adds none; "off" turns the latency-hiding scheduler off (collectives are not moved to overlap
# compute); "on" turns it on with the collectives pipelined across the scanned layers' loop, double
# buffering of that loop, collectives on the highest-priority stream and larger combined collectives.
XLA_OVERLAP_FLAGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "off": ("--xla_gpu_enable_latency_hiding_scheduler=false",),
    "on": (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_pipelined_all_gather=true",
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "--xla_gpu_enable_while_loop_double_buffering=true",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
        "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
        "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    ),
}


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@functools.cache
def parse_model(spec: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """'paper-13b:num_layers=80' → ('paper-13b', (('num_layers', 80),)), checked against the config."""
    name, *fields = spec.split(":")
    names = {f.name for f in dataclasses.fields(RetNetConfig)} - {"vocab_size"}
    overrides = []
    for text in fields:
        field, sep, value = text.partition("=")
        if not sep or field not in names:
            raise ValueError(
                f"model spec {spec!r}: {text!r} is not FIELD=VALUE with FIELD a RetNetConfig field "
                f"(vocab_size excluded), e.g. 'paper-13b:num_layers=80'."
            )
        overrides.append((field, _value(value)))
    RetNetConfig.preset(name, **dict(overrides))  # raises on an unknown preset or a bad value
    return name, tuple(overrides)


def parse_scaling(spec: str) -> tuple[str, str]:
    """'paper-6.7b/fsdp' → ('paper-6.7b', 'fsdp')."""
    model, sep, strategy = spec.rpartition("/")
    if not sep or strategy not in STRATEGIES:
        raise ValueError(f"scaling spec {spec!r} must be MODEL_SPEC/STRATEGY with STRATEGY in {STRATEGIES}.")
    parse_model(model)
    return model, strategy


def architecture(arch: str, spec: str):
    """The model config of ``arch`` ('retnet' or 'transformer', the Transformer of the same size)."""
    name, overrides = parse_model(spec)
    retnet = RetNetConfig.preset(name, **dict(overrides))
    if arch == "retnet":
        return retnet
    if arch == "transformer":
        return TransformerConfig.matching(retnet)
    raise ValueError(f"unknown arch {arch!r}; expected retnet or transformer.")


@functools.cache
def num_params(arch: str, spec: str) -> int:
    """Parameters of the model, from shapes alone (nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from retnet_jax.models import DecoderLM

    model = DecoderLM(architecture(arch, spec))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def strategy_mesh(strategy: str, n: int) -> tuple[int, int, int] | None:
    """The (data, fsdp, tensor) sizes of a strategy on n devices, or None where it does not exist."""
    meshes = {
        "dp": (n, 1, 1),
        "fsdp": (1, n, 1),
        "tp": (1, 1, n),
        "dp_fsdp": (2, n // 2, 1),
        "dp_tp": (n // 2, 1, 2),
        "fsdp_tp": (1, n // 2, 2),
        "dp_fsdp_tp": (2, n // 4, 2),
    }
    if strategy not in meshes:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}.")
    mesh = meshes[strategy]
    sizes = dict(zip(("dp", "fsdp", "tp"), mesh, strict=True))
    if mesh[0] * mesh[1] * mesh[2] != n or (n > 1 and any(sizes[a] < 2 for a in strategy.split("_"))):
        return None
    return mesh


def mesh_name(mesh) -> str:
    return "x".join(str(s) for s in mesh)


def parse_mesh(text: str, n: int) -> tuple[int, int, int]:
    """'2x2x2' → (2, 2, 2), which must hold n devices."""
    try:
        mesh = tuple(int(s) for s in text.split("x"))
    except ValueError:
        mesh = ()
    if len(mesh) != 3 or min(mesh) < 1 or mesh[0] * mesh[1] * mesh[2] != n:
        raise ValueError(f"mesh {text!r} must be DxFxT (data x fsdp x tensor) multiplying to {n} devices.")
    return mesh


def meshes(entries, n: int) -> list[tuple[str, tuple[int, int, int]]]:
    """(strategy or 'mesh', sizes) of each entry (a strategy name or DxFxT) that exists on n devices,
    each mesh once."""
    out, seen = [], set()
    for entry in entries:
        if entry in STRATEGIES:
            mesh = strategy_mesh(entry, n)
            label = entry
        else:
            mesh, label = parse_mesh(entry, n), "mesh"
        if mesh is not None and mesh not in seen:
            seen.add(mesh)
            out.append((label, mesh))
    return out


def all_meshes(n: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) with data · fsdp · tensor = n."""
    return [(d, f, n // (d * f)) for d in range(1, n + 1) for f in range(1, n + 1) if n % (d * f) == 0]


def device_counts(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    counts, c = [], 1
    while c < n:
        counts.append(c)
        c *= 2
    return [*counts, n]


def problem(arch: str, spec: str, mesh, batch: int, device_bytes: int | None) -> str | None:
    """Why a training configuration cannot run on this mesh (a shape that does not split, or a state
    larger than the device), or None."""
    data, fsdp, tensor = mesh
    cfg = architecture(arch, spec)
    if batch < 1 or batch % (data * fsdp):
        return f"B={batch} rows do not split over data x fsdp = {data * fsdp}"
    widths = {"heads": cfg.num_heads, "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size}
    if arch == "retnet":
        widths["value_dim"] = cfg.value_dim
    for field, width in widths.items():
        if width % tensor:
            return f"{field} = {width} does not split over tensor = {tensor}"
    if cfg.d_model % fsdp:
        return f"d_model = {cfg.d_model} does not split over fsdp = {fsdp}"
    if device_bytes:
        need = STATE_BYTES_PER_PARAM * num_params(arch, spec) / (fsdp * tensor)
        if need > device_bytes:
            return (
                f"does not fit: ~{need / 1e9:.0f} GB per device for parameters, gradients and AdamW state "
                f"(device: {device_bytes / 1e9:.0f} GB)"
            )
    return None


def tensor_sizes(arch: str, spec: str, n: int) -> list[int]:
    """1 and the largest power of two <= n that splits heads, FFN, vocabulary and values (decoding)."""
    cfg = architecture(arch, spec)
    widths = [cfg.num_heads, cfg.ffn_dim, cfg.vocab_size] + ([cfg.value_dim] if arch == "retnet" else [])
    best = max(t for t in device_counts(n) if t & (t - 1) == 0 and all(w % t == 0 for w in widths))
    return sorted({1, best})
