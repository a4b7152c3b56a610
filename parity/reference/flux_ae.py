"""PyTorch reference of the Flux 2D autoencoder as Open-Sora 2.0 uses it (``opensora/models/vae/autoencoder_2d.py``,
modified from black-forest-labs flux ``src/flux/modules/autoencoder.py``): the t2i2v image AE,
``flux1-dev-ae.safetensors``.

Module paths and parameter names are upstream's, so the real checkpoint loads strictly and forward hooks carry
upstream's names (``encoder.down.0.block.1.conv2``, ``decoder.mid.attn_1.q``, ``decoder.up.3.upsample.conv`` ...):

* ``ResnetBlock``: GN(32, eps 1e-6) -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, 1x1 ``nin_shortcut`` iff the
  channels change. SiLU is a *function* upstream (no module, so no hook).
* ``AttnBlock`` (mid blocks): GN -> 1x1 convs q, k, v -> one-head SDPA over the h*w tokens (scale C^-1/2) ->
  1x1 ``proj_out`` -> + x.
* ``Downsample``: zero pad (0, 1, 0, 1) (right and bottom only) then a stride-2 3x3 conv; ``Upsample``: nearest x2
  then a 3x3 conv. ``down.{i}.attn`` / ``up.{i}.attn`` are empty ModuleLists upstream (kept: same module tree).
* the decoder's ``up`` list is built from the deepest level and *prepended*, so ``up.0`` is the full-resolution
  level and runs last.
* ``AutoEncoder``: frames of a (B, C, T, H, W) video are folded into the batch (``b c t h w -> (b t) c h w``), the
  encoder's moments unfolded again; diagonal Gaussian posterior (logvar clamped to [-30, 20]);
  ``z = scale * (mean or sample - shift)``; ``decode``: ``z / scale + shift`` then the decoder, per frame.
  Upstream's ``encode`` samples (``config.sample``, default True) with ``torch.randn``; here the noise can be given
  (``noise=``) because no other framework reproduces torch's RNG stream. A 4-D (B, C, H, W) image is also accepted
  (upstream's Flux ``AutoEncoder`` API) and kept 4-D.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from opensora_ms.configs import AutoEncoderConfig

__all__ = ["AutoEncoderConfig", "AutoEncoder", "DiagonalGaussianDistribution", "build"]

GROUPS, EPS = 32, 1e-6


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=c, eps=EPS, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = _gn(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        # b c h w -> b 1 (h w) c, contiguous (einops + .contiguous() upstream)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        # b 1 (h w) c -> b c h w: a view, as einops' rearrange returns
        return o.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.attention(x))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: Optional[int]):
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.norm1 = _gn(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _gn(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))  # asymmetric: right / bottom only


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.ch = cfg.ch
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.resolution = cfg.resolution
        self.in_channels = cfg.in_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            block_in = cfg.ch * in_ch_mult[i_level]
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(self.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down = nn.Module()
            down.block = block
            down.attn = nn.ModuleList()
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = _gn(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = self.down[i_level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        self.ch = cfg.ch
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.resolution = cfg.resolution
        self.in_channels = cfg.in_channels
        self.ffactor = 2 ** (self.num_resolutions - 1)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // self.ffactor
        self.z_shape = (1, cfg.z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(self.num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = nn.Module()
            up.block = block
            up.attn = nn.ModuleList()
            if i_level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)  # up.0 = full resolution (runs last)
        self.norm_out = _gn(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Upstream's ``opensora/models/vae/utils.py`` posterior (chunk on dim 1, logvar clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


def _fold(x: torch.Tensor) -> torch.Tensor:
    """b c t h w -> (b t) c h w (a contiguous copy, as einops)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _unfold(x: torch.Tensor, t: int) -> torch.Tensor:
    """(b t) c h w -> b c t h w (a view, as einops)."""
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).permute(0, 2, 1, 3, 4)


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.scale_factor = config.scale_factor
        self.shift_factor = config.shift_factor
        self.sample = config.sample

    def encode(self, x: torch.Tensor, sample_posterior: Optional[bool] = None, return_posterior: bool = False,
               generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None):
        """Latent of x (B, C, T, H, W) or (B, C, H, W). ``sample_posterior`` None = upstream's ``config.sample``;
        a sample uses ``noise`` (the mean's shape) when given, else ``torch.randn`` with ``generator``."""
        video = x.ndim == 5
        if not video and x.ndim != 4:
            raise ValueError(f"AutoEncoder.encode: expected (B, C, T, H, W) or (B, C, H, W), got {tuple(x.shape)}")
        params = self.encoder(_fold(x) if video else x)
        if video:
            params = _unfold(params, x.shape[2])
        posterior = DiagonalGaussianDistribution(params)
        sample = self.sample if sample_posterior is None else sample_posterior
        z = posterior.sample(generator=generator, noise=noise) if sample else posterior.mode()
        z = self.scale_factor * (z - self.shift_factor)
        return (z, posterior) if return_posterior else z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels of a latent (B, z, T, h, w) or (B, z, h, w): ``z / scale + shift``, then the decoder per frame."""
        video = z.ndim == 5
        if not video and z.ndim != 4:
            raise ValueError(f"AutoEncoder.decode: expected (B, C, T, h, w) or (B, C, h, w), got {tuple(z.shape)}")
        t = z.shape[2] if video else None
        if video:
            z = _fold(z)
        x = self.decoder(z / self.scale_factor + self.shift_factor)
        return _unfold(x, t) if video else x

    def forward(self, x: torch.Tensor):
        z, posterior = self.encode(x, return_posterior=True)
        return self.decode(z), posterior, z

    def get_last_layer(self):
        return self.decoder.conv_out.weight


def build(cfg: dict | AutoEncoderConfig, dtype=torch.float32, device=None) -> AutoEncoder:
    if isinstance(cfg, dict):
        cfg = AutoEncoderConfig.from_dict(cfg)
    with torch.device(device or "cpu"):
        model = AutoEncoder(cfg)
    return model.to(dtype).eval()
