"""The decoding loop's prepared variables: each layer's mixer input projections (a RetNet's q, k, v, g;
attention's q, k, v) joined into one parameter, run through one product a layer.

* the loop through the joined projection emits the tokens and log-probabilities of the loop through the
  separate ones, with XLA's products and with the few-row kernel (interpreted), with biases too;
* one prepared step makes one input product a layer instead of four (three for attention): counted as
  ``pallas_call``s with the kernel and as ``dot_general``s with XLA's products, in its jaxpr;
* ``fuse_input_projections`` is exact on the scanned stack too, and a model built with
  ``fused_projections`` initializes the joined kernel in the same shape;
* with the few-row kernel, a RetNet's and a Transformer's prepared loop emits XLA's tokens and
  log-probabilities, and its steps leave the biases, the FFN's activation and the blocks' residual adds
  to the kernels' epilogues: outside the kernels no add makes a [B, 1, D] value.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax.inference.decoding import LMDecoder
from retnet_jax.inference.generate import generate
from retnet_jax.models import DecoderLM, RetNetConfig, TransformerConfig
from retnet_jax.models.lm import fuse_input_projections
from retnet_jax.nn.projection import fuse_projections
from retnet_jax.ops.gpu import skinny
from retnet_jax.training.tokenizers import ByteTokenizer
from tests.helpers import random_variables

TINY = RetNetConfig.preset("tiny")
CONFIGS = {"retnet": TINY, "transformer": TransformerConfig.matching(TINY)}
IDS = dict(bos_id=ByteTokenizer.bos_id, pad_id=ByteTokenizer.pad_id)
PROMPTS = [[], [10, 20, 30, 40]]
NEW = 4
# The joined product computes each output column as the separate one does (the same D-long dot); float32
# logits and log-probabilities measured equal to 0 here, allowed the ~1e-6 of a different summation order.
ATOL = 1e-6
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def lms():
    """Each model with biases (random, as every parameter: zeros would hide a bias joined in the wrong
    order) and its variables."""
    out = {}
    for name, config in CONFIGS.items():
        model = DecoderLM(config.replace(use_bias=True), projections="xla")
        out[name] = model, random_variables(model, 1)
    return out


def _count(jaxpr, primitive: str) -> int:
    """Equations of ``primitive`` in a jaxpr and every jaxpr nested in it (loops, custom rules)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == primitive
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, primitive)
    return total


def _mixer(params, config=TINY):
    return params["layers_0"][config.mixer_name]


def test_generate_through_the_joined_projection_equals_the_separate_ones(lms):
    """Greedy tokens and log-probabilities of the loop through q, k, v, g in one product equal the loop's
    through four, with the few-row kernel (interpreted on the CPU). With XLA's products: the default
    loop against the stacked one in ``test_generate`` (``unstack_layers=False`` joins nothing) and the
    steps below."""
    model, variables = lms["retnet"]
    model = model.clone(projections="pallas")
    decoder = LMDecoder(model)
    assert model.config.mixer().FUSED_PROJECTION in _mixer(
        jax.eval_shape(decoder.prepare, variables)["params"]
    )
    results = [
        generate(d, variables, PROMPTS, max_new_tokens=NEW, return_logprobs=True, **IDS)
        for d in (decoder, LMDecoder(model, fuse_projections=False))
    ]
    np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
    np.testing.assert_allclose(results[0].logprobs, results[1].logprobs, atol=ATOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_prepared_step_equals_the_models_step(lms, name):
    """One step on the prepared (unstacked, joined) variables gives the logits and state of the model's
    step on its own variables; biases are joined with their kernels."""
    model, variables = lms[name]
    config = model.config
    decoder = LMDecoder(model)
    prepared = jax.jit(decoder.prepare)(variables)
    assert "bias" in _mixer(prepared["params"], config)[config.mixer().FUSED_PROJECTION]
    state = config.init_state(2, max_length=MAX_LENGTH)
    state = state._replace(position=jnp.array([0, 3], jnp.int32))
    tokens = jnp.array([5, 7], jnp.int32)
    step = jax.jit(decoder.step)
    logits, after = step(prepared, tokens, state)
    want, want_after = step(variables, tokens, state)
    np.testing.assert_allclose(logits, want, atol=ATOL)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(want_after), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("projections", "primitive"), [("pallas", "pallas_call"), ("xla", "dot_general")])
