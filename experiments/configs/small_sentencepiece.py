"""The `small` RetNet (5.8M parameters) with a SentencePiece vocabulary trained on the default corpus.

retnet-train --workdir=/tmp/retnet-small --config=experiments/configs/small_sentencepiece.py

On 2 CPU cores a step of 16×256 tokens takes 2–3½ s (measured 2026-12-01; the range is other load on
the cores), so the 2,000 steps take about 75–115 minutes; the SentencePiece model and the dataset take
seconds. For a first look, add --config.steps=300 (about 10–17 minutes; the run refuses to resume it
later with another number of steps, since the schedule is part of the run).
"""

from retnet_jax.configs.default import get_config as default_config


def get_config():
    c = default_config()
    c.model = "small"
    c.tokenizer = "sentencepiece"
    c.tokenizer_vocab_size = 4096
    c.seq_len = 256
    c.batch_size = 16
    c.learning_rate = 1e-3
    c.warmup_steps = 100
    c.steps = 2000
    c.eval_every = 250
    c.checkpoint_every = 250
    return c
