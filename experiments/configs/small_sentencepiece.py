"""The `small` RetNet with a SentencePiece vocabulary trained on the default corpus (CPU: ~20 minutes).

retnet-train --workdir=/tmp/retnet-small --config=experiments/configs/small_sentencepiece.py
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
