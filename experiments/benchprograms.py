"""The model programs the benchmark scripts measure: a Trainer's compiled train step on synthetic batches,
and greedy decoding (a model with random parameters, its decoding state made directly at a position,
a jitted loop of decode steps)."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from experiments.benchlib import packed_segment_ids, random_tokens


def jax_train_step(cfg: dict[str, Any], mesh=None):
    """(step, trainer, init_s, compile_s, compiled): ``step()`` runs one compiled train step of the
    configuration on alternating synthetic batches, carrying the donated state. ``cfg["documents"]``
    > 0 packs documents of that mean length into the rows (segment ids in the batches, resets on);
    ``cfg["overrides"]`` sets architecture fields of the preset. ``mesh``: the device mesh (default one
    device); ``cfg["B"]`` rows in all, split over its data and fsdp axes."""
    from retnet_jax.configs.default import get_config
    from retnet_jax.models.config import RetNetConfig
    from retnet_jax.training import trainer as train
    from retnet_jax.training.sharding import make_mesh

    config = get_config()
    config.arch, config.model = cfg["arch"], cfg["model"]
    if cfg.get("heads"):
        config.model_overrides.num_heads = cfg["heads"]
    for field, value in (cfg.get("overrides") or {}).items():
        config.model_overrides[field] = value
    config.model_overrides.dtype = "bfloat16"
    config.model_overrides.dropout = cfg.get("dropout", 0.0)
    config.seq_len, config.batch_size, config.remat = cfg["T"], cfg["B"], cfg["remat"]
    config.mode = "chunkwise" if cfg["chunk"] else "parallel"
    config.chunk_size = cfg["chunk"] or config.chunk_size
    config.steps, config.warmup_steps, config.learning_rate = 1000, 10, 3e-4
    documents = cfg.get("documents") or 0
    config.reset_at_documents = documents > 0
    vocab = RetNetConfig.preset(cfg["model"], **(cfg.get("overrides") or {})).vocab_size
    if mesh is None:
        mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])  # one device, whatever the host has

    start = time.perf_counter()
    trainer = train.Trainer(config, train.model_config(config, vocab), mesh)
    state = jax.block_until_ready(trainer.init(0))
    init_s = time.perf_counter() - start
    shape = (cfg["B"], cfg["T"])
    batches = []
    for i in range(2):
        batch = dict(
            inputs=random_tokens(2 * i, shape, vocab), targets=random_tokens(2 * i + 1, shape, vocab)
        )
        if documents:
            batch["segment_ids"] = packed_segment_ids(*shape, documents, seed=i)
        batches.append(trainer.global_batch(batch))
    start = time.perf_counter()
    compiled = trainer.lower_train_step(state, batches[0]).compile()  # the Trainer's own jitted step
    compile_s = time.perf_counter() - start

    carry = dict(state=state, step=0, loss=None)

    def step():
        carry["state"], metrics = compiled(carry["state"], batches[carry["step"] % 2])
        carry["step"] += 1
        carry["loss"] = metrics["loss"]
        return carry["state"], metrics

    step.carry = carry
    return step, trainer, init_s, compile_s, compiled


def decode_model(arch: str, model_name: str, dtype: str):
    """(model, decoder, variables) with random parameters in ``dtype``: ``arch`` retnet, retnet-loop (the
    one-token step's layer loop not unrolled) or transformer (the baseline matching the preset); an arch
    may end in @IMPL, @IMPL/PROJ or @IMPL/PROJ/LAYOUT: a RetNet's retention implementation (xla, pallas
    or auto: the decode kernel or not), either model's ``projections`` (xla, pallas or auto: the few-row
    kernel or not), both auto by default, and the loop's weights: by default per-layer copies with the
    mixer's input projections joined into one and the kernels stored transposed where the projections
    may run the few-row kernel (``LMDecoder`` as ``generate`` runs it); LAYOUT is one or more of these
    joined by "+": ``stacked``: the layer-stacked weights (``LMDecoder(unstack_layers=False)``);
    ``separate``: per-layer copies with the input projections apart (``LMDecoder(fuse_projections=False)``);
    ``dn``: the copies' kernels kept [D, N], ``nd``: stored [N, D] whatever the projections
    (``LMDecoder(transpose_kernels=False / True)``)."""
    import flax.linen as nn

    from retnet_jax.inference.decoding import LMDecoder
    from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig

    cfg = RetNetConfig.preset(model_name, dtype=dtype, param_dtype=dtype, dropout=0.0)
    arch, _, options = arch.partition("@")
    implementation, projections, layout = (options.split("/") + ["", ""])[:3]
    projections = projections or "auto"
    if arch.startswith("retnet"):
        model = DecoderLM(
            cfg,
            implementation=implementation or "auto",
            projections=projections,
            unroll_decode=arch == "retnet",
        )
    else:
        model = DecoderLM(TransformerConfig.matching(cfg), projections=projections)
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = jax.jit(lambda key: nn.unbox(model.init(key, tokens)))(jax.random.key(0))
    layout = set(layout.split("+")) if layout else set()
    transpose = True if "nd" in layout else False if "dn" in layout else None
    decoder = LMDecoder(
        model,
        "chunkwise",
        unstack_layers="stacked" not in layout,
        fuse_projections="separate" not in layout,
        transpose_kernels=transpose,
    )
    return model, decoder, variables


def nbytes(tree) -> int:
    """Bytes of a tree's arrays (or of the ``jax.ShapeDtypeStruct``s standing for them)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_arrays(state) -> list[jax.Array]:
    """A decoding state's contents: every array but the position."""
    return [a for name, a in state._asdict().items() if name != "position"]


