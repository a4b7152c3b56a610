"""Upstream's sampling loop over the torch reference models (the other side of the pipeline parity and benchmark).

Written from ../shared/upstream/SPEC.md §f; upstream file:line (hpcaitech/Open-Sora @ 7ad6a96a):
- schedule: `opensora/utils/sampling.py:295-332` (torch.linspace(1, 0, n+1), alpha*t / (1 + (alpha-1)*t));
- CFG batch and conditions: `I2VDenoiser.prepare_guidance` :228-245 (texts [prompt, neg, neg]),
  `prepare_inference_condition` (`opensora/utils/inference.py:283-351`);
- loop: `I2VDenoiser.denoise` :158-226 -- per step t_vec = full(3B, t), cond = cat([cond, cond, zeros]),
  img = cat([x, x, x]), pred = model(...), (c, u, u2) = chunk(3), oscillating guidance (:120-133), the temporal
  image-guidance ramp for i2v (:207-214), pred = u2 + g_img*(u - u2) + g_txt*(c - u) (:219), x += (t_prev - t)*pred;
  `DistilledDenoiser.denoise` :248-281 (Flux T2I: one batch, distilled guidance);
- post: `api_fn` :698-724 -- unpack, i2v frame replacement (batch 0 only), VAE decode, trim to num_frames;
  quantisation as `save_sample` (`opensora/datasets/utils.py:202-234`).

Framework-free planning (buckets, sizes, prompt suffixes, condition masks) comes from `opensora_ms.pipeline.plan`
(no MindSpore import); everything that touches tensors is torch, in the models' dtype, as upstream.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from opensora_ms.pipeline import media, plan

__all__ = ["schedule", "pack", "unpack", "denoise_i2v", "denoise_distill", "sample_video", "encode_reference"]


def schedule(num_steps: int, tokens_per_frame: int, frames: int, shift: bool = True,
             alpha: Optional[float] = None) -> list[float]:
    """get_schedule exactly as upstream computes it (torch fp32)."""
    t = torch.linspace(1, 0, num_steps + 1)
    if shift:
        a = plan.shift_alpha(tokens_per_frame, frames) if alpha is None else alpha
        t = a * t / (1 + (a - 1) * t)
    return t.tolist()


def pack(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, t * (h // p) * (w // p), c * p * p)


def unpack(x: torch.Tensor, t: int, h: int, w: int, p: int) -> torch.Tensor:
    b, _, f = x.shape
    c = f // (p * p)
    return x.reshape(b, t, h, w, c, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h * p, w * p)


Record = Callable[[int, dict], None]


@torch.no_grad()
def denoise_i2v(model, img, img_ids, txt, txt_ids, y_vec, timesteps, *, guidance, guidance_img, masks, masked_ref,
                text_osci, image_osci, scale_temporal_osci, patch_size, record: Optional[Record] = None,
                progress: Optional[Callable[[int], None]] = None):
    """I2VDenoiser.denoise; `img` (B, L, F) is the conditional third of the batch, txt/y_vec/ids the 3B batch."""
    b, c, t, h, w = masked_ref.shape
    cond = pack(torch.cat((masks, masked_ref), dim=1), patch_size)
    cond_all = torch.cat([cond, cond, torch.zeros_like(cond)], dim=0)
    x = img
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        img3 = torch.cat([x, x, x], dim=0)
        t_vec = torch.full((img3.shape[0],), t_curr, dtype=img3.dtype)
        pred = model(img=img3, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y_vec=y_vec, cond=cond_all,
                     timesteps=t_vec)
        if record is not None:
            record(i, {"img_in": img3, "t_vec": t_vec, "cond": cond_all, "pred": pred})
        text_gs = plan.oscillation(guidance, i) if text_osci else guidance
        image_gs = plan.oscillation(guidance_img, i) if image_osci else guidance_img
        c_, u, u2 = pred.chunk(3, dim=0)
        if image_gs > 1.0 and scale_temporal_osci:
            upper = torch.linspace(image_gs, 1.0, len(timesteps))[i]
            ramp = torch.linspace(1.0, upper, t)[None, None, :, None, None].repeat(b, c, 1, h, w)
            image_gs = pack(ramp, patch_size).to(c_.dtype)
        pred = u2 + image_gs * (u - u2) + text_gs * (c_ - u)
        x = x + (t_prev - t_curr) * pred
        if progress is not None:
            progress(i)
    return x


@torch.no_grad()
def denoise_distill(model, img, img_ids, txt, txt_ids, y_vec, timesteps, *, guidance,
                    record: Optional[Record] = None):
    """DistilledDenoiser.denoise (the Flux T2I stage): one batch, guidance as a model input."""
    g = torch.full((img.shape[0],), guidance, dtype=img.dtype)
    x = img
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((x.shape[0],), t_curr, dtype=x.dtype)
        pred = model(img=x, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y_vec=y_vec, timesteps=t_vec, guidance=g)
        if record is not None:
            record(i, {"img_in": x, "t_vec": t_vec, "pred": pred})
        x = x + (t_prev - t_curr) * pred
    return x


@torch.no_grad()
def encode_reference(vae, pixels: np.ndarray, eps: Optional[np.ndarray] = None) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> latent (C, T', h, w): upstream samples the posterior (`sample_posterior=True`);
    `eps` is that sample's noise (None: the posterior mode)."""
    dtype = next(vae.parameters()).dtype
    x = torch.from_numpy(np.ascontiguousarray(pixels[None])).to(dtype)
    if hasattr(vae, "z_channels"):                    # Hunyuan VAE (posterior)
        if eps is None:
            z = vae.encode(x, sample_posterior=False)
        else:
            z = vae.encode(x, sample_posterior=True, noise=torch.from_numpy(eps[None]).to(dtype))
    else:                                             # DC-AE (deterministic)
        z = vae.encode(x)
    return z[0].float().numpy()


