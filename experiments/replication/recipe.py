"""Every number of the replication study: model sizes, the training recipe, token budgets, the MQAR set-up.

Language models: the paper's architecture scaled down (GELU MLP with F = 2D, LayerNorm, a per-head
LayerNorm, value width 2D: 12·D² weights a layer), with heads of K = 64 and V = 128 — the shape the
fused chunkwise kernels prefer — so that H = D / 64 heads give decays from 1 − 2⁻⁵ to 1 − 2^−(4+H)
(a longest memory of 2^(4+H) tokens, past the training length at every size). The Transformer is
``TransformerConfig.matching`` of each: the same D, L, norms and embeddings, a GELU MLP of F = 4D
(attention's 4·D² weights plus 8·D² of MLP), heads of 128; the two differ in the token mixer alone.

| size | D | L | RetNet H | Transformer H | non-embedding parameters | peak LR |
|---|---|---|---|---|---|---|
| s | 384 | 8 | 6 | 3 | 14.2M | 1e-3 |
| m | 640 | 10 | 10 | 5 | 49.2M | 1e-3 |
| l | 1024 | 10 | 16 | 8 | 125.8M | 6e-4 |

Recipe (both architectures alike): AdamW β = (0.9, 0.98), ε = 1e-8, weight decay 0.05 on matrices,
global-norm clipping at 2.0, linear warm-up over 5% of the steps then linear decay to 10% of the peak;
no dropout (no run sees its data more than ``MAX_EPOCHS`` = 4 times); bf16 compute with float32
parameters and optimizer state; chunkwise retention (C = 64); batches of 64 rows of 1024 tokens; a
byte-level BPE of 8192 entries; the same seed and so the same data order for both architectures.

Token budget of a size: the tokens that the slower of the two architectures trains in
``train_seconds``, capped at ``tokens_per_param`` × its non-embedding parameters and at ``MAX_EPOCHS``
passes over the training split; both architectures then train on exactly that many tokens. The cap
that binds is recorded as ``limited_by`` ("time", "tokens_per_param" or "epochs"). The throughput
comes from a calibration run on the device (``--part=calibrate``), else from the FLOP count at an
assumed utilization (``--mfu`` of ``--peak_tflops``: 40% of the 790 TFLOP/s that a bf16 matrix product
reaches on an H200).

Why at most 4 epochs (``MAX_EPOCHS``): the corpus is small (94M training tokens of the 8192-entry BPE,
from one machine's site-packages) and the recipe has no dropout, so a run that loops over it many times
measures how well an architecture memorises the training packages, not how well it learns code; up to
about four passes, repeated tokens still help a model nearly as much as new ones would, and far past
that they stop helping and the validation loss turns up. 20 tokens per parameter takes 3 passes at s
(284M tokens) but would take 10 at m and 27 at l: there the cap binds, unless the device time (one
call of 10 minutes a run) binds first, as the H200 estimate has it.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from retnet_jax.configs.default import get_config
from retnet_jax.models.config import ModelConfig, RetNetConfig, TransformerConfig

ARCHS = ("retnet", "transformer")


@dataclasses.dataclass(frozen=True)
class LMSize:
    """One language-model size and how its run is measured."""

    d_model: int  # D
    num_layers: int  # L
    num_heads: int  # RetNet heads (K = D / H); the Transformer takes heads of 128
    learning_rate: float  # peak
    batch_size: int = 64  # rows a step
    seq_len: int = 1024  # T: tokens a row
    dtype: str = "bfloat16"  # compute dtype (parameters and optimizer state stay float32)
    evaluations: int = 12  # validation points a run
    eval_batches: int = 8  # validation batches each point averages
    extrapolation_rows: int = 32  # validation documents of >= 4T tokens for the loss by position
    decode_batches: tuple[int, ...] = (64,)  # one shape: each batch size costs a compilation (~14 s on H200)
    decode_prompt: int = 128  # prompt tokens of the decoding measurement
    decode_tokens: int = 256  # tokens generated
    calibration_s: float = 20.0  # seconds --part=calibrate times the training loop after its first step
    calibration_steps: int = 10_000  # and at most this many steps
    fixed_steps: int = 0  # steps of a run regardless of the budget (0: from the budget)

    @property
    def step_tokens(self) -> int:
        return self.batch_size * self.seq_len


LM_SIZES = {
    "s": LMSize(d_model=384, num_layers=8, num_heads=6, learning_rate=1e-3),
    "m": LMSize(d_model=640, num_layers=10, num_heads=10, learning_rate=1e-3),
    "l": LMSize(d_model=1024, num_layers=10, num_heads=16, learning_rate=6e-4),
    # The whole pipeline on a CPU in seconds (tests).
    "smoke": LMSize(
        d_model=64,
        num_layers=2,
        num_heads=2,
        learning_rate=3e-3,
        batch_size=4,
        seq_len=32,
        dtype="float32",
        evaluations=2,
        eval_batches=1,
        extrapolation_rows=2,
        decode_batches=(2,),
        decode_prompt=8,
        decode_tokens=4,
        calibration_s=0.0,
        calibration_steps=3,
        fixed_steps=6,
    ),
}

# RetNet with the base size's width and depth but fewer, wider heads: K = 128, V = 256 (H = D / 128), nearer
# the paper's K = 256 (which D = 384 and 640 do not divide), against the base size's Transformer. The
# paper's decay schedule ties memory to the head count, so the widest memory shrinks with H too
# (2^(4+H) tokens: 128 at s-k128, 512 at m-k128): the ablation measures the paper's architecture at
# these widths, not the head width alone.
HEAD_ABLATIONS = {"s-k128": "s", "m-k128": "m"}
LM_SIZES["s-k128"] = dataclasses.replace(LM_SIZES["s"], num_heads=3)
LM_SIZES["m-k128"] = dataclasses.replace(LM_SIZES["m"], num_heads=5)

# The base size at other peak learning rates (the study shares one rate per size between the two
# architectures, tuned for neither): both architectures, each compared with the other at the same rate.
LR_ABLATIONS = {"s-lr3e-4": "s", "s-lr3e-3": "s", "m-lr3e-4": "m", "m-lr3e-3": "m"}
for _name, _base in LR_ABLATIONS.items():
    LM_SIZES[_name] = dataclasses.replace(LM_SIZES[_base], learning_rate=float(_name.split("-lr")[1]))

ABLATIONS = {**HEAD_ABLATIONS, **LR_ABLATIONS}  # variant → base size


def base_size(name: str) -> str:
    """The size whose calibration (and panels) a size shares: itself, or an ablation's base."""
    return ABLATIONS.get(name, name)


