"""Parity adapter for the Flux 2D autoencoder (Open-Sora 2.0's t2i2v image AE, docs/architecture.md "Parity adapters").

Torch side: `parity/reference/flux_ae.py` (upstream names). MindSpore side: `opensora_ms/models/flux_ae.py` (same
cell paths and parameter names), weights converted by `mappings/flux_ae.yaml` (renames) and loaded with
`opensora_ms.loading.load_strict`. No upstream case exists: cases are dumped from the reference
(`msconv parity dump flux_ae --config tiny --out DIR/flux_ae_tiny`), which is itself cross-checked against
diffusers' `AutoencoderKL` (tests/test_flux_ae_reference.py).

Outputs, by the shared case conventions (../shared/upstream/tiny/README.md "Cases"), as far as the inputs allow:

| input | outputs | calls |
|---|---|---|
| `x` (B, C, H, W) or (B, C, T, H, W) | `z`, `posterior_mean`, `posterior_logvar`, `decoded` | `encode(x, sample_posterior=False, return_posterior=True)`, `decode(z)` |
| `posterior_eps` (the mean's shape, with `x`) | `z_sampled` = scale * (mean + exp(logvar / 2) * eps - shift) | `encode(x, sample_posterior=True, noise=eps)` |
| `x_<tag>` | `z_<tag>`, `decoded_<tag>` | as for `x` |
| `z` without `x` | `decoded` | `decode(z)` (decode-only case) |
| `z_<tag>` | `decoded_<tag>` | `decode(z_<tag>)` |

Hooks cover the first calls only -- `encode(x)` then `decode(z)` (or the first decode of a decode-only case); every
later call runs with all forward (pre-)hooks paused, so layer captures and teacher forcing see the same calls in
dump and replay.
"""

from __future__ import annotations

import numpy as np

from parity.adapters.base import (AdapterError, cfg_dict, init_weights_, paused_ms_hooks, paused_torch_hooks,
                                  tagged_inputs, wants)

CONFIG_NAME = "AutoEncoderConfig"

# teacher forcing: every resnet, resampler and mid-block attention gets the reference's recorded input (all are
# (x) -> y on both sides)
TEACHER_BLOCKS = [
    "encoder.down.*.block.*",
    "encoder.down.*.downsample",
    "{coder}.mid.block_1",
    "{coder}.mid.attn_1",
    "{coder}.mid.block_2",
    "decoder.up.*.block.*",
    "decoder.up.*.upsample",
]

PRESETS = {
    # small widths, two levels (one down / up sampling), 32 groups dividing 32 and 64 channels
    "tiny": {
        "resolution": 32, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 2,
        "z_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159,
    },
    # flux1-dev-ae.safetensors (configs/diffusion/inference/plugins/t2i2v.py, img_flux_ae)
    "real": {
        "resolution": 256, "in_channels": 3, "ch": 128, "out_ch": 3, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
        "z_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159,
    },
}


def _cfg(cfg) -> dict:
    return cfg_dict(cfg, CONFIG_NAME)


def mapping_name(cfg) -> str:
    return "flux_ae"


def _is_scale(name: str, p) -> bool:
    """GroupNorm weights (`norm`, `norm1`, `norm2`, `norm_out`): 1 + 0.1 N in the cases' recipe."""
    owner, leaf = name.rsplit(".", 1)
    return leaf == "weight" and owner.rsplit(".", 1)[-1] in ("norm", "norm1", "norm2", "norm_out")


def build_torch(cfg, dtype=None, seed: int = 0):
    import torch

    from parity.reference import flux_ae as R

    model = R.build(_cfg(cfg), dtype=torch.float32)
    init_weights_(model, seed, _is_scale)
    return model.to(dtype or torch.float32).eval()


def build_ms(cfg):
    """In the op layer's model dtype: fp32 on CPU, bf16 in CPU-bf16 and on Ascend (upstream's policy)."""
    from opensora_ms.models import flux_ae as M
    from opensora_ms.ops.device import model_dtype

    return M.build(_cfg(cfg), dtype=model_dtype())


