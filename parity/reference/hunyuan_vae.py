"""PyTorch reference of the Open-Sora 2.0 Hunyuan causal 3D VAE (``AutoencoderKLCausal3D``).

Written from the semantics in ``../shared/upstream/SPEC.md`` §d (upstream ``opensora/models/hunyuan_vae``),
with upstream's module paths and parameter names, so that the real checkpoint ``hunyuan_vae.safetensors``
loads strictly and forward hooks carry upstream's names:

* ``CausalConv3d``: replicate padding on W, H (k//2 each side) and T (k-1 frames in front), then ``conv``.
* ``ResnetBlockCausal3D``: GN(eps 1e-6) -> SiLU -> conv1 -> GN -> SiLU -> dropout -> conv2, 1x1x1 shortcut iff
  channels change.  As in diffusers 0.29 (``get_activation`` returns one shared ``nn.SiLU`` instance) every
  resnet of a model uses the *same* SiLU module, so hooks name all its calls
  ``encoder.down_blocks.0.resnets.0.nonlinearity#n``.
* down/up sampling: strided causal conv / nearest upsampling where frame 0 is upsampled in H, W only.
* mid block: resnet -> diffusers-style ``Attention`` (GroupNorm, to_q/to_k/to_v/to_out.0, one head, frame-causal
  additive mask, residual) on ``b (f h w) c`` tokens -> resnet.
* ``encode``/``decode`` with the diagonal Gaussian posterior (logvar clamped to [-30, 20]), latent scale/shift and
  upstream's spatial and temporal tiled encode/decode with linear blending (in-place, as upstream: a blended tile
  is what its right / lower / next neighbour blends against).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from opensora_ms.configs import AutoEncoder3DConfig, TilingKnobs, sampling_plan

__all__ = [
    "AutoEncoder3DConfig",
    "AutoencoderKLCausal3D",
    "DiagonalGaussianDistribution",
    "prepare_causal_attention_mask",
    "build",
]


# ----------------------------------------------------------------------------------------------------------------
# layers


class ChannelChunkConv3d(nn.Conv3d):
    """Upstream's conv class name. Upstream splits the input channels into chunks only when one sample has
    >= 2**31 elements (never reached with tiling); below that it is a plain ``nn.Conv3d``, as here."""


class CausalConv3d(nn.Module):
    def __init__(self, chan_in: int, chan_out: int, kernel_size: int, stride=1, bias: bool = True):
        super().__init__()
        k = kernel_size
        self.time_causal_padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)  # W, H, T
        self.conv = ChannelChunkConv3d(chan_in, chan_out, kernel_size, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.time_causal_padding, mode="replicate"))


def _nearest(x: torch.Tensor, scale) -> torch.Tensor:
    return F.interpolate(x, scale_factor=tuple(scale), mode="nearest")


class UpsampleCausal3D(nn.Module):
    def __init__(self, channels: int, out_channels: Optional[int] = None, upsample_factor=(2, 2, 2)):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.upsample_factor = tuple(upsample_factor)
        self.conv = CausalConv3d(self.channels, self.out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        first = _nearest(x[:, :, 0], self.upsample_factor[1:]).unsqueeze(2)  # frame 0: H, W only
        if t > 1:
            rest = _nearest(x[:, :, 1:], self.upsample_factor)
            x = torch.cat((first, rest), dim=2)
        else:
            x = first
        return self.conv(x)


class DownsampleCausal3D(nn.Module):
    def __init__(self, channels: int, stride=2):
        super().__init__()
        self.channels = channels
        self.out_channels = channels
        self.conv = CausalConv3d(channels, channels, kernel_size=3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResnetBlockCausal3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, dropout: float, act: nn.Module):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        # registration order = upstream's (hook names and named_modules order depend on it)
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3)
        self.nonlinearity = act
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # output_scale_factor 1


def prepare_causal_attention_mask(n_frame: int, n_hw: int, dtype, device=None, batch_size: Optional[int] = None):
    """Additive (L, L) mask: token i sees every token of frames <= frame(i) (0), the rest -inf."""
    frame = torch.arange(n_frame * n_hw, device=device) // n_hw
    mask = torch.zeros((frame.numel(), frame.numel()), dtype=dtype, device=device)
    mask = mask.masked_fill(frame[None, :] > frame[:, None], float("-inf"))
    if batch_size is not None:
        mask = mask.unsqueeze(0).expand(batch_size, -1, -1)
    return mask


class Attention(nn.Module):
    """diffusers ``Attention`` as configured by the mid block (``_from_deprecated_attn_block``, residual, bias,
    GroupNorm) run by ``AttnProcessor2_0``, on (B, L, C) tokens."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, norm_num_groups: int, eps: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True)
        self.to_q = nn.Linear(query_dim, inner, bias=True)
        self.to_k = nn.Linear(query_dim, inner, bias=True)
        self.to_v = nn.Linear(query_dim, inner, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=True), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = x
        b, n, _ = x.shape
        h = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        d = q.shape[-1] // self.heads
        q, k, v = (t.view(b, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.reshape(b, 1, -1, attention_mask.shape[-1])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        o = o.transpose(1, 2).reshape(b, -1, self.heads * d)
        o = self.to_out[1](self.to_out[0](o))
        return o + residual  # rescale_output_factor 1


class UNetMidBlockCausal3D(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float, dropout: float, add_attention: bool, act: nn.Module):
        super().__init__()
        self.add_attention = add_attention
        attn = Attention(channels, heads=1, dim_head=channels, norm_num_groups=groups, eps=eps) if add_attention else None
        self.attentions = nn.ModuleList([attn])
        self.resnets = nn.ModuleList(
            [ResnetBlockCausal3D(channels, channels, groups, eps, dropout, act) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                b, c, t, h, w = x.shape
                # b c f h w -> b (f h w) c and back, with einops' memory layouts (a contiguous token copy in,
                # a channels-last view out: torch's GroupNorm reduces in a layout-dependent order)
                tok = x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
                tok = attn(tok, attention_mask=attention_mask)
                x = tok.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
            x = resnet(x)
        return x


class DownEncoderBlockCausal3D(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, eps, dropout, add_downsample, stride, act):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlockCausal3D(in_ch if i == 0 else out_ch, out_ch, groups, eps, dropout, act) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([DownsampleCausal3D(out_ch, stride=stride)]) if add_downsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            for d in self.downsamplers:
                x = d(x)
        return x


class UpDecoderBlockCausal3D(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, eps, dropout, add_upsample, factor, act):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlockCausal3D(in_ch if i == 0 else out_ch, out_ch, groups, eps, dropout, act) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([UpsampleCausal3D(out_ch, out_ch, factor)]) if add_upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            for u in self.upsamplers:
                x = u(x)
        return x


def _act(name: str) -> nn.Module:
    if name.lower() in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"unsupported act_fn {name!r}")


class EncoderCausal3D(nn.Module):
    def __init__(self, cfg: AutoEncoder3DConfig, act: nn.Module):
        super().__init__()
        ch = list(cfg.block_out_channels)
        g, eps = cfg.norm_num_groups, 1e-6
        self.layers_per_block = cfg.layers_per_block
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], kernel_size=3)
        self.mid_block = None
        self.down_blocks = nn.ModuleList([])
        out = ch[0]
        for i, (sp, tm) in enumerate(sampling_plan(len(ch), cfg.time_compression_ratio, cfg.spatial_compression_ratio)):
            inp, out = out, ch[i]
            stride = (2 if tm else 1, 2 if sp else 1, 2 if sp else 1)
            self.down_blocks.append(
                DownEncoderBlockCausal3D(inp, out, cfg.layers_per_block, g, eps, cfg.dropout, sp or tm, stride, act)
            )
        self.mid_block = UNetMidBlockCausal3D(ch[-1], g, eps, cfg.dropout, cfg.mid_block_add_attention, act)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        mask = None
        if self.mid_block.add_attention:
            b, _, t, h, w = x.shape
            mask = prepare_causal_attention_mask(t, h * w, x.dtype, x.device, batch_size=b)
        x = self.mid_block(x, mask)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DecoderCausal3D(nn.Module):
    def __init__(self, cfg: AutoEncoder3DConfig, act: nn.Module):
        super().__init__()
        ch = list(cfg.block_out_channels)
        g, eps = cfg.norm_num_groups, 1e-6
        self.layers_per_block = cfg.layers_per_block
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[-1], kernel_size=3)
        self.mid_block = UNetMidBlockCausal3D(ch[-1], g, eps, cfg.dropout, cfg.mid_block_add_attention, act)
        self.up_blocks = nn.ModuleList([])
        rev = list(reversed(ch))
        out = rev[0]
        for i, (sp, tm) in enumerate(sampling_plan(len(ch), cfg.time_compression_ratio, cfg.spatial_compression_ratio)):
            prev, out = out, rev[i]
            factor = (2 if tm else 1, 2 if sp else 1, 2 if sp else 1)
            self.up_blocks.append(
                UpDecoderBlockCausal3D(prev, out, cfg.layers_per_block + 1, g, eps, cfg.dropout, sp or tm, factor, act)
            )
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(ch[0], cfg.out_channels, kernel_size=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        mask = None
        if self.mid_block.add_attention:
            b, _, t, h, w = x.shape
            mask = prepare_causal_attention_mask(t, h * w, x.dtype, x.device, batch_size=b)
        x = self.mid_block(x, mask)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussianDistribution:
    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.parameters.dtype)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


