"""The default experiment (what `retnet-train --workdir=DIR` runs): the `tiny` RetNet on the offline corpus.

retnet-train --workdir=/tmp/retnet-tiny --config=experiments/configs/default.py
"""

from retnet_jax.configs.default import get_config  # noqa: F401
