"""The `small` RetNet on the tfds catalog dataset `tiny_shakespeare` (needs the dataset built or a network).

    retnet-train --workdir=/tmp/retnet-shakespeare --config=experiments/configs/tiny_shakespeare.py

tfds downloads `tiny_shakespeare` and builds it with TensorFlow. Without a network (refused within
seconds) or without TensorFlow, build it once where both are, with
`tfds build tiny_shakespeare --file_format=array_record --data_dir=DIR`, copy DIR here and pass
--config.data_dir=DIR.
"""

from retnet_jax.configs.default import get_config as default_config


def get_config():
    c = default_config()
    c.model = "small"
    c.dataset = "tiny_shakespeare"
    c.text_feature = "text"
    c.eval_split = "validation"
    c.seq_len = 256
    c.batch_size = 16
    c.learning_rate = 1e-3
    c.steps = 3000
    c.eval_every = 500
    c.checkpoint_every = 500
    c.sample_prompt = "ROMEO:"
    return c
