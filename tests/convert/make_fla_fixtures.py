"""Makes the fla fixtures of tests/convert/test_fla.py with fla's own model on a GPU (fla's kernels need one).

    python tests/convert/make_fla_fixtures.py OUT_DIR      # needs torch (CUDA), fla 0.6, transformers

then copy OUT_DIR to tests/convert/fixtures/fla. It builds a tiny 2-layer fla ``RetNetForCausalLM`` with
random weights (projections N(0, 1/fan_in), embeddings N(0, 1), every norm weight 1 + 0.3·N(0, 1) so that
each weight matters), and writes:

* ``model/``: its ``save_pretrained`` directory (config.json, model.safetensors), float32;
* ``logits.npz``: fixed tokens [B, T] and fla's float32 logits [B, T, N] in each of its retention modes
  (``logits_chunk``, ``logits_fused_recurrent``, and ``logits_parallel`` / ``logits_fused_chunk`` where
  this fla has them) and through its cache (``logits_cache``: a prefill of ``prefill_length`` tokens,
  then one token per call);
* ``fixtures.json``: versions, sizes, the modes that ran, and fla's own mode-to-mode spread (normwise
  relative error of the logits between every pair of its modes), from which the test's tolerance comes.

T = 100 > 64: fla's layer switches to fused_recurrent below 65 tokens whatever mode it is given.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np
import torch

VOCAB, HIDDEN, HEADS, EXPAND_V, INTERMEDIATE, LAYERS = 100, 64, 2, 2, 96, 2
BATCH, LENGTH, PREFILL = 2, 100, 70
MODES = ("chunk", "fused_recurrent", "parallel", "fused_chunk")


def relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def build():
    from fla.models import RetNetConfig, RetNetForCausalLM

    config = RetNetConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_heads=HEADS,
        expand_k=1,
        expand_v=EXPAND_V,
        intermediate_size=INTERMEDIATE,
        norm_eps=1e-6,
        attn_mode="chunk",
        tie_word_embeddings=False,
        fuse_cross_entropy=False,
    )
    model = RetNetForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p.ndim == 1:  # every norm weight (block, final and per-head)
                p.copy_(1.0 + 0.3 * noise)
            elif "embeddings" in name:
                p.copy_(noise)
            else:  # Linear [out, in]
                p.copy_(noise / p.shape[1] ** 0.5)
    return model.float().cuda().eval()


def run_mode(model, tokens, mode: str) -> np.ndarray:
    for layer in model.model.layers:
        layer.attn.mode = mode
    with torch.no_grad():
        return model(input_ids=tokens).logits.float().cpu().numpy()


def run_cache(model, tokens) -> np.ndarray:
    for layer in model.model.layers:
        layer.attn.mode = "chunk"
    with torch.no_grad():
        out = model(input_ids=tokens[:, :PREFILL], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(PREFILL, tokens.shape[1]):
            out = model(input_ids=tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    return torch.cat(logits, dim=1).float().cpu().numpy()


def main(out_dir: str):
    import fla
    import transformers

    os.makedirs(out_dir, exist_ok=True)
    model = build()
    model.save_pretrained(os.path.join(out_dir, "model"))  # safetensors
    tokens_np = np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    tokens = torch.from_numpy(tokens_np).long().cuda()

    arrays = {"tokens": tokens_np, "prefill_length": np.int32(PREFILL)}
    failed = {}
    for mode in MODES:
        try:
            arrays[f"logits_{mode}"] = run_mode(model, tokens, mode)
        except Exception as err:  # a mode this fla version lacks or cannot run at these sizes
            failed[mode] = f"{type(err).__name__}: {err}"
    arrays["logits_cache"] = run_cache(model, tokens)
    np.savez_compressed(os.path.join(out_dir, "logits.npz"), **arrays)

    runs = sorted(k[len("logits_") :] for k in arrays if k.startswith("logits_"))
    spread = {
        f"{a} vs {b}": relative(arrays[f"logits_{a}"], arrays[f"logits_{b}"])
        for a, b in itertools.combinations(runs, 2)
    }
    info = dict(
        fla=getattr(fla, "__version__", "?"),
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=torch.cuda.get_device_name(),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        sizes=dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_heads=HEADS,
            expand_v=EXPAND_V,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            batch=BATCH,
            length=LENGTH,
            prefill_length=PREFILL,
        ),
        modes=runs,
        failed=failed,
        spread=spread,
        max_spread=max(spread.values()),
    )
    with open(os.path.join(out_dir, "fixtures.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(json.dumps(info, indent=2))
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(out_dir) for n in ns)
    print(f"{out_dir}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(sys.argv[1])
