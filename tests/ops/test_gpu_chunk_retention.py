"""The fused kernels (run through the Pallas interpreter on the CPU) against the reference.

The same kernel bodies lower through Triton on a GPU (checked here down to Triton IR;
``experiments/bench_retention.py`` runs them there against a float64 reference). Here, in float32: outputs,
final states and gradients (q, k, v, log γ, the incoming state) of both kernel families (the split family
in both its variants: scores recomputed per tile, or stored once) at lengths below, at and not a multiple of
the chunk, K and V not powers of two, split into tiles; ``chunkwise`` with a
carried, left-padded state, normalized and not; bf16 inputs; the choice of path, its errors and its
fallback; a device mesh.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from retnet_jax import retention
from retnet_jax.models import RetNetConfig, RetNetLM
from retnet_jax.ops import dispatch, reference
from retnet_jax.ops.gpu import chunk_retention, common, fused, split_retention
from retnet_jax.ops.gpu import plan as plan_lib
from tests.helpers import FORM_RTOL, GRAD_RTOL, random_inputs, relative_error

# bf16 inputs against the float32 reference: the kernels round the decayed scores and the states to bf16
# before each product, as the XLA form does (both measured ≈ 4e-3 here).
BF16_RTOL = 1.5e-2

REGISTER, SPLIT = chunk_retention.Tiles, split_retention.Tiles

# (B, H, K, V, T, C, family, tiles): T below, at and not a multiple of C; K, V padded to powers of two
# (register) or to tiles (split); the state whole or in tiles; the split family's stored-scores variant
# (several key and value tiles, so that its scores passes loop) on the same shapes.
CASES = [
    (1, 2, 16, 16, 7, 16, "register", None),
    (1, 3, 32, 64, 45, 16, "register", REGISTER(key=16, value=32)),
    (2, 2, 16, 48, 37, 16, "split", SPLIT(16, 16)),
    (1, 2, 32, 64, 32, 16, "split", SPLIT(16, 32)),
    (1, 1, 24, 40, 9, 16, "split", SPLIT(16, 16)),
    (2, 2, 16, 48, 37, 16, "split", SPLIT(16, 16, stored_scores=True)),
    (1, 2, 32, 64, 32, 16, "split", SPLIT(16, 32, stored_scores=True)),
    (1, 1, 24, 40, 9, 16, "split", SPLIT(16, 16, stored_scores=True)),
]


def _ids(case):
    stored = getattr(case[7], "stored_scores", False)
    return "B{}H{}K{}V{}T{}C{}-{}".format(*case[:7]) + ("-stored" if stored else "")


@jax.jit
def _reference_outputs_and_grads(q, k, v, log_decay, h0, do, dht):
    """The reference's (o, final state) and the gradients of <o, do> + <final state, dht>, compiled once
    per shape (op by op, its gradient compiles every operation anew)."""

    def loss(q, k, v, log_decay, h0):
        o, ht = reference.retention(q, k, v, log_decay, kv=h0, normalize=False)
        return jnp.vdot(o, do) + jnp.vdot(ht, dht), (o, ht)

    (_, outputs), grads = jax.value_and_grad(loss, range(5), has_aux=True)(q, k, v, log_decay, h0)
    return outputs, grads


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernels_equal_reference(case):
    """Outputs, final state and every gradient, continuing a random state."""
    batch, heads, key_dim, value_dim, length, chunk, family, tiles = case
    rng = np.random.default_rng(length)
    q, k, v = (
        jnp.asarray(x) for x in random_inputs(rng, batch, length, heads, key_dim, value_dim, "float32")
    )
    h0 = jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32)
    do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    dht = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    log_decay = retention.log_decays(heads, "linspace")
    plan = plan_lib.make(key_dim, value_dim, chunk, jnp.float32, family=family, tiles=tiles)
    assert isinstance(plan, plan_lib.Plan) and plan.family == family and plan.tiles == (tiles or plan.tiles)

    def fused_loss(*args):
        o, ht = fused.chunk_retention(*args, plan=plan, interpret=True)
        return jnp.vdot(o, do) + jnp.vdot(ht, dht), (o, ht)

    args = (q, k, v, log_decay, h0)
    (_, got), grads = jax.jit(jax.value_and_grad(fused_loss, range(5), has_aux=True))(*args)
    want, expected = _reference_outputs_and_grads(*args, do, dht)
    for name, g, e in zip(("o", "final state"), got, want, strict=True):
        assert relative_error(g, e) < FORM_RTOL["float32"], name
    for name, g, e in zip(("dq", "dk", "dv", "dlog_decay", "dh0"), grads, expected, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"], name


@pytest.mark.parametrize("family, normalize", [("register", True), ("split", False)])
def test_chunkwise_pallas_continues_states_like_xla(family, normalize, monkeypatch):
    """implementation="pallas" with a carried state (one row left-padded) equals the XLA form: outputs,
    final states and gradients (through the row factors too). The toy heads take the register kernels;
    for "split" the register family's size limit is lowered. (The row factors are applied outside the
    kernels, the same way for both families.)"""
    if family == "split":
        monkeypatch.setattr(chunk_retention, "STATE_TILE_ENTRIES", 8)
    batch, heads, key_dim, value_dim, length = 2, 2, 16, 48, 37
    assert dispatch.kernel_plan("f", "pallas", key_dim, value_dim, 16, jnp.float32).family == family
    rng = np.random.default_rng(3)
    q, k, v = random_inputs(rng, batch, length, heads, key_dim, value_dim, "float32")
    k[1, :2] = 0.0  # the two pads of row 1 (count −2) carry no key, as the model guarantees
    kv = jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32)
    count = jnp.array([5, -2], jnp.int32)
    log_decay = retention.log_decays(heads)
    do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)

    def run(impl, incoming):
        def loss(q, k, v, kv):
            state = retention.RetentionState(kv, count) if incoming else None
            o, new = retention.chunkwise(
                q, k, v, log_decay, chunk_size=16, state=state, normalize=normalize, implementation=impl
            )
            return jnp.vdot(o, do) + jnp.sum(new.kv**2), (o, new)

        return jax.jit(jax.value_and_grad(loss, range(4), has_aux=True))(q, k, v, kv)

    for incoming in (False, True):
        (_, (o_x, s_x)), g_x = run("xla", incoming)
        (_, (o_p, s_p)), g_p = run("pallas", incoming)
        assert relative_error(o_p, o_x) < FORM_RTOL["float32"]
        assert relative_error(s_p.kv, s_x.kv) < FORM_RTOL["float32"]
        np.testing.assert_array_equal(s_p.count, s_x.count)
        for name, a, b in zip(("dq", "dk", "dv", "dkv"), g_p, g_x, strict=True):
            if incoming or name != "dkv":
                assert relative_error(a, b) < GRAD_RTOL["float32"], name


@pytest.mark.parametrize("family, stored_scores", [("register", False), ("split", False), ("split", True)])
def test_bf16_inputs_stay_close_to_float32(family, stored_scores):
    rng = np.random.default_rng(4)
    q, k, v = random_inputs(rng, 1, 96, 2, 32, 32, "float32")
    log_decay = retention.log_decays(2)
    exact = retention.parallel(q, k, v, log_decay, normalize=False)
    plan = plan_lib.make(32, 32, 32, jnp.bfloat16, family=family, stored_scores=stored_scores)
    assert getattr(plan.tiles, "stored_scores", False) == stored_scores, plan
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    o, _ = jax.jit(lambda *a: fused.chunk_retention(*a, log_decay, plan=plan, interpret=True))(*low)
    assert o.dtype == jnp.bfloat16
    assert relative_error(o, exact) < BF16_RTOL


def test_sharded_equals_unsharded():
    """Under a mesh of 8 devices (batch over 4, heads over 2) the kernels run on each shard: the same
    outputs and gradients as on one device, and no operand is gathered."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    mesh = jax.make_mesh((4, 2), ("batch", "heads"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(x) for x in random_inputs(rng, 4, 40, 2, 16, 32, "float32"))
    kv = jnp.asarray(rng.standard_normal((4, 2, 16, 32)), jnp.float32)
    log_decay = retention.log_decays(2)

    def loss(q, k, v, kv):
        state = retention.RetentionState(kv, jnp.full((4,), 3, jnp.int32))
        o, new = retention.chunkwise(q, k, v, log_decay, chunk_size=16, state=state, implementation="pallas")
        return jnp.sum(o**2) + jnp.sum(new.kv), o

    step = jax.jit(jax.value_and_grad(loss, range(4), has_aux=True))
    (_, o), grads = step(q, k, v, kv)
    seq, state = PartitionSpec("batch", None, "heads"), PartitionSpec("batch", "heads")
    with jax.set_mesh(mesh):
        put = [
            jax.device_put(x, NamedSharding(mesh, s))
            for x, s in zip((q, k, v, kv), (seq, seq, seq, state), strict=True)
        ]
        hlo = step.lower(*put).compile().as_text()
        (_, o_sharded), grads_sharded = step(*put)
    assert "all-gather" not in hlo
    assert tuple(o_sharded.sharding.spec)[:3] == tuple(seq)
    assert relative_error(o_sharded, o) < FORM_RTOL["float32"]
    for g, e in zip(grads_sharded, grads, strict=True):
        assert relative_error(g, e) < GRAD_RTOL["float32"]


