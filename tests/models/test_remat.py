"""Remat policies (``nn.remat``) for both LMs: every policy computes the same gradients, and each keeps
what it says, read off the backward program (the primitives the gradient's jaxpr runs):

* "full" reruns each block's projections and its retention kernel's forward;
* "projections" reruns no input projection (fewer matmuls than "full"), but still the kernel's forward;
* "mixer" reruns neither: as many matmuls and kernel launches as no remat at all.

The fused GPU kernels run through the Pallas interpreter on the CPU; the TPU kernels and jax's cuDNN
attention are traced (not run) as on their devices.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig
from retnet_jax.nn import remat as remat_lib
from tests.helpers import GRAD_RTOL, relative_error

RETNET = RetNetConfig.preset("tiny")  # D 64, H 2, K 32, V 64, GLU F 128, L 2
TRANSFORMER = TransformerConfig.matching(RETNET)
# The fused kernels take C in [16, 128]; two chunks per row.
KERNELS = dict(mode="chunkwise", chunk_size=16, implementation="pallas")
RUNS = {
    "retnet-kernels": (RETNET, KERNELS),
    "retnet-xla": (RETNET, dict(mode="chunkwise", chunk_size=8, implementation="xla")),
    "transformer": (TRANSFORMER, dict(implementation="xla")),
}
TOKENS = jax.random.randint(jax.random.key(0), (2, 32), 0, RETNET.vocab_size)


def _loss(model):
    return lambda variables: jnp.mean(model.apply(variables, TOKENS)[0] ** 2)


def _variables(config):
    return jax.jit(DecoderLM(config).init)(jax.random.key(1), TOKENS)


def _backward_program(config, remat, tokens=TOKENS, **run_options):
    """Primitive counts of the gradient's jaxpr, sub-jaxprs included (the scanned block counted once), but
    not inside a kernel (a ``pallas_call`` counts as one launch)."""
    model = DecoderLM(config, remat=remat, **run_options)
    shapes = jax.eval_shape(model.init, jax.random.key(1), tokens)
    counts = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            if eqn.primitive.name == "pallas_call":
                continue
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    loss = lambda variables: jnp.mean(model.apply(variables, tokens)[0] ** 2)
    program = jax.make_jaxpr(jax.grad(loss))(shapes).jaxpr
    walk(program)
    # What the forward layer scan hands the backward one: the activations kept, stacked over layers.
    forward = next(eqn for eqn in program.eqns if eqn.primitive.name == "scan")
    kept = forward.outvars[forward.params["num_carry"] :]
    counts["kept_bytes"] = sum(math.prod(x.aval.shape) * x.aval.dtype.itemsize for x in kept)
    return counts


@pytest.mark.parametrize("run", RUNS)
def test_every_policy_computes_the_same_gradients(run):
    config, options = RUNS[run]
    variables = _variables(config)
    gradients = lambda model: jax.jit(jax.value_and_grad(_loss(model)))(variables)
    reference_loss, reference = gradients(DecoderLM(config, **options))
    for remat in ("projections", "mixer"):  # "full": tests/models/test_lm.py
        loss, grads = gradients(DecoderLM(config, remat=remat, **options))
        assert abs(float(loss - reference_loss)) <= 1e-6 * abs(float(reference_loss)), remat
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
            assert relative_error(a, b) < GRAD_RTOL["float32"], remat


def test_each_policy_keeps_what_it_says_with_the_kernels():
    programs = {remat: _backward_program(RETNET, remat, **KERNELS) for remat in remat_lib.POLICIES}
    launches = {remat: p["pallas_call"] for remat, p in programs.items()}
    matmuls = {remat: p["dot_general"] for remat, p in programs.items()}
    # One forward kernel and two backward ones per block without remat; "full" and "projections" rerun
    # the forward kernel for the backward, "mixer" keeps its output and final state.
    assert launches["mixer"] == launches["none"], launches
    assert launches["full"] == launches["projections"] == launches["none"] + 1, launches
    # The projections kept: fewer matmuls rerun. Everything kept: none rerun.
    assert matmuls["none"] == matmuls["mixer"] < matmuls["projections"] < matmuls["full"], matmuls
    # Exactly what each policy says it keeps, per layer and token (float32 here): the block's input;
    # q, k, v, g, the FFN's fc1 and gate; then retention's output, the mixer's output and the final state.
    c, (batch, length) = RETNET, TOKENS.shape
    tokens = c.num_layers * batch * length
    projections = 2 * c.num_heads * c.key_dim + 2 * c.value_dim + 2 * c.ffn_dim
    state = c.num_layers * batch * c.num_heads * c.key_dim * c.head_value_dim
    kept = {remat: p["kept_bytes"] for remat, p in programs.items()}
    assert kept["full"] == 4 * tokens * c.d_model, kept
    assert kept["projections"] == kept["full"] + 4 * tokens * projections, kept
    assert kept["mixer"] == kept["projections"] + 4 * (tokens * (c.value_dim + c.d_model) + state), kept
    assert kept["mixer"] < kept["none"], kept


def test_each_policy_keeps_what_it_says_with_the_tpu_kernels(monkeypatch):
    # Traced as a TPU run traces it (the Mosaic kernels, not their interpreter, which remat cannot take).
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    tokens = jnp.zeros((2, 128), jnp.int32)
    options = dict(mode="chunkwise", chunk_size=128, implementation="pallas_tpu")
    config = RETNET.replace(dtype="bfloat16")
    launches = {r: _backward_program(config, r, tokens, **options)["pallas_call"] for r in remat_lib.POLICIES}
    assert launches["mixer"] == launches["none"], launches
    assert launches["full"] == launches["projections"] == launches["none"] + 1, launches


def test_mixer_keeps_the_cudnn_attention_forward(monkeypatch):
    # jax's cuDNN attention checks the GPU while tracing; its checks are stubbed so that the CPU traces
    # the program a GPU gets. "mixer" keeps its forward's outputs by primitive (they carry no name).
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    stubs = dict(
        check_cudnn_version=lambda: 91000,
        check_is_flash_attention=lambda *args, **kwargs: None,
        check_compute_capability=lambda capability: True,
        is_cuda_compute_capability_equal=lambda capability: False,
    )
    if not all(hasattr(cudnn, name) for name in stubs):
        pytest.skip("this jax's cuDNN attention checks differ")
    for name, stub in stubs.items():
        monkeypatch.setattr(cudnn, name, stub)
    config = TRANSFORMER.replace(dtype="bfloat16")
    forward = "dot_product_attention_fwd_wrapper"
    launches = {
        r: _backward_program(config, r, implementation="cudnn").get(forward, 0) for r in remat_lib.POLICIES
    }
    assert launches["none"] == launches["mixer"] == 1, launches
    assert launches["full"] == launches["projections"] == 2, launches


@pytest.mark.parametrize("run", ["retnet-xla", "transformer"])
def test_each_policy_keeps_what_it_says_with_xla(run):
    # The XLA forms of retention and attention rerun their own inner products for their backward under
    # any remat policy; the projections and the out projection are kept all the same.
    config, options = RUNS[run]
    matmuls = {r: _backward_program(config, r, **options)["dot_general"] for r in remat_lib.POLICIES}
    assert matmuls["none"] < matmuls["mixer"] < matmuls["projections"] < matmuls["full"], matmuls


def test_remat_takes_the_policy_names_and_booleans():
    assert [remat_lib.resolve(x) for x in (True, False, "projections")] == ["full", "none", "projections"]
    assert remat_lib.policy("full") is None
    with pytest.raises(ValueError, match=r"DecoderLM: remat must be one of \('none', 'full'"):
        DecoderLM(RETNET, remat="everything")
    with pytest.raises(ValueError, match="remat must be one of"):
        DecoderLM(TRANSFORMER, remat=1)  # an int is not a bool
