"""Everything of upstream's sampling that needs no framework: options, resolution buckets, latent sizes, the shift
schedule, guidance oscillation, (un)packing and the i2v/v2v conditions -- in numpy, float32 where
upstream computes in float32, so the MindSpore loop and the torch reference share one definition of the plan.

Upstream (hpcaitech/Open-Sora @ 7ad6a96a, ../shared/upstream/SPEC.md §a, §f): `opensora/utils/sampling.py`
(SamplingOption :28-79, sanitize :96-117, get_oscillation_gs :120-133, get_schedule :295-332, get_noise :335-372,
pack/unpack :375-393, prepare :401-459, api_fn :590-724), `opensora/datasets/aspect.py` (get_aspect_ratios_dict,
get_image_size), `opensora/utils/inference.py` (collect_references_batch :216-280, prepare_inference_condition
:283-351). Prompt suffixes live with the text encoders (`opensora_ms.models.text_encoders.video_prompt`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["SamplingOption", "PlanError", "COND_TYPES", "get_image_size", "aspect_ratios", "sanitize",
           "latent_frames", "check_num_frames", "latent_shape", "schedule", "shift_alpha", "linspace_f32",
           "oscillation",
           "temporal_image_guidance", "pack", "unpack", "inference_condition",
           "reference_frames", "noise", "OPEN_SORA_V2"]

COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy")
METHODS = ("i2v", "distill")


class PlanError(ValueError):
    """A sampling request that upstream would reject (the CLI turns it into one `error:` line, exit 2)."""


@dataclass
class SamplingOption:
    """Upstream's `SamplingOption` (sampling.py:28-79): field names and dataclass defaults."""

    width: Optional[int] = None
    height: Optional[int] = None
    resolution: Optional[str] = None
    aspect_ratio: Optional[str] = None
    num_frames: int = 1
    num_steps: int = 50
    guidance: float = 4.0
    text_osci: bool = False
    guidance_img: Optional[float] = None
    image_osci: bool = False
    scale_temporal_osci: bool = False
    seed: Optional[int] = None
    shift: bool = True
    method: str = "i2v"
    temporal_reduction: int = 1
    is_causal_vae: bool = False
    flow_shift: Optional[float] = None

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingOption":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PlanError(f"SamplingOption: unknown field(s) {unknown}")
        opt = cls(**d)
        if opt.method not in METHODS:
            raise PlanError(f"SamplingOption.method must be one of {METHODS}, got {opt.method!r}")
        return opt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# configs/diffusion/inference/256px.py:1-33 (768px.py only changes the resolution)
OPEN_SORA_V2 = dict(resolution="256px", aspect_ratio="16:9", num_frames=129, num_steps=50, shift=True,
                    temporal_reduction=4, is_causal_vae=True, guidance=7.5, guidance_img=3.0, text_osci=True,
                    image_osci=True, scale_temporal_osci=True, method="i2v", seed=42)


# ------------------------------------------------------------------------------------------------ buckets
_RATIOS = ["2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1"]   # width:height (aspect.py)


def _num_pixels(resolution: str) -> int:
    name = resolution.split("_")[0]
    if name.endswith("px") and name[:-2].isdigit():
        return int(name[:-2]) ** 2
    if name.endswith("p") and name[:-1].isdigit():
        return int(int(name[:-1]) ** 2 / 9 * 16)
    raise PlanError(f"unknown resolution {resolution!r} (expected e.g. 256px, 768px)")