def test_model_with_pallas_retention_equals_xla():
    config = RetNetConfig.preset("tiny")
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, config.vocab_size)
    model = RetNetLM(config, mode="chunkwise", chunk_size=16)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    logits = {}
    for impl in ("xla", "pallas"):  # ("auto" is XLA off the GPU: test_auto_follows_the_table)
        model = RetNetLM(config, mode="chunkwise", chunk_size=16, implementation=impl)
        logits[impl], _ = jax.jit(model.apply)(variables, tokens)
    assert relative_error(logits["pallas"], logits["xla"]) < 1e-5


def test_kernels_lower_to_triton_for_preset_heads():
    """Forward and backward of both families lower through Pallas's Triton backend (to Triton IR, on the
    CPU) at preset heads: paper (K256, V512; the split family's stored-scores variant), torchscale v2
    (V432: padded), fla (K = V = 128: two column tiles a head), K = V = 64 (the whole state), bf16."""
    for heads, key_dim, value_dim, family, stored in (
        (8, 256, 432, "split", False),
        (8, 256, 512, "split", True),
        (4, 128, 128, "register", False),
        (4, 64, 64, "register", False),
    ):
        plan = plan_lib.make(key_dim, value_dim, 64, jnp.bfloat16, stored_scores=stored)
        assert plan.family == family and (family == "register" or plan.tiles.stored_scores == stored), plan
        q = jnp.zeros((1, 100, heads, key_dim), jnp.bfloat16)
        v = jnp.zeros((1, 100, heads, value_dim), jnp.bfloat16)
        h0 = jnp.zeros((1, heads, key_dim, value_dim), jnp.float32)

        def loss(q, k, v, log_decay, h0, plan=plan):
            o, ht = fused.chunk_retention(q, k, v, log_decay, h0, plan=plan)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)

        grad = jax.jit(jax.grad(loss, range(5)))
        text = (
            grad.trace(q, q, v, retention.log_decays(heads), h0).lower(lowering_platforms=("cuda",)).as_text()
        )
        assert "__gpu$xla.gpu.triton" in text


