"""Parity adapter for the Hunyuan causal 3D VAE (docs/architecture.md "Parity adapters").

Torch side: `parity/reference/hunyuan_vae.py` (upstream names). MindSpore side: `opensora_ms/models/hunyuan_vae.py`
(same cell paths and parameter names), weights converted by `mappings/hunyuan_vae.yaml` (renames) and loaded with
`opensora_ms.loading.load_strict`.

`run_torch` / `run_ms` produce every output of the `hunyuan_vae_tiny` case (its `calls`):

| output | call |
|---|---|
| `z`, `posterior_mean`, `posterior_logvar` | `encode(x, sample_posterior=False, return_posterior=True)` |
| `decoded` | `decode(z)` |
| `z_first_frame`, `decoded_first_frame_latent` | `encode(x[:, :, :1])`, `decode(z_first_frame)` |
| `z_sampled_gen_seed_7` | posterior sample with `torch.Generator().manual_seed(7)` noise (MindSpore gets the same noise as an input: RNG streams differ) |
| `tiling/z_{v}`, `tiling/dec_{v}` for v in plain, spatial_tiled, temporal_tiled, spatial+temporal_tiled | `encode(x_tiling)` and `decode(tiling/z_plain)` with the case's small tiles |

Hooks: the case's hooks cover exactly the first two calls (`encode(x)` then `decode(z)`); both run functions run
those first and **pause every forward (pre-)hook** during the remaining calls, so layer captures and teacher forcing
see the same calls as the case (the later calls would otherwise appear as extra `#n` captures).

`case_cfg["jit"]` (from `msconv parity replay --jit`) runs the MindSpore encoder/decoder as whole `ms.jit` graphs
(one compilation per tile shape); the default is PyNative (hooks), where large convolutions still run as cached
per-shape graphs (`opensora_ms.ops.conv.set_cpu_conv_jit`).
"""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np

CONFIG_NAME = "AutoEncoder3DConfig"

# teacher forcing: every resnet and every resampler gets the reference's recorded input (their signatures are
# (x) -> y on both sides; the mid-block attention is not listed: torch passes the mask, MindSpore builds it)
TEACHER_BLOCKS = [
    "encoder.down_blocks.*.resnets.*",
    "encoder.down_blocks.*.downsamplers.0",
    "{coder}.mid_block.resnets.*",
    "decoder.up_blocks.*.resnets.*",
    "decoder.up_blocks.*.upsamplers.0",
]

PRESETS = {
    # = ../shared/upstream/tiny/hunyuan_vae_tiny.config.json
    "tiny": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 4,
        "block_out_channels": [8, 16, 32, 32], "scale_factor": 0.476986, "shift_factor": 0.0,
        "time_compression_ratio": 4, "spatial_compression_ratio": 8, "mid_block_add_attention": True,
        "sample_size": 256, "sample_tsize": 64, "use_slicing": False, "use_spatial_tiling": False,
        "use_temporal_tiling": False, "tile_overlap_factor": 0.25,
    },
    # the real checkpoint's architecture (hunyuan_vae.safetensors; configs/diffusion/inference/256px.py)
    "real": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
        "use_spatial_tiling": True, "use_temporal_tiling": False,
    },
}

# the case's small tiles (upstream: 256 / 32 / 64 / 16)
DEFAULT_TILES = {"tile_sample_min_size": 32, "tile_latent_min_size": 4, "tile_sample_min_tsize": 16,
                 "tile_latent_min_tsize": 4}
TILING_VARIANTS = {"plain": (False, False), "spatial_tiled": (True, False), "temporal_tiled": (False, True),
                   "spatial+temporal_tiled": (True, True)}
SAMPLE_SEED = 7


def _cfg_dict(cfg) -> dict:
    if isinstance(cfg, dict):
        return cfg.get(CONFIG_NAME, cfg)
    import dataclasses

    return dataclasses.asdict(cfg)


def mapping_name(cfg) -> str:
    return "hunyuan_vae"


def tile_sizes(case_cfg: dict | None) -> dict:
    """The tile sizes of the case's `calls["tiling/*"]` text (defaults: the tiny case's)."""
    text = ((case_cfg or {}).get("calls") or {}).get("tiling/*", "")
    out = dict(DEFAULT_TILES)
    for k in out:
        m = re.search(rf"\b{k}=(\d+)", text)
        if m:
            out[k] = int(m.group(1))
    return out


def sample_noise(shape, seed: int = SAMPLE_SEED) -> np.ndarray:
    """The noise upstream draws for `posterior.sample(generator=torch.Generator().manual_seed(seed))` (fp32)."""
    import torch

    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()


# ---------------------------------------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def _paused_torch_hooks(model):
    saved = []
    for m in model.modules():
        saved.append((m, m._forward_hooks, m._forward_pre_hooks))
        m._forward_hooks, m._forward_pre_hooks = type(m._forward_hooks)(), type(m._forward_pre_hooks)()
    try:
        yield
    finally:
        for m, fh, fph in saved:
            m._forward_hooks, m._forward_pre_hooks = fh, fph


@contextlib.contextmanager
def _paused_ms_hooks(net):
    saved = []
    for _, c in net.cells_and_names():
        saved.append((c, c.__dict__.get("_lazy_forward_hook"), c.__dict__.get("_lazy_forward_pre_hook")))
        object.__setattr__(c, "_lazy_forward_hook", None)
        object.__setattr__(c, "_lazy_forward_pre_hook", None)
    try:
        yield
    finally:
        for c, fh, fph in saved:
            object.__setattr__(c, "_lazy_forward_hook", fh)
            object.__setattr__(c, "_lazy_forward_pre_hook", fph)