@torch.no_grad()
def sample_video(mmdit, vae, opt: plan.SamplingOption, cond_type: str, z: np.ndarray, txt: np.ndarray,
                 y_vec: np.ndarray, refs: Optional[list] = None, patch_size: int = 2,
                 record: Optional[Record] = None, quantize_dtype: str = "float32") -> dict:
    """One upstream `api_fn` call from prepared inputs: noise `z` (B, C, T', H', W'), text embeddings of the CFG
    batch `txt` (3B, L, ctx) / `y_vec` (3B, vec) in [prompts, negs, negs] order, reference latents per sample.
    Returns numpy `latent_before_decode`, `video` (B, 3, T, H, W) and `video_uint8` (B, T, H, W, 3)."""
    dtype = next(mmdit.parameters()).dtype
    B, C, T, H, W = z.shape
    p = patch_size
    timesteps = schedule(opt.num_steps, (H * W) // p ** 2, T, shift=opt.shift, alpha=opt.flow_shift)
    refs = refs if refs is not None else [None] * B
    masks, masked = plan.inference_condition(z.shape, cond_type, refs, causal=opt.is_causal_vae)
    zt = torch.from_numpy(np.ascontiguousarray(z)).to(dtype)
    img = pack(zt, p)
    ids = torch.from_numpy(plan.img_ids(T, H // p, W // p, 3 * B)).to(dtype)
    txt_t = torch.from_numpy(np.ascontiguousarray(txt)).to(dtype)
    txt_ids = torch.zeros(3 * B, txt.shape[1], 3, dtype=dtype)
    y = torch.from_numpy(np.ascontiguousarray(y_vec)).to(dtype)
    x = denoise_i2v(mmdit, img, ids, txt_t, txt_ids, y, timesteps, guidance=opt.guidance,
                    guidance_img=opt.guidance_img, masks=torch.from_numpy(masks).to(dtype),
                    masked_ref=torch.from_numpy(masked).to(dtype), text_osci=opt.text_osci,
                    image_osci=opt.image_osci, scale_temporal_osci=opt.scale_temporal_osci and "i2v" in cond_type,
                    patch_size=p, record=record)
    x = unpack(x, T, H // p, W // p, p)
    if refs[0] is not None:   # upstream replaces in batch index 0 only
        if cond_type in ("i2v_head", "i2v_loop"):
            x[0, :, :1] = torch.from_numpy(refs[0][0][:, :1]).to(dtype)
        if cond_type == "i2v_tail":
            x[0, :, -1:] = torch.from_numpy(refs[0][0][:, -1:]).to(dtype)
        if cond_type == "i2v_loop":
            x[0, :, -1:] = torch.from_numpy(refs[0][1][:, -1:]).to(dtype)
    latent = x.float().numpy()
    vd = next(vae.parameters()).dtype
    video = vae.decode(x.to(vd))[:, :, :opt.num_frames]
    if not opt.is_causal_vae and cond_type in ("i2v_head", "i2v_tail", "i2v_loop"):
        pad = vae.time_compression_ratio - 1   # upstream's `compression[0] - 1` duplicate frames
        video = video[:, :, pad:] if cond_type == "i2v_head" else (
            video[:, :, :-pad] if cond_type == "i2v_tail" else video[:, :, pad:-pad])
    v = video.float().numpy()
    qd = "bfloat16" if video.dtype == torch.bfloat16 else quantize_dtype
    u8 = np.stack([media.to_uint8(s, qd) for s in v])
    return {"latent_before_decode": latent, "video": v, "video_uint8": u8}