def test_plans_fit_shared_memory():
    """Every plan's estimate fits one program's shared memory; the estimate refuses what failed on an
    H100 (the register forward at 3 stages in float32 at the small preset's K = 64, V = 128, C = 64; the
    dk-dv pass at 3 stages, K = V = 128, bf16)."""
    small = plan_lib.make(64, 128, 64, jnp.float32)
    assert small.family == "register" and small.tiles.num_stages < 3
    over = plan_lib.make(64, 128, 64, jnp.float32, tiles=REGISTER(64, 128, num_stages=3))
    assert "shared memory" in over
    over = plan_lib.make(128, 128, 64, jnp.bfloat16, tiles=REGISTER(128, 128, backward_stages=3))
    assert "dkdv kernel" in over
    for key_dim, value_dim in ((64, 64), (64, 128), (128, 128), (256, 512), (256, 432), (256, 428)):
        for dtype in (jnp.bfloat16, jnp.float32):
            plan = plan_lib.make(key_dim, value_dim, 64, dtype)
            sizes = plan_lib.shared_memory(plan, key_dim, value_dim, dtype)
            assert max(sizes.values()) <= common.SHARED_MEMORY_BYTES, (key_dim, value_dim, dtype, plan)


def test_register_tiles_hold_at_most_64_by_128_state_entries_on_4_warps():
    """The register family's default tiles: the whole state up to 64·128 entries, else column tiles that
    fit (K = V = 128: two of 64 columns, measured faster than the whole state on the H200), all on 4 warps;
    the planner runs them as such (no fused dk-dv pass for a split state)."""
    cases = {  # (K, V): (key tile, value tile)
        (64, 64): (64, 64),
        (32, 64): (32, 64),
        (16, 16): (16, 16),
        (64, 128): (64, 128),
        (128, 64): (128, 64),
        (128, 16): (128, 16),
        (128, 128): (64, 64),
    }
    for (key_dim, value_dim), (key, value) in cases.items():
        plan = plan_lib.make(key_dim, value_dim, 64, jnp.bfloat16)
        assert plan.family == "register", plan
        assert (plan.tiles.key, plan.tiles.value, plan.tiles.num_warps) == (key, value, 4), plan
        assert key * value_dim <= chunk_retention.PROGRAM_TILE_ENTRIES
        assert key_dim * value <= chunk_retention.PROGRAM_TILE_ENTRIES
    split_state = plan_lib.shared_memory(plan_lib.make(128, 128, 64, jnp.bfloat16), 128, 128, jnp.bfloat16)
    assert {"dk", "dv"} <= set(split_state) and "dkdv" not in split_state