def aspect_ratios(resolution: str, training: bool = False, D: int = 16) -> dict[str, tuple[int, int]]:
    """{"W:H": (height, width)}: upstream's `get_aspect_ratios_dict(pixels, training)`; D is the AE's spatial
    compression (16 for the Hunyuan VAE with patch 2; 32 for the DC-AE, upstream's AE_SPATIAL_COMPRESSION)."""
    total = _num_pixels(resolution)
    out, vertical = {}, {}
    for ratio in _RATIOS:
        wr, hr = map(float, ratio.split(":"))
        width = int(math.sqrt(total * (wr / hr)) // D) * D
        height = int((total / width) // D) * D
        if training:  # nudge towards the pixel budget
            diff = abs(height * width - total)
            for h, w in ((height - D, width), (height + D, width), (height, width - D), (height, width + D)):
                if abs(h * w - total) < diff:
                    height, width, diff = h, w, abs(h * w - total)
        if (height, width) not in out.values() or not training:   # training drops duplicated buckets
            out[ratio] = (height, width)
            vertical[":".join(ratio.split(":")[::-1])] = (width, height)
    out.update(vertical)
    return out


def get_image_size(resolution: str, aspect_ratio: str, training: bool = False, D: int = 16) -> tuple[int, int]:
    table = aspect_ratios(resolution, training, D)
    if aspect_ratio not in table:
        raise PlanError(f"unknown aspect ratio {aspect_ratio!r} for {resolution} (known: {', '.join(table)})")
    return table[aspect_ratio]


def sanitize(opt: SamplingOption, D: int = 16) -> SamplingOption:
    """Upstream's `sanitize_sampling_option`: resolution + aspect ratio -> (height, width) from the inference table,
    else the explicit height/width; both rounded up to multiples of 16."""
    if opt.resolution is not None or opt.aspect_ratio is not None:
        if opt.resolution is None or opt.aspect_ratio is None:
            raise PlanError("both resolution and aspect ratio must be given")
        height, width = get_image_size(opt.resolution, opt.aspect_ratio, training=False, D=D)
    else:
        if opt.height is None or opt.width is None:
            raise PlanError("both height and width must be given (or resolution and aspect ratio)")
        height, width = int(opt.height), int(opt.width)
    height = (height // 16 + (1 if height % 16 else 0)) * 16
    width = (width // 16 + (1 if width % 16 else 0)) * 16
    return dataclasses.replace(opt, height=height, width=width)


# ------------------------------------------------------------------------------------------------ sizes
def latent_frames(opt: SamplingOption) -> int:
    """Latent frame count as api_fn computes it: causal (N-1)//r+1, else N//r; one frame stays one frame."""
    n = int(opt.num_frames)
    if n < 1:
        raise PlanError(f"num_frames must be >= 1, got {n}")
    if n == 1:
        return 1
    r = int(opt.temporal_reduction)
    return (n - 1) // r + 1 if opt.is_causal_vae else n // r


def check_num_frames(n: int, causal: bool, r: int = 4) -> None:
    """What the VAE can reproduce exactly: a causal VAE (Hunyuan) needs r*k+1 frames, the DC-AE a multiple of r."""
    if n < 1:
        raise PlanError(f"num_frames must be >= 1, got {n}")
    if n == 1:
        return
    if causal and (n - 1) % r:
        lo = r * ((n - 1) // r) + 1
        raise PlanError(f"num_frames must be {r}k+1 for the causal VAE (e.g. {lo} or {lo + r}), got {n}")
    if not causal and n % r:
        raise PlanError(f"num_frames must be a multiple of {r} for the DC-AE, got {n}")


def latent_shape(opt: SamplingOption, batch: int, channels: int, patch_size: int, D: int) -> tuple:
    """(B, C, T', p*ceil(H/D), p*ceil(W/D)) of the noise (get_noise); channels = the MMDiT's in_channels / p^2."""
    return (batch, channels, latent_frames(opt), patch_size * math.ceil(opt.height / D),
            patch_size * math.ceil(opt.width / D))


# ------------------------------------------------------------------------------------------------ schedule
def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: step = (end-start)/(steps-1) in fp32; the first half counts up from start, the
    second half down from end. Within 1 ulp of torch's CPU kernel, whose vectorised lanes (width and FMA use
    depend on the CPU) round differently; the torch reference calls torch.linspace itself."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    lo = start32 + step * idx[:half].astype(np.float32)
    hi = end32 - step * (steps - idx[half:] - 1).astype(np.float32)
    return np.concatenate([lo, hi]).astype(np.float32)


def shift_alpha(tokens_per_frame: int, frames: int, base_shift: float = 1.0, max_shift: float = 3.0) -> float:
    """get_res_lin_function(256 -> base, 4096 -> max)(tokens) * sqrt(frames)."""
    m = (max_shift - base_shift) / (4096 - 256)
    b = base_shift - m * 256
    return (m * tokens_per_frame + b) * math.sqrt(frames)


def schedule(num_steps: int, tokens_per_frame: int, frames: int, shift: bool = True,
             alpha: Optional[float] = None) -> list[float]:
    """get_schedule: linspace(1, 0, n+1) in fp32, then alpha*t / (1 + (alpha-1)*t) in fp32 (python floats of the
    fp32 values, as upstream's `.tolist()`)."""
    if num_steps < 1:
        raise PlanError(f"steps must be >= 1, got {num_steps}")
    t = linspace_f32(1.0, 0.0, num_steps + 1)
    if shift:
        a = shift_alpha(tokens_per_frame, frames) if alpha is None else float(alpha)
        t = (np.float32(a) * t / (np.float32(1.0) + np.float32(a - 1) * t)).astype(np.float32)
    return [float(v) for v in t]


def oscillation(g: float, i: int, force_num: int = 10) -> float:
    """get_oscillation_gs: g for the first `force_num` steps and on even steps after, else 1.0."""
    return g if i < force_num or i % 2 == 0 else 1.0


def temporal_image_guidance(g_img: float, i: int, num_steps: int, frames: int) -> np.ndarray:
    """The i2v image-guidance ramp (denoise :207-214) per latent frame, (frames,) fp32: the step's upper value
    linspace(g_img, 1, n+1)[i], then linspace(1, upper, frames) along time."""
    upper = linspace_f32(g_img, 1.0, num_steps + 1)[i]
    return linspace_f32(1.0, float(upper), frames)


# ------------------------------------------------------------------------------------------------ packing
def pack(x: np.ndarray, p: int) -> np.ndarray:
    """b c t (h ph) (w pw) -> b (t h w) (c ph pw)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).transpose(0, 2, 3, 5, 1, 4, 6)
    return np.ascontiguousarray(x.reshape(b, t * (h // p) * (w // p), c * p * p))


def unpack(x: np.ndarray, t: int, h: int, w: int, p: int) -> np.ndarray:
    """b (t h w) (c ph pw) -> b c t (h ph) (w pw); h, w in tokens (ceil(H/D), ceil(W/D))."""
    b, _, f = x.shape
    c = f // (p * p)
    x = x.reshape(b, t, h, w, c, p, p).transpose(0, 4, 1, 2, 5, 3, 6)
    return np.ascontiguousarray(x.reshape(b, c, t, h * p, w * p))


def img_ids(t: int, h: int, w: int, batch: int) -> np.ndarray:
    """(B, t*h*w, 3) positions (t, h, w) in token units, t-major (prepare :431-447)."""
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    ids = np.stack([tt, hh, ww], -1).reshape(1, t * h * w, 3).astype(np.float32)
    return np.repeat(ids, batch, 0)


# ------------------------------------------------------------------------------------------------ conditions
def reference_frames(cond_type: str, causal: bool, available: int) -> int:
    """Pixel frames a v2v reference video contributes (collect_references_batch): 32 (64 for `_easy` when the video
    has >= 64), +1 when causal."""
    target = 64 if (available >= 64 and "easy" in cond_type) else 32
    return target + int(causal)


def inference_condition(z_shape: tuple, cond_type: str, refs: list, causal: bool = True):
    """(masks (B,1,T,H,W), masked_ref (B,C,T,H,W)) fp32 (prepare_inference_condition). `refs[i]` is None or the list
    of reference latents (C, T_ref, H, W) of sample i (i2v_loop: [head, tail])."""
    if cond_type not in COND_TYPES:
        raise PlanError(f"unknown cond type {cond_type!r} (known: {', '.join(COND_TYPES)})")
    B, C, T, H, W = z_shape
    masks = np.zeros((B, 1, T, H, W), np.float32)
    masked = np.zeros((B, C, T, H, W), np.float32)
    for i in range(B):
        ref = refs[i] if refs is not None else None
        if ref is None or T <= 1 or cond_type == "t2v":
            continue
        if cond_type == "i2v_head":
            masks[i, :, 0], masked[i, :, 0] = 1, ref[0][:, 0]
        elif cond_type == "i2v_tail":
            masks[i, :, -1], masked[i, :, -1] = 1, ref[-1][:, -1]
        elif cond_type == "i2v_loop":
            masks[i, :, 0], masked[i, :, 0] = 1, ref[0][:, 0]
            masks[i, :, -1], masked[i, :, -1] = 1, ref[-1][:, -1]
        else:
            k = (16 if cond_type.endswith("_easy") else 8) + int(causal)
            if ref[0].shape[1] < k:
                raise PlanError(f"{cond_type}: the reference encodes to {ref[0].shape[1]} latent frames, needs {k}")
            if k > T:
                raise PlanError(f"{cond_type}: conditions {k} latent frames but the video has only {T}")
            sl = slice(0, k) if "head" in cond_type else slice(T - k, T)
            rs = slice(0, k) if "head" in cond_type else slice(ref[0].shape[1] - k, ref[0].shape[1])
            masks[i, :, sl], masked[i, :, sl] = 1, ref[0][:, rs]
    return masks, masked


# ------------------------------------------------------------------------------------------------ noise
def noise(shape: tuple, seed: int) -> np.ndarray:
    """The initial latent noise: numpy's PCG64 generator seeded with `seed`, standard normal float32. Upstream draws
    from the CUDA generator (not reproducible off-GPU); this is reproducible run to run and on both frameworks."""
    return np.random.Generator(np.random.PCG64(int(seed))).standard_normal(shape, dtype=np.float32)