def decode_state_spec(model, batch: int, context: int, *, extra_slots: int, state_dtype=None):
    """The shapes and dtypes (``jax.ShapeDtypeStruct``) of the model's decoding state for ``batch`` rows;
    a KV cache gets ``context + extra_slots`` slots."""
    return jax.eval_shape(
        lambda: model.config.init_state(batch, max_length=context + extra_slots, state_dtype=state_dtype)
    )


def decode_state(model, batch: int, context: int, *, extra_slots: int, state_dtype=None):
    """The model's own decoding state (whatever its layout) at position ``context``, with random contents
    (the work of a step does not depend on them); a KV cache gets ``context + extra_slots`` slots."""
    empty = decode_state_spec(model, batch, context, extra_slots=extra_slots, state_dtype=state_dtype)
    fields = {
        name: random_layers(jax.random.key(i), spec)
        for i, (name, spec) in enumerate(empty._asdict().items())
        if name != "position"
    }
    return type(empty)(**fields, position=jnp.full(empty.position.shape, context, jnp.int32))


def random_layers(key, spec) -> jax.Array:
    """Random normal values of ``spec``'s shape and dtype, drawn for one (layer, row) and repeated over
    the first two axes: a state that fills most of the device needs no temporary as large as itself
    (values drawn for the whole array at once would)."""
    shape, dtype = tuple(spec.shape), spec.dtype
    lead = 2 if len(shape) > 2 else 0
    draw = jax.jit(
        lambda key: jnp.broadcast_to(jax.random.normal(key, (1,) * lead + shape[lead:], dtype), shape)
    )
    return draw(key)


def at_position(state, context: int):
    """The state with every row's position set back to ``context``."""
    return state._replace(position=jnp.full(state.position.shape, context, jnp.int32))


def decode_program(decoder, steps: int):
    """f(variables, token [B], state) → (token, state) after ``steps`` greedy steps (a fori_loop), the
    variables prepared once before the loop (``decoding.prepare``), as the library's decoding loop does."""
    from retnet_jax.inference.decoding import prepare

    def decode(variables, token, state):
        variables = prepare(decoder, variables, token.shape[0])

        def body(_, carry):
            token, state = carry
            logits, state = decoder.step(variables, token, state)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), state

        return jax.lax.fori_loop(0, steps, body, (token, state))

    return decode
