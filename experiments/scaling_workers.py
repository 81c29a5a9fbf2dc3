"""The measurements of ``bench_scaling``, each run in a worker process of its own (or in the calling
process with ``--in_process``): the devices' ceilings, a training configuration on a mesh, the one-step
check of every mesh against one device, and decoding split by tensor parallel."""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from experiments import benchlib as bl
from experiments import benchprograms as bp
from experiments import scaling_plan as plan

# The check's tolerances (float32; tests/training/test_mesh_shapes.py measures them on CPU meshes).
CHECK_LOSS_RTOL, CHECK_UPDATE_RTOL = 1e-5, 1e-4


def peaks_worker(payload):
    import jax

    del payload
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        device=bl.device_info(), ceilings=bl.measure_ceilings(), device_bytes=stats.get("bytes_limit")
    )


def train_worker(cfg):
    import jax

    from retnet_jax.training.sharding import make_mesh

    devices = jax.devices()[: cfg["devices"]]
    if len(devices) < cfg["devices"]:
        raise ValueError(f"{cfg['devices']} devices asked, {len(devices)} present")
    mesh = make_mesh(tuple(cfg["mesh"]), devices=devices)
    name, overrides = plan.parse_model(cfg["model"])
    step, trainer, init_s, compile_s, compiled = bp.jax_train_step(
        dict(cfg, model=name, overrides=dict(overrides), chunk=cfg["chunk"]), mesh=mesh
    )
    timing = bl.time_calls(step, repeats=cfg["steps"], warmup=2, calls_per_sample=1)
    return dict(
        num_params=trainer.num_params,
        flops_per_token=trainer.train_flops_per_token(),
        init_s=init_s,
        compile_s=compile_s,
        timing=timing.to_dict(),
        loss=float(step.carry["loss"]),
        memory=dict(bytes=bl.peak_bytes_in_use(devices), program=bl.program_memory(compiled)),
        env=environment(),
        hlo=hlo_counts(compiled.as_text()),
    )


def hlo_counts(text: str) -> dict[str, int]:
    """What the compiled step holds: Pallas (Triton) kernel calls and collectives, by kind (loop bodies
    counted once)."""
    counts = {"kernels": text.count('custom_call_target="__gpu$xla.gpu.triton"')}
    for op in ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all"):
        counts[op] = len(re.findall(rf"= [^=]*? {op}(?:-start)?\(", text))
    return counts


def environment() -> dict[str, str | None]:
    """What the run was under: NVLink multicast's setting, the XLA flags, the visible GPUs."""
    names = ("NCCL_NVLS_ENABLE", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")
    return {name: os.environ.get(name) for name in names}


def check_worker(payload):
    """One float32 step per mesh against one device: loss and parameter-change errors."""
    import jax

    from retnet_jax.configs.default import get_config
    from retnet_jax.models import RetNetConfig, TransformerConfig
    from retnet_jax.training import trainer as train
    from retnet_jax.training.sharding import make_mesh

    batch, length = 8, payload["T"]
    rng = np.random.default_rng(0)
    data = {k: rng.integers(0, 259, (batch, length)).astype(np.int32) for k in ("inputs", "targets")}
    retnet = RetNetConfig.preset(
        "tiny", d_model=128, num_heads=8, value_dim=256, ffn_dim=256, vocab_size=264, dtype="float32"
    )
    rows = []
    for arch in payload["archs"]:
        config = get_config()
        # eps = 1: Adam's first step is then ≈ g, not sign(g) (which rounding flips where g ≈ 0).
        config.update(
            dict(mode="chunkwise", chunk_size=16, batch_size=batch, seq_len=length, schedule="constant",
                 warmup_steps=0, learning_rate=1e-2, eps=1.0, weight_decay=0.0,
                 implementation="pallas" if arch == "retnet" else "xla")
        )  # fmt: skip
        architecture = retnet if arch == "retnet" else TransformerConfig.matching(retnet, head_dim=16)
        one = None
        for mesh in [(1, 1, 1), *[tuple(m) for m in payload["meshes"]]]:
            n = mesh[0] * mesh[1] * mesh[2]
            step = functools.partial(
                _one_step, train, config, architecture, make_mesh(mesh, jax.devices()[:n])
            )
            with jax.default_matmul_precision("highest"):  # no TF32 rounding in the products
                if one is None:  # the one-device step: any failure fails the check
                    one = step(data, None)["state"]
                    continue
                result = bl.guarded(functools.partial(step, data, one))
            rows.append(dict(arch=arch, mesh=list(mesh), **result))
    return dict(rows=rows, env=environment())


def _one_step(train, config, architecture, mesh, data, one):
    import jax

    trainer = train.Trainer(config, architecture, mesh)
    initial = jax.tree.map(np.asarray, trainer.init(0) if one is None else one["initial"])
    state = jax.device_put(initial, trainer.state_shardings)
    state, metrics = trainer.train_step(state, trainer.global_batch(data))
    change = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, state.params, initial.params)
    out = dict(loss=float(metrics["loss"]))
    if one is None:
        return dict(out, state=dict(initial=initial, loss=out["loss"], change=change))
    diff = jax.tree.map(np.subtract, change, one["change"])
    norm = lambda t: float(np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(t))))  # noqa: E731
    out.update(
        loss_rel=abs(out["loss"] - one["loss"]) / abs(one["loss"]),
        update_rel=norm(diff) / norm(one["change"]),
    )
    out["agrees"] = out["loss_rel"] <= CHECK_LOSS_RTOL and out["update_rel"] <= CHECK_UPDATE_RTOL
    return out


