"""Parity adapter for the whole sampling pipeline (cases `pipeline_t2v_tiny`, `pipeline_i2v_tiny`).

A pipeline case is several models plus a recipe; its config (../shared/upstream/tiny/README.md, "Cases") holds
`SamplingOption` (upstream's dataclass), `cond_type`, `mmdit` (MMDiTConfig), `vae` (AutoEncoder3DConfig), the
prompt list `prompts(t5/clip index order)` (index i -> inputs `t5_emb/<i>`, `clip_emb/<i>`) and `final_prompt` (the
B prompts). Every parameter is read from there: sizes, steps, guidance values, cond type, patch size, compression.

The model is a container with `mmdit` and `vae` children on both sides, so the case's `mmdit.*` / `vae.*` weights
load strictly into torch and convert through `mappings/pipeline_opensora_v2.yaml` for MindSpore. **The builders
need the whole case config** (not only `SamplingOption`): see `WHOLE_CASE_CONFIG`.

Inputs -> outputs: `noise_z` (else noise from `seed(noise)`), `t5_emb/<i>`, `clip_emb/<i>` (fake encoders),
`ref_latent` (the reference latent upstream sampled from the VAE posterior -- replayed as is; else `ref_image` is
encoded with the posterior mode) -> `stepNN/{img_in, t_vec, cond, pred}` for every model call,
`latent_before_decode`, `video`, `video_uint8_THWC`. The case stores no layer hooks, so every call runs with hooks
paused (nothing to align), and there is no teacher mode (`TEACHER_BLOCKS` is empty).
"""

from __future__ import annotations

import numpy as np

from parity.adapters import base

CONFIG_NAME = "SamplingOption"
TEACHER_BLOCKS: list[str] = []
# the engine must hand build_torch/build_ms/mapping_name the whole case config (SamplingOption + mmdit + vae + ...)
WHOLE_CASE_CONFIG = True

PROMPTS_KEY = "prompts(t5/clip index order)"

# = ../shared/upstream/tiny/pipeline_t2v_tiny.config.json (structured fields only)
PRESETS = {
    "tiny": {
        "SamplingOption": {
            "width": 48, "height": 32, "resolution": None, "aspect_ratio": None, "num_frames": 9, "num_steps": 12,
            "guidance": 7.5, "text_osci": True, "guidance_img": 3.0, "image_osci": True, "scale_temporal_osci": True,
            "seed": None, "shift": True, "method": "i2v", "temporal_reduction": 4, "is_causal_vae": True,
            "flow_shift": None},
        "cond_type": "t2v",
        "seed(noise)": 1234,
        PROMPTS_KEY: ["a red fox running in snow. 24 FPS. 4 motion score.", ""],
        "final_prompt": ["a red fox running in snow. 24 FPS. 4 motion score."],
        "mmdit": {"in_channels": 64, "vec_in_dim": 32, "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0,
                  "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
                  "qkv_bias": True, "guidance_embed": False, "cond_embed": True, "fused_qkv": False,
                  "use_liger_rope": True, "patch_size": 2},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
                "norm_num_groups": 4, "block_out_channels": [8, 16, 32, 32], "scale_factor": 0.476986,
                "shift_factor": 0.0, "time_compression_ratio": 4, "spatial_compression_ratio": 8,
                "mid_block_add_attention": True, "sample_size": 256, "sample_tsize": 64, "use_slicing": False,
                "use_spatial_tiling": True, "use_temporal_tiling": False, "tile_overlap_factor": 0.25},
    },
}


# ---------------------------------------------------------------------------------------------- the case config
def is_whole(cfg) -> bool:
    return isinstance(cfg, dict) and CONFIG_NAME in cfg and "mmdit" in cfg and "vae" in cfg


def whole(cfg) -> dict:
    """The whole case config; a bare `SamplingOption` dict cannot say which models to build. An engine that hands
    the adapter only that makes the case *not covered* (with this reason), not an error."""
    if not is_whole(cfg):
        from parity.engine import NotCoveredError

        raise NotCoveredError("the pipeline adapter needs the whole case config (SamplingOption, mmdit, vae, ...) "
                              "in build_torch/build_ms; this engine passes only the SamplingOption fields "
                              "(WHOLE_CASE_CONFIG)")
    return cfg


