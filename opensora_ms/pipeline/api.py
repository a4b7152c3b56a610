"""`generate(...)`: prompt (+ reference) -> mp4/PNG with converted weights, upstream's recipe end to end.

Order and memory plan (one card): text encoders (T5, CLIP) encode the CFG batch and are released; T2I2V runs
FLUX.1-dev + the Flux AE for the first frame and releases them; the video AE encodes the references; the MMDiT
denoises; with `offload` the MMDiT is released before the AE decode (AE tiling on, as upstream). The weights folder
is the layout `msconv download-and-convert` writes (docs/download.md, docs/pipeline.md); `load_component` is the
one function that reads it.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from converter.errors import UserError
from converter.memory import PeakRSS

from . import media, plan

__all__ = ["GenerateError", "Request", "Result", "generate", "make_plan", "load_component", "COMPONENTS"]


class GenerateError(UserError):
    """Bad request, missing/wrong weights or media: one `error:` line, exit 2."""


# component folder -> (opensora_ms.models module, config name in config.json; None = a Hugging Face config.json)
COMPONENTS = {
    "mmdit": ("mmdit", "MMDiTConfig"), "mmdit_hc": ("mmdit", "MMDiTConfig"), "flux": ("mmdit", "MMDiTConfig"),
    "vae": ("hunyuan_vae", "AutoEncoder3DConfig"), "dc_ae": ("dc_ae", "DCAEConfig"),
    "flux_ae": ("flux_ae", "AutoEncoderConfig"), "t5": ("t5", None), "clip": ("clip", None),
}
T5_MAX_LENGTH = 512                                # configs/diffusion/inference/256px.py:66-76
T2I_RESOLUTION, T2I_GUIDANCE = "768px", 4.0        # plugins/t2i2v.py, modify_option_to_t2i


@dataclass
class Request:
    """What `msconv generate` takes (defaults: configs/diffusion/inference/256px.py)."""

    prompt: str
    weights: str
    resolution: str = "256px"
    aspect_ratio: str = "16:9"
    num_frames: int = 129
    steps: int = 50
    seed: int = 42
    cond_type: Optional[str] = None          # None: t2v, or i2v_head / v2v_head from the reference's kind
    ref: Optional[str] = None                # image or video; i2v_loop: "HEAD;TAIL"
    motion_score: str = "4"
    guidance: float = 7.5
    guidance_img: float = 3.0
    negative_prompt: str = ""
    t2i2v: bool = False
    t2i_resolution: str = T2I_RESOLUTION     # upstream's img_resolution (plugins/t2i2v.py)
    high_compression: bool = False
    out: str = "sample.mp4"
    device: str = "CPU"
    dtype: Optional[str] = None              # fp32 | bf16; None: fp32 on CPU, bf16 on Ascend (upstream's policy)
    offload: bool = False
    vae_tile_size: Optional[int] = None
    noise: Optional[str] = None              # safetensors/npy file with the initial noise (upstream dump replay)
    text_embeddings: Optional[str] = None    # safetensors: txt (3B, L, ctx), y_vec (3B, vec) [+ t2i/txt, t2i/y_vec]
    fps: int = 24
    jit: bool = True


@dataclass
class Result:
    path: Optional[Path]
    plan: dict
    seconds: float = 0.0
    step_seconds: list = field(default_factory=list)
    peak_rss_bytes: int = 0
    image_path: Optional[Path] = None        # the T2I frame of t2i2v
    video: Optional[np.ndarray] = None       # (T, H, W, 3) uint8


# ------------------------------------------------------------------------------------------------ the plan
def _variant(req: Request) -> dict:
    """The model set: Open-Sora v2 (MMDiT + Hunyuan VAE, patch 2, D=16) or high compression (+ DC-AE, patch 1,
    D=32, upstream's high_compression.py)."""
    if req.high_compression:
        return {"mmdit": "mmdit_hc", "vae": "dc_ae", "patch": 1, "D": 32, "causal_ae": False}
    return {"mmdit": "mmdit", "vae": "vae", "patch": 2, "D": 16, "causal_ae": True}


def _cond_type(req: Request) -> str:
    if req.t2i2v:
        if req.cond_type not in (None, "i2v_head"):
            raise GenerateError(f"--t2i2v generates the first frame: cond type must be i2v_head, got {req.cond_type}")
        if req.ref:
            raise GenerateError("--t2i2v makes its own reference image; drop --ref")
        return "i2v_head"
    ct = req.cond_type
    if ct is None:
        if not req.ref:
            return "t2v"
        return "v2v_head" if Path(req.ref.split(";")[0]).suffix.lower() in media.VIDEO_EXTS else "i2v_head"
    if ct not in plan.COND_TYPES:
        raise GenerateError(f"unknown cond type {ct!r} (known: {', '.join(plan.COND_TYPES)})")
    if ct != "t2v" and not req.ref:
        raise GenerateError(f"cond type {ct} needs a reference: --ref IMAGE|VIDEO")
    if ct == "t2v" and req.ref:
        raise GenerateError("--ref given with cond type t2v; choose an i2v_* or v2v_* cond type")
    if ct.startswith("v2v") and Path(req.ref).suffix.lower() not in media.VIDEO_EXTS:
        raise GenerateError(f"cond type {ct} needs a video reference ({', '.join(media.VIDEO_EXTS)}), got {req.ref}")
    return ct


def _options(req: Request, D: int) -> plan.SamplingOption:
    opt = plan.SamplingOption.from_dict(dict(plan.OPEN_SORA_V2, resolution=req.resolution,
                                             aspect_ratio=req.aspect_ratio, num_frames=int(req.num_frames),
                                             num_steps=int(req.steps), guidance=float(req.guidance),
                                             guidance_img=float(req.guidance_img), seed=int(req.seed)))
    return plan.sanitize(opt, D)


def make_plan(req: Request, check_weights: bool = True) -> dict:
    """Sizes, latent shape, steps and a memory estimate, from the request and the weights' configs (no model is
    built). Raises GenerateError for anything upstream would reject; `check_weights` also compares every
    component's tensor names and shapes (file headers) with its model's parameter inventory."""
    if not req.prompt or not req.prompt.strip():
        raise GenerateError("the prompt is empty")
    if req.device not in ("CPU", "Ascend"):
        raise GenerateError(f"--device must be CPU or Ascend, got {req.device!r}")
    if req.dtype is None:
        req.dtype = "bf16" if req.device == "Ascend" else "fp32"
    if req.dtype not in ("fp32", "bf16"):
        raise GenerateError(f"--dtype must be fp32 or bf16, got {req.dtype!r}")
    if req.device == "Ascend" and req.dtype == "fp32":
        raise GenerateError("--device Ascend builds the models in bf16 (upstream's policy); drop --dtype fp32")
    if req.vae_tile_size is not None and (req.vae_tile_size < 32 or req.vae_tile_size % 32):
        # other sizes make upstream's tile stitching return a latent of another size than the plan's
        raise GenerateError(f"--vae-tile-size must be a multiple of 32 pixels (upstream: 256), got {req.vae_tile_size}")
    if req.fps < 1:
        raise GenerateError(f"fps must be >= 1, got {req.fps}")
    v = _variant(req)
    cond_type = _cond_type(req)
    try:
        plan.check_num_frames(int(req.num_frames), v["causal_ae"])
        opt = _options(req, v["D"])
        if req.steps < 1:
            raise plan.PlanError(f"--steps must be >= 1, got {req.steps}")
    except plan.PlanError as e:
        raise GenerateError(str(e)) from None
    from opensora_ms.models.text_encoders import video_prompt

    motion = video_prompt(req.prompt, req.fps, req.motion_score)
    comps = [v["mmdit"], v["vae"]] + ([] if req.text_embeddings else ["t5", "clip"])
    if req.t2i2v:
        comps += ["flux", "flux_ae"]
    cfgs = {c: component_config(req.weights, c) for c in comps}
    for p_ in (req.ref.split(";") if req.ref else []):
        if not Path(p_).is_file():
            raise GenerateError(f"--ref {p_}: no such file")
    mcfg = cfgs[v["mmdit"]]
    for c, key, dim in (("t5", "d_model", "context_in_dim"), ("clip", "hidden_size", "vec_in_dim")):
        if c in cfgs and int(cfgs[c].get(key, -1)) != int(mcfg[dim]):
            raise GenerateError(f"weights {Path(req.weights) / c}: {key} {cfgs[c].get(key)} does not fit the MMDiT's "
                                f"{dim} {mcfg[dim]}")
    if check_weights:
        setup_device(req.device, req.dtype)
        for c in comps:
            check_component(req.weights, c, cfgs[c])
    p = int(mcfg.get("patch_size", 2))
    if p != v["patch"]:
        raise GenerateError(f"{Path(req.weights) / v['mmdit']}: patch_size {p}, expected {v['patch']} for "
                            f"{'high compression' if req.high_compression else 'Open-Sora v2'}")
    shape = plan.latent_shape(opt, 1, int(mcfg["in_channels"]) // p ** 2, p, v["D"])
    T, H, W = shape[2:]
    if cond_type.startswith("v2v"):
        k = (16 if cond_type.endswith("_easy") else 8) + 1      # latent frames the condition covers (causal)
        if T < k:
            raise GenerateError(f"cond type {cond_type} conditions {k} latent frames; --num-frames "
                                f"{opt.num_frames} gives {T} (use >= {4 * (k - 1) + 1})")
    tokens = (H * W) // p ** 2
    frames1 = int(req.num_frames) == 1
    out = Path(req.out)
    if frames1:
        out = out.with_suffix(".png")
    info = {
        "prompt": motion, "negative_prompt": req.negative_prompt, "cond_type": cond_type,
        "ref": req.ref, "t2i2v": req.t2i2v, "high_compression": req.high_compression,
        "height": opt.height, "width": opt.width, "num_frames": opt.num_frames, "fps": req.fps,
        "latent_shape": list(shape), "image_tokens": T * tokens, "steps": opt.num_steps,
        "shift_alpha": plan.shift_alpha(tokens, T), "guidance": opt.guidance, "guidance_img": opt.guidance_img,
        "seed": opt.seed, "device": req.device, "dtype": req.dtype, "offload": req.offload,
        "components": {c: str(Path(req.weights) / c) for c in comps}, "out": str(out),
        "memory": _memory_estimate(req, cfgs, v, shape, tokens * T),
    }
    if req.t2i2v:
        try:
            fh, fw = plan.get_image_size(req.t2i_resolution, req.aspect_ratio, training=True, D=v["D"])
        except plan.PlanError as e:
            raise GenerateError(f"t2i2v: {e} (the T2I stage uses the training bucket table)") from None
        info["t2i"] = {"resolution": req.t2i_resolution, "height": fh, "width": fw, "guidance": T2I_GUIDANCE,
                       "steps": opt.num_steps,
                       "latent_shape": [1, int(cfgs["flux"]["in_channels"]) // 4, 1, 2 * math.ceil(fh / v["D"]),
                                        2 * math.ceil(fw / v["D"])]}
    return info


def _param_count(weights: str, comp: str) -> int:
    from converter.sources import Source

    try:
        inv = Source(Path(weights) / comp).inventory()
    except UserError as e:
        raise GenerateError(f"weights {Path(weights) / comp}: {e}") from None
    return sum(math.prod(s) for s, _ in inv.values())


def _memory_estimate(req: Request, cfgs: dict, v: dict, shape: tuple, img_tokens: int) -> dict:
    """Peak bytes by stage: parameters in the compute dtype (fp32 4 bytes, bf16 2) plus the MMDiT's largest live
    activations (3B batch x (text + image tokens) x hidden x ~14 values: qkv, attention output, the 4x MLP)."""
    size = 4 if req.dtype == "fp32" else 2
    params = {c: _param_count(req.weights, c) for c in cfgs}
    m = cfgs[v["mmdit"]]
    act = 3 * (img_tokens + T5_MAX_LENGTH) * int(m["hidden_size"]) * 14 * size
    text = size * sum(params.get(c, 0) for c in ("t5", "clip"))
    t2i = size * sum(params.get(c, 0) for c in ("flux", "flux_ae"))
    denoise = size * (params[v["mmdit"]] + params[v["vae"]]) + act
    return {"parameters": params, "text_stage": text, "t2i_stage": t2i, "denoise_stage": denoise,
            "peak_estimate": max(text, t2i, denoise)}


# ------------------------------------------------------------------------------------------------ weights
def component_config(weights, name: str) -> dict:
    """The model config of `weights/<name>`: its config.json (`{"<ConfigName>": {...}}`, or the Hub's config for
    t5/clip; CLIP's text tower under `text_config`), else the real config of the mapping its manifest names."""
    folder = Path(weights) / name
    if not Path(weights).is_dir():
        raise GenerateError(f"--weights {weights}: no such folder (make it with msconv download-and-convert)")
    if not folder.is_dir():
        raise GenerateError(f"weights {folder}: component {name!r} missing (msconv download-and-convert"
                            f"{' --with-t2i' if name.startswith('flux') else ''})")
    mod, cname = COMPONENTS[name]
    f = folder / "config.json"
    try:
        if f.is_file():
            d = json.loads(f.read_text())
        else:
            man = json.loads((folder / "msconv-manifest.json").read_text())
            tgt = Path(__file__).resolve().parents[2] / "mappings" / "targets" / f"{man['mapping']['name']}.json"
            d = json.loads(tgt.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GenerateError(f"weights {folder}: no readable config.json nor msconv-manifest.json ({e})") from None
    if cname is None:
        return d.get("text_config", d) if name == "clip" else d
    if not isinstance(d, dict):
        raise GenerateError(f"{f}: expected a JSON object")
    return d.get(cname, d)


def check_component(weights, name: str, cfg: dict) -> None:
    """Names and shapes of `weights/<name>` (headers only) against the model's parameter inventory at `cfg`."""
    import importlib

    from converter.sources import Source

    folder = Path(weights) / name
    mod = importlib.import_module(f"opensora_ms.models.{COMPONENTS[name][0]}")
    try:
        want = mod.param_inventory(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise GenerateError(f"weights {folder}: its config does not describe a {name} ({e})") from None
    try:
        have = Source(folder).inventory()
    except UserError as e:
        raise GenerateError(f"weights {folder}: {e}") from None
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{k}: file {list(have[k][0])} vs model {list(want[k][0])}" for k in sorted(set(want) & set(have))
              if tuple(have[k][0]) != tuple(want[k][0])]
    problems = ([f"{len(missing)} missing (first {missing[0]})"] if missing else []) + \
               ([f"{len(extra)} unexpected (first {extra[0]})"] if extra else []) + \
               ([f"{len(shapes)} shape mismatch(es) (first {shapes[0]})"] if shapes else [])
    if problems:
        raise GenerateError(f"weights {folder}: do not fit the {name} model of its config: {'; '.join(problems)}")


def load_component(weights, name: str, dtype=None):
    """Build `opensora_ms.models.<module>` at the component's config (parameters not drawn) and load its converted
    weights strictly. Returns (net, config dict). The one place that knows the folder layout."""
    import importlib

    from mindspore.nn.utils import no_init_parameters

    from opensora_ms.loading import LoadError, load_strict

    cfg = component_config(weights, name)
    mod = importlib.import_module(f"opensora_ms.models.{COMPONENTS[name][0]}")
    kw = {"dtype": dtype} if dtype is not None and name not in ("vae", "dc_ae") else {}
    try:
        with no_init_parameters():
            net = mod.build(cfg, **kw)
    except (ValueError, TypeError, KeyError) as e:
        raise GenerateError(f"weights {Path(weights) / name}: config does not build a {name} ({e})") from None
    try:
        load_strict(net, str(Path(weights) / name))
    except (LoadError, UserError) as e:
        raise GenerateError(f"weights {Path(weights) / name}: {e}") from None
    net.set_train(False)
    return net, cfg


def encode_texts(weights, texts: list[str], dtype=None, jit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """T5 `last_hidden_state` and CLIP `pooler_output` of `texts`, called as upstream's HFEmbedder
    (`opensora_ms.models.text_encoders`); each encoder is released right after its use."""
    from opensora_ms.loading import LoadError
    from opensora_ms.models import text_encoders as TE

    out = []
    for name in ("t5", "clip"):
        try:
            enc = TE.load_text_encoder(Path(weights) / name, kind=name, dtype=dtype, jit=jit)
            out.append(TE.numpy_f32(enc(texts)))
        except (TE.TextEncoderError, LoadError) as e:
            raise GenerateError(f"weights {Path(weights) / name}: {e}") from None
        del enc
        gc.collect()
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------ inputs from files
def _read_arrays(path, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise GenerateError(f"{what} {p}: no such file")
    try:
        if p.suffix == ".npy":
            return {"": np.load(p, allow_pickle=False)}
        from safetensors.numpy import load_file

        return load_file(str(p))
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's problem
        raise GenerateError(f"{what} {p}: cannot read ({' '.join(str(e).split())[:200]})") from None


def read_noise(path, shape: tuple) -> np.ndarray:
    d = _read_arrays(path, "--noise")
    key = next((k for k in ("noise_z", "noise", "") if k in d), None)
    if key is None and len(d) == 1:
        key = next(iter(d))
    if key is None:
        raise GenerateError(f"--noise {path}: expected one tensor or a 'noise_z' / 'noise' key, got {sorted(d)}")
    z = np.asarray(d[key], np.float32)
    if tuple(z.shape) != tuple(shape):
        raise GenerateError(f"--noise {path}: shape {list(z.shape)}, the plan needs {list(shape)}")
    return z


def read_text_embeddings(path, rows: int, mcfg: dict, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    d = _read_arrays(path, "--text-embeddings")
    k_txt, k_vec = f"{prefix}txt", f"{prefix}y_vec"
    if k_txt not in d or k_vec not in d:
        raise GenerateError(f"--text-embeddings {path}: needs keys {k_txt!r} and {k_vec!r}, has {sorted(d)}")
    txt, vec = np.asarray(d[k_txt], np.float32), np.asarray(d[k_vec], np.float32)
    if txt.ndim != 3 or txt.shape[0] != rows or txt.shape[2] != int(mcfg["context_in_dim"]):
        raise GenerateError(f"--text-embeddings {path}: {k_txt} has shape {list(txt.shape)}, expected "
                            f"[{rows}, L, {mcfg['context_in_dim']}]")
    if vec.shape != (rows, int(mcfg["vec_in_dim"])):
        raise GenerateError(f"--text-embeddings {path}: {k_vec} has shape {list(vec.shape)}, expected "
                            f"[{rows}, {mcfg['vec_in_dim']}]")
    return txt, vec


def _reference_pixels(req: Request, cond_type: str, hw: tuple, causal: bool) -> list[np.ndarray]:
    """The reference clips upstream encodes (collect_references_batch), (3, T, H, W) each."""
    paths = req.ref.split(";")
    try:
        if cond_type.startswith("v2v"):
            r = media.read_reference(paths[0], hw)
            need = plan.reference_frames(cond_type, causal, r.shape[1])
            if cond_type.endswith("_easy"):   # upstream falls back to 33 frames, then fails to fill 17 latents
                need = plan.reference_frames(cond_type, causal, 64)
            if r.shape[1] < need:
                raise GenerateError(f"--ref {paths[0]}: {cond_type} needs at least {need} frames, the video has "
                                    f"{r.shape[1]}")
            return [r[:, :need] if "head" in cond_type else r[:, -need:]]
        if cond_type == "i2v_head":
            return [media.read_reference(paths[0], hw)[:, :1]]
        if cond_type == "i2v_tail":
            return [media.read_reference(paths[-1], hw)[:, -1:]]
        return [media.read_reference(paths[0], hw)[:, :1], media.read_reference(paths[-1], hw)[:, -1:]]
    except media.MediaError as e:
        raise GenerateError(str(e)) from None


# ------------------------------------------------------------------------------------------------ device
def setup_device(device: str, dtype: str) -> None:
    """Select MindSpore's device (and the CPU-bf16 emulation for --dtype bf16 on CPU) before the op layer loads."""
    import mindspore as ms

    if "opensora_ms.ops.nn" not in sys.modules:
        try:
            ms.set_device(device)
        except (RuntimeError, ValueError) as e:
            raise GenerateError(f"--device {device}: MindSpore cannot use it here ({' '.join(str(e).split())[:160]})") \
                from None
        from opensora_ms.ops import device as D

        want = "Ascend" if device == "Ascend" else ("CPU-bf16" if dtype == "bf16" else "CPU")
        if D.DEVICE != want:
            D.configure(want)
    from opensora_ms.ops import device as D

    want = "Ascend" if device == "Ascend" else ("CPU-bf16" if dtype == "bf16" else "CPU")
    if D.DEVICE != want:
        raise GenerateError(f"this process already runs the op layer as {D.DEVICE}; --device {device} --dtype "
                            f"{dtype} needs a new process")


# ------------------------------------------------------------------------------------------------ generate
def _t2i_reference(req: Request, info: dict, v: dict, dtype, jit: bool, progress) -> tuple[np.ndarray, Path]:
    """The T2I2V first frame: FLUX.1-dev (distilled guidance 4.0) on the bare prompt at the 768px training bucket,
    Flux AE decode, uint8 PNG beside the output -- then read back as the i2v_head reference."""
    from . import sampling as S

    t2i = info["t2i"]
    prompt = req.prompt   # upstream's T2I stage reads the prompt without the fps / motion suffixes
    flux_cfg = component_config(req.weights, "flux")
    if req.text_embeddings:
        txt, vec = read_text_embeddings(req.text_embeddings, 1, flux_cfg, prefix="t2i/")
    else:
        txt, vec = encode_texts(req.weights, [prompt], dtype, jit)
    shape = tuple(t2i["latent_shape"])
    z = plan.noise(shape, req.seed)
    p = int(flux_cfg.get("patch_size", 2))
    T, H, W = shape[2:]
    ts = plan.schedule(req.steps, (H * W) // p ** 2, T)
    flux, _ = load_component(req.weights, "flux", dtype)
    x = S.denoise_distill(flux, plan.pack(z, p), plan.img_ids(T, H // p, W // p, 1), txt,
                          np.zeros((1, txt.shape[1], 3), np.float32), vec, ts, guidance=T2I_GUIDANCE,
                          progress=progress, jit=jit)
    lat = plan.unpack(S._np(x), T, H // p, W // p, p)
    _release(flux)
    del flux
    ae, _ = load_component(req.weights, "flux_ae", dtype)
    img = S.decode(ae, lat)[0]
    del ae
    gc.collect()
    frame = media.to_uint8(img)[0]
    png = Path(info["out"]).with_name(Path(info["out"]).stem + "_t2i.png")
    media.write_png(png, frame)
    from PIL import Image

    arr = media.resize_crop_image(Image.fromarray(frame), (info["height"], info["width"])).astype(np.float32) / 255
    ref = ((arr - np.float32(0.5)) / np.float32(0.5)).astype(np.float32).transpose(2, 0, 1)[:, None]
    return np.ascontiguousarray(ref), png


def _release(net) -> None:
    from . import sampling as S

    S.release(net)
    gc.collect()


def generate(req: Request | None = None, progress: Optional[Callable[[str, int, int], None]] = None,
             **kw) -> Result:
    """Run a request (or keyword arguments of `Request`). `progress(stage, done, total)` is called after every
    denoising step. Writes `req.out` (mp4; PNG when one frame) and returns where and what it cost."""
    req = req or Request(**kw)
    peak = PeakRSS()
    try:
        return _generate(req, progress, peak)
    finally:
        peak.stop()


def _generate(req: Request, progress, peak: PeakRSS) -> Result:
    t0 = time.time()
    info = make_plan(req)
    out = Path(info["out"])
    if not out.parent.is_dir():
        raise GenerateError(f"--out {out}: folder {out.parent} does not exist")
    from opensora_ms.ops import device as D

    from . import sampling as S

    dtype = D.model_dtype()
    jit = bool(req.jit) and not D.BF16_EMU   # CPU-bf16 emulation is PyNative only
    v = _variant(req)
    cond_type = info["cond_type"]
    B = 1
    # 0. the files that replace computations, read before anything heavy runs
    mcfg = component_config(req.weights, v["mmdit"])
    shape = tuple(info["latent_shape"])
    z = read_noise(req.noise, shape) if req.noise else plan.noise(shape, req.seed)
    if req.text_embeddings:
        txt, vec = read_text_embeddings(req.text_embeddings, 3 * B, mcfg)
        if req.t2i2v:
            read_text_embeddings(req.text_embeddings, 1, component_config(req.weights, "flux"), prefix="t2i/")
    opt = _options(req, v["D"])
    pixels, png = None, None
    if not req.t2i2v and cond_type != "t2v":
        pixels = _reference_pixels(req, cond_type, (opt.height, opt.width), v["causal_ae"])
    # 1. text
    texts = [info["prompt"]] * B + [req.negative_prompt] * (2 * B)
    if not req.text_embeddings:
        txt, vec = encode_texts(req.weights, texts, dtype, jit)
    steps_done: list[float] = []
    last = [time.time()]

    def step(stage):
        def f(i):
            now = time.time()
            steps_done.append(now - last[0])
            last[0] = now
            if progress:
                progress(stage, i + 1, req.steps)
        return f

    # 2. references (T2I2V: generate the first frame)
    if req.t2i2v:
        last[0] = time.time()
        ref, png = _t2i_reference(req, info, v, dtype, jit, step("t2i"))
        pixels = [ref]
    vae, _ = load_component(req.weights, v["vae"], dtype)
    # upstream's inference tiling (256px.py: spatial only; high_compression.py: spatial + temporal)
    vae.use_spatial_tiling, vae.use_temporal_tiling = True, req.high_compression
    if req.vae_tile_size is not None:
        if hasattr(vae, "configure_tiling"):
            vae.configure_tiling(tile_size=req.vae_tile_size)
        else:
            vae.spatial_tile_size = int(req.vae_tile_size)
            vae.spatial_tile_latent_size = int(req.vae_tile_size) // vae.spatial_compression_ratio
    refs = None
    if pixels is not None:
        lats = []
        for k, px in enumerate(pixels):
            eps = None
            if hasattr(vae, "z_channels"):   # upstream samples the posterior: noise from the seed (documented)
                t_lat = 1 if px.shape[1] == 1 else (px.shape[1] - 1) // vae.time_compression_ratio + 1
                mean_shape = (vae.z_channels, t_lat, px.shape[2] // vae.spatial_compression_ratio,
                              px.shape[3] // vae.spatial_compression_ratio)
                eps = plan.noise(mean_shape, req.seed + 1 + k)
            try:
                lats.append(S.encode_reference(vae, px, eps))
            except ValueError as e:
                raise GenerateError(f"--ref {req.ref}: the AE cannot encode it ({e})") from None
        refs = [lats]
    # 3. denoise
    net, _ = load_component(req.weights, v["mmdit"], dtype)
    holder = {"net": net}
    del net

    def offload():
        if req.offload:
            n = holder.pop("net")
            _release(n)
            del n
            gc.collect()

    last[0] = time.time()
    n_t2i = len(steps_done)
    try:
        res = S.sample_video(holder["net"], vae, opt, cond_type, z, txt, vec, refs, patch_size=v["patch"],
                             progress=step("video"), jit=jit, offload=offload if req.offload else None)
    except plan.PlanError as e:
        raise GenerateError(str(e)) from None
    holder.clear()
    frames = res["video_uint8"][0]
    if frames.shape[0] == 1:
        path = media.write_png(out, frames[0])
    else:
        path = media.write_video(out, frames, fps=req.fps)
    secs = time.time() - t0
    return Result(path=path, plan=info, seconds=secs, step_seconds=steps_done[n_t2i:], peak_rss_bytes=peak.peak(),
                  image_path=png, video=frames)