@contextlib.contextmanager
def _tiling(model, spatial: bool, temporal: bool, tiles: dict):
    keep = {k: getattr(model, k) for k in list(tiles) + ["use_spatial_tiling", "use_temporal_tiling"]}
    for k, v in tiles.items():
        setattr(model, k, v)
    model.use_spatial_tiling, model.use_temporal_tiling = spatial, temporal
    try:
        yield
    finally:
        for k, v in keep.items():
            setattr(model, k, v)


# ---------------------------------------------------------------------------------------------------------------- torch
def init_weights_(model, seed: int = 0):
    """The cases' weight recipe: matrices/kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.05 N."""
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
            elif owner in norms and leaf == "weight":
                v = 1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            else:
                v = 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(v.to(p.dtype))
    return model


def build_torch(cfg, dtype=None, seed: int = 0):
    import torch

    from parity.reference import hunyuan_vae as R

    model = R.build(_cfg_dict(cfg), dtype=torch.float32)
    init_weights_(model, seed)
    return model.to(dtype or torch.float32).eval()


def _tiling_outputs(model, xt, case_cfg, n, out: dict) -> None:
    """The case's tiled variants (same calls in both frameworks): encode `xt` with each tiling; decode the plain
    latent with each tiling. `n` converts a framework tensor to numpy."""
    tiles, z_plain = tile_sizes(case_cfg), None
    for v, (sp, tm) in TILING_VARIANTS.items():
        with _tiling(model, sp, tm, tiles):
            zv = model.encode(xt, sample_posterior=False)
            z_plain = zv if z_plain is None else z_plain
            out[f"tiling/z_{v}"] = n(zv)
            out[f"tiling/dec_{v}"] = n(model.decode(z_plain))


def run_torch(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import torch

    dtype = next(model.parameters()).dtype

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    def n(a):
        return a.detach().float().numpy()

    out = {}
    x = t(inputs["x"])
    with torch.no_grad(), _tiling(model, False, False, {}):
        z, post = model.encode(x, sample_posterior=False, return_posterior=True)
        out["z"] = n(z)
        out["decoded"] = n(model.decode(z))
        with _paused_torch_hooks(model):
            out["posterior_mean"], out["posterior_logvar"] = n(post.mean), n(post.logvar)
            g = torch.Generator().manual_seed(SAMPLE_SEED)
            out[f"z_sampled_gen_seed_{SAMPLE_SEED}"] = n(model.encode(x, sample_posterior=True, generator=g))
            zf = model.encode(x[:, :, :1], sample_posterior=False)
            out["z_first_frame"] = n(zf)
            out["decoded_first_frame_latent"] = n(model.decode(zf))
            if "x_tiling" in inputs:
                _tiling_outputs(model, t(inputs["x_tiling"]), case_cfg, n, out)
    return out


# ---------------------------------------------------------------------------------------------------------------- ms
def build_ms(cfg):
    """fp32 on CPU, PyNative orchestration (hooks work); `run_ms(..., {"jit": True})` switches to whole graphs."""
    from opensora_ms.models import hunyuan_vae as M

    return M.build(_cfg_dict(cfg), jit=False)


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import mindspore as ms

    def n(a):
        return a.astype(ms.float32).asnumpy()

    jit_before = model.use_jit
    model.set_jit(bool((case_cfg or {}).get("jit", False)))
    out = {}
    try:
        x = ms.Tensor(np.ascontiguousarray(inputs["x"], np.float32))
        with _tiling(model, False, False, {}):
            z, post = model.encode(x, sample_posterior=False, return_posterior=True)
            out["z"] = n(z)
            out["decoded"] = n(model.decode(z))
            with _paused_ms_hooks(model):
                out["posterior_mean"], out["posterior_logvar"] = n(post.mean), n(post.logvar)
                noise = sample_noise(post.mean.shape)
                out[f"z_sampled_gen_seed_{SAMPLE_SEED}"] = n(model.encode(x, sample_posterior=True, noise=noise))
                zf = model.encode(x[:, :, :1], sample_posterior=False)
                out["z_first_frame"] = n(zf)
                out["decoded_first_frame_latent"] = n(model.decode(zf))
                if "x_tiling" in inputs:
                    xt = ms.Tensor(np.ascontiguousarray(inputs["x_tiling"], np.float32))
                    _tiling_outputs(model, xt, case_cfg, n, out)
    finally:
        model.set_jit(jit_before)
    return out


def convert_state(state: dict, cfg=None) -> dict:
    """Torch (upstream) state dict as numpy -> MindSpore state dict via `mappings/hunyuan_vae.yaml`."""
    from converter.mapping import load_mapping

    return load_mapping(mapping_name(cfg)).convert(state)


def load_ms_from_torch(net, torch_model, cfg=None):
    """Convert `torch_model`'s weights with the mapping and load them strictly into `net`."""
    import torch

    from opensora_ms.loading import load_strict

    state = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
             for k, v in torch_model.state_dict().items()}
    load_strict(net, convert_state(state, cfg))
    return net


# ---------------------------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, seed: int) -> dict:
    """Seeded videos in [-1, 1]: `x` (1, C, 9, 16, 24) and `x_tiling` (1, C, 33, 48, 64) — the case's shapes
    (the tiled calls use DEFAULT_TILES)."""
    c = _cfg_dict(cfg)
    ch = c.get("in_channels", 3)
    rng = np.random.default_rng(seed)
    return {
        "x": rng.uniform(-1, 1, (1, ch, 9, 16, 24)).astype(np.float32),
        "x_tiling": rng.uniform(-1, 1, (1, ch, 33, 48, 64)).astype(np.float32),
    }