# ----------------------------------------------------------------------------------------------------------------
# the autoencoder


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Upstream's blend_{t,v,h}: the first `extent` slices of b along `dim` fade from a's last ones (in place)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        bs, as_ = b.select(dim, y), a.select(dim, a.shape[dim] - extent + y)
        bs.copy_(as_ * (1 - y / extent) + bs * (y / extent))
    return b


class AutoencoderKLCausal3D(nn.Module, TilingKnobs):
    def __init__(
        self,
        config: AutoEncoder3DConfig,
        *,
        tile_sample_min_size: Optional[int] = None,
        tile_latent_min_size: Optional[int] = None,
        tile_sample_min_tsize: Optional[int] = None,
        tile_latent_min_tsize: Optional[int] = None,
    ):
        super().__init__()
        cfg = config
        self.config = cfg
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor
        self.time_compression_ratio = cfg.time_compression_ratio
        self.spatial_compression_ratio = cfg.spatial_compression_ratio
        self.z_channels = cfg.latent_channels
        # diffusers' get_activation hands every resnet the same SiLU instance
        act = _act(cfg.act_fn)
        self.encoder = EncoderCausal3D(cfg, act)
        self.decoder = DecoderCausal3D(cfg, act)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, kernel_size=1)
        self.use_slicing = cfg.use_slicing
        self.use_spatial_tiling = cfg.use_spatial_tiling
        self.use_temporal_tiling = cfg.use_temporal_tiling
        self.tile_overlap_factor = cfg.tile_overlap_factor
        self.set_tile_sizes(
            sample_size=cfg.sample_size,
            sample_tsize=cfg.sample_tsize,
        )
        if tile_sample_min_size is not None:
            self.tile_sample_min_size = tile_sample_min_size
        if tile_latent_min_size is not None:
            self.tile_latent_min_size = tile_latent_min_size
        if tile_sample_min_tsize is not None:
            self.tile_sample_min_tsize = tile_sample_min_tsize
        if tile_latent_min_tsize is not None:
            self.tile_latent_min_tsize = tile_latent_min_tsize

    # ---- encode
    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_temporal_tiling and x.shape[2] > self.tile_sample_min_tsize:
            return self.temporal_tiled_encode(x)
        if self.use_spatial_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self.spatial_tiled_encode(x)
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self.encoder(s) for s in x.split(1)])
        else:
            h = self.encoder(x)
        return self.quant_conv(h)

    def encode(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        return_posterior: bool = False,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
    ):
        assert x.ndim == 5
        posterior = DiagonalGaussianDistribution(self._moments(x))
        z = posterior.sample(generator=generator, noise=noise) if sample_posterior else posterior.mode()
        z = self.scale_factor * (z - self.shift_factor)
        return (z, posterior) if return_posterior else z

    def spatial_tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the moments (upstream's ``return_moments=True``)."""
        overlap = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_latent_min_size * self.tile_overlap_factor)
        limit = self.tile_latent_min_size - blend
        ts = self.tile_sample_min_size
        rows = []
        for i in range(0, x.shape[-2], overlap):
            rows.append([self.quant_conv(self.encoder(x[:, :, :, i : i + ts, j : j + ts])) for j in range(0, x.shape[-1], overlap)])
        return self._stitch(rows, blend, limit)

    def temporal_tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        overlap = int(self.tile_sample_min_tsize * (1 - self.tile_overlap_factor))
        blend = int(self.tile_latent_min_tsize * self.tile_overlap_factor)
        limit = self.tile_latent_min_tsize - blend
        row = []
        for i in range(0, x.shape[2], overlap):
            tile = x[:, :, i : i + self.tile_sample_min_tsize + 1]
            if self.use_spatial_tiling and (tile.shape[-1] > self.tile_sample_min_size or tile.shape[-2] > self.tile_sample_min_size):
                tile = self.spatial_tiled_encode(tile)
            else:
                tile = self.quant_conv(self.encoder(tile))
            row.append(tile if i == 0 else tile[:, :, 1:])
        return self._stitch_t(row, blend, limit)

    # ---- decode
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_temporal_tiling and z.shape[2] > self.tile_latent_min_tsize:
            return self.temporal_tiled_decode(z)
        if self.use_spatial_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            return self.spatial_tiled_decode(z)
        return self.decoder(self.post_quant_conv(z))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        assert z.ndim == 5
        z = z / self.scale_factor + self.shift_factor
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(s) for s in z.split(1)])
        return self._decode(z)

    def spatial_tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        overlap = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_sample_min_size * self.tile_overlap_factor)
        limit = self.tile_sample_min_size - blend
        tl = self.tile_latent_min_size
        rows = []
        for i in range(0, z.shape[-2], overlap):
            rows.append(
                [self.decoder(self.post_quant_conv(z[:, :, :, i : i + tl, j : j + tl])) for j in range(0, z.shape[-1], overlap)]
            )
        return self._stitch(rows, blend, limit)

    def temporal_tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        overlap = int(self.tile_latent_min_tsize * (1 - self.tile_overlap_factor))
        blend = int(self.tile_sample_min_tsize * self.tile_overlap_factor)
        limit = self.tile_sample_min_tsize - blend
        row = []
        for i in range(0, z.shape[2], overlap):
            tile = z[:, :, i : i + self.tile_latent_min_tsize + 1]
            if self.use_spatial_tiling and (tile.shape[-1] > self.tile_latent_min_size or tile.shape[-2] > self.tile_latent_min_size):
                dec = self.spatial_tiled_decode(tile)
            else:
                dec = self.decoder(self.post_quant_conv(tile))
            row.append(dec if i == 0 else dec[:, :, 1:])
        return self._stitch_t(row, blend, limit)

    # ---- blending
    @staticmethod
    def _stitch(rows, blend: int, limit: int) -> torch.Tensor:
        out_rows = []
        for i, row in enumerate(rows):
            res = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = _blend(rows[i - 1][j], tile, blend, dim=3)
                if j > 0:
                    tile = _blend(row[j - 1], tile, blend, dim=4)
                res.append(tile[:, :, :, :limit, :limit])
            out_rows.append(torch.cat(res, dim=-1))
        return torch.cat(out_rows, dim=-2)

    @staticmethod
    def _stitch_t(row, blend: int, limit: int) -> torch.Tensor:
        res = []
        for i, tile in enumerate(row):
            if i > 0:
                tile = _blend(row[i - 1], tile, blend, dim=2)
                res.append(tile[:, :, :limit])
            else:
                res.append(tile[:, :, : limit + 1])
        return torch.cat(res, dim=2)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = True, generator=None):
        z, posterior = self.encode(sample, sample_posterior=sample_posterior, return_posterior=True, generator=generator)
        return self.decode(z), posterior, z


def build(cfg: dict | AutoEncoder3DConfig, dtype=torch.float32, device=None, **tile_kw) -> AutoencoderKLCausal3D:
    if isinstance(cfg, dict):
        cfg = AutoEncoder3DConfig.from_dict(cfg)
    with torch.device(device or "cpu"):
        model = AutoencoderKLCausal3D(cfg, **tile_kw)
    return model.to(dtype).eval()
