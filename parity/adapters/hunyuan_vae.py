"""Parity adapter for the Hunyuan causal 3D VAE (docs/architecture.md "Parity adapters").

Torch side: `parity/reference/hunyuan_vae.py` (upstream names). MindSpore side: `opensora_ms/models/hunyuan_vae.py`
(same cell paths and parameter names), weights converted by `mappings/hunyuan_vae.yaml` (renames) and loaded with
`opensora_ms.loading.load_strict`.

`run_torch` / `run_ms` follow the self-describing case format (../shared/upstream/tiny/README.md, "Cases"; helpers
in `parity/adapters/base.py`) and produce what the case's inputs allow:

| input | outputs | call |
|---|---|---|
| `x` | `z`, `posterior_mean`, `posterior_logvar`, `decoded` | `encode(x, return_posterior=True)`, `decode(z)` |
| `x` | `z_first_frame`, `decoded_first_frame_latent` | `encode(x[:, :, :1])`, its decode (this case family's 1-frame outputs) |
| `posterior_eps` (+ `x`) | `z_sampled` | `scale * (mean + exp(logvar / 2) * posterior_eps - shift)` |
| `x_<tag>` | `z_<tag>`, `decoded_<tag>` | as for `x` |
| `z`, `z_<tag>` without the matching `x` | `decoded`, `decoded_<tag>` | decode-only cases |
| `tiling/<n>/x` | `tiling/<n>/{z_plain, z_tiled, dec_tiled}` | `config.tiling.sizes` on the model, `config.tiling.cases[n]` flags |
| `tiling/<n>/z` | `tiling/<n>/{dec_plain, dec_tiled}` | likewise |

Hooks: a case's hooks cover exactly its first two calls (`encode(x)` then `decode(z)`, or `decode(z)` alone); both
run functions make those first and **pause every forward (pre-)hook** during the remaining calls, so layer captures and
teacher forcing see the same calls as the case.

`case_cfg["jit"]` (from `msconv parity replay --jit`) runs the MindSpore encoder/decoder as whole `ms.jit` graphs
(one compilation per tile shape); the default is PyNative (hooks), where large convolutions still run as cached
per-shape graphs (`opensora_ms.ops.conv.ConvSettings.jit`).
"""

from __future__ import annotations

import contextlib

import numpy as np

from parity.adapters import base

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

# the tiny case's small tiles (upstream: 256 / 32 / 64 / 16), used by `make_inputs` / dumps
_TINY_TILING = {
    "sizes": {"tile_sample_min_size": 32, "tile_latent_min_size": 4, "tile_sample_min_tsize": 16,
              "tile_latent_min_tsize": 4, "tile_overlap_factor": 0.25},
    "cases": {"sp": {"use_spatial_tiling": True, "use_temporal_tiling": False},
              "tp": {"use_spatial_tiling": False, "use_temporal_tiling": True},
              "sptp": {"use_spatial_tiling": True, "use_temporal_tiling": True}},
}

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
# case-level fields a dump of a preset writes beside the model config (structured, read back by run_*)
PRESET_CASE_FIELDS = {"tiny": {"tiling": _TINY_TILING}}


def _cfg_dict(cfg) -> dict:
    return base.cfg_dict(cfg, CONFIG_NAME)


def mapping_name(cfg) -> str:
    return "hunyuan_vae"


def sample_noise(shape, seed: int) -> np.ndarray:
    """The noise `posterior.sample(generator=torch.Generator().manual_seed(seed))` draws (fp32): the way to turn a
    seed into a `posterior_eps` input that reproduces upstream's own sampling."""
    import torch

    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()


