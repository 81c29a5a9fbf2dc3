"""The decoding loop's prepared kernels stored transposed (``LMDecoder(transpose_kernels=...)``: [N, D],
read by ``ops.gpu.skinny_nd``), against the same loop on [D, N] kernels.

* tokens and log-probabilities of the loop through the few-row kernel (interpreted) and through XLA's
  products are those of [D, N] kernels: float32, RetNet and Transformer with biases (the kernels sum in
  another order: 1e-5; XLA's products of the same operands: 1e-6);
* in bfloat16, one step's logits within 2^-5 of the largest (a few roundings of 2^-8 through two layers);
* off by default (measured slower); where preferred, on exactly where the projections may run the
  kernel; the model's own parameters (init, checkpoints) never hold a transposed kernel, and a prepared
  one of the wrong shape is named;
* a one-row step of paper-1.3b's layer shapes through the kernel sums no partials: the [D, N] plans split
  D in qkvg, out, fc1 and fc2 (4 sums of partials a layer), the [N, D] kernels none.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.inference.decoding import LMDecoder
from retnet_jax.inference.generate import generate
from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig
from retnet_jax.nn.projection import TRANSPOSED_KERNEL
from retnet_jax.ops import products
from retnet_jax.training.tokenizers import ByteTokenizer
from tests.helpers import random_variables

TINY = RetNetConfig.preset("tiny").replace(use_bias=True)
CONFIGS = {"retnet": TINY, "transformer": TransformerConfig.matching(TINY)}
IDS = dict(bos_id=ByteTokenizer.bos_id, pad_id=ByteTokenizer.pad_id)
PROMPTS = [[], [10, 20, 30, 40]]
NEW = 4
TOLERANCE = {"pallas": 1e-5, "xla": 1e-6}
BF16_TOLERANCE = 2**-5


def _model(config, projections="pallas", seed=1):
    """The model and its variables, every parameter random (zero biases would hide a misplaced one)."""
    model = DecoderLM(config, projections=projections)
    return model, random_variables(model, seed)


@pytest.fixture(scope="module")
def lms():
    return {name: _model(config) for name, config in CONFIGS.items()}


# XLA's products on transposed kernels once (the projections' code is the architectures' common part)
@pytest.mark.parametrize(
    ("name", "projections"), [("retnet", "pallas"), ("transformer", "pallas"), ("retnet", "xla")]
)
def test_generate_with_transposed_kernels_equals_without(lms, name, projections):
    model, variables = lms[name]
    model = model.clone(projections=projections)
    results = [
        generate(LMDecoder(model, transpose_kernels=t), variables, PROMPTS, max_new_tokens=NEW,
                 return_logprobs=True, **IDS)
        for t in (True, False)
    ]  # fmt: skip
    np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
    tol = TOLERANCE[projections]
    np.testing.assert_allclose(results[0].logprobs, results[1].logprobs, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["retnet"])  # the Transformer's projections are the same modules
def test_a_bfloat16_step_with_transposed_kernels_equals_without(name):
    config = CONFIGS[name].replace(dtype="bfloat16", param_dtype="bfloat16")
    model, variables = _model(config)
    state = config.init_state(2, max_length=16)
    state = state._replace(position=jnp.array([0, 3], jnp.int32))
    tokens = jnp.array([5, 7], jnp.int32)
    logits = []
    for transpose in (True, False):
        decoder = LMDecoder(model, transpose_kernels=transpose)
        logits.append(jax.jit(decoder.step)(jax.jit(decoder.prepare)(variables), tokens, state)[0])
    scale = np.abs(np.asarray(logits[1])).max()
    assert np.abs(np.asarray(logits[0]) - np.asarray(logits[1])).max() <= BF16_TOLERANCE * scale


def _has_transposed(tree) -> bool:
    return TRANSPOSED_KERNEL in str(jax.tree_util.tree_structure(tree))


def test_off_by_default_as_measured(lms):
    """[N, D] measured slower than [D, N] in the decoding loop (products.PREFER_TRANSPOSED): the default
    keeps [D, N] wherever the kernel runs; True still transposes."""
    model, variables = lms["retnet"]
    assert not products.PREFER_TRANSPOSED
    assert not LMDecoder(model).transposes_kernels and not LMDecoder(model).transposes_for(1)  # "pallas"
    assert not _has_transposed(LMDecoder(model).prepare(variables)["params"])
    assert _has_transposed(LMDecoder(model, transpose_kernels=True).prepare(variables)["params"])


def test_on_where_the_kernel_may_run_and_only_in_the_prepared_variables(lms, monkeypatch):
    monkeypatch.setattr(products, "PREFER_TRANSPOSED", True)
    model, variables = lms["retnet"]
    assert LMDecoder(model).transposes_kernels  # "pallas"
    assert not LMDecoder(model.clone(projections="xla")).transposes_kernels
    assert not LMDecoder(model.clone(projections="auto")).transposes_kernels  # a CPU
    assert LMDecoder(model).transposes_for(16) and not LMDecoder(model).transposes_for(17)  # a matmul: XLA's

    prepared = jax.eval_shape(LMDecoder(model).prepare, variables)["params"]  # shapes: nothing compiled
    layers = {k: v for k, v in prepared.items() if k.startswith("layers_")}
    assert len(layers) == TINY.num_layers and _has_transposed(layers)
    assert "'kernel'" not in str(jax.tree_util.tree_structure(layers))  # every block's kernel transposed
    mixer = layers["layers_0"][TINY.mixer_name]
    joined = (TINY.num_heads, 2 * TINY.key_dim + 2 * TINY.head_value_dim)
    assert mixer["qkvg_proj"][TRANSPOSED_KERNEL].shape == (*joined, TINY.d_model)
    assert mixer["out_proj"][TRANSPOSED_KERNEL].shape == (TINY.d_model, TINY.num_heads, TINY.head_value_dim)
    assert not _has_transposed(variables)  # the caller's variables are untouched
    assert not _has_transposed(
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    )
    assert not _has_transposed(jax.eval_shape(LMDecoder(model, unstack_layers=False).prepare, variables))


def test_a_transposed_kernel_of_the_wrong_shape_is_named(lms):
    model, variables = lms["retnet"]
    decoder = LMDecoder(model, transpose_kernels=False)
    prepared = jax.eval_shape(decoder.prepare, variables)  # shapes: the step is refused while traced
    block = prepared["params"]["layers_0"]["ffn"]
    fc1 = dict(block["fc1"])
    fc1[TRANSPOSED_KERNEL] = fc1.pop("kernel")  # [D, F] where [F, D] is wanted
    params = {
        **prepared["params"],
        "layers_0": {**prepared["params"]["layers_0"], "ffn": {**block, "fc1": fc1}},
    }
    state = TINY.init_state(1, max_length=16)
    with pytest.raises(ValueError, match=r"fc1: kernel_transposed has shape \(64, 128\).*\(128, 64\)"):
        jax.eval_shape(decoder.step, {**prepared, "params": params}, jnp.zeros((1,), jnp.int32), state)


def _partial_sums(jaxpr) -> int:
    """``reduce_sum``s of a kernel's output (the sum of a split product's partials), nested jaxprs
    included."""
    total, made = 0, set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            made.update(id(v) for v in eqn.outvars)
        total += eqn.primitive.name == "reduce_sum" and id(eqn.invars[0]) in made
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _partial_sums(inner)
    return total


def test_a_one_row_step_sums_no_partials():
    """paper-1.3b's layers (2 of them; traced only, abstract weights): with [D, N] kernels the default
    plans split D (qkvg S = 4, out and fc2 S = 32, fc1 S = 16) and XLA sums the partials after each; with
    [N, D] kernels no product has partials. The head (not transposed) may sum its own either way."""
    config = RetNetConfig.preset("paper-1.3b").replace(num_layers=2, vocab_size=512)
    model = DecoderLM(config, projections="pallas")
    variables = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    state = config.init_state(1, max_length=16)
    tokens = jnp.zeros((1,), jnp.int32)
    sums = {}
    for transpose in (True, False):
        decoder = LMDecoder(model, transpose_kernels=transpose)
        program = jax.make_jaxpr(lambda v, s, d=decoder: d.step(d.prepare(v), tokens, s))(variables, state)
        sums[transpose] = _partial_sums(program.jaxpr)
    assert sums[False] - sums[True] == 4 * config.num_layers, sums
    assert sums[True] <= 1, sums  # the head's


def test_auto_transposes_only_for_the_rows_it_runs_the_kernel_at(lms, monkeypatch):
    """On one GPU "auto" runs the kernel for one row (products.AUTO_MAX_ROWS): a loop of one row gets
    transposed kernels, a batch that XLA's products serve keeps [D, N]."""
    model, _ = lms["retnet"]
    monkeypatch.setattr(products, "PREFER_TRANSPOSED", True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(products.common, "triton_unavailable", lambda: None)
    decoder = LMDecoder(model.clone(projections="auto"))
    assert decoder.transposes_for(1) and not decoder.transposes_for(8)
    monkeypatch.setattr(products, "AUTO_MAX_ROWS", 0)
    assert not decoder.transposes_for(1)
