"""The default experiment: the `tiny` RetNet on the offline default corpus, minutes on a laptop CPU.

    retnet-train --workdir=/tmp/retnet-tiny
    retnet-train --workdir=/tmp/retnet-tiny --config.steps=1000 --config.model=small
    retnet-train --workdir=/tmp/retnet-h8 --config.model=small --config.model_overrides.num_heads=8

Every field can be overridden on the command line as ``--config.FIELD=VALUE``. The experiment files in
``experiments/configs/`` start from this one and change what they need.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from retnet_jax.models.config import RetNetConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def model_overrides() -> ml_collections.ConfigDict:
    """One unset (None) field per architecture field of ``RetNetConfig``, typed as the field is; the
    tokenizer sets ``vocab_size``."""
    overrides = ml_collections.ConfigDict()
    for field in dataclasses.fields(RetNetConfig):
        if field.name != "vocab_size":
            overrides[field.name] = config_dict.placeholder(_TYPES[field.type])
    return overrides


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model: a preset, and any architecture field of RetNetConfig changed from it (unset = the preset's).
    c.arch = "retnet"  # "retnet", or "transformer" (the baseline with the same parameter count)
    c.model = "tiny"  # preset name: tiny, small, paper-1.3b, ..., torchscale-base, ... (models/presets.py)
    c.model_overrides = model_overrides()  # e.g. --config.model_overrides.num_heads=32 (RetNet fields)

    # How the model runs (none of this changes the function it computes).
    c.mode = "parallel"  # training form of retention: "parallel" or "chunkwise"
    c.chunk_size = 64  # C of the chunkwise form
    c.implementation = "auto"  # chunkwise retention: "auto" (fused kernels on GPU), "pallas", "xla";
    #                            attention: "auto" (cuDNN on GPU), "cudnn", "xla"
    # What each block keeps for the backward pass (nn/remat.py): "none" keeps every activation (the most
    # memory, no recompute); "full" keeps only each block's input and reruns the block (the least memory);
    # "projections" keeps the input projections' outputs (reruns the retention kernel / attention and
    # elementwise work); "mixer" keeps those and the mixer's outputs (reruns only elementwise work). For
    # paper-1.3b at B·T = 16K in bf16: 13 / 18 GB over its 24 layers for projections / mixer, 1.6 GB for full.
    # "auto" compiles the step under none, mixer, projections, full in turn and takes the first that fits
    # 90% of the device's memory (training/remat_choice.py; on a CPU: none).
    c.remat = "none"  # "none", "full", "projections", "mixer" or "auto"; True / False = full / none
    c.scan_layers = True  # one compiled block scanned over the layers

    # Data.
    c.dataset = "default"  # "default" (offline corpus), "text:DIR_OR_GLOB", or a tfds catalog name
    c.text_feature = "text"  # feature holding the text in a tfds catalog dataset
    c.train_split = "train"
    c.eval_split = "validation"
    c.data_dir = ""  # where tfds builds and reads datasets ("" = tfds default, ~/tensorflow_datasets)
    c.tokenizer = "byte"  # "byte", "sentencepiece" (train one on the corpus), or a .model / tokenizer.json
    c.tokenizer_vocab_size = 4096  # pieces of a SentencePiece model trained on the corpus (at most)
    c.tokenizer_bos = ""  # BOS spelling in a tokenizer file, e.g. "[BOS]" ("" = found: <s>, <bos>, ...)
    c.tokenizer_eos = ""  # EOS spelling in a tokenizer file ("" = found: </s>, <eos>, ...)
    c.tokenizer_pad = ""  # PAD spelling in a tokenizer file ("" = found, else EOS)
    c.seq_len = 128  # tokens per training sequence
    c.reset_at_documents = True  # documents packed in a row start from an empty state (False: they flow on)
    c.batch_size = 32  # sequences per step, over all devices and hosts
    c.grain_workers = 0  # grain worker processes (0 = in the main process)
    c.prefetch = 2  # batches prepared ahead of the training step

    # Optimization (paper defaults: AdamW β = (0.9, 0.98), clip 2.0, warm-up then decay).
    c.learning_rate = 3e-3
    c.schedule = "cosine"  # cosine, linear, polynomial, constant (all after linear warm-up)
    c.warmup_steps = 30
    c.end_learning_rate_factor = 0.1  # final LR = learning_rate * this factor
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-8
    c.weight_decay = 0.05
    c.grad_clip = 2.0  # global-norm clipping (0 = off)
    c.grad_accum_steps = 1  # micro-batches per optimizer step
    c.z_loss = 0.0  # weight of log(Z)^2 (0 = off)
    c.allow_schedule_change = False  # resume with other steps / learning-rate fields (re-shapes the schedule)

    # Run.
    c.steps = 300  # the schedule's length: a resumed run must keep it (see allow_schedule_change)
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 8
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.seed = 0
    c.mesh = "-1,1,1"  # data,fsdp,tensor axis sizes; -1 = the rest of the devices
    c.sample_prompt = "def "  # text the run ends by continuing
    c.sample_tokens = 96
    c.sample_temperature = 0.7
    return _also_bool(c, "remat")


def _also_bool(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The field ``name`` takes a bool as well as a string (a ConfigDict field keeps its first type)."""
    value = c[name]
    del c[name]
    c[name] = config_dict.FieldReference(value, field_type=object)
    return c
