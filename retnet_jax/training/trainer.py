"""Training: one pure jitted step over a device mesh, and the loop around it.

    state, metrics = train_step(state, batch)      # jit, donated state, shardings from logical names

Everything stateful lives outside the step: the grain data iterator (``data``), checkpoints
(``checkpoint``), logs (``reporting``). ``train_and_evaluate(config, workdir)`` runs a whole experiment
and resumes from the latest checkpoint in ``workdir``: the losses after a restart equal those of an
uninterrupted run bit for bit (same data position, same parameters, a step's dropout key derived from
the step number).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from retnet_jax.models.config import RetNetConfig
from retnet_jax.models.retnet import RetNetLM, cast_params
from retnet_jax.training import checkpoints as checkpoint_lib
from retnet_jax.training import data as data_lib
from retnet_jax.training import flops as flops_lib
from retnet_jax.training import reporting
from retnet_jax.training import tokenizers as tokenizer_lib
from retnet_jax.training.optim import make_optimizer
from retnet_jax.training.sharding import LOGICAL_RULES, batch_sharding, make_mesh, shardings_of

log = logging.getLogger("retnet_jax")

ARCHS = ("retnet", "transformer")


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def model_vocab_size(tokenizer: tokenizer_lib.Tokenizer) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 8 (friendlier matrix shapes)."""
    return -(-tokenizer.vocab_size // 8) * 8


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
    """The model the experiment config names; returns (module, model config)."""
    overrides: dict[str, Any] = dict(vocab_size=vocab_size, dtype=config.dtype, remat=config.remat)
    if config.dropout >= 0:
        overrides["dropout"] = config.dropout
    if config.get("num_heads", 0) > 0 and config.arch == "retnet":  # absent from older checkpoints
        overrides["num_heads"] = config.num_heads
    if config.chunk_size > 0:
        overrides.update(
            mode="chunkwise",
            chunk_size=config.chunk_size,
            retention_impl=config.get("retention_impl", "auto"),  # absent from older checkpoints
        )
    else:
        overrides["mode"] = "parallel"
    retnet_config = RetNetConfig.preset(config.model, **overrides)
    if config.arch == "retnet":
        return RetNetLM(retnet_config), retnet_config
    if config.arch == "transformer":
        from retnet_jax.models import transformer

        transformer_config = transformer.TransformerConfig.matching(retnet_config)
        return transformer.TransformerLM(transformer_config), transformer_config
    raise ValueError(f"--config.arch must be one of {ARCHS}; got {config.arch!r}.")


def cross_entropy(logits, targets, z_loss: float = 0.0):
    """Mean token cross-entropy in float32, and the loss to optimize (with z-loss if asked).

    Args:
        logits: [B, T, N]; targets: [B, T] int.

    Returns:
        (objective, cross-entropy): scalars.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.mean(log_z - target_logits)
    objective = ce + z_loss * jnp.mean(jnp.square(log_z)) if z_loss else ce
    return objective, ce


class Trainer:
    """The model, optimizer, mesh and shardings of an experiment, and its compiled steps."""

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.model, self.model_config = build_model(config, vocab_size)
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
        self._train_step = jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(self._eval, in_shardings=(self.state_shardings.params, self.batch_sharding))

    def context(self):
        """The mesh and logical-axis rules under which the model is traced."""
        return _Context(self.mesh)

    def init(self, seed: int) -> TrainState:
        with self.context():
            return self._init(jax.random.key(seed))

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        with self.context():
            return self._train_step(state, batch)

    def eval_step(self, params, batch: dict[str, jax.Array]) -> jax.Array:
        with self.context():
            return self._eval_step(params, batch)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows → one array over all processes, split as the batch sharding says."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def train_flops_per_token(self) -> float:
        """Forward + backward FLOPs per trained token (3× the forward)."""
        cfg = self.model_config
        lookups = cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0
        matmul = self.num_params - lookups
        if isinstance(cfg, RetNetConfig):
            mixer = flops_lib.retention_forward_flops(
                self.config.seq_len,
                cfg.num_heads,
                cfg.key_dim,
                cfg.head_value_dim,
                self.config.chunk_size or None,
            )
        else:
            mixer = cfg.attention_flops_per_token(self.config.seq_len)
        return 3 * flops_lib.lm_forward_flops_per_token(matmul, cfg.num_layers, mixer)

    # -- the pure functions -----------------------------------------------------------------

    def _init_boxed(self, rng) -> TrainState:
        tokens = jnp.zeros((1, min(self.config.seq_len, 8)), jnp.int32)
        params = self.model.init({"params": rng}, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def _loss(self, params, inputs, targets, rng):
        logits, _ = self.model.apply(
            {"params": params},
            inputs,
            deterministic=self.model_config.dropout == 0,
            rngs={"dropout": rng},
        )
        return cross_entropy(logits, targets, self.config.z_loss)

    def _step(self, state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        micro = self.config.grad_accum_steps
        if micro == 1:
            (_, ce), grads = grad_fn(state.params, batch["inputs"], batch["targets"], rng)
        else:
            # Micro-batch a takes rows a, a + A, a + 2A, ...: each device keeps its own rows.
            def split(x):
                return jnp.swapaxes(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 0, 1)

            def accumulate(carry, inputs):
                grads_sum, ce_sum = carry
                index, tokens, targets = inputs
                (_, ce), grads = grad_fn(state.params, tokens, targets, jax.random.fold_in(rng, index))
                return (jax.tree.map(jnp.add, grads_sum, grads), ce_sum + ce), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            xs = (jnp.arange(micro), split(batch["inputs"]), split(batch["targets"]))
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

    def _eval(self, params, batch):
        logits, _ = self.model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"])[1]


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


# ---------------------------------------------------------------------------------------------
# The loop.


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """Errors that name the flag, before any compute."""
    for name in ("steps", "seq_len", "batch_size", "log_every", "eval_every", "checkpoint_every"):
        if config[name] < 1:
            raise ValueError(f"--config.{name} must be >= 1; got {config[name]}.")
    if config.grad_accum_steps < 1:
        raise ValueError(f"--config.grad_accum_steps must be >= 1; got {config.grad_accum_steps}.")
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = data_parallel * config.grad_accum_steps
    if config.batch_size % rows:
        raise ValueError(
            f"--config.batch_size={config.batch_size} is not divisible by the data-parallel size "
            f"{data_parallel} (mesh data × fsdp = {mesh.shape['data']} × {mesh.shape['fsdp']})"
            + (f" times grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else "")
            + f"; use a multiple of {rows}."
        )


def _preemption_check(checkpoints: checkpoint_lib.Checkpoints):
    """A function step → whether to save and stop now.

    One process: SIGTERM sets a flag the loop reads after each step. Several processes: they must stop
    at the same step, so the signal is left to JAX's preemption service and every process asks the
    checkpoint manager whether the common sync point is reached.
    """
    if jax.process_count() > 1:
        return checkpoints.reached_preemption
    flag = {"preempted": False}

    def handler(signum, frame):
        flag["preempted"] = True

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the default handler
        pass
    return lambda step: flag["preempted"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the experiment ``config`` in ``workdir``; returns the final state."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    checkpoints = checkpoint_lib.Checkpoints(
        workdir, every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    try:
        state, trainer, tokenizer, finished = _train(config, workdir, checkpoints)
    finally:
        checkpoints.close()
    if finished and config.sample_tokens > 0:
        # Every process runs the (sharded) decoding; the first one prints.
        text = sample(trainer, state.params, tokenizer, config)
        if jax.process_index() == 0:
            print(
                f"\n--- sample (temperature {config.sample_temperature}) ---\n{config.sample_prompt}{text}\n"
            )
    return state


def _train(config, workdir, checkpoints):
    """The loop; returns (state, trainer, tokenizer, whether all steps ran)."""
    config_dict = config.to_dict()
    checkpoints.check_compatible(config_dict)
    mesh = make_mesh(config.mesh)
    validate(config, mesh)
    resumed = checkpoints.latest_step()
    if resumed is None:
        tokenizer = data_lib.make_tokenizer(config)
    else:
        tokenizer = tokenizer_lib.tokenizer_from_dict(checkpoints.restore_tokenizer())
    vocab_size = model_vocab_size(tokenizer)
    trainer = Trainer(config, vocab_size, mesh)
    train_data = data_lib.make_dataset(
        config, tokenizer, config.train_split, train=True, vocab_size=vocab_size
    )
    if resumed is None:
        state, start = trainer.init(config.seed), 0
    else:
        state = checkpoints.restore(trainer.abstract_state, data_iterator=train_data)
        start = int(state.step)

    reporter = reporting.Reporter(workdir, total_steps=config.steps, start_step=start)
    reporter.message(
        f"{config.arch} '{config.model}': {trainer.num_params / 1e6:.2f}M parameters, vocab {vocab_size} "
        f"({type(tokenizer).__name__}); mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); "
        + (f"resumed at step {start}" if resumed is not None else "starting from scratch")
    )
    preempted = _preemption_check(checkpoints)
    tokens_per_step = config.batch_size * config.seq_len
    peak = flops_lib.device_peak_flops()
    flops_per_step = trainer.train_flops_per_token() * tokens_per_step
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_good = resumed
    clock, steps_timed = time.perf_counter(), 0

    def flush() -> dict[str, float] | None:
        """Fetches the buffered step metrics (one sync), stopping on a non-finite loss."""
        nonlocal pending
        fetched = jax.device_get(pending)
        pending = []
        for step, metrics in fetched:
            if not math.isfinite(float(metrics["loss"])):
                checkpoints.wait()
                raise FloatingPointError(
                    f"Training stopped: the loss became {float(metrics['loss'])} at step {step}. "
                    f"The last good checkpoint is step {last_good} in {checkpoints.directory} "
                    f"(nothing later was saved). Lower --config.learning_rate or set --config.z_loss "
                    f"and run again to resume from it."
                )
        return {k: float(v) for k, v in fetched[-1][1].items()} if fetched else None

    step = start
    try:
        if resumed is None:  # the starting point of the validation curve
            reporter.eval(0, evaluate(trainer, state.params, tokenizer, config, vocab_size))
            clock = time.perf_counter()
        while step < config.steps:
            batch = trainer.global_batch(next(train_data))
            state, metrics = trainer.train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            reporter.advance()
            if steps_timed == 0 and step == start + 1:
                jax.block_until_ready(metrics)
                reporter.message(
                    f"First step (compilation included) took {time.perf_counter() - clock:.1f}s."
                )
                clock = time.perf_counter()
            else:
                steps_timed += 1
            stop = preempted(step)
            save = step == config.steps or stop or checkpoints.should_save(step)
            evaluate_now = step % config.eval_every == 0 or step == config.steps
            if step % config.log_every == 0 or save or evaluate_now:
                latest = flush()
                elapsed = time.perf_counter() - clock
                if steps_timed:
                    latest["tokens_per_sec"] = tokens_per_step * steps_timed / elapsed
                    if peak:
                        latest["mfu"] = flops_per_step * steps_timed / elapsed / (peak * jax.device_count())
                reporter.train(step, latest)
            if evaluate_now:
                reporter.eval(step, evaluate(trainer, state.params, tokenizer, config, vocab_size))
            if save:
                checkpoints.save(
                    step,
                    state,
                    data_iterator=train_data,
                    config=config_dict,
                    tokenizer=tokenizer.to_dict(),
                    force=True,
                )
                last_good = step
            if stop:
                checkpoints.wait()
                reporter.message(f"Preempted: saved step {step}; run again to resume.")
                return state, trainer, tokenizer, False
            if step % config.log_every == 0 or save or evaluate_now:
                clock, steps_timed = time.perf_counter(), 0
        checkpoints.wait()
    finally:
        reporter.close()
        train_data.close()
    return state, trainer, tokenizer, True


def evaluate(trainer: Trainer, params, tokenizer, config, vocab_size: int) -> float:
    """Mean cross-entropy over the first ``eval_batches`` batches of the validation split."""
    eval_data = data_lib.make_dataset(
        config, tokenizer, config.eval_split, train=False, vocab_size=vocab_size
    )
    losses = []
    try:
        for _ in range(config.eval_batches):
            try:
                local = next(eval_data)
            except StopIteration:
                if jax.process_count() > 1:
                    raise ValueError(
                        f"The validation split has fewer than --config.eval_batches="
                        f"{config.eval_batches} batches on process {jax.process_index()}; lower it."
                    ) from None
                break
            losses.append(trainer.eval_step(params, trainer.global_batch(local)))
    finally:
        eval_data.close()
    if not losses:
        raise ValueError(
            f"The validation split '{config.eval_split}' gives no full batch of "
            f"{config.batch_size}×{config.seq_len} tokens; lower --config.batch_size or seq_len."
        )
    return float(np.mean(jax.device_get(losses)))


def sample(trainer: Trainer, params, tokenizer, config) -> str:
    """Continues ``config.sample_prompt`` for ``sample_tokens`` tokens (recurrent decoding)."""
    from retnet_jax.inference import generate

    result = generate.generate(
        trainer.model,
        {"params": params},
        [tokenizer.encode(config.sample_prompt)],
        max_new_tokens=config.sample_tokens,
        temperature=config.sample_temperature,
        seed=config.seed,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        stop_tokens=(tokenizer.eos_id,),
    )
    return tokenizer.decode(np.asarray(result.tokens[0][: int(result.lengths[0])]).tolist())


def load_for_inference(workdir: str | None = None, *, checkpoint: str | None = None):
    """Loads a trained model for generation: (model, variables, tokenizer, experiment config).

    Parameters come back in the model's compute dtype when it is below 32 bits (bf16 training →
    bf16 serving), in float32 otherwise.

    Args:
        workdir: a training workdir (its latest checkpoint is used), or
        checkpoint: a checkpoint step directory, e.g. ``WORKDIR/checkpoints/300``.
    """
    if checkpoint is not None:
        path = os.path.abspath(os.path.expanduser(checkpoint)).rstrip("/")
        step_name = os.path.basename(path)
        if not step_name.isdigit():
            raise ValueError(
                f"--checkpoint must be a step directory such as WORKDIR/checkpoints/300; got {checkpoint}."
            )
        workdir, step = os.path.dirname(os.path.dirname(path)), int(step_name)
    elif workdir is not None:
        workdir, step = os.path.abspath(os.path.expanduser(workdir)), None
    else:
        raise ValueError("Pass --workdir (latest checkpoint) or --checkpoint=WORKDIR/checkpoints/STEP.")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"No checkpoints in {workdir}: train first with `retnet-train --workdir={workdir}`."
        )
    checkpoints = checkpoint_lib.Checkpoints(workdir, every=1, keep=1 << 30, async_save=False)
    try:
        if checkpoints.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoints in {workdir}: train first with `retnet-train --workdir={workdir}`."
            )
        config = ml_collections.ConfigDict(checkpoints.restore_config(step))
        tokenizer = tokenizer_lib.tokenizer_from_dict(checkpoints.restore_tokenizer(step))
        mesh = make_mesh((-1, 1, 1), devices=jax.local_devices()[:1])
        trainer = Trainer(config, model_vocab_size(tokenizer), mesh)
        state = checkpoints.restore(trainer.abstract_state, step=step)
    finally:
        checkpoints.close()
    params = state.params
    if trainer.model_config.compute_dtype.itemsize < 4:  # serve in the compute dtype
        params = cast_params(params, trainer.model_config.compute_dtype)
    return trainer.model, {"params": params}, tokenizer, config


def default_config() -> ml_collections.ConfigDict:
    from retnet_jax.configs import default

    return default.get_config()


__all__ = [
    "TrainState",
    "Trainer",
    "build_model",
    "cross_entropy",
    "default_config",
    "load_for_inference",
    "train_and_evaluate",
]
