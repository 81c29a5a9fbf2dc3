"""The paper's 1.3B RetNet (Table 2) on one GPU: bf16 compute, chunkwise training, remat.

    retnet-train --workdir=/tmp/retnet-1p3b --config=experiments/configs/paper_1p3b.py \
        --config.dataset=text:/data/corpus --config.tokenizer=/data/tokenizer.json

Paper hyper-parameters: AdamW β = (0.9, 0.98), weight decay 0.05, clip 2.0, LR 6e-4 after 375 warm-up
steps with polynomial decay, dropout 0.1, length 2048. The paper's 4M-token batches need many devices;
on one GPU raise ``grad_accum_steps`` instead.
"""

from retnet_jax.configs.default import get_config as default_config


def get_config():
    c = default_config()
    c.model = "paper-1.3b"  # the preset computes in bfloat16
    c.mode = "chunkwise"
    c.chunk_size = 256
    c.remat = "full"  # nn/remat.py: "projections" or "mixer" when memory allows
    c.seq_len = 2048
    c.batch_size = 8
    c.grad_accum_steps = 1
    c.learning_rate = 6e-4
    c.schedule = "polynomial"
    c.warmup_steps = 375
    c.end_learning_rate_factor = 0.0
    c.steps = 20000
    c.log_every = 10
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.tokenizer = "sentencepiece"
    c.tokenizer_vocab_size = 32000  # at most: a corpus too small for it yields fewer (the run says so)
    c.sample_prompt = "The "
    return c
