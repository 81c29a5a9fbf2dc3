"""What document resets (``segment_ids``) cost in the mixers alone, forward + backward, bf16; and whether
cuDNN attention with the document mask computes what XLA's does.

    python -m experiments.bench_resets                      # T 2048 and 8192, B·T = 65536 (a few minutes)
    python -m experiments.bench_resets --lengths=256 --tokens=1024 --repeats=2    # CPU smoke run

Rows, at the paper-1.3b widths (D = 2048) and B·T = ``--tokens`` (B8 at T8192 by default):

* ``retention-xla``: the XLA chunkwise form (H8, K256, V512, C = ``--chunk_size``, normalized), without
  segment ids and with them.
* ``retention-pallas`` (on a GPU only: interpreted, it would take minutes on a CPU): the fused kernels at
  the same heads (``implementation="pallas"``, the split family at C = ``--kernel_chunk_size``), without
  segment ids and with them (the document starts enter the kernels' decay factors, docs/kernels.md §5).
* ``attention-cudnn`` (``attention-xla`` on a CPU): causal attention with 128-wide heads (H16), without
  segment ids and with them (a boolean mask [B, 1, T, T] that cuDNN turns into an additive bias and whose
  gradient jax computes too).

Documents: lengths drawn from a geometric distribution with mean ``--mean_document`` tokens, packed
back to back, as the packer produces them. "slower" is the time with resets over the time without, − 1
(the issue's bound for a whole train step is 5%). The correctness lines compare, on the first two rows
and in bf16, cuDNN with the mask against XLA with the mask, and the kernels with resets against the XLA
form with resets (outputs and the gradient of q).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib as bl
from experiments import benchreport as br
from retnet_jax import retention
from retnet_jax.ops import attention

_LENGTHS = flags.DEFINE_string("lengths", "2048,8192", "Sequence lengths T.")
_TOKENS = flags.DEFINE_integer("tokens", 65536, "B·T per configuration: B = max(1, tokens // T).")
_CHUNK = flags.DEFINE_integer("chunk_size", 128, "C of the XLA chunkwise form.")
_KERNEL_CHUNK = flags.DEFINE_integer("kernel_chunk_size", 64, "C of the fused kernels (GPU only).")
_MEAN_DOCUMENT = flags.DEFINE_integer("mean_document", 1000, "Mean document length in tokens.")


def _fwd_bwd(forward):
    """The loss sum(o · w) and its gradient with respect to q, k, v: one forward + backward."""

    def loss(q, k, v, w, segment_ids):
        return jnp.sum(forward(q, k, v, segment_ids).astype(jnp.float32) * w)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _retention(chunk, implementation):
    log_decay = retention.log_decays(8)

    def forward(q, k, v, segment_ids):
        return retention.chunkwise(
            q, k, v, log_decay, chunk_size=chunk, segment_ids=segment_ids, implementation=implementation
        )[0]

    return forward


def _attention(implementation):
    def forward(q, k, v, segment_ids):
        return attention.causal_attention(q, k, v, implementation, segment_ids=segment_ids)

    return forward


def run_config(name, forward, shapes, segment_ids) -> dict:
    """Times forward + backward without and with segment ids."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (bl.normal(key, shape, jnp.bfloat16) for key, shape in zip(keys[:3], shapes, strict=True))
    w = bl.normal(keys[3], shapes[2], jnp.float32)
    out = {}
    for label, ids in (("plain", None), ("resets", jnp.asarray(segment_ids))):
        step = _fwd_bwd(forward)
        compiled, compile_s, memory = bl.compile_timed(step, q, k, v, w, ids)
        timing = bl.time_calls(lambda c=compiled, i=ids: c(q, k, v, w, i))
        out[label] = dict(timing=timing.to_dict(), compile_s=compile_s, memory=memory)
        print(f"  {name} {label}: {timing.median_s * 1e3:.3f} ms", flush=True)
    out["slower"] = out["resets"]["timing"]["median_s"] / out["plain"]["timing"]["median_s"] - 1
    return out


