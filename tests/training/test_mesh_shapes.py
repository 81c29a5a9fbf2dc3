"""One training step over every (data, fsdp, tensor) mesh of 8 devices equals the same step on one device.

Data parallel, FSDP, tensor parallel and their mixes, through the logical-axis rules of
``training.sharding``: the loss and the parameters after one AdamW step agree with the one-device run in
float32. RetNet trains chunkwise through the fused kernels (the Pallas interpreter on the CPU), so their
partitioning rule (``ops.gpu.partition``) runs under each mesh; the Transformer through XLA attention.

The model is one layer of ``tiny`` widened to 8 heads (K = 16, V = 32) so that every axis divides by 8:
heads, feed-forward width and vocabulary over tensor, model width over fsdp, batch rows over data × fsdp.
"""

import functools
import re

import jax
import numpy as np
import pytest

from retnet_jax.models import RetNetConfig, TransformerConfig
from retnet_jax.training import trainer as train
from retnet_jax.training.sharding import MESH_AXES, make_mesh
from tests.conftest import small_config

# Every way of writing 8 devices as data × fsdp × tensor.
MESHES = [
    (8, 1, 1),
    (1, 8, 1),
    (1, 1, 8),
    (4, 2, 1),
    (2, 4, 1),
    (4, 1, 2),
    (2, 1, 4),
    (1, 4, 2),
    (1, 2, 4),
    (2, 2, 2),
]
# The Transformer shares every rule but the mixer's: the meshes of one axis each and three mixes.
TRANSFORMER_MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 4, 1), (4, 1, 2), (2, 2, 2)]
CASES = [("retnet", s) for s in MESHES] + [("transformer", s) for s in TRANSFORMER_MESHES]
BATCH, LENGTH, CHUNK = 8, 32, 16

# Tolerances in float32 (the reductions run in another order on a mesh; nothing else differs):
# the loss, measured <= 4e-7 relative;
LOSS_RTOL = 1e-5
# the whole update (every parameter's change, as one vector), measured <= 7.4e-6 normwise;
UPDATE_RTOL = 1e-4
# each parameter's change alone: the norm scales' gradients are sums of many terms of both signs, so their
# relative rounding error is larger (measured <= 8.2e-5, 2.2e-4 with two layers; every other leaf <= 1.3e-5).
LEAF_RTOL = 1e-3


def architectures():
    # One layer: the layers are scanned, so more of them would only lengthen compilation.
    retnet = RetNetConfig.preset(
        "tiny", d_model=128, num_heads=8, value_dim=256, ffn_dim=256, vocab_size=264, num_layers=1
    )
    return {"retnet": retnet, "transformer": TransformerConfig.matching(retnet, head_dim=16)}


def experiment(arch):
    # Adam's first step is g / (|g| + eps): with the usual eps that is sign(g), which rounding flips where
    # g ≈ 0. eps = 1 makes the update a smooth function of the gradient (≈ g), so comparing parameters
    # compares gradients. No weight decay: the change is the gradient's alone. Learning rate at its peak.
    return small_config(
        mode="chunkwise",
        chunk_size=CHUNK,
        implementation="pallas" if arch == "retnet" else "xla",
        batch_size=BATCH,
        seq_len=LENGTH,
        schedule="constant",
        warmup_steps=0,
        learning_rate=1e-2,
        eps=1.0,
        weight_decay=0.0,
    )


def batch():
    rng = np.random.default_rng(0)
    return {k: rng.integers(0, 259, (BATCH, LENGTH)).astype(np.int32) for k in ("inputs", "targets")}


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


@functools.cache
def one_device(arch):
    """(initial state, loss, parameters after the step) of the step on one device."""
    trainer = train.Trainer(experiment(arch), architectures()[arch], make_mesh((1, 1, 1), jax.devices()[:1]))
    state = trainer.init(0)
    initial = to_numpy(state)
    state, metrics = trainer.train_step(state, trainer.global_batch(batch()))
    return initial, float(metrics["loss"]), to_numpy(state.params)


def updates(after, before):
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, after, before)


def norm(tree):
    return np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize(("arch", "shape"), CASES, ids=[f"{a}-{'x'.join(map(str, s))}" for a, s in CASES])
def test_one_step_on_a_mesh_equals_one_device(arch, shape):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    initial, loss, params = one_device(arch)
    trainer = train.Trainer(experiment(arch), architectures()[arch], make_mesh(shape))
    # The same initial state (the one device's), laid out as this mesh's rules say.
    state = jax.device_put(initial, trainer.state_shardings)
    inputs = trainer.global_batch(batch())

    # Every mesh axis of more than one device splits something: the rows (data) or parameters (fsdp,
    # tensor). Otherwise the comparison would not test that axis.
    used = {a for x in jax.tree.leaves(state.params) for a in jax.tree.leaves(tuple(x.sharding.spec))}
    for axis, size in zip(MESH_AXES, shape, strict=True):
        if size > 1:
            assert axis in used or axis in jax.tree.leaves(tuple(inputs["inputs"].sharding.spec)), axis
    lowered = trainer.lower_train_step(state, inputs)
    if arch == "retnet":  # the kernels run under the mesh through their partitioning rule (fwd and bwd)
        assert len(re.findall(r"custom_call @CustomSPMDPartitioning", lowered.as_text())) == 2

    state, metrics = lowered.compile()(state, inputs)
    assert abs(float(metrics["loss"]) - loss) <= LOSS_RTOL * loss
    expected = updates(params, initial.params)
    got = updates(to_numpy(state.params), initial.params)
    difference = jax.tree.map(np.subtract, got, expected)
    assert norm(difference) <= UPDATE_RTOL * norm(expected), norm(difference) / norm(expected)
    for path, d, e in zip(
        jax.tree_util.tree_leaves_with_path(difference),
        jax.tree.leaves(difference),
        jax.tree.leaves(expected),
        strict=True,
    ):
        assert np.linalg.norm(d) <= LEAF_RTOL * np.linalg.norm(e), (jax.tree_util.keystr(path[0]), shape)
