"""The TPU path lowered for the TPU platform without a TPU: a train step, a decode step, the decode loop.

This jaxlib lowers for a platform it cannot run (``jax.jit(f).trace(...).lower(lowering_platforms=
("tpu",))``): StableHLO for XLA, and the Pallas TPU kernels to Mosaic MLIR inside ``tpu_custom_call``s.
The tests pretend a TPU backend (``jax.default_backend`` returns "tpu"), so every choice the package makes
by backend ("auto" retention, attention, the kernels' interpret flag) is the one a TPU run makes, and
check the text for the Mosaic kernels where retention runs chunkwise and for no GPU-only op (cuDNN
attention, the Triton kernels).

Where libtpu is installed (the [tpu] extra; no TPU needed), the last tests go further: libtpu's
compile-only client compiles the same programs for v4, v5e, v5p and v6e topologies, running XLA's TPU
compiler and Mosaic's (layouts, VMEM budgets). Without libtpu they are skipped.
"""

import jax
import jax.numpy as jnp
import pytest

from retnet_jax.inference import decoding, sampling
from retnet_jax.models import decode_step
from retnet_jax.training import trainer as train
from retnet_jax.training.sharding import make_mesh
from tests.conftest import small_config

MOSAIC = "tpu_custom_call"  # the custom call that carries a Mosaic kernel
GPU_ONLY = ("cudnn", "triton", "mosaic_gpu", "__gpu$")  # cuDNN attention, Pallas Triton / Mosaic GPU


@pytest.fixture
def on_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")


def _lower(fn, *args, **kwargs) -> str:
    return fn.trace(*args, **kwargs).lower(lowering_platforms=("tpu",)).as_text()


def _assert_no_gpu_op(text: str):
    lowered = text.lower()
    assert not [name for name in GPU_ONLY if name in lowered]


# (arch, mode, implementation, dtype, mesh, Mosaic kernels expected). The default experiment as it is
# (parallel retention, float32), its chunkwise form through "auto" (the TPU kernels: forward, dq, dk-dv)
# in bfloat16 and through "xla", and the Transformer baseline (XLA attention, not cuDNN).
TRAIN_STEPS = [
    ("retnet", "parallel", "auto", None, "2,2,1", False),
    ("retnet", "chunkwise", "auto", "bfloat16", "2,2,1", True),
    ("retnet", "chunkwise", "xla", None, "2,1,2", False),
    ("transformer", "parallel", "auto", "bfloat16", "2,2,1", False),
]


@pytest.mark.parametrize("case", TRAIN_STEPS, ids=lambda c: "-".join(str(x) for x in c[:4]))
def test_train_step_lowers_for_tpu(on_tpu, case):
    """A whole sharded train step of the default experiment (tiny model, packed documents with resets)
    on a mesh of fake CPU devices."""
    arch, mode, implementation, dtype, mesh, kernels = case
    config = small_config(
        arch=arch, mode=mode, chunk_size=128, implementation=implementation, seq_len=128, mesh=mesh
    )
    if dtype is not None:
        config.model_overrides.dtype = dtype
    trainer = train.Trainer(config, train.model_config(config, 264), make_mesh(mesh, jax.devices()[:4]))
    shape = (config.batch_size, config.seq_len)
    rows = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding)
    batch = {"inputs": rows, "targets": rows, "segment_ids": rows}
    with trainer.context():
        text = _lower(trainer._train_step, trainer.abstract_state, batch)
    # Scanned layers: one block body, whose forward and backward hold the three kernels.
    calls = [line for line in text.splitlines() if MOSAIC in line]
    assert len(calls) == (3 if kernels else 0)
    for call in calls:  # on 2 of the 8 rows (batch split over data × fsdp), with the document blocks
        assert "tensor<2x128x128xi32>" in call and "tensor<2x8x128xi32>" in call
    _assert_no_gpu_op(text)


def _retnet(mode="chunkwise"):
    config = small_config(mode=mode, chunk_size=128)
    model = train.build_model(config, train.model_config(config, 264))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return model, variables


def test_decode_step_lowers_for_tpu(on_tpu):
    """One token of the recurrent form: plain XLA, no kernel."""
    model, variables = _retnet()
    state = jax.eval_shape(lambda: model.config.init_state(4))
    tokens = jax.ShapeDtypeStruct((4,), jnp.int32)
    text = _lower(jax.jit(decode_step, static_argnums=0), model, variables, tokens, state)
    assert MOSAIC not in text
    _assert_no_gpu_op(text)


def test_prefill_and_decode_lowers_for_tpu(on_tpu):
    """The jitted loop: a chunkwise prefill of 200 prompt tokens through the TPU kernel (forward only),
    then the sampled while loop of decode steps."""
    model, variables = _retnet()
    decoder = decoding.LMDecoder(model)
    draw = decoding.Sampling(
        sampler=sampling.sampler(temperature=0.7, top_k=20, top_p=0.9, vocab_size=264),
        key=jax.random.key(0),
        stops=jnp.array([0], jnp.int32),
    )
    text = _lower(
        decoding.prefill_and_decode,
        decoder,
        variables,
        jax.ShapeDtypeStruct((4, 201), jnp.int32),
        jax.ShapeDtypeStruct((4,), jnp.int32),
        jnp.int32(16),
        draw,
        max_length=217,
        spec=decoding.Spec(width=16, pad_id=0, logprobs=True),
    )
    assert text.count(MOSAIC) == 1
    assert "stablehlo.while" in text
    _assert_no_gpu_op(text)


