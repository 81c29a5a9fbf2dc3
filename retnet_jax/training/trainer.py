"""The training step: one pure jitted function of (state, batch) over a device mesh.

    trainer = Trainer(config, model_config, mesh)
    state = trainer.init(seed)
    state, metrics = trainer.train_step(state, batch)   # jit, donated state, shardings from logical names

The experiment config (``retnet_jax/configs/default.py``) names a preset and any architecture fields to
change (``model_config``) and how the model runs (``build_model``); the optimizer comes from ``optim``.
Everything stateful — data, checkpoints, logs — lives outside the step (``loop``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from retnet_jax.models.config import ModelConfig, RetNetConfig, TransformerConfig
from retnet_jax.models.lm import DecoderLM
from retnet_jax.training import flops as flops_lib
from retnet_jax.training import remat_choice
from retnet_jax.training.optim import make_optimizer
from retnet_jax.training.sharding import LOGICAL_RULES, batch_sharding, shardings_of
from retnet_jax.training.tokenizers import Tokenizer

__all__ = [
    "ARCHS",
    "TrainState",
    "Trainer",
    "build_model",
    "cross_entropy",
    "model_config",
    "model_vocab_size",
]

ARCHS = ("retnet", "transformer")


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def model_vocab_size(tokenizer: Tokenizer) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 8 (friendlier matrix shapes)."""
    return -(-tokenizer.vocab_size // 8) * 8


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The architecture an experiment config names: its preset, with the fields ``model_overrides`` sets
    (the Transformer is the baseline matching that RetNet's size)."""
    if config.arch not in ARCHS:
        raise ValueError(f"--config.arch must be one of {ARCHS}; got {config.arch!r}.")
    overrides = {name: value for name, value in config.model_overrides.items() if value is not None}
    retnet = RetNetConfig.preset(config.model, **overrides, vocab_size=vocab_size)
    return retnet if config.arch == "retnet" else TransformerConfig.matching(retnet)


def build_model(config: ml_collections.ConfigDict, architecture: ModelConfig, remat=None) -> DecoderLM:
    """The LM of ``architecture`` run as the experiment config says (form, chunk size, kernel, remat;
    ``remat`` given: that policy instead of the config's)."""
    return DecoderLM(
        architecture,
        mode=config.mode,
        chunk_size=config.chunk_size,
        implementation=config.implementation,
        scan_layers=config.scan_layers,
        remat=config.remat if remat is None else remat,
    )


def cross_entropy(logits, targets, z_loss: float = 0.0, weights=None):
    """Mean token cross-entropy in float32, and the loss to optimize (with z-loss if asked).

    Args:
        logits: [B, T, N]; targets: [B, T] int.
        weights: [B, T] or None: each token's weight in the mean (0 leaves a token out, e.g. the
            positions of an associative-recall row that are not answers; their targets may be any id,
            negative ones included).

    Returns:
        (objective, cross-entropy): scalars.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    safe = jnp.maximum(targets, 0)
    target_logits = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    if weights is None:
        ce = jnp.mean(log_z - target_logits)
        z = jnp.mean(jnp.square(log_z))
    else:
        weights = weights.astype(jnp.float32)
        total = jnp.maximum(jnp.sum(weights), 1e-9)
        ce = jnp.sum((log_z - target_logits) * weights) / total
        z = jnp.sum(jnp.square(log_z) * weights) / total
    objective = ce + z_loss * z if z_loss else ce
    return objective, ce


class Trainer:
    """The model, optimizer, mesh and shardings of an experiment, and its compiled steps.

    Args:
        config: the experiment config (optimizer, run options, seq_len, z_loss, grad_accum_steps, seed).
        architecture: the model config (``model_config(config, vocab_size)``, or one read back from a
            checkpoint).
        mesh: the device mesh (``training.sharding.make_mesh``).
        log: where ``remat = "auto"`` reports its choice.

    Attributes:
        remat: the remat policy the step runs (the config's, or the one "auto" chose:
            ``training.remat_choice``); ``remat_peaks``: the peak bytes per device "auto" measured.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        architecture: ModelConfig,
        mesh: jax.sharding.Mesh,
        log: Callable[[str], Any] = print,
    ):
        self.config = config
        self.mesh = mesh
        self.model_config = architecture
        self.remat, self.remat_peaks = config.remat, {}
        if config.remat == "auto":
            self.remat, self.remat_peaks = remat_choice.choose(
                lambda name: self._peak_with(name), remat_choice.device_limit(mesh), log
            )
        self.model = build_model(config, architecture, remat=self.remat)
        self.tx, self.schedule = make_optimizer(config)
        with self.context():
            boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        self.state_shardings = shardings_of(boxed, mesh)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.unbox(boxed),
            self.state_shardings,
        )
        self.batch_sharding = batch_sharding(mesh)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))
        self._init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)), out_shardings=self.state_shardings)
        self._init_from_params = jax.jit(
            lambda params: TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params)),
            in_shardings=(self.state_shardings.params,),
            out_shardings=self.state_shardings,
        )
        self._train_step = jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            self._eval,
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            static_argnums=2,  # the document rule: one program per rule
        )

    def context(self):
        """The mesh and logical-axis rules under which the model is traced."""
        return _Context(self.mesh)

    def init(self, seed: int) -> TrainState:
        with self.context():
            return self._init(jax.random.key(seed))

    def init_from_params(self, params) -> TrainState:
        """The state at step 0 around given parameters (e.g. imported weights): a fresh optimizer."""
        with self.context():
            return self._init_from_params(params)

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        with self.context():
            return self._train_step(state, batch)

    def lower_train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
        """The train step lowered for these (abstract or concrete) arguments: ``.compile()`` it to time
        compilation apart, or read its cost and memory analyses."""
        with self.context():
            return self._train_step.lower(state, batch)

    def eval_step(
        self, params, batch: dict[str, jax.Array], *, reset_at_documents: bool | None = None
    ) -> jax.Array:
        """The mean cross-entropy of a batch (weighted by ``batch["weights"]`` where given).

        Args:
            reset_at_documents: evaluate under this document rule instead of the config's (None): True
                starts every packed document of a row from an empty state (with ``segment_ids``), False
                lets state and positions flow across them. Lets a model be measured under both rules.
        """
        resets = self.config.reset_at_documents if reset_at_documents is None else bool(reset_at_documents)
        with self.context():
            return self._eval_step(params, batch, resets)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows → one array over all processes, split as the batch sharding says."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def train_flops_per_token(self) -> float:
        """Forward + backward FLOPs per trained token (3× the forward)."""
        cfg = self.model_config
        lookups = cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0
        chunk = self.config.chunk_size if self.config.mode == "chunkwise" else None
        mixer = cfg.mixer_flops_per_token(self.config.seq_len, chunk)
        return 3 * flops_lib.lm_forward_flops_per_token(self.num_params - lookups, cfg.num_layers, mixer)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """A training batch's shapes: inputs, targets and segment ids [B, T] int32, sharded."""
        shape = (self.config.batch_size, self.config.seq_len)
        spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
        return dict(inputs=spec, targets=spec, segment_ids=spec)

    def _peak_with(self, remat: str) -> int | None:
        """The peak bytes per device of this run's train step under another remat policy (compiled)."""
        other = self.config.copy_and_resolve_references()
        other.remat = remat
        trainer = Trainer(other, self.model_config, self.mesh)
        compiled = trainer.lower_train_step(trainer.abstract_state, trainer.abstract_batch()).compile()
        return remat_choice.peak_bytes(compiled)

    # -- the pure functions -----------------------------------------------------------------

    def _init_boxed(self, rng) -> TrainState:
        tokens = jnp.zeros((1, min(self.config.seq_len, 8)), jnp.int32)
        params = self.model.init({"params": rng}, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def _segments(self, batch, resets: bool | None = None):
        """The batch's document ids when the run resets at documents (``reset_at_documents``, or
        ``resets`` where given), else None."""
        resets = self.config.reset_at_documents if resets is None else resets
        return batch.get("segment_ids") if resets else None

    def _loss(self, params, batch, rng):
        """The loss of a batch: ``inputs``, ``targets`` and optionally ``segment_ids`` (packed documents)
        and ``weights`` (each target's weight; 0 leaves it out)."""
        logits, _ = self.model.apply(
            {"params": params},
            batch["inputs"],
            deterministic=self.model_config.dropout == 0,
            rngs={"dropout": rng},
            segment_ids=self._segments(batch),
        )
        return cross_entropy(logits, batch["targets"], self.config.z_loss, weights=batch.get("weights"))

    def _step(self, state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        micro = self.config.grad_accum_steps
        if micro == 1:
            (_, ce), grads = grad_fn(state.params, batch, rng)
        else:
            # Micro-batch a takes rows a, a + A, a + 2A, ...: each device keeps its own rows.
            def split(x):
                return jnp.swapaxes(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 0, 1)

            def accumulate(carry, inputs):
                grads_sum, ce_sum = carry
                index, part = inputs
                (_, ce), grads = grad_fn(state.params, part, jax.random.fold_in(rng, index))
                return (jax.tree.map(jnp.add, grads_sum, grads), ce_sum + ce), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            xs = (jnp.arange(micro), jax.tree.map(split, batch))
            (grads, ce), _ = jax.lax.scan(accumulate, (zeros, 0.0), xs)
            grads = jax.tree.map(lambda g: g / micro, grads)
            ce = ce / micro
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce,
            "grad_norm": _norm(grads),
            "param_norm": _norm(params),
            "learning_rate": self.schedule(state.step),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval(self, params, batch, resets: bool):
        segment_ids = self._segments(batch, resets)
        logits, _ = self.model.apply({"params": params}, batch["inputs"], segment_ids=segment_ids)
        return cross_entropy(logits, batch["targets"], weights=batch.get("weights"))[1]


def _norm(tree) -> jax.Array:
    """Global L2 norm of a pytree, accumulated in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class _Context:
    def __init__(self, mesh):
        self.mesh = mesh

    def __enter__(self):
        self._mesh = jax.set_mesh(self.mesh)
        self._mesh.__enter__()
        self._rules = nn.logical_axis_rules(LOGICAL_RULES)
        self._rules.__enter__()

    def __exit__(self, *exc):
        self._rules.__exit__(*exc)
        self._mesh.__exit__(*exc)