def vae_kind(vae_cfg: dict) -> str:
    """"dc_ae" when the AE config has DCAEConfig-only fields, else "hunyuan" (AutoEncoder3DConfig)."""
    dc_only = {"encoder", "decoder", "spatial_tile_size", "temporal_tile_size", "scaling_factor"}
    return "dc_ae" if dc_only & set(vae_cfg) else "hunyuan"


def recipe(case_cfg: dict):
    """(SamplingOption, cond_type, patch size, D = AE spatial compression x patch) from the case config."""
    from opensora_ms.pipeline import plan

    c = whole(case_cfg)
    opt = plan.SamplingOption.from_dict(c[CONFIG_NAME])
    p = int(c["mmdit"].get("patch_size", 2))
    D = int(c["vae"].get("spatial_compression_ratio", 8 if vae_kind(c["vae"]) == "hunyuan" else 32)) * p
    opt = plan.sanitize(opt, D)
    cond_type = c.get("cond_type", "t2v")
    if cond_type not in plan.COND_TYPES:
        raise base.AdapterError(f"cond_type {cond_type!r} is not one of {plan.COND_TYPES}")
    return opt, cond_type, p, D


def text_batch(case_cfg: dict, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(txt (3B, L, ctx), y_vec (3B, vec)) for upstream's CFG texts [prompts, negs, negs] (neg = "" unless the
    case gives `negative_prompt`), each looked up by string in the case's prompt list."""
    c = whole(case_cfg)
    names = c.get(PROMPTS_KEY)
    finals = c.get("final_prompt")
    if not isinstance(names, list) or not isinstance(finals, list) or not finals:
        raise base.AdapterError(f"config needs {PROMPTS_KEY!r} and 'final_prompt' lists")
    neg = c.get("negative_prompt", "")
    negs = neg if isinstance(neg, list) else [neg] * len(finals)
    rows = []
    for text in list(finals) + list(negs) + list(negs):
        if text not in names:
            raise base.AdapterError(f"prompt {text!r} is not in {PROMPTS_KEY}")
        rows.append(names.index(text))
    for i in set(rows):
        for k in (f"t5_emb/{i}", f"clip_emb/{i}"):
            if k not in inputs:
                raise base.AdapterError(f"input {k} missing (text embeddings of prompt {names[i]!r})")
    txt = np.stack([inputs[f"t5_emb/{i}"] for i in rows]).astype(np.float32)
    vec = np.stack([inputs[f"clip_emb/{i}"] for i in rows]).astype(np.float32)
    return txt, vec