def test_stored_scores_plans_cover_their_kernels():
    """The split family's stored-scores variant is a plan of its own: its estimate covers the scores
    passes (which the recomputing variant lacks) and the lighter chunk passes, the planner fits it to
    shared memory (lowering stages, then tiles) or refuses it, and the register family has no such
    variant."""
    recompute = plan_lib.make(256, 512, 64, jnp.bfloat16, family="split", stored_scores=False)
    stored = plan_lib.make(256, 512, 64, jnp.bfloat16, stored_scores=True)
    assert stored.family == "split" and stored.tiles == recompute.tiles._replace(stored_scores=True)
    sizes = plan_lib.shared_memory(stored, 256, 512, jnp.bfloat16)
    before = plan_lib.shared_memory(recompute, 256, 512, jnp.bfloat16)
    assert {"scores", "dscores"} <= set(sizes) and not {"scores", "dscores"} & set(before)
    for name in ("output", "dv"):  # no key loads for the scores any more
        assert sizes[name] < before[name], name
    for chunk in (16, 64, 128):
        for dtype in (jnp.bfloat16, jnp.float32):
            plan = plan_lib.make(256, 512, chunk, dtype, stored_scores=True)
            assert plan.tiles.stored_scores, plan
            assert max(plan_lib.shared_memory(plan, 256, 512, dtype).values()) <= common.SHARED_MEMORY_BYTES
    # C = 128 in float32: a 128-wide key tile at 4 stages loads 4·2·128·128 floats in the scores pass.
    over = plan_lib.make(256, 512, 128, jnp.float32, tiles=SPLIT(128, 16, num_stages=4, stored_scores=True))
    assert "scores kernel" in over
    assert "register family" in plan_lib.make(64, 64, 64, jnp.bfloat16, family="register", stored_scores=True)


