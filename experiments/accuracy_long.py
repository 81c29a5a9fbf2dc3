"""bf16 retention over long sequences: finite outputs and states close to the float32 result.

    python -m experiments.accuracy_long                                  # T = 16,384 and 65,536 (CPU: ~1 min)
    python -m experiments.accuracy_long --lengths=65536,262144 --heads=8 --dim=128   # on a GPU

All eight paper decays (γ up to 1 − 2^−12: the heads bf16 would round to γ = 1). The reference is the
float32 chunkwise form (itself equal to the slow reference to ~1e-7, see tests/test_retention.py); the
bf16 inputs are the float32 ones rounded. Reported: normwise relative error ‖x − ref‖ / ‖ref‖ of the
outputs and final states, and whether every output is finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchreport as br
from retnet_jax import retention

_LENGTHS = flags.DEFINE_string("lengths", "16384,65536", "Sequence lengths T.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads H (paper decays γ_h = 1 − 2^(−5−h)).")
_DIM = flags.DEFINE_integer("dim", 32, "K = V per head.")
_CHUNKS = flags.DEFINE_string("chunk_sizes", "64,256", "Chunk sizes of the chunkwise form.")


def measure(length: int) -> list[dict]:
    rng = np.random.default_rng(length)
    heads, dim = _HEADS.value, _DIM.value
    q, k, v = (rng.standard_normal((1, length, heads, dim)).astype(np.float32) for _ in range(3))
    k *= dim**-0.5
    log_decay = retention.log_decays(heads)
    chunkwise = jax.jit(retention.chunkwise, static_argnames="chunk_size")
    reference, reference_state = chunkwise(q, k, v, log_decay, chunk_size=256)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    forms = {
        f"chunkwise C={c}": (lambda c=c: chunkwise(*low, log_decay, chunk_size=c))
        for c in bl.int_list(_CHUNKS.value)
    }
    forms["recurrent"] = lambda: jax.jit(retention.recurrent)(*low, log_decay)
    rows = []
    for name, run in forms.items():
        o, state = run()
        o32 = np.asarray(o.astype(jnp.float32))
        rows.append(
            {
                "T": length,
                "form": name,
                "finite": bool(np.isfinite(o32).all() and np.isfinite(np.asarray(state.kv)).all()),
                "rel_o": bl.rel_error(o32, reference),
                "rel_state": bl.rel_error(state.kv, reference_state.kv),
                "state_dtype": str(state.kv.dtype),
            }
        )
    return rows


def main(argv):
    del argv
    device = bl.device_info()
    report = br.Report("accuracy_long", device["short"])
    rows = [row for length in bl.int_list(_LENGTHS.value) for row in measure(length)]
    table = br.markdown_table(
        rows,
        [
            ("T", lambda r: f"{r['T']:,}"),
            ("form (bf16 inputs)", lambda r: r["form"]),
            ("all finite", lambda r: "yes" if r["finite"] else "NO"),
            ("rel err output", lambda r: f"{r['rel_o']:.2e}"),
            ("rel err final state", lambda r: f"{r['rel_state']:.2e}"),
            ("state dtype", lambda r: r["state_dtype"]),
        ],
    )
    setup = (
        f"{br.ceilings_markdown(device, None)} B = 1, H = {_HEADS.value} (all paper decays), "
        f"K = V = {_DIM.value}; reference: float32 chunkwise (C = 256) on the same inputs."
    )
    text = report.write(
        "bf16 retention over long sequences", [setup, table], {"device": device, "rows": rows}
    )
    print(text)


if __name__ == "__main__":
    app.run(main)