def test_a_prepared_step_makes_one_input_product_a_layer(lms, name, projections, primitive):
    """The jaxpr of one prepared step has one product for the mixer's input projections a layer instead
    of one each (4 for retention's q, k, v, g; 3 for attention's q, k, v): kernel launches under
    "pallas", XLA products under "xla". Everything else (output projection, FFN, head) is unchanged."""
    model, variables = lms[name]
    model, config = model.clone(projections=projections), model.config
    state = config.init_state(1, max_length=MAX_LENGTH)
    tokens = jnp.zeros((1,), jnp.int32)
    counts = {}
    for fuse in (True, False):
        decoder = LMDecoder(model, fuse_projections=fuse)
        prepared = jax.eval_shape(decoder.prepare, variables)  # shapes: the step is only traced
        counts[fuse] = _count(jax.make_jaxpr(decoder.step)(prepared, tokens, state).jaxpr, primitive)
    inputs = len(config.mixer().INPUT_PROJECTIONS)
    assert counts[False] - counts[True] == (inputs - 1) * config.num_layers, counts
    assert counts[True] > 0, counts


def test_joining_the_scanned_stack_is_exact_and_a_joined_model_initializes_it(lms):
    """``fuse_input_projections`` on the layer-stacked variables gives a ``fused_projections`` model the
    logits of the separate projections (full-call form: the training path's); that model's own init makes
    the joined kernel [L, D, H, 2K + 2V]."""
    model, variables = lms["retnet"]
    config, joined_model = model.config, model.clone(fused_projections=True)
    tokens = jnp.array([[1, 5, 9, 2, 7, 3]], jnp.int32)
    want = jax.jit(lambda v: model.apply(v, tokens)[0])(variables)
    got = jax.jit(lambda v: joined_model.apply(v, tokens)[0])(fuse_input_projections(config, variables))
    np.testing.assert_allclose(got, want, atol=ATOL)
    fresh = jax.eval_shape(lambda: nn.unbox(joined_model.init(jax.random.key(0), tokens)))
    mixer = fresh["params"]["layers"][config.mixer_name]
    assert set(mixer) == {"qkvg_proj", "out_proj"}
    joined = (config.num_heads, 2 * config.key_dim + 2 * config.head_value_dim)
    assert mixer["qkvg_proj"]["kernel"].shape == (config.num_layers, config.d_model, *joined)
    assert mixer["qkvg_proj"]["bias"].shape == (config.num_layers, *joined)


def test_joining_missing_projections_is_named():
    with pytest.raises(ValueError, match=r"no projection \['g_proj'\]"):
        fuse_projections({"q_proj": {"kernel": jnp.zeros((4, 2, 2))}}, ("q_proj", "g_proj"), "qg_proj")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_through_the_kernel_equals_xlas(lms, name):
    """The prepared loop with every projection through the few-row kernel (interpreted), its biases,
    activation and residual adds in the kernels' epilogues, gives the greedy tokens of XLA's products and
    their log-probabilities (float32: the epilogue's sums in another order, 1e-5)."""
    model, variables = lms[name]
    results = [
        generate(LMDecoder(model.clone(projections=p)), variables, PROMPTS, max_new_tokens=NEW,
                 return_logprobs=True, **IDS)
        for p in ("pallas", "xla")
    ]  # fmt: skip
    np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
    np.testing.assert_allclose(results[0].logprobs, results[1].logprobs, rtol=1e-5, atol=1e-5)


def _stream_adds_outside_kernels(jaxpr, width: int) -> int:
    """``add`` equations outside the kernels whose result is a float [1, 1, width] or [1, width] (a bias or
    residual add of a batch-1 step's stream), nested jaxprs included, kernels' bodies not."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        aval = eqn.outvars[0].aval
        is_float = jnp.issubdtype(getattr(aval, "dtype", jnp.int32), jnp.floating)
        total += eqn.primitive.name == "add" and is_float and aval.shape in ((1, 1, width), (1, width))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _stream_adds_outside_kernels(inner, width)
    return total


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_steps_residual_adds_are_epilogues(lms, name, monkeypatch):
    """With plans of one slice (S = 1: the kernel writes the output and applies the epilogue), a prepared
    step makes no [B, 1, D] add outside the kernels: the out_proj's and fc2's biases and both residual
    adds of every block are in their kernels' epilogues; so with kernels stored [N, D] (always one
    slice). XLA's step has them (4 a layer with biases)."""
    planned = skinny.plan

    def one_slice(*shape):
        tiles = planned(*shape)
        return tiles if isinstance(tiles, str) else tiles._replace(splits=1)

    monkeypatch.setattr(skinny, "plan", one_slice)
    model, variables = lms[name]
    config = model.config
    state = config.init_state(1, max_length=MAX_LENGTH)
    tokens = jnp.zeros((1,), jnp.int32)
    adds = {}
    for projections, transpose in (("pallas", False), ("pallas", True), ("xla", False)):
        decoder = LMDecoder(model.clone(projections=projections), transpose_kernels=transpose)
        program = jax.make_jaxpr(decoder.step)(jax.eval_shape(decoder.prepare, variables), tokens, state)
        adds[projections, transpose] = _stream_adds_outside_kernels(program.jaxpr, config.d_model)
    want = {("pallas", False): 0, ("pallas", True): 0, ("xla", False): 4 * config.num_layers}
    assert adds == want, adds
