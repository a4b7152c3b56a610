"""MindSpore port of Open-Sora 2.0's Video DC-AE (upstream ``DCAE`` with ``is_video=True``, F32T4C128).

Cell paths and parameter names are upstream's (``encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight``
...), the same as the torch reference ``parity/reference/dc_ae.py``, so the checkpoint converts by renames only
(``mappings/video_dc_ae.yaml``) and the parity harness aligns cells with torch modules by path. Every convolution
goes through the op layer (``opensora_ms.ops.conv``: fast GEMM conv3d on CPU, grouped / depthwise included).

Behaviour (``../shared/upstream/SPEC.md`` §e): zero-padded 3D convs, RMSNorm3d (weight and bias, eps 1e-5, fp32
statistics), ResBlock, EfficientViT blocks (LiteMLA ReLU linear attention with the 5x5x5 multi-scale aggregation,
GLUMBConv), pixel (un)shuffle shortcuts with channel averaging / duplicating, temporal resampling skipped when the
current T == 1 (1 frame -> 1 latent frame; 4k frames -> k), spatial + temporal tiling with upstream's sizes,
strides and linear blending, optional ``scaling_factor`` (None in upstream's inference config).

Precision: CPU computes fp32. On Ascend (bf16, **not verified on hardware**) the same code runs in the parameters'
dtype, with RMSNorm statistics and LiteMLA's final division in fp32 as upstream.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from opensora_ms.configs import DCAEConfig
from opensora_ms.ops.conv import Conv3d, interpolate_nearest
from opensora_ms.ops.nn import matmul, mean, relu, silu

__all__ = ["DCAE", "DCAEConfig", "build", "param_inventory", "check_video_shape"]


def _cfg(cfg) -> DCAEConfig:
    if isinstance(cfg, DCAEConfig):
        return cfg
    if isinstance(cfg, dict) and "DCAEConfig" in cfg:
        cfg = cfg["DCAEConfig"]
    return DCAEConfig.from_dict(cfg)


def _act(name, x):
    if name is None:
        return x
    if name == "silu":
        return silu(x)
    if name == "relu":
        return relu(x)
    raise ValueError(f"DC-AE: unsupported activation {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# layers


class RMSNorm3d(nn.Cell):
    """Over channels: (x / sqrt(mean(x_f32^2) + eps)).to(x.dtype) * weight + bias."""

    def __init__(self, num_features: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(initializer("ones", (num_features,), dtype))
        self.bias = Parameter(initializer("zeros", (num_features,), dtype))

    def construct(self, x):
        xf = x.astype(ms.float32)
        y = (xf / ops.sqrt((xf * xf).mean(1, keep_dims=True) + self.eps)).astype(x.dtype)
        return y * self.weight.reshape(1, -1, 1, 1, 1) + self.bias.reshape(1, -1, 1, 1, 1)


def _norm(name, c):
    if name is None:
        return None
    if name == "rms3d":
        return RMSNorm3d(c)
    raise ValueError(f"DC-AE: unsupported norm {name!r} (the video model uses rms3d)")


class ConvLayer(nn.Cell):
    """Zero padding k//2 (T, H, W) + conv (fused in the op layer's CPU kernel) -> optional norm -> activation."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, use_bias=False, norm=None, act_func=None):
        super().__init__()
        self.conv = Conv3d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=use_bias,
                           groups=groups)
        self.norm = _norm(norm, cout)
        self.act_name = act_func

    def construct(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return _act(self.act_name, x)


class ResBlock(nn.Cell):
    def __init__(self, c, norm, act):
        super().__init__()
        self.conv1 = ConvLayer(c, c, 3, use_bias=True, act_func=act)
        self.conv2 = ConvLayer(c, c, 3, use_bias=False, norm=norm)

    def construct(self, x):
        return self.conv2(self.conv1(x))


class ResidualBlock(nn.Cell):
    """main(x) + shortcut(x); `shortcut=None` is upstream's IdentityLayer."""

    def __init__(self, main, shortcut=None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def construct(self, x):
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class LiteMLA(nn.Cell):
    """Multi-scale ReLU linear attention: heads of 32 channels over all T*H*W tokens, value padded with a row of
    ones whose output is the normaliser; the division runs in fp32 (upstream casts bf16 up)."""

    def __init__(self, c, norm, dim=32, scales=(5,), eps=1.0e-15):
        super().__init__()
        heads = int(c // dim)
        total = heads * dim
        self.dim, self.eps = dim, float(eps)
        self.qkv = ConvLayer(c, 3 * total, 1, use_bias=False)
        self.aggreg = nn.CellList([
            nn.SequentialCell([
                Conv3d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                Conv3d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            ]) for s in scales
        ])
        self.proj = ConvLayer(total * (1 + len(scales)), c, 1, use_bias=False, norm=norm)

    def relu_linear_att(self, qkv):
        b, _, t, h, w = qkv.shape
        n = t * h * w
        qkv = qkv.reshape(b, -1, 3 * self.dim, n)
        nh = qkv.shape[1]
        q = relu(qkv[:, :, : self.dim])
        k = relu(qkv[:, :, self.dim: 2 * self.dim])
        v = qkv[:, :, 2 * self.dim:]
        v = mint.cat((v, mint.ones((b, nh, 1, n), dtype=v.dtype)), 2)
        vk = matmul(v, mint.transpose(k, -1, -2))  # bf16 matmuls (upstream upcasts fp16 only)
        out = matmul(vk, q).astype(ms.float32)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return out.reshape(b, -1, t, h, w)

    def construct(self, x):
        qkv = self.qkv(x)
        parts = [qkv]
        for op in self.aggreg:
            parts.append(op(qkv))
        qkv = mint.cat(parts, 1)
        return self.proj(self.relu_linear_att(qkv).astype(qkv.dtype))


class GLUMBConv(nn.Cell):
    def __init__(self, c, norm, act, expand_ratio=4):
        super().__init__()
        mid = round(c * expand_ratio)
        self.mid = mid
        self.glu_act_name = act
        self.inverted_conv = ConvLayer(c, mid * 2, 1, use_bias=True, act_func=act)
        self.depth_conv = ConvLayer(mid * 2, mid * 2, 3, groups=mid * 2, use_bias=True)
        self.point_conv = ConvLayer(mid, c, 1, use_bias=False, norm=norm)

    def construct(self, x):
        x = self.depth_conv(self.inverted_conv(x))
        x, gate = x[:, : self.mid], x[:, self.mid:]
        return self.point_conv(x * _act(self.glu_act_name, gate))


class EfficientViTBlock(nn.Cell):
    def __init__(self, c, norm, act, scales=(5,)):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(c, norm, dim=32, scales=scales))
        self.local_module = ResidualBlock(GLUMBConv(c, norm, act, expand_ratio=4))

    def construct(self, x):
        return self.local_module(self.context_module(x))


def pixel_unshuffle_3d(x, r):
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // r, r, h // r, r, w // r, r).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * r ** 3, t // r, h // r, w // r)


def pixel_unshuffle_hw(x, r):
    """torch's per-frame F.pixel_unshuffle on (B, C, T, H, W): channel c*r*r + rh*r + rw."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // r, r, w // r, r).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * r * r, t, h // r, w // r)


def pixel_shuffle_3d(x, r):
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // r ** 3, r, r, r, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // r ** 3, t * r, h * r, w * r)


def pixel_shuffle_hw(x, r):
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (r * r), r, r, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c // (r * r), t, h * r, w * r)


def repeat_channels(x, repeats):
    """x.repeat_interleave(repeats, dim=1) as one broadcast."""
    shp = tuple(x.shape)
    y = mint.broadcast_to(x.reshape(shp[:2] + (1,) + shp[2:]), shp[:2] + (repeats,) + shp[2:])
    return y.reshape((shp[0], shp[1] * repeats) + shp[2:])


class PixelUnshuffleChannelAveragingDownSampleLayer(nn.Cell):
    def __init__(self, cin, cout, factor, temporal_downsample=False):
        super().__init__()
        self.in_channels, self.out_channels, self.factor = cin, cout, factor
        self.temporal_downsample = temporal_downsample

    def construct(self, x):
        if self.temporal_downsample and x.shape[2] != 1:
            x = pixel_unshuffle_3d(x, self.factor)
            group = self.in_channels * self.factor ** 3 // self.out_channels
        else:
            x = pixel_unshuffle_hw(x, self.factor) if self.factor > 1 else x
            group = self.in_channels * self.factor ** 2 // self.out_channels
        b, _, t, h, w = x.shape
        return mean(x.reshape(b, self.out_channels, group, t, h, w), 2)


class ChannelDuplicatingPixelShuffleUpSampleLayer(nn.Cell):
    def __init__(self, cin, cout, factor, temporal_upsample=False):
        super().__init__()
        self.in_channels, self.out_channels, self.factor = cin, cout, factor
        self.temporal_upsample = temporal_upsample

    def construct(self, x):
        temporal = self.temporal_upsample and x.shape[2] != 1
        repeats = self.out_channels * self.factor ** (3 if temporal else 2) // self.in_channels
        x = repeat_channels(x, repeats)
        if self.factor == 1:
            return x
        return pixel_shuffle_3d(x, self.factor) if temporal else pixel_shuffle_hw(x, self.factor)


class InterpolateConvUpSampleLayer(nn.Cell):
    def __init__(self, cin, cout, factor=2, temporal_upsample=False):
        super().__init__()
        self.factor, self.temporal_upsample = factor, temporal_upsample
        self.conv = ConvLayer(cin, cout, 3, use_bias=True)

    def construct(self, x):
        f = self.factor
        ft = f if (self.temporal_upsample and x.shape[2] != 1) else 1
        return self.conv(interpolate_nearest(x, (ft, f, f)))


class ReLU(nn.Cell):
    def construct(self, x):
        return relu(x)


class OpSequential(nn.Cell):
    def __init__(self, op_list):
        super().__init__()
        self.op_list = nn.CellList([o for o in op_list if o is not None])

    def construct(self, x):
        for op in self.op_list:
            x = op(x)
        return x


def _per_stage(v, i):
    return v[i] if isinstance(v, (list, tuple)) else v


def build_block(block_type, c, norm, act):
    if block_type == "ResBlock":
        return ResidualBlock(ResBlock(c, norm, act))
    if block_type == "EViTS5_GLU":
        return EfficientViTBlock(c, norm, act, scales=(5,))
    if block_type == "EViT_GLU":
        return EfficientViTBlock(c, norm, act, scales=())
    raise ValueError(f"DC-AE: block_type {block_type!r} is not supported")


def _check_supported(cfg):
    e, d = cfg.encoder, cfg.decoder
    if not (e.is_video and d.is_video):
        raise ValueError("DC-AE: only the video model (is_video=True) is supported")
    if e.depth_list[0] <= 0 or e.downsample_block_type != "Conv" or e.downsample_shortcut != "averaging":
        raise ValueError("DC-AE encoder: supported are depth_list[0] > 0, Conv downsampling, averaging shortcut")
    if d.depth_list[0] <= 0 or d.upsample_block_type != "InterpolateConv" or d.upsample_shortcut != "duplicating":
        raise ValueError("DC-AE decoder: supported are depth_list[0] > 0, InterpolateConv upsampling, duplicating shortcut")
    if d.out_act not in (None, "relu") or e.out_act not in (None, "relu"):
        raise ValueError("DC-AE: out_act must be None or relu")


class Encoder(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        w, n = list(cfg.width_list), len(cfg.width_list)
        temporal = list(cfg.temporal_downsample) or [False] * n
        self.project_in = ConvLayer(cfg.in_channels, w[0], 3, use_bias=True)
        stages = []
        for i, (width, depth) in enumerate(zip(w, cfg.depth_list)):
            ops_ = [build_block(_per_stage(cfg.block_type, i), width, cfg.norm, cfg.act) for _ in range(depth)]
            if i < n - 1 and depth > 0:
                cout = w[i + 1] if cfg.downsample_match_channel else width
                conv = ConvLayer(width, cout, 3, stride=(2, 2, 2) if temporal[i] else (1, 2, 2), use_bias=True)
                ops_.append(ResidualBlock(conv, PixelUnshuffleChannelAveragingDownSampleLayer(width, cout, 2, temporal[i])))
            stages.append(OpSequential(ops_))
        self.stages = nn.CellList(stages)
        cout = 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels
        main = OpSequential([_norm(cfg.out_norm, w[-1]), ReLU() if cfg.out_act == "relu" else None,
                             ConvLayer(w[-1], cout, 3, use_bias=True)])
        short = PixelUnshuffleChannelAveragingDownSampleLayer(w[-1], cout, 1) if cfg.out_shortcut == "averaging" else None
        self.project_out = ResidualBlock(main, short) if short is not None else main

    def construct(self, x):
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        w, n = list(cfg.width_list), len(cfg.width_list)
        temporal = list(cfg.temporal_upsample) or [False] * n
        conv = ConvLayer(cfg.latent_channels, w[-1], 3, use_bias=True)
        self.project_in = (ResidualBlock(conv, ChannelDuplicatingPixelShuffleUpSampleLayer(cfg.latent_channels, w[-1], 1))
                           if cfg.in_shortcut == "duplicating" else conv)
        stages = [None] * n
        for i in reversed(range(n)):
            width, depth = w[i], cfg.depth_list[i]
            ops_ = []
            if i < n - 1 and depth > 0:
                cout = width if cfg.upsample_match_channel else w[i + 1]
                ops_.append(ResidualBlock(InterpolateConvUpSampleLayer(w[i + 1], cout, 2, temporal[i]),
                                          ChannelDuplicatingPixelShuffleUpSampleLayer(w[i + 1], cout, 2, temporal[i])))
            ops_ += [build_block(_per_stage(cfg.block_type, i), width, _per_stage(cfg.norm, i), _per_stage(cfg.act, i))
                     for _ in range(depth)]
            stages[i] = OpSequential(ops_)
        self.stages = nn.CellList(stages)
        self.n_stages = n
        self.project_out = OpSequential([_norm(cfg.out_norm, w[0]), ReLU() if cfg.out_act == "relu" else None,
                                         ConvLayer(w[0], cfg.in_channels, 3, use_bias=True)])

    def construct(self, x):
        x = self.project_in(x)
        for i in range(self.n_stages - 1, -1, -1):
            x = self.stages[i](x)
        return self.project_out(x)


# ----------------------------------------------------------------------------------------------------------------
# shapes, blending


def check_video_shape(x_shape, cfg: DCAEConfig):
    """ValueError unless x is (B, C, T, H, W) with H, W positive multiples of the spatial compression and T a frame
    count the temporal pixel-unshuffle accepts (1, or even at every temporal downsampling: 4k frames -> k)."""
    if len(x_shape) != 5:
        raise ValueError(f"DC-AE encode: expected a (B, C, T, H, W) video, got shape {tuple(x_shape)}")
    _, c, t, h, w = x_shape
    s = cfg.spatial_compression_ratio
    if c != cfg.in_channels:
        raise ValueError(f"DC-AE encode: expected {cfg.in_channels} channels, got {c}")
    if h % s or w % s or h == 0 or w == 0:
        raise ValueError(f"DC-AE encode: H and W must be positive multiples of {s}, got {h}x{w}")
    if t < 1:
        raise ValueError("DC-AE encode: no frames")
    tt = t
    for flag in list(cfg.encoder.temporal_downsample):
        if flag and tt != 1:
            if tt % 2:
                raise ValueError(f"DC-AE encode: {t} frames cannot be encoded (1 frame, or a multiple of "
                                 f"{cfg.time_compression_ratio})")
            tt //= 2


def _blend(a, b, extent: int, axis: int):
    """Upstream blend_v / blend_h / blend_t: b's first `extent` slices become a_tail*(1-y/e) + b_head*(y/e)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    y = np.arange(extent, dtype=np.float64) / extent
    shape = [1] * b.ndim
    shape[axis] = extent
    wb = Tensor(y.astype(np.float32).reshape(shape)).astype(b.dtype)
    wa = Tensor((1.0 - y).astype(np.float32).reshape(shape)).astype(b.dtype)
    head = mint.narrow(a, axis, a.shape[axis] - extent, extent) * wa + mint.narrow(b, axis, 0, extent) * wb
    if extent == b.shape[axis]:
        return head
    return mint.cat((head, mint.narrow(b, axis, extent, b.shape[axis] - extent)), axis)


def _cat(xs, axis):
    return xs[0] if len(xs) == 1 else mint.cat(xs, axis)


# ----------------------------------------------------------------------------------------------------------------
# the autoencoder


class DCAE(nn.Cell):
    def __init__(self, config):
        super().__init__()
        cfg = _cfg(config)
        _check_supported(cfg)
        self.config = cfg
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

    # ---- untiled: one sample at a time (upstream's inference path)
    def _encode(self, x):
        zs = []
        for i in range(x.shape[0]):
            z = self.encoder(x[i: i + 1])
            zs.append(z / self.scaling_factor if self.scaling_factor is not None else z)
        return _cat(zs, 0)

    def _decode(self, z):
        xs = []
        for i in range(z.shape[0]):
            zi = z[i: i + 1]
            xs.append(self.decoder(zi * self.scaling_factor if self.scaling_factor is not None else zi))
        return _cat(xs, 0)

    # ---- tiling
    @staticmethod
    def _spatial_tiled(x, tile, net, blend, limit, fn):
        rows = []
        for i in range(0, x.shape[-2], net):
            rows.append([fn(x[:, :, :, i: i + tile, j: j + tile]) for j in range(0, x.shape[-1], net)])
        out_rows = []
        for i, row in enumerate(rows):
            res = []
            for j in range(len(row)):
                t = row[j]
                if i > 0:
                    t = _blend(rows[i - 1][j], t, blend, 3)
                if j > 0:
                    t = _blend(row[j - 1], t, blend, 4)
                row[j] = t  # upstream blends in place: later neighbours see the blended tile
                res.append(t[:, :, :, :limit, :limit])
            out_rows.append(_cat(res, 4))
        return _cat(out_rows, 3)

    @staticmethod
    def _temporal_tiled(x, tile, net, blend, limit, fn):
        row = [fn(x[:, :, i: i + tile]) for i in range(0, x.shape[2], net)]
        res = []
        for i in range(len(row)):
            t = row[i]
            if i > 0:
                t = _blend(row[i - 1], t, blend, 2)
                row[i] = t
            res.append(t[:, :, :limit])
        return _cat(res, 2)

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
        """Latent of a (B, 3, T, H, W) video: T = 1 or a multiple of 4 (-> T/4), H, W multiples of 32."""
        if not isinstance(x, Tensor):
            x = Tensor(np.asarray(x, np.float32))
        check_video_shape(x.shape, self.config)
        if self.use_temporal_tiling and x.shape[2] > self.temporal_tile_size:
            return self.temporal_tiled_encode(x)
        if self.use_spatial_tiling and (x.shape[-1] > self.spatial_tile_size or x.shape[-2] > self.spatial_tile_size):
            return self.spatial_tiled_encode(x)
        return self._encode(x)

    def decode(self, z):
        if not isinstance(z, Tensor):
            z = Tensor(np.asarray(z, np.float32))
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"DC-AE decode: expected (B, {self.config.latent_channels}, T, H, W), got {tuple(z.shape)}")
        if self.use_temporal_tiling and z.shape[2] > self.temporal_tile_latent_size:
            return self.temporal_tiled_decode(z)
        if self.use_spatial_tiling and (z.shape[-1] > self.spatial_tile_latent_size
                                        or z.shape[-2] > self.spatial_tile_latent_size):
            return self.spatial_tiled_decode(z)
        return self._decode(z)

    def construct(self, x):
        z = self.encode(x)
        return self.decode(z), z


# ----------------------------------------------------------------------------------------------------------------
# inventory / factory


def param_inventory(cfg) -> dict:
    """{name: (shape, "F32")} of every parameter at `cfg`, from the architecture (nothing is allocated)."""
    cfg = _cfg(cfg)
    _check_supported(cfg)
    inv = {}

    def conv(p, ci, co, k, bias, groups=1):
        inv[f"{p}.weight"] = ((co, ci // groups, k, k, k), "F32")
        if bias:
            inv[f"{p}.bias"] = ((co,), "F32")

    def norm(p, name, c):
        if name is not None:
            inv[f"{p}.weight"] = ((c,), "F32")
            inv[f"{p}.bias"] = ((c,), "F32")

    def layer(p, ci, co, k, bias, nm=None, groups=1):
        conv(f"{p}.conv", ci, co, k, bias, groups)
        norm(f"{p}.norm", nm, co)

    def block(p, bt, c, nm):
        if bt == "ResBlock":
            layer(f"{p}.main.conv1", c, c, 3, True)
            layer(f"{p}.main.conv2", c, c, 3, False, nm)
            return
        scales = (5,) if bt == "EViTS5_GLU" else ()
        heads = c // 32
        tot = heads * 32
        m = f"{p}.context_module.main"
        layer(f"{m}.qkv", c, 3 * tot, 1, False)
        for si, s in enumerate(scales):
            conv(f"{m}.aggreg.{si}.0", 3 * tot, 3 * tot, s, False, groups=3 * tot)
            conv(f"{m}.aggreg.{si}.1", 3 * tot, 3 * tot, 1, False, groups=3 * heads)
        layer(f"{m}.proj", tot * (1 + len(scales)), c, 1, False, nm)
        lm, mid = f"{p}.local_module.main", round(c * 4)
        layer(f"{lm}.inverted_conv", c, 2 * mid, 1, True)
        layer(f"{lm}.depth_conv", 2 * mid, 2 * mid, 3, True, groups=2 * mid)
        layer(f"{lm}.point_conv", mid, c, 1, False, nm)

    e, d = cfg.encoder, cfg.decoder
    w, n = list(e.width_list), len(e.width_list)
    layer("encoder.project_in", e.in_channels, w[0], 3, True)
    for i, (width, depth) in enumerate(zip(w, e.depth_list)):
        for j in range(depth):
            block(f"encoder.stages.{i}.op_list.{j}", _per_stage(e.block_type, i), width, e.norm)
        if i < n - 1 and depth > 0:
            layer(f"encoder.stages.{i}.op_list.{depth}.main", width, w[i + 1] if e.downsample_match_channel else width, 3, True)
    cout = 2 * e.latent_channels if e.double_latent else e.latent_channels
    k = 0
    if e.out_norm is not None:
        norm("encoder.project_out.main.op_list.0", e.out_norm, w[-1])
        k += 1
    k += e.out_act is not None
    pre = "encoder.project_out.main" if e.out_shortcut == "averaging" else "encoder.project_out"
    layer(f"{pre}.op_list.{k}", w[-1], cout, 3, True)
    w, n = list(d.width_list), len(d.width_list)
    layer("decoder.project_in.main" if d.in_shortcut == "duplicating" else "decoder.project_in",
          d.latent_channels, w[-1], 3, True)
    for i in reversed(range(n)):
        width, depth = w[i], d.depth_list[i]
        j0 = 0
        if i < n - 1 and depth > 0:
            layer(f"decoder.stages.{i}.op_list.0.main.conv", w[i + 1], width if d.upsample_match_channel else w[i + 1], 3, True)
            j0 = 1
        for j in range(depth):
            block(f"decoder.stages.{i}.op_list.{j0 + j}", _per_stage(d.block_type, i), width, _per_stage(d.norm, i))
    k = 0
    if d.out_norm is not None:
        norm("decoder.project_out.op_list.0", d.out_norm, w[0])
        k += 1
    k += d.out_act is not None
    layer(f"decoder.project_out.op_list.{k}", w[0], d.in_channels, 3, True)
    return inv


def _infer_fail(msg):
    from converter.errors import MappingError

    raise MappingError(f"cannot infer the dc_ae config from the checkpoint: {msg}; pass --config FILE.json "
                       "(e.g. the case / model config with a 'DCAEConfig' object)")


def _conv_shape(inv: dict, k: str):
    """Shape of `k`; every shape `infer_config` reads is a 3-D conv weight (out, in / groups, k, k, k)."""
    from opensora_ms.models.t5 import inv_shape

    s = inv_shape(inv, k, "dc_ae")
    return s if len(s) == 5 else _infer_fail(f"{k!r} has shape {list(s)}, a 3-D conv weight has 5 dims")


def _has(inv: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in inv)


def _infer_block(inv: dict, p: str):
    """(block type, width) of the block with keys `p.*`."""
    if _has(inv, f"{p}.context_module.") or _has(inv, f"{p}.local_module."):
        bt = "EViTS5_GLU" if _has(inv, f"{p}.context_module.main.aggreg.") else "EViT_GLU"
        return bt, _conv_shape(inv, f"{p}.context_module.main.qkv.conv.weight")[1]
    return "ResBlock", _conv_shape(inv, f"{p}.main.conv1.conv.weight")[0]


def _infer_stages(inv: dict, side: str, first: int):
    """Per stage: widths, depths, block types, norms; `first` = index of a stage's first block (the decoder's
    up-sampler comes first, the encoder's down-sampler last)."""
    from opensora_ms.models.t5 import inv_count

    n = inv_count(inv, f"{side}.stages")
    if not n:
        _infer_fail(f"no '{side}.stages.N.*' key")
    w, dep, bt, nm = [], [], [], []
    for i in range(n):
        p = f"{side}.stages.{i}.op_list"
        ops = inv_count(inv, p)
        if not ops:
            _infer_fail(f"stage {side}.stages.{i} has no parameter (a stage of depth 0 has no width to read)")
        j0 = first if i < n - 1 else 0
        depth = ops - (1 if i < n - 1 else 0)
        kinds = [_infer_block(inv, f"{p}.{j0 + j}") for j in range(depth)]
        if len({k for k, _ in kinds}) > 1:
            _infer_fail(f"{p}.* mixes block types {[k for k, _ in kinds]} (one type per stage)")
        w.append(kinds[0][1] if kinds else _infer_fail(f"stage {side}.stages.{i} holds no block"))
        dep.append(depth)
        bt.append(kinds[0][0])
        nm.append("rms3d" if any(k.startswith(f"{side}.stages.{i}.") and ".norm." in k for k in inv) else None)
    return n, w, dep, bt, nm


def _infer_head(inv: dict, po: str):
    """(out_norm, out_act, conv key) of a stem `op_list`: [norm] [ReLU] conv."""
    from opensora_ms.models.t5 import inv_count

    k = inv_count(inv, po) - 1
    norm = "rms3d" if f"{po}.0.weight" in inv or f"{po}.0.bias" in inv else None
    act = k - (norm is not None)
    if k < 0 or act not in (0, 1):
        _infer_fail(f"{po}.* is not [norm] [ReLU] conv")
    return norm, "relu" if act else None, f"{po}.{k}.conv.weight"


def infer_config(inv: dict) -> dict:
    """A `DCAEConfig` dict from the port's parameter names and shapes (for `converter.targets`).

    Inferred: in / out / latent channels and double_latent (stem convs); per stage of each side width_list,
    depth_list and block_type (ResBlock, EViTS5_GLU with the 5x5x5 aggregation, EViT_GLU); norm ("rms3d", the
    port's only norm, where norm parameters exist, else None); the stems' out_norm / out_act / shortcut layout
    (from the op_list index of the conv); down/upsample_match_channel; spatial_compression_ratio
    (2 ** number of down-sampling stages).
    Assumed (no parameter carries them): act "silu"; Conv / InterpolateConv resampling with averaging /
    duplicating shortcuts (the only kinds the port builds); is_video; the temporal down/up-sampling of upstream's
    F32T4C128 (stages 3 and 4, time_compression_ratio 4), taken only when both sides have its 6 stages -- any
    other stage count raises MappingError asking for --config FILE.json. Tiling and scaling: DCAEConfig defaults."""
    fail = _infer_fail

    def shape(k):
        return _conv_shape(inv, k)

    # encoder
    n, ew, ed, et, en = _infer_stages(inv, "encoder", 0)
    short = _has(inv, "encoder.project_out.main.op_list.")
    e_norm, e_act, e_conv = _infer_head(inv, "encoder.project_out.main.op_list" if short
                                        else "encoder.project_out.op_list")
    in_ch = shape("encoder.project_in.conv.weight")[1]
    down = shape(f"encoder.stages.0.op_list.{ed[0]}.main.conv.weight")[0] if n > 1 else ew[0]
    # decoder
    dup = _has(inv, "decoder.project_in.main.")
    latent = shape("decoder.project_in.main.conv.weight" if dup else "decoder.project_in.conv.weight")[1]
    m, dw, dd, dt, dn = _infer_stages(inv, "decoder", 1)
    d_norm, d_act, d_conv = _infer_head(inv, "decoder.project_out.op_list")
    up = shape("decoder.stages.0.op_list.0.main.conv.conv.weight")[0] if m > 1 else dw[0]
    if (n, m) != (6, 6):
        fail(f"temporal down/up-sampling has no parameter and is known only for upstream's 6-stage F32T4C128, "
             f"this checkpoint has {n} encoder / {m} decoder stages")
    t4 = [False, False, False, True, True, False]
    enc = {"in_channels": in_ch, "latent_channels": latent, "width_list": ew, "depth_list": ed, "block_type": et,
           "norm": en[0] if len(set(en)) == 1 else fail(f"encoder norms differ by stage ({en})"), "act": "silu",
           "downsample_block_type": "Conv", "downsample_match_channel": n < 2 or down == ew[1],
           "downsample_shortcut": "averaging", "out_norm": e_norm, "out_act": e_act,
           "out_shortcut": "averaging" if short else None, "double_latent": shape(e_conv)[0] == 2 * latent,
           "is_video": True, "temporal_downsample": t4}
    dec = {"in_channels": shape(d_conv)[0], "latent_channels": latent, "in_shortcut": "duplicating" if dup else None,
           "width_list": dw, "depth_list": dd, "block_type": dt, "norm": dn[0] if len(set(dn)) == 1 else dn,
           "act": "silu", "upsample_block_type": "InterpolateConv", "upsample_match_channel": m < 2 or up == dw[0],
           "upsample_shortcut": "duplicating", "out_norm": d_norm, "out_act": d_act, "is_video": True,
           "temporal_upsample": t4}
    return {"in_channels": in_ch, "latent_channels": latent, "time_compression_ratio": 2 ** sum(t4),
            "spatial_compression_ratio": 2 ** (n - 1), "encoder": enc, "decoder": dec}


def build(cfg, **_) -> DCAE:
    """The model at `cfg` (dict, case config dict or DCAEConfig), fp32."""
    model = DCAE(_cfg(cfg))
    model.set_train(False)
    return model