# ---------------------------------------------------------------------------------------------------------------- calls
def _plan(inputs: dict, case_cfg: dict | None):
    """(encode jobs [(x input, z out, decoded out)], decode jobs [(z input, decoded out)], sample?) the inputs
    allow, restricted to outputs the case holds (all of them for a dump)."""
    want = wants(case_cfg)
    enc, dec = [], []
    if "x" in inputs:
        enc.append(("x", "", ""))
    elif "z" in inputs and want("decoded"):
        dec.append(("z", "decoded"))
    xtags = tagged_inputs(inputs, "x")
    for tag, name in sorted(xtags.items()):
        if want(f"z_{tag}", f"decoded_{tag}"):
            enc.append((name, f"_{tag}", f"_{tag}"))
    for tag, name in sorted(tagged_inputs(inputs, "z").items()):
        if tag in xtags:
            raise AdapterError(f"inputs x_{tag} and z_{tag} would both give decoded_{tag}")
        if want(f"decoded_{tag}"):
            dec.append((name, f"decoded_{tag}"))
    sample = "x" in inputs and "posterior_eps" in inputs and want("z_sampled")
    if "posterior_eps" in inputs and "x" not in inputs:
        raise AdapterError("input posterior_eps needs the input x (z_sampled samples x's posterior)")
    return enc, dec, sample


def _run(model, inputs, case_cfg, to_fw, to_np, paused):
    enc, dec, sample = _plan(inputs, case_cfg)
    out = {}
    first = True

    def hooked():
        return _Null() if first else paused(model)

    for name, ztag, dtag in enc:
        with hooked():
            z, post = model.encode(to_fw(inputs[name]), sample_posterior=False, return_posterior=True)
        out["z" + ztag] = to_np(z)
        if name == "x":
            out["posterior_mean"], out["posterior_logvar"] = to_np(post.mean), to_np(post.logvar)
        with hooked():
            out["decoded" + dtag] = to_np(model.decode(z))
        first = False
        if name == "x" and sample:
            with paused(model):
                out["z_sampled"] = to_np(model.encode(to_fw(inputs["x"]), sample_posterior=True,
                                                      noise=to_fw(inputs["posterior_eps"])))
    for name, dname in dec:
        with hooked():
            out[dname] = to_np(model.decode(to_fw(inputs[name])))
        first = False
    return out


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_torch(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import torch

    dtype = next(model.parameters()).dtype

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    def n(a):
        return a.detach().float().contiguous().numpy()

    with torch.no_grad():
        return _run(model, inputs, case_cfg, t, n, paused_torch_hooks)


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import mindspore as ms

    from parity.adapters.base import ms_dtype, ms_tensor

    dtype = ms_dtype(model)  # floating inputs in the model dtype (upstream's policy, SPEC §g)

    def t(a):
        return ms_tensor(a, dtype)

    def n(a):
        return a.astype(ms.float32).asnumpy()

    return _run(model, inputs, case_cfg, t, n, paused_ms_hooks)


# ---------------------------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, seed: int) -> dict:
    """Seeded inputs exercising every path: images `x` (2, C, 8f, 8f) in [-1, 1] (f = the downsampling factor;
    tiny: 16 x 16), `posterior_eps` (the posterior's shape), a non-square video `x_video` (1, C, 3, 6f, 4f) (frames
    folded into the batch) and a decode-only video latent `z_latent` (1, z, 2, 3, 2)."""
    c = _cfg(cfg)
    ch_in, zc = int(c.get("in_channels", 3)), int(c.get("z_channels", 16))
    f = 2 ** (len(c.get("ch_mult", [1, 2, 4, 4])) - 1)
    rng = np.random.default_rng(seed)
    h, w = 8 * f, 8 * f
    return {
        "x": rng.uniform(-1, 1, (2, ch_in, h, w)).astype(np.float32),
        "posterior_eps": rng.standard_normal((2, zc, h // f, w // f)).astype(np.float32),
        "x_video": rng.uniform(-1, 1, (1, ch_in, 3, 6 * f, 4 * f)).astype(np.float32),
        "z_latent": rng.standard_normal((1, zc, 2, 3, 2)).astype(np.float32),
    }
