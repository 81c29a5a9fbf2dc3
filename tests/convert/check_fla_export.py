"""GPU check that fla loads our exports: ``AutoModelForCausalLM`` reads ``export_fla``'s directory and its
logits match ours in every mode (fla's kernels need a GPU; run from the repository root):

    python tests/convert/check_fla_export.py                          # two random tiny models
    python tests/convert/check_fla_export.py tests/convert/fixtures/fla   # also re-export fla's fixture

Needs torch (CUDA), fla 0.6 and transformers next to this library. Our model runs on the CPU (JAX stays off
the GPU that torch uses). For each model it prints the normwise relative error of every one of our modes
against each of fla's (chunk, fused_recurrent, cache = prefill + steps) and exits non-zero when one
exceeds the tolerance of tests/convert/test_fla.py. With a fixture directory it also loads fla's
fixture, exports it again, and checks that fla's logits of the re-export equal the fixture's.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from retnet_jax import convert  # noqa: E402
from tests.convert.common import MODES, all_modes, fla_style_model  # noqa: E402
from tests.convert.test_fla import FLA_RTOL  # noqa: E402
from tests.helpers import relative_error  # noqa: E402

LENGTH, PREFILL = 100, 70  # more than 64 tokens: fla's layer runs fused_recurrent below that
VARIANTS = {
    "untied": {},
    "tied, no head-norm weight": {"tie_embeddings": True, "head_norm": "rms"},
}
SIZES = dict(vocab_size=100, d_model=64, num_heads=2, value_dim=128, ffn_dim=96)


def fla_logits(directory: str, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """fla's float32 logits of the checkpoint in ``directory``: chunk, fused_recurrent and cache."""
    import fla  # noqa: F401  (registers model_type "retnet" with transformers)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda().eval()
    assert type(model).__module__.startswith("fla."), type(model)
    ids = torch.from_numpy(np.asarray(tokens)).long().cuda()
    out = {}
    with torch.no_grad():
        for mode in ("chunk", "fused_recurrent"):
            for layer in model.model.layers:
                layer.attn.mode = mode
            out[mode] = model(input_ids=ids).logits
        for layer in model.model.layers:
            layer.attn.mode = "chunk"
        step = model(input_ids=ids[:, :PREFILL], use_cache=True)
        logits, cache = [step.logits], step.past_key_values
        for t in range(PREFILL, ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(step.logits)
            cache = step.past_key_values
        out["cache"] = torch.cat(logits, dim=1)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def compare(name: str, ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> bool:
    worst = 0.0
    print(f"\n{name}: ours (rows) vs fla (columns), normwise relative error of the logits")
    print(f"{'':>18}" + "".join(f"{k:>18}" for k in theirs))
    for mode in MODES:
        errors = [relative_error(ours[mode], theirs[k]) for k in theirs]
        worst = max(worst, *errors)
        print(f"{mode:>18}" + "".join(f"{e:>18.2e}" for e in errors))
    spread = max(relative_error(theirs[a], theirs[b]) for a in theirs for b in theirs if a != b)
    print(f"fla's own mode-to-mode spread: {spread:.2e}; worst: {worst:.2e}; tolerance {FLA_RTOL:.0e}")
    return worst < FLA_RTOL


def main(fixture: str | None) -> int:
    ok = True
    tokens = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, LENGTH)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, variant) in enumerate(VARIANTS.items()):
            model, variables = fla_style_model(i, **SIZES, **variant)
            directory = os.path.join(tmp, f"export{i}")
            convert.export_fla(model, variables, directory)
            ours = all_modes(model, variables, tokens, chunk_sizes=(25, 64), prefill=PREFILL)
            ok &= compare(name, ours, fla_logits(directory, tokens))
        if fixture is not None:
            reference = np.load(os.path.join(fixture, "logits.npz"))
            model, variables = convert.load_fla(os.path.join(fixture, "model"))
            directory = os.path.join(tmp, "reexport")
            convert.export_fla(model, variables, directory)
            again = fla_logits(directory, reference["tokens"])
            for mode in ("chunk", "fused_recurrent", "cache"):
                error = relative_error(again[mode], reference[f"logits_{mode}"])
                print(f"fixture re-exported, fla {mode}: {error:.2e} from the fixture's logits")
                ok &= error < 1e-6
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