# ---------------------------------------------------------------------------------------------------------------- calls
def _outputs(model, inputs: dict, case_cfg: dict | None, t, n, paused) -> dict:
    """Every output the inputs allow, in the case's call order; the framework enters through `t` (numpy -> tensor),
    `n` (tensor -> numpy) and `paused` (a context without hooks). The same calls for torch and MindSpore."""
    want = base.wants(case_cfg)
    sizes, plan = base.tiling_plan(case_cfg)
    out: dict[str, np.ndarray] = {}
    first = [True]   # the first encode/decode pair runs with hooks; everything after it without

    @contextlib.contextmanager
    def later():
        if first[0]:
            first[0] = False
            yield
        else:
            with paused():
                yield

    def encode_decode(x, zname, dname, post=False, eps=None):
        with later():
            z, p = model.encode(x, sample_posterior=False, return_posterior=True)
            out[zname] = n(z)
            if want(dname):
                out[dname] = n(model.decode(z))
        if post:
            out["posterior_mean"], out["posterior_logvar"] = n(p.mean), n(p.logvar)
        if eps is not None:
            # posterior sample with the case's noise, scaled as encode(sample_posterior=True) does
            out["z_sampled"] = n(model.scale_factor * (p.sample(noise=t(eps)) - model.shift_factor))

    def decode_only(z, dname):
        with later():
            out[dname] = n(model.decode(t(z)))

    with base.tiling(model, {}, False, False):
        if "x" in inputs:
            encode_decode(t(inputs["x"]), "z", "decoded", post=True, eps=inputs.get("posterior_eps"))
            if want("z_first_frame", "decoded_first_frame_latent"):
                with paused():
                    zf = model.encode(t(inputs["x"])[:, :, :1], sample_posterior=False)
                    out["z_first_frame"] = n(zf)
                    if want("decoded_first_frame_latent"):
                        out["decoded_first_frame_latent"] = n(model.decode(zf))
        elif "z" in inputs:
            decode_only(inputs["z"], "decoded")
        for tag, name in base.tagged_inputs(inputs, "x").items():
            encode_decode(t(inputs[name]), f"z_{tag}", f"decoded_{tag}")
        for tag, name in base.tagged_inputs(inputs, "z").items():
            if f"x_{tag}" not in inputs:
                decode_only(inputs[name], f"decoded_{tag}")
    for c in sorted(set(base.tiling_input_cases(inputs, "x")) | set(base.tiling_input_cases(inputs, "z"))):
        if c not in plan:
            raise base.AdapterError(f"input tiling/{c}/...: config.tiling.cases has no {c!r}")
        sp, tm = plan[c]
        if not want(*(f"tiling/{c}/{k}" for k in ("z_plain", "z_tiled", "dec_tiled", "dec_plain"))):
            continue  # nobody compares this tiling case (e.g. `--outputs`): skip its encodes/decodes
        with paused():
            if f"tiling/{c}/x" in inputs:
                x = t(inputs[f"tiling/{c}/x"])
                with base.tiling(model, sizes, False, False):
                    z_plain = model.encode(x, sample_posterior=False)
                out[f"tiling/{c}/z_plain"] = n(z_plain)
                with base.tiling(model, sizes, sp, tm):
                    out[f"tiling/{c}/z_tiled"] = n(model.encode(x, sample_posterior=False))
                    out[f"tiling/{c}/dec_tiled"] = n(model.decode(z_plain))
            if f"tiling/{c}/z" in inputs:
                z = t(inputs[f"tiling/{c}/z"])
                with base.tiling(model, sizes, False, False):
                    out[f"tiling/{c}/dec_plain"] = n(model.decode(z))
                with base.tiling(model, sizes, sp, tm):
                    out[f"tiling/{c}/dec_tiled"] = n(model.decode(z))
    return out


# ---------------------------------------------------------------------------------------------------------------- torch
def init_weights_(model, seed: int = 0):
    """The cases' weight recipe (`base.init_weights_`); GroupNorm weights are the scales."""
    import torch

    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    return base.init_weights_(model, seed, lambda name, p: name.rsplit(".", 1)[0] in norms and name.endswith(".weight"))


def build_torch(cfg, dtype=None, seed: int = 0):
    import torch

    from parity.reference import hunyuan_vae as R

    model = R.build(_cfg_dict(cfg), dtype=torch.float32)
    init_weights_(model, seed)
    return model.to(dtype or torch.float32).eval()


def run_torch(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import torch

    dtype = next(model.parameters()).dtype

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    def n(a):
        return a.detach().float().numpy()

    with torch.no_grad():
        return _outputs(model, inputs, case_cfg, t, n, lambda: base.paused_torch_hooks(model))


# ---------------------------------------------------------------------------------------------------------------- ms
def build_ms(cfg):
    """In the op layer's model dtype (fp32 on CPU, bf16 in CPU-bf16 and on Ascend), PyNative orchestration (hooks
    work); `run_ms(..., {"jit": True})` switches to whole graphs."""
    from opensora_ms.models import hunyuan_vae as M

    return base.ms_in_model_dtype(M.build(_cfg_dict(cfg), jit=False))


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import mindspore as ms

    dtype = base.ms_dtype(model)  # floating inputs in the model dtype (upstream's policy, SPEC §g)

    def t(a):
        return base.ms_tensor(a, dtype)

    def n(a):
        return a.astype(ms.float32).asnumpy()

    jit_before = model.use_jit
    model.set_jit(bool((case_cfg or {}).get("jit", False)))
    try:
        return _outputs(model, inputs, case_cfg, t, n, lambda: base.paused_ms_hooks(model))
    finally:
        model.set_jit(jit_before)


def convert_state(state: dict, cfg=None) -> dict:
    """Torch (upstream) state dict as numpy -> MindSpore state dict via `mappings/hunyuan_vae.yaml`."""
    return base.convert_state(mapping_name(cfg), state)


def load_ms_from_torch(net, torch_model, cfg=None):
    """Convert `torch_model`'s weights with the mapping and load them strictly into `net`."""
    return base.load_ms_from_torch(net, torch_model, mapping_name(cfg))


# ---------------------------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, seed: int, case_fields: dict | None = None) -> dict:
    """Seeded inputs in the case conventions: a video `x` (1, C, 9, 16, 24) in [-1, 1], its posterior noise
    `posterior_eps`, and for every case of `case_fields["tiling"]` a `tiling/<n>/x` (1, C, 33, 48, 64)."""
    c = _cfg_dict(cfg)
    ch = c.get("in_channels", 3)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (1, ch, 9, 16, 24)).astype(np.float32)
    lat = (1, c.get("latent_channels", 16), (9 - 1) // c.get("time_compression_ratio", 4) + 1,
           16 // c.get("spatial_compression_ratio", 8), 24 // c.get("spatial_compression_ratio", 8))
    out = {"x": x, "posterior_eps": rng.standard_normal(lat).astype(np.float32)}
    _, plan = base.tiling_plan(case_fields)
    for name in plan:
        out[f"tiling/{name}/x"] = rng.uniform(-1, 1, (1, ch, 33, 48, 64)).astype(np.float32)
    return out
