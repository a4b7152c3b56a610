"""The sampling loop on MindSpore: upstream's I2V denoiser (3-way CFG batch, oscillating text/image guidance, the
temporal image-guidance ramp for i2v, Euler steps), the distilled Flux denoiser, i2v frame replacement, AE decode.

Same arithmetic as upstream (`opensora/utils/sampling.py:158-281`, `api_fn` :590-724; the torch mirror is
`parity/reference/pipeline.py`), in the MMDiT's dtype: fp32 on CPU, bf16 on Ascend where x, t_vec, the CFG
combination and the Euler update stay bf16 as upstream's (SPEC §g). Inputs and outputs are numpy; the plan
(schedule, masks, packing) comes from `plan.py`.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

from . import media, plan

__all__ = ["denoise_i2v", "denoise_distill", "sample_video", "decode", "encode_reference"]

Record = Callable[[int, dict], None]


def _t(a, dtype) -> Tensor:
    return Tensor(np.ascontiguousarray(a, np.float32)).astype(dtype)


def _np(t: Tensor) -> np.ndarray:
    return t.astype(ms.float32).asnumpy()


def _i2v_step(net, x, ids, txt, txt_ids, t_vec, y, cond_all, g_img, g_txt, dt):
    """One I2VDenoiser step: pred = model([x, x, x], ...); pred = u2 + g_img*(u - u2) + g_txt*(c - u);
    x + dt*pred. Upstream's rounding points: every tensor op rounds to the model dtype, python-scalar products
    (g_txt, dt, a scalar g_img) are formed in fp32 (torch's opmath) -- identities in fp32. `g_img` is fp32
    (B, L, F): the scalar, or the temporal ramp already rounded to the model dtype. Returns (x', raw pred)."""
    b = x.shape[0]
    d = x.dtype
    f32 = ms.float32
    pred = net(mint.cat((x, x, x), 0), ids, txt, txt_ids, t_vec, y, cond_all, None)
    c, u, u2 = pred[:b], pred[b:2 * b], pred[2 * b:]
    img_term = ((u - u2).astype(f32) * g_img).astype(d)
    txt_term = ((c - u).astype(f32) * g_txt).astype(d)
    upd = ((u2 + img_term) + txt_term).astype(f32) * dt
    return x + upd.astype(d), pred


def _distill_step(net, x, ids, txt, txt_ids, t_vec, y, g, dt):
    pred = net(x, ids, txt, txt_ids, t_vec, y, None, g)
    return x + (pred.astype(ms.float32) * dt).astype(x.dtype), pred


_JIT: dict = {}


def _stepper(net, fn, jit: bool):
    """`fn(net, ...)` bound to `net`; under `ms.jit` one graph per net (the MMDiT and the step arithmetic fused),
    created once and cached (jit recompiles for new function objects)."""
    if not jit:
        return lambda *a: fn(net, *a)
    key = (id(net), fn.__name__)
    hit = _JIT.get(key)
    if hit is None or hit[0] is not net:
        def step(*a):
            return fn(net, *a)

        hit = _JIT[key] = (net, ms.jit(step))
    return hit[1]


def release(net) -> None:
    """Forget the cached graphs of `net` (so its parameters can be freed)."""
    for key in [k for k in _JIT if k[0] == id(net)]:
        del _JIT[key]


def _scalar(v) -> Tensor:
    return Tensor(np.float32(v))


def denoise_i2v(net, x: np.ndarray, img_ids, txt, txt_ids, y_vec, timesteps: list, *, guidance: float,
                guidance_img: float, cond: np.ndarray, text_osci: bool, image_osci: bool, temporal: Optional[tuple],
                record: Optional[Record] = None, progress: Optional[Callable[[int], None]] = None,
                jit: bool = True) -> Tensor:
    """I2VDenoiser.denoise on the conditional third `x` (B, L, F); `cond` (B, L, F_cond) is the packed
    [mask, masked_ref]; `temporal` = (B, C, T, H, W, p) enables the per-frame image-guidance ramp (i2v only)."""
    dt = net.dtype
    step = _stepper(net, _i2v_step, jit)
    B = x.shape[0]
    xt = _t(x, dt)
    c = _t(cond, dt)
    cond_all = mint.cat([c, c, ops.zeros_like(c)], 0)
    ids, txt_t, txt_ids_t, y = (_t(a, dt) for a in (img_ids, txt, txt_ids, y_vec))
    flat = (B,) + tuple(x.shape[1:])
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = _t(np.full((3 * B,), t_curr, np.float32), dt)
        text_gs = plan.oscillation(guidance, i) if text_osci else guidance
        image_gs = plan.oscillation(guidance_img, i) if image_osci else guidance_img
        if image_gs > 1.0 and temporal is not None:
            b, ch, T, H, W, p = temporal
            ramp = plan.temporal_image_guidance(image_gs, i, len(timesteps) - 1, T)
            ramp = np.broadcast_to(ramp[None, None, :, None, None], (b, ch, T, H, W))
            g_img = _t(plan.pack(np.ascontiguousarray(ramp), p), dt).astype(ms.float32)   # `.to(cond.dtype)`
        else:
            g_img = _t(np.full(flat, image_gs, np.float32), ms.float32)
        x_in = xt
        xt, pred = step(xt, ids, txt_t, txt_ids_t, t_vec, y, cond_all, g_img, _scalar(text_gs),
                        _scalar(t_prev - t_curr))
        if record is not None:
            record(i, {"img_in": np.concatenate([_np(x_in)] * 3), "t_vec": _np(t_vec), "cond": _np(cond_all),
                       "pred": _np(pred)})
        if progress is not None:
            progress(i)
    return xt


def denoise_distill(net, x: np.ndarray, img_ids, txt, txt_ids, y_vec, timesteps: list, *, guidance: float,
                    record: Optional[Record] = None, progress: Optional[Callable[[int], None]] = None,
                    jit: bool = True) -> Tensor:
    """DistilledDenoiser.denoise (Flux T2I): one batch, the distilled guidance is a model input."""
    dt = net.dtype
    step = _stepper(net, _distill_step, jit)
    xt = _t(x, dt)
    ids, txt_t, txt_ids_t, y = (_t(a, dt) for a in (img_ids, txt, txt_ids, y_vec))
    g = _t(np.full((x.shape[0],), guidance, np.float32), dt)
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = _t(np.full((x.shape[0],), t_curr, np.float32), dt)
        x_in = xt
        xt, pred = step(xt, ids, txt_t, txt_ids_t, t_vec, y, g, _scalar(t_prev - t_curr))
        if record is not None:
            record(i, {"img_in": _np(x_in), "t_vec": _np(t_vec), "pred": _np(pred)})
        if progress is not None:
            progress(i)
    return xt


def _vae_dtype(vae):
    for _, p in vae.parameters_and_names():
        return p.dtype
    return ms.float32


def decode(vae, latent: np.ndarray) -> np.ndarray:
    """AE decode of a (B, C, T, H, W) latent (the AE's own scaling and tiling) -> float32 numpy."""
    return _np(vae.decode(_t(latent, _vae_dtype(vae))))


def encode_reference(vae, pixels: np.ndarray, eps: Optional[np.ndarray] = None) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> latent (C, T', h, w). Hunyuan VAE: the posterior sample with noise `eps` (upstream
    samples, `sample_posterior=True`), or the mode when `eps` is None; DC-AE: deterministic."""
    x = _t(pixels[None], _vae_dtype(vae))
    if hasattr(vae, "z_channels"):
        z = vae.encode(x, sample_posterior=eps is not None, noise=None if eps is None else _t(eps[None], x.dtype))
    else:
        z = vae.encode(x)
    return _np(z)[0]


def replace_reference_frames(latent: np.ndarray, cond_type: str, refs: list) -> np.ndarray:
    """api_fn's post-loop replacement: the conditioned latent frame(s) of sample 0 become the reference latent."""
    if not refs or refs[0] is None:
        return latent
    latent = latent.copy()
    if cond_type in ("i2v_head", "i2v_loop"):
        latent[0, :, :1] = refs[0][0][:, :1]
    if cond_type == "i2v_tail":
        latent[0, :, -1:] = refs[0][0][:, -1:]
    if cond_type == "i2v_loop":
        latent[0, :, -1:] = refs[0][1][:, -1:]
    return latent


def trim_frames(video: np.ndarray, opt: plan.SamplingOption, cond_type: str, time_ratio: int) -> np.ndarray:
    """Keep num_frames; a non-causal AE also drops upstream's duplicated `compression[0] - 1` frames for i2v."""
    video = video[:, :, :opt.num_frames]
    if not opt.is_causal_vae and cond_type in ("i2v_head", "i2v_tail", "i2v_loop"):
        pad = time_ratio - 1
        video = video[:, :, pad:] if cond_type == "i2v_head" else (
            video[:, :, :-pad] if cond_type == "i2v_tail" else video[:, :, pad:-pad])
    return video


def sample_video(net, vae, opt: plan.SamplingOption, cond_type: str, z: np.ndarray, txt: np.ndarray,
                 y_vec: np.ndarray, refs: Optional[list] = None, patch_size: int = 2, record: Optional[Record] = None,
                 progress=None, jit: bool = True, offload: Optional[Callable[[], None]] = None) -> dict:
    """One upstream `api_fn` call from prepared numpy inputs (noise `z` (B, C, T', H', W'); CFG-batch text
    embeddings `txt` (3B, L, ctx), `y_vec` (3B, vec) in [prompts, negs, negs] order; reference latents per sample).
    `offload()` runs between the loop and the decode (release the MMDiT). Returns numpy `latent_before_decode`,
    `video` (B, 3, T, H, W) in [-1, 1] and `video_uint8` (B, T, H, W, 3)."""
    B, C, T, H, W = z.shape
    p = patch_size
    timesteps = plan.schedule(opt.num_steps, (H * W) // p ** 2, T, shift=opt.shift, alpha=opt.flow_shift)
    refs = refs if refs is not None else [None] * B
    masks, masked = plan.inference_condition(z.shape, cond_type, refs, causal=opt.is_causal_vae)
    cond = plan.pack(np.concatenate([masks, masked], 1), p)
    ids = plan.img_ids(T, H // p, W // p, 3 * B)
    txt_ids = np.zeros((3 * B, txt.shape[1], 3), np.float32)
    temporal = (B, C, T, H, W, p) if (opt.scale_temporal_osci and "i2v" in cond_type) else None
    x = denoise_i2v(net, plan.pack(z, p), ids, txt, txt_ids, y_vec, timesteps, guidance=opt.guidance,
                    guidance_img=opt.guidance_img, cond=cond, text_osci=opt.text_osci, image_osci=opt.image_osci,
                    temporal=temporal, record=record, progress=progress, jit=jit)
    latent = replace_reference_frames(plan.unpack(_np(x), T, H // p, W // p, p), cond_type, refs)
    net = x = None   # drop this frame's references, so `offload` can free the MMDiT before the decode
    if offload is not None:
        offload()
    video = trim_frames(decode(vae, latent), opt, cond_type, _time_ratio(vae))
    qd = "bfloat16" if _vae_dtype(vae) == ms.bfloat16 else "float32"
    u8 = np.stack([media.to_uint8(s, qd) for s in video])
    return {"latent_before_decode": latent, "video": video, "video_uint8": u8}


def _time_ratio(vae) -> int:
    r = getattr(vae, "time_compression_ratio", None)
    return int(r if r is not None else vae.config.time_compression_ratio)