def check_against_xla(forward, reference, shapes, segment_ids) -> dict:
    """``forward`` against ``reference`` (the XLA path), both with the segment ids: outputs and dq, bf16,
    relative errors."""
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (bl.normal(key, shape, jnp.bfloat16) for key, shape in zip(keys[:3], shapes, strict=True))
    w = bl.normal(keys[3], shapes[2], jnp.float32)
    ids = jnp.asarray(segment_ids)
    results = []
    for fn in (forward, reference):
        o = jax.jit(fn)(q, k, v, ids)
        _, (dq, _, _) = jax.jit(_fwd_bwd(fn))(q, k, v, w, ids)
        results.append((o, dq))
    return dict(
        output_rel_error=bl.rel_error(results[0][0], results[1][0]),
        dq_rel_error=bl.rel_error(results[0][1], results[1][1]),
    )


def main(argv):
    del argv
    device = bl.device_info()
    report = br.Report("bench_resets", device["short"])
    rows: list[dict] = []
    raw = {"device": device, "rows": rows}
    on_gpu = device["platform"] == "gpu"
    for length in bl.int_list(_LENGTHS.value):
        batch = max(1, _TOKENS.value // length)
        segment_ids = bl.packed_segment_ids(batch, length, _MEAN_DOCUMENT.value)
        documents = int(segment_ids[:, -1].sum())
        retention_shapes = [(batch, length, 8, 256)] * 2 + [(batch, length, 8, 512)]
        configs = [("retention-xla", _retention(_CHUNK.value, "xla"), retention_shapes)]
        if on_gpu:
            configs.append(("retention-pallas", _retention(_KERNEL_CHUNK.value, "pallas"), retention_shapes))
        # XLA's attention holds B·H·T² float32 scores (34 GB at B8 T8192): cuDNN's only, on a GPU.
        implementation = "cudnn" if on_gpu else "xla"
        configs.append(
            (f"attention-{implementation}", _attention(implementation), [(batch, length, 16, 128)] * 3)
        )
        for name, forward, shapes in configs:
            print(f"{name} B{batch} T{length}: {documents} documents", flush=True)
            row = dict(name=name, B=batch, T=length, documents=documents)
            row.update(
                bl.guarded(lambda f=forward, s=shapes, n=name, ids=segment_ids: run_config(n, f, s, ids))
            )
            rows.append(row)
        if on_gpu:
            two = segment_ids[:2]
            pair, attention_shapes = two.shape[0], [(two.shape[0], length, 16, 128)] * 3
            kernel_shapes = [(pair, length, 8, 256)] * 2 + [(pair, length, 8, 512)]
            raw.setdefault("cudnn_check", {})[length] = bl.guarded(
                lambda ids=two, s=attention_shapes: check_against_xla(
                    _attention("cudnn"), _attention("xla"), s, ids
                )
            )
            raw.setdefault("kernel_check", {})[length] = bl.guarded(
                lambda ids=two, s=kernel_shapes: check_against_xla(
                    _retention(_KERNEL_CHUNK.value, "pallas"), _retention(_CHUNK.value, "xla"), s, ids
                )
            )

        def ms(label):
            return br.when_ok(lambda r: f"{r[label]['timing']['median_s'] * 1e3:.3f}")

        table = br.markdown_table(
            rows,
            [
                ("mixer", lambda r: r["name"]),
                ("B×T", lambda r: f"{r['B']}×{r['T']}"),
                ("documents", lambda r: str(r["documents"])),
                ("fwd+bwd ms", ms("plain")),
                ("with resets ms", ms("resets")),
                ("slower", br.when_ok(lambda r: f"{100 * r['slower']:+.1f}%")),
            ],
        )
        checks = [
            f"T{t}: {what}, output {c.get('output_rel_error', c.get('status'))}, "
            f"dq {c.get('dq_rel_error', '')}"
            for key, what in (
                ("cudnn_check", "cuDNN vs XLA with the mask"),
                ("kernel_check", "retention kernels vs XLA with resets"),
            )
            for t, c in raw.get(key, {}).items()
        ]
        print(
            report.write(
                "Document resets: mixer cost", [br.ceilings_markdown(device, None), table, *checks], raw
            )
        )


if __name__ == "__main__":
    app.run(main)