def test_auto_follows_the_table():
    def plan(key_dim, value_dim, dtype=jnp.bfloat16, backend="gpu"):
        return dispatch.kernel_plan("f", "auto", key_dim, value_dim, 512, dtype, backend=backend)

    assert plan(128, 128) == plan_lib.make(128, 128, 64, jnp.bfloat16)
    assert plan(64, 128).family == "register"
    for key_dim, value_dim in dispatch.AUTO_CHOICES:
        choice = dispatch.AUTO_CHOICES[(key_dim, value_dim)]
        assert (plan(key_dim, value_dim) is not None) == (choice.implementation == "pallas")
    assert plan(128, 128, jnp.float32) is None  # float32 keeps XLA
    assert plan(128, 128, backend="cpu") is None and plan(128, 128, backend="tpu") is None


def test_auto_sends_few_programs_to_the_split_kernels():
    """The register kernels run one program per (batch row, head, column tile): below
    MIN_REGISTER_PROGRAMS of them "auto" takes the split kernels (K = V = 128 has two tiles a head, so
    half the rows of K = V = 64 fill them); the paper's heads take them anyway; a forced "pallas" plans
    by shape."""

    def plan(key_dim, value_dim, rows, implementation="auto"):
        return dispatch.kernel_plan("f", implementation, key_dim, value_dim, 64, jnp.bfloat16, "gpu", rows)

    enough = plan_lib.MIN_REGISTER_PROGRAMS
    assert plan(64, 64, enough - 1).family == "split" and plan(64, 64, enough).family == "register"
    assert plan(128, 128, enough // 2 - 1).family == "split"
    assert plan(128, 128, enough // 2).family == "register"
    assert plan(128, 128, None).family == "register"  # rows unknown: by shape
    assert plan(256, 512, 1).family == "split" and plan(256, 512, enough).family == "split"
    assert plan(128, 128, 1, "pallas").family == "register"
    # Scores stored where V spans 4+ value tiles (measured faster there, slower at 2 tiles).
    assert plan(256, 512, enough).tiles.stored_scores and plan(256, 432, enough).tiles.stored_scores
    assert not plan(128, 128, 1).tiles.stored_scores


def test_without_the_triton_backend_auto_warns_once_and_uses_xla(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "jax.experimental.pallas.triton", None)
    monkeypatch.setattr(dispatch, "_warned_missing_backend", set())
    common.triton_unavailable.cache_clear()
    try:
        assert "no Pallas Triton backend" in common.triton_unavailable()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert dispatch.kernel_plan("f", "auto", 128, 128, 64, jnp.bfloat16, backend="gpu") is None
        assert len(caught) == 1 and "using the XLA form" in str(caught[0].message)
        with pytest.raises(ValueError, match="no Pallas Triton backend.*implementation='xla'"):
            dispatch.kernel_plan("f", "pallas", 128, 128, 64, jnp.bfloat16, backend="gpu")
        # The interpreter needs no Triton: the CPU still runs the kernels.
        assert dispatch.kernel_plan("f", "pallas", 128, 128, 64, jnp.bfloat16, backend="cpu") is not None
    finally:
        common.triton_unavailable.cache_clear()


def test_what_the_kernels_cannot_run_is_an_error():
    q = jnp.zeros((1, 8, 2, 24), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    log_decay = retention.log_decays(2)
    with pytest.raises(ValueError, match="dtype float64.*implementation='xla'"):
        dispatch.kernel_plan("chunkwise", "pallas", 24, 24, 16, jnp.float64)
    with pytest.raises(ValueError, match="on tpu.*implementation='xla'"):
        dispatch.kernel_plan("chunkwise", "pallas", 24, 24, 16, jnp.bfloat16, backend="tpu")
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        retention.chunkwise(q, q, q, log_decay, chunk_size=16, implementation="triton")
    assert "chunk_size = 12" in plan_lib.make(16, 16, 12, jnp.float32)
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        model = RetNetLM(RetNetConfig.preset("tiny"), mode="chunkwise", implementation="cuda")
        jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    # Any chunk size runs: the kernels take the nearest power of two in [16, 128].
    assert [dispatch.kernel_chunk(c) for c in (1, 16, 24, 64, 512)] == [16, 16, 16, 64, 128]
    o, _ = retention.chunkwise(q, q, q, log_decay, chunk_size=5, implementation="pallas")
    assert o.shape == q.shape