def test_the_check_sees_gpu_kernels(monkeypatch):
    """The check itself: the GPU kernels (``"pallas"`` on a pretended GPU, lowered for CUDA) are seen."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model, variables = _retnet()
    model = model.clone(implementation="pallas", chunk_size=64)
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    text = jax.jit(model.apply).trace(variables, tokens).lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(AssertionError):
        _assert_no_gpu_op(text)


# ----------------------------------------------------------------------------------------------
# Compiled for TPU topologies without a TPU: libtpu's compile-only client (``jax.experimental.
# topologies``) runs XLA's TPU compiler and Mosaic's on the lowered programs. Needs libtpu (the [tpu]
# extra, or TPU_LIBRARY_PATH naming libtpu.so); skipped without it.

# Four chips of each generation; v4 as a megacore chip (one device of two TensorCores), as on Cloud TPU
# (v5p's default already is).
TOPOLOGIES = {"v4:2x2x1": {"chip_config_name": "megacore"}, "v5e:2x2": {}, "v5p:2x2x1": {}, "v6e:2x2": {}}


@pytest.fixture(scope="module")
def topology_devices():
    """Compile-only devices of each topology in TOPOLOGIES."""
    from jax.experimental import topologies

    try:
        return {
            name: topologies.get_topology_desc(name, "tpu", **kw).devices for name, kw in TOPOLOGIES.items()
        }
    except RuntimeError as error:  # "JAX TPU support not installed"
        pytest.skip(f"needs libtpu (pip install -e '.[tpu]', or TPU_LIBRARY_PATH=.../libtpu.so): {error}")


def _compiled_kernels(compiled) -> int:
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def _placed(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# (K, V, C, dtype, resets): the paper's head as "auto" runs it, and the largest VMEM need (float32 at
# C = 256 with resets, 16.5 MiB on v5p: DOCUMENTS_VMEM_LIMIT).
KERNEL_COMPILES = [
    (256, 512, 128, "bfloat16", False),
    (256, 512, 128, "bfloat16", True),
    (256, 512, 256, "float32", True),
]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_kernels_compile_for_tpu(topology_devices, topology):
    from jax.sharding import NamedSharding, PartitionSpec

    from retnet_jax.ops.tpu import chunk_retention

    one = NamedSharding(jax.sharding.Mesh(topology_devices[topology][:1], ("x",)), PartitionSpec())
    b, t, h = 2, 512, 2
    for key_dim, value_dim, chunk, dtype, resets in KERNEL_COMPILES:
        args = [(b, t, h, key_dim), (b, t, h, key_dim), (b, t, h, value_dim)]
        args = [jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for s in args]
        args += [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((h,), (b, h, key_dim, value_dim))]
        args += [jax.ShapeDtypeStruct((b, t), jnp.int32)] if resets else []

        def f(q, k, v, log_decay, kv, *ids, chunk=chunk):
            segment_ids = ids[0] if ids else None
            o, kv = chunk_retention.chunk_retention(
                q, k, v, log_decay, kv, chunk_size=chunk, segment_ids=segment_ids
            )
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(kv)

        compiled = jax.jit(jax.grad(f, range(5))).trace(*_placed(args, one)).lower().compile()
        assert _compiled_kernels(compiled) == 3


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_train_step_and_decode_loop_compile_for_tpu(on_tpu, topology_devices, topology):
    """The sharded train step (chunkwise through "auto": the reset kernels, bfloat16) on a (2, 2, 1) mesh
    of the topology's devices, and the prefill-and-decode loop on one of them."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from retnet_jax.training.sharding import LOGICAL_RULES

    devices = topology_devices[topology]
    config = small_config(mode="chunkwise", chunk_size=128, seq_len=128, mesh="2,2,1")
    config.model_overrides.dtype = "bfloat16"
    # Built on CPU devices (building runs a few ops), then placed on the topology's devices.
    trainer = train.Trainer(config, train.model_config(config, 264), make_mesh("2,2,1", jax.devices()[:4]))
    mesh = make_mesh("2,2,1", devices[:4])
    state_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s.spec), trainer.state_shardings)
    batch_sharding = NamedSharding(mesh, trainer.batch_sharding.spec)
    step = jax.jit(
        trainer._step, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None)
    )
    rows = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32, sharding=batch_sharding)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        trainer.abstract_state,
        state_sharding,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        lowered = step.trace(state, {"inputs": rows, "targets": rows, "segment_ids": rows}).lower()
    assert _compiled_kernels(lowered.compile()) == 3

    model, variables = _retnet()
    one = NamedSharding(jax.sharding.Mesh(devices[:1], ("x",)), PartitionSpec())
    draw = jax.eval_shape(
        lambda: decoding.Sampling(
            sampler=sampling.sampler(temperature=0.7, top_k=20, top_p=0.9, vocab_size=264),
            key=jax.random.key(0),
            stops=jnp.array([0], jnp.int32),
        )
    )
    tokens, pads, limit = (jax.ShapeDtypeStruct(s, jnp.int32) for s in ((4, 201), (4,), ()))
    lowered = decoding.prefill_and_decode.trace(
        decoding.LMDecoder(model),
        *_placed((variables, tokens, pads, limit, draw), one),
        max_length=217,
        spec=decoding.Spec(width=16, pad_id=0, logprobs=True),
    ).lower()
    assert _compiled_kernels(lowered.compile()) == 1
