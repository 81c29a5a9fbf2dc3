"""Makes the torchscale fixtures of tests/convert/test_torchscale.py with torchscale 0.3.0 itself (CPU).

    python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch safetensors numpy
    /tmp/venv-torch/bin/pip install --no-deps torchscale==0.3.0 fairscale==0.4.0
    /tmp/venv-torch/bin/python tests/convert/make_torchscale_fixtures.py tests/convert/fixtures/torchscale

For each of two tiny random RetNetDecoders (2 layers; every norm weight perturbed so that each weight
matters) it writes:

* ``NAME.safetensors``: the float32 state dict, buffers included, as torchscale holds it;
* ``NAME.npz``: fixed tokens [B, T] and torchscale's float64 logits [B, T, N] in its parallel, chunkwise
  (chunk 8) and recurrent (one token per call) forms, each with
  layernorm eps 0 and 1e-6 (the eps is not in the state dict: the same weights serve both);
* ``fixtures.json``: the settings and versions.

"base" is torchscale's default decoder (no embedding scale); "fairseq" scales embeddings by √D
(``no_scale_embedding=False``) and has an embedding norm (``layernorm_embedding=True``).

For the float64 logits the buffers are set to the same schedule in float64 that the JAX model uses
(log γ rounded once to float32, θ in float64), so that the comparison measures the weights' mapping and
the architecture, not the rounding of torchscale's float32 buffers; and torchscale's casts of norm and
activation inputs to float32 (``x.float()``) keep float64 tensors float64.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types

import numpy as np
import torch

VOCAB, D_MODEL, HEADS, VALUE_DIM, FFN_DIM, LAYERS = 50, 32, 2, 48, 40, 2
# The length is a multiple of the chunk: torchscale pads a partial last chunk with zero rows, whose
# norms divide 0 by 0 at eps 0, and the NaN reaches real rows through the (masked) products.
BATCH, LENGTH, CHUNK = 2, 24, 8
EPSILONS = {"eps0": 0.0, "eps1e-6": 1e-6}
MODELS = {
    "base": dict(no_scale_embedding=True, layernorm_embedding=False),
    "fairseq": dict(no_scale_embedding=False, layernorm_embedding=True),
}


def _import_torchscale():
    # torchscale imports timm only for drop_path, which a drop_path_rate of 0 never builds; timm's own
    # imports need torchvision, which has no CPU wheel for every torch. Stand in for it when missing.
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:

        def drop_path(x, drop_prob=0.0, training=False):
            raise AssertionError("drop_path is not used at drop_path_rate=0")

        for name in ("timm", "timm.models", "timm.models.layers"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["timm.models.layers"].drop_path = drop_path
    import torchscale
    from torchscale.architecture.config import RetNetConfig
    from torchscale.architecture.retnet import RetNetDecoder

    return torchscale, RetNetConfig, RetNetDecoder


def build(config_cls, decoder_cls, seed: int, eps: float, **options):
    torch.manual_seed(seed)
    args = config_cls(
        vocab_size=VOCAB,
        decoder_embed_dim=D_MODEL,
        decoder_value_embed_dim=VALUE_DIM,
        decoder_retention_heads=HEADS,
        decoder_ffn_embed_dim=FFN_DIM,
        decoder_layers=LAYERS,
        activation_fn="swish",
        dropout=0.0,
        layernorm_eps=eps,
        recurrent_chunk_size=CHUNK,
        **options,
    )
    embed = torch.nn.Embedding(VOCAB, D_MODEL)
    torch.nn.init.normal_(embed.weight, std=D_MODEL**-0.5)
    model = decoder_cls(args, embed_tokens=embed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval()


@contextlib.contextmanager
def float64_stays_float64():
    """torchscale computes norms and activations on ``x.float()``: keep float64 tensors float64 there."""
    original = torch.Tensor.float

    def to_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = to_float
    try:
        yield
    finally:
        torch.Tensor.float = original


def logits(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Float64 logits of the three forms: parallel, chunkwise and recurrent."""
    key_dim = D_MODEL // HEADS
    model = model.double()
    log_decay = np.log1p(-(2.0 ** (-5.0 - np.arange(HEADS)))).astype(np.float32).astype(np.float64)
    theta = 1.0 / 10000.0 ** np.linspace(0.0, 1.0, key_dim // 2)
    model.retnet_rel_pos.decay.copy_(torch.from_numpy(log_decay))
    model.retnet_rel_pos.angle.copy_(torch.from_numpy(np.repeat(theta, 2)))
    out = {}
    with torch.no_grad(), float64_stays_float64():
        model.chunkwise_recurrent = False
        out["parallel"] = model(tokens)[0]
        model.chunkwise_recurrent = True
        out["chunkwise"] = model(tokens)[0]
        model.chunkwise_recurrent = False
        state: dict = {}
        steps = [model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(tokens.shape[1])]
        out["recurrent"] = torch.cat(steps, dim=1)
    return {k: v.numpy() for k, v in out.items()}


def main(out_dir: str):
    from safetensors.torch import save_file

    torchscale, config_cls, decoder_cls = _import_torchscale()
    os.makedirs(out_dir, exist_ok=True)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH)))
    for seed, (name, options) in enumerate(MODELS.items()):
        arrays = {"tokens": tokens.numpy().astype(np.int32)}
        for tag, eps in EPSILONS.items():
            model = build(config_cls, decoder_cls, seed, eps, **options)
            weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            if tag == "eps0":
                state = weights
                save_file(state, os.path.join(out_dir, f"{name}.safetensors"))
            # The eps is not in the state dict: every eps must run the same weights.
            assert all(torch.equal(weights[k], state[k]) for k in state), "weights differ between eps"
            for mode, value in logits(model, tokens).items():
                arrays[f"{mode}_{tag}"] = value
        np.savez_compressed(os.path.join(out_dir, f"{name}.npz"), **arrays)
        spread = {
            tag: {
                m: float(
                    np.linalg.norm(arrays[f"{m}_{tag}"] - arrays[f"recurrent_{tag}"])
                    / np.linalg.norm(arrays[f"recurrent_{tag}"])
                )
                for m in ("parallel", "chunkwise")
            }
            for tag in EPSILONS
        }
        print(name, "torchscale forms vs its recurrent form (normwise relative):", spread)
    info = dict(
        torchscale=getattr(torchscale, "__version__", "0.3.0"),
        torch=torch.__version__,
        vocab_size=VOCAB,
        d_model=D_MODEL,
        num_heads=HEADS,
        value_dim=VALUE_DIM,
        ffn_dim=FFN_DIM,
        num_layers=LAYERS,
        chunk_size=CHUNK,
        epsilons=EPSILONS,
        models=MODELS,
    )
    with open(os.path.join(out_dir, "fixtures.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(sys.argv[1])
