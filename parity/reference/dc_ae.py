"""PyTorch reference of upstream's Video DC-AE (`opensora/models/dc_ae/`, DCAE with `is_video=True`), fp32 on CPU.

Module paths and parameter names are upstream's, so the state dict equals the real checkpoint's manifest
(`video_dc_ae_f32t4c128.json`) and the shared case's hooks (`dc_ae_tiny`) align by path. Written from the facts
in ../shared/upstream/SPEC.md §e; only the video path and the block types of the released config are built
(ResBlock, EViTS5_GLU / EViT_GLU, Conv downsampling, InterpolateConv upsampling, rms3d norm).

Differences that do not change numbers: parameter-free activations (SiLU / ReLU / the LiteMLA kernel) and
upstream's `IdentityLayer` shortcuts are applied as functions instead of modules (the case does not hook them);
the one ReLU that sits in a ModuleList (`decoder.project_out.op_list.1`) stays a module so the next index is kept.
`ChannelChunkConv3d` is a plain Conv3d (it only chunks tensors above 2**31 elements).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from opensora_ms.configs import DCAEConfig

__all__ = ["DCAE", "DCAEConfig", "build", "check_video_shape"]


def _act(name: Optional[str], x: torch.Tensor) -> torch.Tensor:
    if name is None:
        return x
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"DC-AE: unsupported activation {name!r}")


class RMSNorm3d(nn.Module):
    """Upstream `RMSNorm3d`: over channels, statistics in fp32, affine with bias (eps 1e-5)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        x = (x / torch.sqrt(torch.square(x.float()).mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


def _norm(name: Optional[str], c: int):
    if name is None:
        return None
    if name == "rms3d":
        return RMSNorm3d(c)
    raise ValueError(f"DC-AE: unsupported norm {name!r} (the video model uses rms3d)")


class ConvLayer(nn.Module):
    """Zero padding k//2 on T, H, W (non-causal) -> Conv3d -> optional norm -> optional activation."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, use_bias=False, norm=None, act_func=None):
        super().__init__()
        self.padding = (kernel_size // 2,) * 6
        self.conv = nn.Conv3d(cin, cout, kernel_size, stride=stride, groups=groups, bias=use_bias)
        norm_mod = _norm(norm, cout)
        if norm_mod is not None:
            self.norm = norm_mod
        else:
            self.norm = None
        self.act_name = act_func

    def forward(self, x):
        x = self.conv(F.pad(x, self.padding, mode="constant"))
        if self.norm is not None:
            x = self.norm(x)
        return _act(self.act_name, x)


class ResBlock(nn.Module):
    def __init__(self, c, norm, act):
        super().__init__()
        self.conv1 = ConvLayer(c, c, 3, use_bias=True, act_func=act)
        self.conv2 = ConvLayer(c, c, 3, use_bias=False, norm=norm)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class ResidualBlock(nn.Module):
    """main(x) + shortcut(x); `shortcut=None` is upstream's IdentityLayer."""

    def __init__(self, main: nn.Module, shortcut: Optional[nn.Module]):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention over all T*H*W tokens (heads of `dim` channels)."""

    def __init__(self, c, norm, dim=32, scales=(5,), eps=1.0e-15):
        super().__init__()
        heads = int(c // dim)
        total = heads * dim
        self.dim, self.eps = dim, eps
        self.qkv = ConvLayer(c, 3 * total, 1, use_bias=False)
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv3d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                nn.Conv3d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            ) for s in scales
        ])
        self.proj = ConvLayer(total * (1 + len(scales)), c, 1, use_bias=False, norm=norm)

    def relu_linear_att(self, qkv):
        b, _, t, h, w = qkv.shape
        if qkv.dtype == torch.float16:
            qkv = qkv.float()
        qkv = qkv.reshape(b, -1, 3 * self.dim, t * h * w)
        q, k, v = qkv[:, :, : self.dim], qkv[:, :, self.dim: 2 * self.dim], qkv[:, :, 2 * self.dim:]
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1)
        out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
        if out.dtype == torch.bfloat16:
            out = out.float()
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return out.reshape(b, -1, t, h, w)

    def forward(self, x):
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        return self.proj(self.relu_linear_att(qkv).to(qkv.dtype))


class GLUMBConv(nn.Module):
    def __init__(self, c, norm, act, expand_ratio=4):
        super().__init__()
        mid = round(c * expand_ratio)
        self.glu_act_name = act
        self.inverted_conv = ConvLayer(c, mid * 2, 1, use_bias=True, act_func=act)
        self.depth_conv = ConvLayer(mid * 2, mid * 2, 3, groups=mid * 2, use_bias=True)
        self.point_conv = ConvLayer(mid, c, 1, use_bias=False, norm=norm)

    def forward(self, x):
        x = self.depth_conv(self.inverted_conv(x))
        x, gate = torch.chunk(x, 2, dim=1)
        return self.point_conv(x * _act(self.glu_act_name, gate))


class EfficientViTBlock(nn.Module):
    def __init__(self, c, norm, act, scales=(5,)):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(c, norm, dim=32, scales=scales), None)
        self.local_module = ResidualBlock(GLUMBConv(c, norm, act, expand_ratio=4), None)

    def forward(self, x):
        return self.local_module(self.context_module(x))


def pixel_unshuffle_3d(x, r):
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // r, r, h // r, r, w // r, r).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * r ** 3, t // r, h // r, w // r)


def pixel_shuffle_3d(x, r):
    b, c, t, h, w = x.shape
    x = x.view(b, c // r ** 3, r, r, r, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // r ** 3, t * r, h * r, w * r)


class PixelUnshuffleChannelAveragingDownSampleLayer(nn.Module):
    """Shortcut of the downsampling blocks: pixel unshuffle (3D when temporal and T != 1, else per frame), then
    the mean over groups of consecutive channels."""

    def __init__(self, cin, cout, factor, temporal_downsample=False):
        super().__init__()
        self.in_channels, self.out_channels, self.factor = cin, cout, factor
        self.temporal_downsample = temporal_downsample

    def forward(self, x):
        t = x.shape[2]
        if self.temporal_downsample and t != 1:
            x = pixel_unshuffle_3d(x, self.factor)
            group = self.in_channels * self.factor ** 3 // self.out_channels
        else:
            # a fresh contiguous copy: torch rejects degenerate strides here (1 frame, 1 x 1 latent) -- same numbers
            x = x.permute(0, 2, 1, 3, 4).clone(memory_format=torch.contiguous_format)
            x = F.pixel_unshuffle(x, self.factor).permute(0, 2, 1, 3, 4)
            group = self.in_channels * self.factor ** 2 // self.out_channels
        b, _, t, h, w = x.shape
        return x.reshape(b, self.out_channels, group, t, h, w).mean(dim=2)


class ChannelDuplicatingPixelShuffleUpSampleLayer(nn.Module):
    """Shortcut of the upsampling blocks: repeat_interleave channels, then pixel shuffle (3D when temporal and
    T != 1, else per frame)."""

    def __init__(self, cin, cout, factor, temporal_upsample=False):
        super().__init__()
        self.in_channels, self.out_channels, self.factor = cin, cout, factor
        self.temporal_upsample = temporal_upsample

    def forward(self, x):
        t = x.shape[2]
        temporal = self.temporal_upsample and t != 1
        repeats = self.out_channels * self.factor ** (3 if temporal else 2) // self.in_channels
        x = x.repeat_interleave(repeats, dim=1)
        if temporal:
            return pixel_shuffle_3d(x, self.factor)
        x = x.permute(0, 2, 1, 3, 4).clone(memory_format=torch.contiguous_format)  # see the unshuffle above
        return F.pixel_shuffle(x, self.factor).permute(0, 2, 1, 3, 4)


class InterpolateConvUpSampleLayer(nn.Module):
    """Nearest x(2, 2, 2) (temporal and T != 1) or x(1, 2, 2), then a 3x3x3 ConvLayer."""

    def __init__(self, cin, cout, factor=2, temporal_upsample=False):
        super().__init__()
        self.factor, self.temporal_upsample = factor, temporal_upsample
        self.conv = ConvLayer(cin, cout, 3, use_bias=True)

    def forward(self, x):
        f = self.factor
        sf = [f, f, f] if self.temporal_upsample and x.shape[2] != 1 else [1, f, f]
        return self.conv(F.interpolate(x, scale_factor=sf, mode="nearest"))


class OpSequential(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.op_list = nn.ModuleList([o for o in ops if o is not None])

    def forward(self, x):
        for op in self.op_list:
            x = op(x)
        return x


def _check_video(cfg, side):
    if not cfg.is_video:
        raise ValueError(f"DC-AE {side}: only the video model (is_video=True) is supported")


def build_block(block_type, c, norm, act):
    if block_type == "ResBlock":
        return ResidualBlock(ResBlock(c, norm, act), None)
    if block_type == "EViTS5_GLU":
        return EfficientViTBlock(c, norm, act, scales=(5,))
    if block_type == "EViT_GLU":
        return EfficientViTBlock(c, norm, act, scales=())
    raise ValueError(f"DC-AE: block_type {block_type!r} is not supported")


def _per_stage(v, i):
    return v[i] if isinstance(v, (list, tuple)) else v


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        _check_video(cfg, "encoder")
        if cfg.depth_list[0] <= 0 or cfg.downsample_block_type != "Conv" or cfg.downsample_shortcut != "averaging":
            raise ValueError("DC-AE encoder: supported are depth_list[0] > 0, Conv downsampling, averaging shortcut")
        self.cfg = cfg
        w, n = list(cfg.width_list), len(cfg.width_list)
        temporal = list(cfg.temporal_downsample) or [False] * n
        self.project_in = ConvLayer(cfg.in_channels, w[0], 3, use_bias=True)
        stages = []
        for i, (width, depth) in enumerate(zip(w, cfg.depth_list)):
            ops = [build_block(_per_stage(cfg.block_type, i), width, cfg.norm, cfg.act) for _ in range(depth)]
            if i < n - 1 and depth > 0:
                cout = w[i + 1] if cfg.downsample_match_channel else width
                conv = ConvLayer(width, cout, 3, stride=(2, 2, 2) if temporal[i] else (1, 2, 2), use_bias=True)
                ops.append(ResidualBlock(conv, PixelUnshuffleChannelAveragingDownSampleLayer(width, cout, 2, temporal[i])))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        cout = 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels
        main = OpSequential([_norm(cfg.out_norm, w[-1]), nn.ReLU() if cfg.out_act == "relu" else None,
                             ConvLayer(w[-1], cout, 3, use_bias=True)])
        short = PixelUnshuffleChannelAveragingDownSampleLayer(w[-1], cout, 1) if cfg.out_shortcut == "averaging" else None
        self.project_out = ResidualBlock(main, short) if short is not None else main

    def forward(self, x):
        x = self.project_in(x)
        for stage in self.stages:
            if len(stage.op_list):
                x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        _check_video(cfg, "decoder")
        if cfg.depth_list[0] <= 0 or cfg.upsample_block_type != "InterpolateConv" or cfg.upsample_shortcut != "duplicating":
            raise ValueError("DC-AE decoder: supported are depth_list[0] > 0, InterpolateConv upsampling, duplicating shortcut")
        self.cfg = cfg
        w, n = list(cfg.width_list), len(cfg.width_list)
        temporal = list(cfg.temporal_upsample) or [False] * n
        conv = ConvLayer(cfg.latent_channels, w[-1], 3, use_bias=True)
        self.project_in = (ResidualBlock(conv, ChannelDuplicatingPixelShuffleUpSampleLayer(cfg.latent_channels, w[-1], 1))
                           if cfg.in_shortcut == "duplicating" else conv)
        stages = [None] * n
        for i in reversed(range(n)):
            width, depth = w[i], cfg.depth_list[i]
            ops = []
            if i < n - 1 and depth > 0:
                cout = width if cfg.upsample_match_channel else w[i + 1]
                ops.append(ResidualBlock(InterpolateConvUpSampleLayer(w[i + 1], cout, 2, temporal[i]),
                                         ChannelDuplicatingPixelShuffleUpSampleLayer(w[i + 1], cout, 2, temporal[i])))
            ops += [build_block(_per_stage(cfg.block_type, i), width, _per_stage(cfg.norm, i), _per_stage(cfg.act, i))
                    for _ in range(depth)]
            stages[i] = OpSequential(ops)
        self.stages = nn.ModuleList(stages)
        act = nn.ReLU() if cfg.out_act == "relu" else None
        if cfg.out_act not in (None, "relu"):
            raise ValueError(f"DC-AE decoder: out_act {cfg.out_act!r} is not supported")
        self.project_out = OpSequential([_norm(cfg.out_norm, w[0]), act, ConvLayer(w[0], cfg.in_channels, 3, use_bias=True)])

    def forward(self, x):
        x = self.project_in(x)
        for stage in reversed(self.stages):
            if len(stage.op_list):
                x = stage(x)
        return self.project_out(x)


def check_video_shape(x_shape, cfg: DCAEConfig):
    """ValueError unless x is (B, C, T, H, W) with H, W multiples of the spatial compression and a frame count the
    encoder's temporal pixel-unshuffle accepts (1, or even at every temporal downsampling: 1 -> 1, 4k -> k)."""
    if len(x_shape) != 5:
        raise ValueError(f"DC-AE encode: expected a (B, C, T, H, W) video, got shape {tuple(x_shape)}")
    _, c, t, h, w = x_shape
    s = cfg.spatial_compression_ratio
    if c != cfg.in_channels:
        raise ValueError(f"DC-AE encode: expected {cfg.in_channels} channels, got {c}")
    if h % s or w % s or h == 0 or w == 0:
        raise ValueError(f"DC-AE encode: H and W must be positive multiples of {s}, got {h}x{w}")
    tt = t
    for flag in list(cfg.encoder.temporal_downsample):
        if flag and tt != 1:
            if tt % 2:
                raise ValueError(f"DC-AE encode: {t} frames cannot be encoded (1 frame, or a multiple of "
                                 f"{cfg.time_compression_ratio})")
            tt //= 2
    if t < 1:
        raise ValueError("DC-AE encode: no frames")


def _blend(a, b, extent, dim):
    """Upstream blend_v / blend_h / blend_t, vectorised and, like upstream, in place on `b`."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = extent
    wb = (torch.arange(extent, dtype=torch.float64) / extent).to(b.dtype).view(shape)
    wa = (1 - torch.arange(extent, dtype=torch.float64) / extent).to(b.dtype).view(shape)
    a_tail = a.narrow(dim, a.shape[dim] - extent, extent)
    b.narrow(dim, 0, extent).copy_(a_tail * wa + b.narrow(dim, 0, extent) * wb)
    return b


class DCAE(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder)
        self.decoder = Decoder(cfg.decoder)
        self.scaling_factor = cfg.scaling_factor
        self.time_compression_ratio = cfg.time_compression_ratio
        self.spatial_compression_ratio = cfg.spatial_compression_ratio
        self.use_spatial_tiling = cfg.use_spatial_tiling
        self.use_temporal_tiling = cfg.use_temporal_tiling
        self.spatial_tile_size = cfg.spatial_tile_size
        self.temporal_tile_size = cfg.temporal_tile_size
        self.spatial_tile_latent_size = cfg.spatial_tile_latent_size
        self.temporal_tile_latent_size = cfg.temporal_tile_latent_size
        self.tile_overlap_factor = cfg.tile_overlap_factor

    # ---- single (untiled) calls: one sample at a time, as upstream's inference path
    def encode_single(self, x):
        z = self.encoder(x)
        return z / self.scaling_factor if self.scaling_factor is not None else z

    def _encode(self, x):
        return torch.cat([self.encode_single(x[i: i + 1]) for i in range(x.shape[0])], 0)

    def decode_single(self, z):
        if self.scaling_factor is not None:
            z = z * self.scaling_factor
        return self.decoder(z)

    def _decode(self, z):
        return torch.cat([self.decode_single(z[i: i + 1]) for i in range(z.shape[0])], 0)

    # ---- tiling (upstream dc_ae.py spatial_tiled_* / temporal_tiled_*)
    def _spatial_tiled(self, x, tile, net, blend, limit, fn):
        rows = []
        for i in range(0, x.shape[-2], net):
            rows.append([fn(x[:, :, :, i: i + tile, j: j + tile]) for j in range(0, x.shape[-1], net)])
        out_rows = []
        for i, row in enumerate(rows):
            res = []
            for j, t in enumerate(row):
                if i > 0:
                    t = _blend(rows[i - 1][j], t, blend, 3)
                if j > 0:
                    t = _blend(row[j - 1], t, blend, 4)
                res.append(t[:, :, :, :limit, :limit])
            out_rows.append(torch.cat(res, dim=-1))
        return torch.cat(out_rows, dim=-2)

    def _temporal_tiled(self, x, tile, net, blend, limit, fn):
        row = [fn(x[:, :, i: i + tile]) for i in range(0, x.shape[2], net)]
        res = []
        for i, t in enumerate(row):
            if i > 0:
                t = _blend(row[i - 1], t, blend, 2)
            res.append(t[:, :, :limit])
        return torch.cat(res, dim=2)

    def spatial_tiled_encode(self, x):
        blend = int(self.spatial_tile_latent_size * self.tile_overlap_factor)
        return self._spatial_tiled(x, self.spatial_tile_size, int(self.spatial_tile_size * (1 - self.tile_overlap_factor)),
                                   blend, self.spatial_tile_latent_size - blend, self._encode)

    def temporal_tiled_encode(self, x):
        blend = int(self.temporal_tile_latent_size * self.tile_overlap_factor)

        def one(tile):
            if self.use_spatial_tiling and (tile.shape[-1] > self.spatial_tile_size or tile.shape[-2] > self.spatial_tile_size):
                return self.spatial_tiled_encode(tile)
            return self._encode(tile)

        return self._temporal_tiled(x, self.temporal_tile_size, int(self.temporal_tile_size * (1 - self.tile_overlap_factor)),
                                    blend, self.temporal_tile_latent_size - blend, one)

    def spatial_tiled_decode(self, z):
        blend = int(self.spatial_tile_size * self.tile_overlap_factor)
        return self._spatial_tiled(z, self.spatial_tile_latent_size,
                                   int(self.spatial_tile_latent_size * (1 - self.tile_overlap_factor)),
                                   blend, self.spatial_tile_size - blend, self._decode)

    def temporal_tiled_decode(self, z):
        blend = int(self.temporal_tile_size * self.tile_overlap_factor)

        def one(tile):
            if self.use_spatial_tiling and (tile.shape[-1] > self.spatial_tile_latent_size
                                            or tile.shape[-2] > self.spatial_tile_latent_size):
                return self.spatial_tiled_decode(tile)
            return self._decode(tile)

        return self._temporal_tiled(z, self.temporal_tile_latent_size,
                                    int(self.temporal_tile_latent_size * (1 - self.tile_overlap_factor)),
                                    blend, self.temporal_tile_size - blend, one)

    # ---- public
    def encode(self, x):
        check_video_shape(x.shape, self.cfg)
        if self.use_temporal_tiling and x.shape[2] > self.temporal_tile_size:
            return self.temporal_tiled_encode(x)
        if self.use_spatial_tiling and (x.shape[-1] > self.spatial_tile_size or x.shape[-2] > self.spatial_tile_size):
            return self.spatial_tiled_encode(x)
        return self._encode(x)

    def decode(self, z):
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"DC-AE decode: expected (B, {self.cfg.latent_channels}, T, H, W), got {tuple(z.shape)}")
        if self.use_temporal_tiling and z.shape[2] > self.temporal_tile_latent_size:
            return self.temporal_tiled_decode(z)
        if self.use_spatial_tiling and (z.shape[-1] > self.spatial_tile_latent_size
                                        or z.shape[-2] > self.spatial_tile_latent_size):
            return self.spatial_tiled_decode(z)
        return self._decode(z)

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), None, z


def build(cfg, dtype=torch.float32, device=None) -> DCAE:
    """The model at `cfg` (dict, case config dict or DCAEConfig); `device="meta"` allocates nothing."""
    c = DCAEConfig.from_dict(cfg if not isinstance(cfg, dict) or "DCAEConfig" not in cfg else cfg["DCAEConfig"])
    if device is not None:
        with torch.device(device):
            m = DCAE(c)
    else:
        m = DCAE(c)
    return m.to(dtype).eval()