def check_arch_for_size(arch: str, size_name: str) -> None:
    """A head ablation is a RetNet run; its Transformer is the base size's (the same model)."""
    if size_name in HEAD_ABLATIONS and arch != "retnet":
        raise ValueError(
            f"--size={size_name} changes RetNet's heads only; its Transformer is size "
            f"{HEAD_ABLATIONS[size_name]}'s. Use --arch=retnet with it."
        )


# Training tokens of every language-model run, whatever its size, as in the paper's comparison across sizes
# (all on the same tokens): 1526 steps of 64 × 1024. What the largest size's slower architecture trains in
# one device call of 10 minutes on an H200 (l's RetNet at the 271,738 tokens/s that --part=calibrate
# measured on 2026-12-02: ~368 s, ~480 s with start-up, set-up and measurements; schedule's 10% margin
# included, 517 s of the call's 560). ``--tokens=0`` gives each size instead what its slower architecture
# trains in ``--train_seconds``.
STUDY_TOKENS = 1526 * 64 * 1024

MAX_EPOCHS = 4  # passes over the training split a run may make (see the module docstring)
WARMUP_FRACTION = 0.05
END_LR_FACTOR = 0.1
WEIGHT_DECAY = 0.05
CHUNK_SIZE = 64


def lm_config(
    size: LMSize,
    arch: str,
    *,
    dataset: str,
    data_dir: str,
    tokenizer: str,
    steps: int,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """The experiment config of one run (``retnet_jax/configs/default.py`` with the study's fields)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch must be among {ARCHS}; got {arch!r}.")
    c = get_config()
    c.arch = arch
    c.model = "paper-1.3b"  # the paper's architecture; the size fields below replace its sizes
    c.model_overrides.d_model = size.d_model
    c.model_overrides.num_layers = size.num_layers
    c.model_overrides.num_heads = size.num_heads
    c.model_overrides.value_dim = 2 * size.d_model
    c.model_overrides.ffn_dim = 2 * size.d_model
    c.model_overrides.dropout = 0.0
    c.model_overrides.dtype = size.dtype
    c.mode, c.chunk_size, c.implementation = "chunkwise", CHUNK_SIZE, "auto"
    c.dataset, c.data_dir, c.tokenizer = dataset, data_dir, tokenizer
    c.seq_len, c.batch_size = size.seq_len, size.batch_size
    c.grain_workers, c.prefetch = 0, 0  # unused: the runs read pre-tokenized batches (tokens.py)
    c.learning_rate, c.schedule, c.end_learning_rate_factor = size.learning_rate, "linear", END_LR_FACTOR
    c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip = 0.9, 0.98, 1e-8, WEIGHT_DECAY, 2.0
    c.steps, c.warmup_steps = steps, max(1, round(WARMUP_FRACTION * steps))
    c.eval_batches, c.seed = size.eval_batches, seed
    return c


def token_budget(
    *,
    params: int,
    step_tokens: int,
    tokens_per_second: float,
    train_seconds: float,
    tokens_per_param: float,
    corpus_tokens: int | None = None,
    max_epochs: float = MAX_EPOCHS,
    margin: float = 1.0,
) -> dict:
    """Steps and tokens of a size's runs: what fits ``train_seconds / margin`` at ``tokens_per_second`` (the
    slower architecture's measured loop speed; ``margin`` > 1 leaves room for a run slower than measured),
    capped at ``tokens_per_param`` × ``params`` and at ``max_epochs`` × ``corpus_tokens`` (the training
    split's tokens; no epoch cap when None); whole steps, at least one.

    Returns:
        dict of steps, tokens, tokens_per_param, epochs (tokens / corpus_tokens, None without a corpus
        size) and limited_by: "time", "tokens_per_param" or "epochs", whichever cap is the lowest.
    """
    if margin < 1:
        raise ValueError(f"margin must be >= 1 (a factor on the expected training time); got {margin}.")
    caps = {"time": tokens_per_second * train_seconds / margin, "tokens_per_param": tokens_per_param * params}
    if corpus_tokens:
        caps["epochs"] = max_epochs * corpus_tokens
    limited_by = min(caps, key=caps.get)
    steps = max(1, int(caps[limited_by] // step_tokens))
    tokens = steps * step_tokens
    return dict(
        steps=steps,
        tokens=tokens,
        tokens_per_param=tokens / params,
        epochs=tokens / corpus_tokens if corpus_tokens else None,
        limited_by=limited_by,
    )


# ---------------------------------------------------------------------------------------------------------
# Multi-query associative recall.


@dataclasses.dataclass(frozen=True)
class MQARSize:
    """A small two-layer model for MQAR; RetNet heads K = D / H, value width 2D; Transformer heads of 64."""

    d_model: int
    num_heads: int
    num_layers: int = 2


@dataclasses.dataclass(frozen=True)
class MQARSetup:
    """The MQAR data and training (defaults as in Zoology's: vocabulary 8192, power law a = 0.01)."""

    vocab_size: int = 8192
    seq_len: int = 256
    train_pairs: tuple[int, ...] = (4, 8, 16, 32, 64)  # the training set mixes these key counts equally
    eval_pairs: tuple[int, ...] = (4, 8, 16, 32, 64)
    train_examples: int = 100_000  # a fixed training set, reshuffled each epoch
    eval_examples: int = 1000  # per key count, from another seed
    batch_size: int = 256
    steps: int = 3000
    learning_rates: tuple[float, ...] = (1e-3, 3e-3)  # each is trained; the report takes the best
    power_a: float = 0.01
    dtype: str = "float32"


MQAR_SIZES = {
    "xs": MQARSize(d_model=64, num_heads=2),
    "s": MQARSize(d_model=128, num_heads=4),
    "m": MQARSize(d_model=256, num_heads=4),
    "smoke": MQARSize(d_model=32, num_heads=2),
}
MQAR_SETUPS = {
    "full": MQARSetup(),
    # An easier task that runs on a CPU in minutes at size xs: 64-token rows, a vocabulary of 256,
    # trained on 4 keys and tested on 4 and 8.
    "small": MQARSetup(
        vocab_size=256,
        seq_len=64,
        train_pairs=(4,),
        eval_pairs=(4, 8),
        train_examples=20_000,
        eval_examples=256,
        batch_size=64,
        steps=1500,
        learning_rates=(3e-3,),
    ),
    "smoke": MQARSetup(
        vocab_size=64,
        seq_len=32,
        train_pairs=(2, 4),
        eval_pairs=(2, 4, 8),
        train_examples=32,
        eval_examples=8,
        batch_size=8,
        steps=3,
        learning_rates=(3e-3,),
    ),
}


def mqar_variant(setup_name: str, steps: int = 0, learning_rates=()) -> str:
    """The MQAR result files' suffix for a set-up other than the study's ("" for the study's and the
    smoke test's): ``@small``, ``@full-12000steps``, ``@small-lr0.003``; the report gives each a table."""
    changes = ([f"{steps}steps"] if steps else []) + (
        ["lr" + ",".join(str(lr) for lr in learning_rates)] if learning_rates else []
    )
    if not changes and setup_name in ("full", "smoke"):
        return ""
    return "@" + "-".join([setup_name, *changes])


def mqar_architecture(size: MQARSize, arch: str, setup: MQARSetup) -> ModelConfig:
    """The paper-style architecture of an MQAR model (the Transformer matching the RetNet's size)."""
    retnet = RetNetConfig.preset(
        "paper-1.3b",
        vocab_size=setup.vocab_size,
        d_model=size.d_model,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        value_dim=2 * size.d_model,
        ffn_dim=2 * size.d_model,
        dropout=0.0,
        dtype=setup.dtype,
    )
    if arch == "retnet":
        return retnet
    if arch == "transformer":
        return TransformerConfig.matching(retnet, head_dim=min(64, size.d_model))
    raise ValueError(f"--arch must be among {ARCHS}; got {arch!r}.")


def mqar_config(setup: MQARSetup, learning_rate: float, seed: int = 0) -> ml_collections.ConfigDict:
    """The Trainer's config of an MQAR run: optimizer and run fields (the architecture is given apart)."""
    c = get_config()
    c.mode, c.chunk_size, c.implementation = "chunkwise", CHUNK_SIZE, "auto"
    c.seq_len, c.batch_size = setup.seq_len, setup.batch_size
    c.learning_rate, c.schedule, c.end_learning_rate_factor = learning_rate, "cosine", 0.0
    c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip = 0.9, 0.98, 1e-8, 0.1, 2.0
    c.steps, c.warmup_steps = setup.steps, max(1, round(0.1 * setup.steps))
    c.seed = seed
    return c