def noise_for(case_cfg: dict, inputs: dict) -> np.ndarray:
    from opensora_ms.pipeline import plan

    opt, _, p, D = recipe(case_cfg)
    c = whole(case_cfg)
    shape = plan.latent_shape(opt, len(c["final_prompt"]), int(c["mmdit"]["in_channels"]) // p ** 2, p, D)
    if "noise_z" in inputs:
        z = np.asarray(inputs["noise_z"], np.float32)
        if z.shape != shape:
            raise base.AdapterError(f"input noise_z has shape {list(z.shape)}, the config implies {list(shape)}")
        return z
    return plan.noise(shape, int(c.get("seed(noise)", 0)))


def _record_into(out: dict):
    def record(i, d):
        for k, v in d.items():
            out[f"step{i:02d}/{k}"] = v if isinstance(v, np.ndarray) else v.detach().float().numpy()
    return record


def _finish(out: dict, res: dict) -> dict:
    out["latent_before_decode"] = res["latent_before_decode"]
    out["video"] = res["video"]
    u8 = res["video_uint8"]
    if len(u8) == 1:
        out["video_uint8_THWC"] = u8[0]
    else:
        for i, v in enumerate(u8):
            out[f"video_uint8_THWC/{i}"] = v
    return out


# ---------------------------------------------------------------------------------------------- torch
def mapping_name(cfg) -> str:
    """`pipeline_opensora_v2` (the `mmdit.` + `vae.` prefixed Open-Sora v2 + Hunyuan VAE weights)."""
    if not is_whole(cfg):
        return "pipeline_opensora_v2"
    c = cfg
    if vae_kind(c["vae"]) != "hunyuan" or int(c["mmdit"].get("patch_size", 2)) != 2:
        raise base.AdapterError("pipeline cases: only the Open-Sora v2 MMDiT + Hunyuan VAE layout has a combined "
                                "mapping (pipeline_opensora_v2)")
    return "pipeline_opensora_v2"


def build_torch(cfg, dtype=None, seed: int = 0):
    import torch

    from parity.adapters import dc_ae, hunyuan_vae, mmdit

    c = whole(cfg)
    vae_mod = hunyuan_vae if vae_kind(c["vae"]) == "hunyuan" else dc_ae

    class PipelineModels(torch.nn.Module):
        """The case's models under the prefixes of its weights file."""

        def __init__(self):
            super().__init__()
            self.mmdit = mmdit.build_torch(c["mmdit"], dtype=dtype, seed=seed)
            self.vae = vae_mod.build_torch(c["vae"], dtype=dtype, seed=seed + 1)

    return PipelineModels().eval()


def _refs(case_cfg, inputs, encode, cond_type):
    if cond_type == "t2v":
        return None
    if "ref_latent" in inputs:
        r = np.asarray(inputs["ref_latent"], np.float32)
        r = r[None] if r.ndim == 4 else r          # (C, T, H, W) per sample -> (B, C, T, H, W)
        return [[s] for s in r] if cond_type != "i2v_loop" else [[s[:, :1], s[:, -1:]] for s in r]
    if "ref_image" in inputs:
        return [[encode(img)] for img in np.asarray(inputs["ref_image"], np.float32)]
    raise base.AdapterError(f"cond_type {cond_type}: the case has neither ref_latent nor ref_image")


def run_torch(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import torch

    from parity.reference import pipeline as R

    opt, cond_type, p, _ = recipe(case_cfg)
    txt, vec = text_batch(case_cfg, inputs)
    z = noise_for(case_cfg, inputs)
    out: dict = {}
    with torch.no_grad(), base.paused_torch_hooks(model):
        refs = _refs(case_cfg, inputs, lambda x: R.encode_reference(model.vae, x), cond_type)
        res = R.sample_video(model.mmdit, model.vae, opt, cond_type, z, txt, vec, refs, patch_size=p,
                             record=_record_into(out))
    return _finish(out, res)


# ---------------------------------------------------------------------------------------------- ms
def build_ms(cfg):
    from mindspore import nn

    from parity.adapters import dc_ae, hunyuan_vae, mmdit

    c = whole(cfg)
    vae_mod = hunyuan_vae if vae_kind(c["vae"]) == "hunyuan" else dc_ae

    class PipelineModels(nn.Cell):
        def __init__(self):
            super().__init__()
            self.mmdit = mmdit.build_ms(c["mmdit"])
            self.vae = vae_mod.build_ms(c["vae"])

    return PipelineModels()


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    from opensora_ms.pipeline import sampling as S

    opt, cond_type, p, _ = recipe(case_cfg)
    txt, vec = text_batch(case_cfg, inputs)
    z = noise_for(case_cfg, inputs)
    jit = bool((case_cfg or {}).get("jit", False))
    out: dict = {}
    with base.paused_ms_hooks(model):
        refs = _refs(case_cfg, inputs, lambda x: S.encode_reference(model.vae, x), cond_type)
        res = S.sample_video(model.mmdit, model.vae, opt, cond_type, z, txt, vec, refs, patch_size=p,
                             record=_record_into(out), jit=jit)
    return _finish(out, res)


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, seed: int, case_fields: dict | None = None) -> dict:
    """Seeded inputs in the case conventions: `noise_z`, fake text embeddings per prompt (T5: 7 tokens), and for
    conditioned cases a `ref_image` in [-1, 1]."""
    from opensora_ms.pipeline import plan

    c = whole(dict(cfg, **(case_fields or {})) if CONFIG_NAME in cfg else {CONFIG_NAME: cfg, **(case_fields or {})})
    opt, cond_type, p, D = recipe(c)
    rng = np.random.default_rng(seed)
    out = {"noise_z": rng.standard_normal(plan.latent_shape(opt, len(c["final_prompt"]),
                                                            int(c["mmdit"]["in_channels"]) // p ** 2, p, D),
                                          dtype=np.float32)}
    for i, _ in enumerate(c[PROMPTS_KEY]):
        out[f"t5_emb/{i}"] = rng.standard_normal((7, int(c["mmdit"]["context_in_dim"])), dtype=np.float32)
        out[f"clip_emb/{i}"] = rng.standard_normal((int(c["mmdit"]["vec_in_dim"]),), dtype=np.float32)
    if cond_type != "t2v":
        out["ref_image"] = rng.uniform(-1, 1, (len(c["final_prompt"]), 3, 1, opt.height, opt.width)).astype(np.float32)
    return out