def decode_worker(cfg):
    """Greedy decoding of one model split over ``tensor`` devices, per batch size."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from retnet_jax.inference.decoding import LMDecoder
    from retnet_jax.models import DecoderLM
    from retnet_jax.training.sharding import LOGICAL_RULES, make_mesh, shardings_of

    tensor = cfg["tensor"]
    devices = jax.devices()[:tensor]
    mesh = make_mesh((1, 1, tensor), devices=devices)
    architecture = plan.architecture(cfg["arch"], cfg["model"]).replace(
        dtype="bfloat16", param_dtype="bfloat16", dropout=0.0
    )
    model = DecoderLM(architecture)
    decoder = LMDecoder(model, "chunkwise")
    tokens = jnp.zeros((1, 8), jnp.int32)
    rows = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
        init = jax.jit(lambda key: nn.unbox(model.init(key, tokens)), out_shardings=shardings_of(boxed, mesh))
        variables = init(jax.random.key(0))
        weight_bytes = bp.nbytes(variables)
        for batch in cfg["batches"]:
            run = functools.partial(_decode_batch, cfg, mesh, model, decoder, variables, batch)
            rows.append(dict(bl.guarded(run), B=batch))
    num_params = sum(x.size for x in jax.tree.leaves(variables))
    return dict(rows=rows, weight_bytes=weight_bytes, num_params=num_params, env=environment())


def _decode_batch(cfg, mesh, model, decoder, variables, batch):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    steps, context = cfg["steps"], cfg["context"]
    empty = jax.eval_shape(lambda: model.config.init_state(batch, max_length=context + steps))

    def spec(x):  # [L, B, H, ...] state arrays split over heads, as the weights are; positions whole
        return NamedSharding(mesh, PartitionSpec(None, None, "tensor") if x.ndim >= 3 else PartitionSpec())

    def fill(key):  # random contents (the work of a step does not depend on them) at position `context`
        keys = iter(jax.random.split(key, len(empty)))
        fields = {
            name: jax.random.normal(next(keys), x.shape, x.dtype) if name != "position" else None
            for name, x in empty._asdict().items()
        }
        return type(empty)(**dict(fields, position=jnp.full(empty.position.shape, context, jnp.int32)))

    state = jax.jit(fill, out_shardings=jax.tree.map(spec, empty))(jax.random.key(1))
    token = jnp.asarray(bl.random_tokens(batch, (batch,), model.config.vocab_size))
    compiled, compile_s, memory = bl.compile_timed(
        bp.decode_program(decoder, steps), variables, token, state, donate_argnums=(2,)
    )
    carry = dict(token=token, state=state)
    del state

    def call():
        carry["token"], carry["state"] = compiled(
            variables, carry["token"], bp.at_position(carry["state"], context)
        )
        return carry["token"]

    timing = bl.time_calls(call, warmup=1, calls_per_sample=1)
    carry.clear()
    return dict(compile_s=compile_s, memory=memory, timing=timing.to_dict())


WORKERS = {"peaks": peaks_worker, "train": train_worker, "check": check_worker, "decode": decode_worker}
