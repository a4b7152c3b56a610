"""Parity adapter for the Video DC-AE (docs/architecture.md "Parity adapters").

Torch side: `parity/reference/dc_ae.py` (upstream names). MindSpore side: `opensora_ms/models/dc_ae.py` (same cell
paths and parameter names), weights converted by `mappings/video_dc_ae.yaml` (renames) and loaded strictly.

Outputs follow the self-describing case conventions (../shared/upstream/tiny/README.md "Cases"), read from
structured fields only, and only what the inputs allow is run:

| input | outputs |
|---|---|
| `x` | `z` = encode(x), `decoded` = decode(z) |
| `x_<tag>` | `z_<tag>`, `decoded_<tag>` |
| `z` or `z_<tag>` alone (no `x` / `x_<tag>`) | `decoded` / `decoded_<tag>` |
| `tiling/<n>/x` | `tiling/<n>/z_plain`, `tiling/<n>/z_tiled`, `tiling/<n>/dec_tiled` (decode of z_plain, tiled) |
| `tiling/<n>/z` | `tiling/<n>/dec_plain`, `tiling/<n>/dec_tiled` |

Tiling: `config["tiling"]["sizes"]` (upstream attribute names: `spatial_tile_size`, `spatial_tile_latent_size`,
`temporal_tile_size`, `temporal_tile_latent_size`, `tile_overlap_factor`) are set on the model and
`config["tiling"]["cases"][n]` gives the flags. Hooks: the case's hooks record the first calls (encode(x) then
decode(z), or the first decode of a decode-only case); every later call runs with hooks paused.
"""

from __future__ import annotations

import numpy as np

from parity.adapters import base

CONFIG_NAME = "DCAEConfig"

# teacher forcing: every block of every stage (ResBlock / EfficientViT block / down- and up-sampling residual
# blocks) and the stems get the reference's recorded input; all are (x) -> y on both sides
TEACHER_BLOCKS = [
    "encoder.stages.*.op_list.*",
    "encoder.project_out",
    "decoder.project_in",
    "decoder.stages.*.op_list.*",
    "decoder.project_out",
]

_TINY = {
    "in_channels": 3, "latent_channels": 32, "time_compression_ratio": 4, "spatial_compression_ratio": 32,
    "encoder": {
        "in_channels": 3, "latent_channels": 32, "width_list": [4, 16, 16, 32, 32, 64], "depth_list": [2, 2, 2, 3, 3, 3],
        "block_type": ["ResBlock", "ResBlock", "ResBlock", "EViTS5_GLU", "EViTS5_GLU", "EViTS5_GLU"],
        "norm": "rms3d", "act": "silu", "downsample_block_type": "Conv", "downsample_match_channel": True,
        "downsample_shortcut": "averaging", "out_norm": None, "out_act": None, "out_shortcut": "averaging",
        "double_latent": False, "is_video": True, "temporal_downsample": [False, False, False, True, True, False],
    },
    "decoder": {
        "in_channels": 3, "latent_channels": 32, "in_shortcut": "duplicating", "width_list": [4, 16, 16, 32, 32, 64],
        "depth_list": [3, 3, 3, 3, 3, 3],
        "block_type": ["ResBlock", "ResBlock", "ResBlock", "EViTS5_GLU", "EViTS5_GLU", "EViTS5_GLU"],
        "norm": "rms3d", "act": "silu", "upsample_block_type": "InterpolateConv", "upsample_match_channel": True,
        "upsample_shortcut": "duplicating", "out_norm": "rms3d", "out_act": "relu", "is_video": True,
        "temporal_upsample": [False, False, False, True, True, False],
    },
    "use_quant_conv": False, "pretrained_path": None, "pretrained_source": "dc-ae", "scaling_factor": None,
    "is_image_model": False, "is_training": False, "use_spatial_tiling": False, "use_temporal_tiling": False,
    "spatial_tile_size": 256, "temporal_tile_size": 32, "tile_overlap_factor": 0.25,
}


def _real() -> dict:
    """The F32T4C128 architecture (= ../shared/upstream/manifests/video_dc_ae_f32t4c128.dcaeconfig.json)."""
    import copy

    c = copy.deepcopy(_TINY)
    c["latent_channels"] = 128
    for side in ("encoder", "decoder"):
        c[side]["latent_channels"] = 128
        c[side]["width_list"] = [128, 256, 512, 512, 1024, 1024]
    return c


PRESETS = {"tiny": _TINY, "real": _real()}

# the tiny case's structured case-level fields (= dc_ae_tiny.config.json "tiling")
PRESET_CASE_FIELDS = {
    "tiny": {"tiling": {
        "sizes": {"spatial_tile_size": 128, "spatial_tile_latent_size": 4, "temporal_tile_size": 16,
                  "temporal_tile_latent_size": 4, "tile_overlap_factor": 0.25},
        "cases": {"sp": {"use_spatial_tiling": True, "use_temporal_tiling": False},
                  "tp": {"use_spatial_tiling": False, "use_temporal_tiling": True}},
    }},
}


def mapping_name(cfg) -> str:
    return "video_dc_ae"


# ---------------------------------------------------------------------------------------------- torch
def _is_scale(name, p) -> bool:
    """RMSNorm3d weights (the only 1-D `.weight` parameters: convs are >= 2-D)."""
    return name.endswith(".weight") and p.ndim == 1


def build_torch(cfg, dtype=None, seed: int = 0):
    import torch

    from parity.reference import dc_ae as R

    model = R.build(base.cfg_dict(cfg, CONFIG_NAME), dtype=torch.float32)
    if next(model.parameters()).device.type != "meta":
        base.init_weights_(model, seed, is_scale=_is_scale)
    return model.to(dtype or torch.float32).eval()


def build_ms(cfg):
    """In the op layer's model dtype (fp32 on CPU, bf16 in CPU-bf16 and on Ascend: upstream's policy)."""
    from opensora_ms.models import dc_ae as M

    return base.ms_in_model_dtype(M.build(base.cfg_dict(cfg, CONFIG_NAME)))


# ---------------------------------------------------------------------------------------------- shared driver
def _drive(model, inputs: dict, case_cfg: dict | None, t, n, paused) -> dict:
    """Every output the inputs allow (framework-neutral: `t` numpy -> tensor, `n` tensor -> numpy, `paused()` a
    context with hooks paused). The first encode/decode pair runs with hooks on (what the case's hooks record)."""
    want = base.wants(case_cfg)
    sizes, plan = base.tiling_plan(case_cfg)
    out: dict = {}
    hooked = [True]

    def calls():
        """Hooks on for the first pair of calls only."""
        import contextlib

        if hooked[0]:
            hooked[0] = False
            return contextlib.nullcontext()
        return paused()

    def encode_decode(x_name, z_name, d_name):
        with calls():
            z = model.encode(t(inputs[x_name]))
            d = model.decode(z) if want(d_name) or x_name == "x" else None
        out[z_name] = n(z)
        if d is not None:
            out[d_name] = n(d)

    with base.tiling(model, {}, False, False):
        if "x" in inputs:
            if want("z", "decoded"):  # skipped when nobody compares them (e.g. `--outputs` picks a decode only)
                encode_decode("x", "z", "decoded")
        elif "z" in inputs:
            with calls():
                out["decoded"] = n(model.decode(t(inputs["z"])))
        xs = base.tagged_inputs(inputs, "x")
        for tag, name in xs.items():
            if want(f"z_{tag}", f"decoded_{tag}"):
                encode_decode(name, f"z_{tag}", f"decoded_{tag}")
        for tag, name in base.tagged_inputs(inputs, "z").items():
            if tag not in xs and want(f"decoded_{tag}"):
                with calls():
                    out[f"decoded_{tag}"] = n(model.decode(t(inputs[name])))

    def flags(c):
        if c not in plan:
            raise base.AdapterError(f"input tiling/{c}/...: config.tiling.cases has no case {c!r}")
        return plan[c]

    for c in base.tiling_input_cases(inputs, "x"):
        sp, tm = flags(c)
        p = f"tiling/{c}/"
        with calls():
            x = t(inputs[p + "x"])
            with base.tiling(model, sizes, False, False):
                z_plain = model.encode(x)
            out[p + "z_plain"] = n(z_plain)
            with base.tiling(model, sizes, sp, tm):
                if want(p + "z_tiled"):
                    out[p + "z_tiled"] = n(model.encode(x))
                if want(p + "dec_tiled"):
                    out[p + "dec_tiled"] = n(model.decode(z_plain))
    for c in base.tiling_input_cases(inputs, "z"):
        sp, tm = flags(c)
        p = f"tiling/{c}/"
        if f"tiling/{c}/x" in inputs and p + "dec_tiled" in out:
            continue  # the x input already gave this case's decode outputs
        with calls():
            z = t(inputs[p + "z"])
            if want(p + "dec_plain"):
                with base.tiling(model, sizes, False, False):
                    out[p + "dec_plain"] = n(model.decode(z))
            if want(p + "dec_tiled"):
                with base.tiling(model, sizes, sp, tm):
                    out[p + "dec_tiled"] = n(model.decode(z))
    return out


def run_torch(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import torch

    dtype = next(model.parameters()).dtype

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    def n(a):
        return a.detach().float().numpy()

    with torch.no_grad():
        return _drive(model, inputs, case_cfg, t, n, lambda: base.paused_torch_hooks(model))


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import mindspore as ms

    dtype = base.ms_dtype(model)  # floating inputs in the model dtype (upstream's policy, SPEC §g)

    def t(a):
        return base.ms_tensor(a, dtype)

    def n(a):
        return a.astype(ms.float32).asnumpy()

    return _drive(model, inputs, case_cfg, t, n, lambda: base.paused_ms_hooks(model))


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, seed: int, case_fields: dict | None = None) -> dict:
    """Seeded inputs in the case conventions: `x` (1, C, 8, 32, 64) in [-1, 1] (8 frames -> 2 latent frames) and,
    for every case of a `tiling` field, a latent `tiling/<n>/z` just over the tile sizes (2 x 2 spatial tiles for a
    spatial case, 3 temporal tiles for a temporal one)."""
    c = base.cfg_dict(cfg, CONFIG_NAME)
    rng = np.random.default_rng(seed)
    ch, lc = c.get("in_channels", 3), c.get("latent_channels", 32)
    out = {"x": rng.uniform(-1, 1, (1, ch, 8, 32, 64)).astype(np.float32)}
    sizes, plan = base.tiling_plan(case_fields)
    s_lat = int(sizes.get("spatial_tile_latent_size", c.get("spatial_tile_size", 256) // c.get("spatial_compression_ratio", 32)))
    t_lat = int(sizes.get("temporal_tile_latent_size", c.get("temporal_tile_size", 32) // c.get("time_compression_ratio", 4)))
    for name, (sp, tm) in plan.items():
        t = 2 * t_lat if tm else 2
        hw = (s_lat, s_lat + 2) if sp else (1, 1)
        out[f"tiling/{name}/z"] = rng.standard_normal((1, lc, t) + hw).astype(np.float32)
    return out
