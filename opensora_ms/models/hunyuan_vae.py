"""MindSpore port of the Open-Sora 2.0 Hunyuan causal 3D VAE (upstream ``AutoencoderKLCausal3D``).

Cell paths and parameter names are upstream's (``encoder.down_blocks.0.resnets.0.conv1.conv.weight``,
``decoder.mid_block.attentions.0.to_q.weight`` ...), so the real checkpoint converts by renames only
(``mappings/hunyuan_vae.yaml``) and the parity harness aligns MindSpore cells with torch modules by path.
All kernels come from the op layer (``opensora_ms.ops.conv``, ``opensora_ms.ops.nn``).

Behaviour (``../shared/upstream/SPEC.md`` §d): causal conv (replicate pad W, H and 2 frames in front), resnets with
GroupNorm(eps 1e-6), causal down/up sampling (frame 0 upsampled in space only), mid-block attention with the
frame-causal mask, ``quant_conv``/``post_quant_conv``, diagonal Gaussian posterior (logvar clamped to [-30, 20]),
sampling with *given* noise (RNG streams differ between frameworks), latent scale 0.476986 / shift 0, and spatial +
temporal tiled encode/decode with upstream's tile sizes, strides and linear blending.

Execution: by default the encoder and decoder run in PyNative, with each large convolution as a cached per-shape
graph (the op layer's CPU conv). ``model.set_jit(True)`` runs each of them as one ``ms.jit`` graph instead (one
compilation per input shape; tiling reuses the shape of a full tile) -- fast on small widths, but at the real
widths the whole-decoder graph keeps every activation buffer and runs out of memory (docs/vae.md), so it is opt-in. Hooks only
fire in PyNative. ``build(cfg, conv_settings=ConvSettings(...))`` chooses how the CPU convs run (slab memory
budget, per-slab graphs; ``opensora_ms.ops.conv.ConvSettings``), ``model.conv_settings`` says which.

Tiling knobs (upstream attribute names; see docs/vae.md): ``use_spatial_tiling``, ``use_temporal_tiling``,
``tile_sample_min_size`` (pixels, upstream 256), ``tile_latent_min_size`` (= pixels / 8), ``tile_sample_min_tsize``
(frames, upstream 64), ``tile_latent_min_tsize`` (= frames / 4), ``tile_overlap_factor`` (0.25);
``set_tile_sizes(sample_size=, sample_tsize=)`` sets each pair consistently.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn, ops

from opensora_ms.ops.conv import DEFAULT_CONV_SETTINGS, Conv3d, ConvSettings, GroupNorm, apply_conv_settings
from opensora_ms.ops.nn import Identity, Linear, SiLU, attention, clamp, exp
from opensora_ms.configs import AutoEncoder3DConfig, TilingKnobs, sampling_plan

__all__ = [
    "AutoEncoder3DConfig",
    "AutoencoderKLCausal3D",
    "DiagonalGaussianDistribution",
    "param_inventory",
    "build",
    "sampling_plan",
]


def _cfg(cfg) -> AutoEncoder3DConfig:
    return cfg if isinstance(cfg, AutoEncoder3DConfig) else AutoEncoder3DConfig.from_dict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# layers


class CausalConv3d(nn.Cell):
    def __init__(self, chan_in, chan_out, kernel_size, stride=1, bias=True):
        super().__init__()
        k = int(kernel_size)
        self.time_causal_padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)  # W, H, T
        # the replicate pad is the conv cell's own (fused into the CPU kernel); torch pads before calling it
        pad = self.time_causal_padding if k > 1 else None
        self.conv = Conv3d(chan_in, chan_out, k, stride=stride, bias=bias, pad=pad, pad_mode="replicate")

    def construct(self, x):
        return self.conv(x)


class UpsampleCausal3D(nn.Cell):
    """Nearest upsampling (frame 0 in H, W only) then a causal conv; the op layer fuses the upsampling and the
    replicate padding into the conv (the conv cell takes the low-resolution input, its output is torch's)."""

    def __init__(self, channels, out_channels=None, upsample_factor=(2, 2, 2)):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.upsample_factor = tuple(int(f) for f in upsample_factor)
        self.conv = CausalConv3d(self.channels, self.out_channels, kernel_size=3)
        self.conv.conv.upsample = self.upsample_factor

    def construct(self, x):
        return self.conv(x)


class DownsampleCausal3D(nn.Cell):
    def __init__(self, channels, stride=2):
        super().__init__()
        self.channels = channels
        self.out_channels = channels
        self.conv = CausalConv3d(channels, channels, kernel_size=3, stride=stride)

    def construct(self, x):
        return self.conv(x)


class ResnetBlockCausal3D(nn.Cell):
    def __init__(self, in_channels, out_channels, groups, eps, act):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        # same registration order as upstream (cell traversal / hook names)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = Identity()
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3)
        self.nonlinearity = act  # one SiLU cell shared by every resnet, as diffusers' get_activation
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.conv_shortcut = CausalConv3d(in_channels, out_channels, kernel_size=1)
        else:
            self.conv_shortcut = None

    def construct(self, x):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.has_shortcut:
            x = self.conv_shortcut(x)
        return x + h


def causal_attention_mask(n_frame: int, n_hw: int, dtype=ms.float32):
    """(L, L) additive mask: token i sees all tokens of frames <= frame(i) (0), others -inf; built in fp32 and cast
    (exact; the CPU MaskedFill has no bf16 kernel, docs/bf16.md)."""
    frame = ops.arange(0, n_frame * n_hw, 1, dtype=ms.int32) // n_hw
    future = frame.reshape(1, -1) > frame.reshape(-1, 1)
    zeros = mint.zeros((n_frame * n_hw, n_frame * n_hw), dtype=ms.float32)
    return ops.masked_fill(zeros, future, float("-inf")).astype(dtype)


class Attention(nn.Cell):
    """diffusers ``Attention`` of the mid block: GroupNorm -> to_q/k/v -> SDPA (+mask) -> to_out.0 -> + residual."""

    def __init__(self, query_dim, heads, dim_head, norm_num_groups, eps):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.head_dim = dim_head
        self.scale = dim_head**-0.5
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=eps)
        self.to_q = Linear(query_dim, inner, bias=True)
        self.to_k = Linear(query_dim, inner, bias=True)
        self.to_v = Linear(query_dim, inner, bias=True)
        self.to_out = nn.CellList([Linear(inner, query_dim, bias=True), Identity()])

    def construct(self, x, mask=None):
        b, n, _ = x.shape
        h = mint.transpose(self.group_norm(mint.transpose(x, 1, 2)), 1, 2)
        q = mint.transpose(self.to_q(h).reshape(b, n, self.heads, self.head_dim), 1, 2)
        k = mint.transpose(self.to_k(h).reshape(b, n, self.heads, self.head_dim), 1, 2)
        v = mint.transpose(self.to_v(h).reshape(b, n, self.heads, self.head_dim), 1, 2)
        o = attention(q, k, v, mask, self.scale)
        o = mint.transpose(o, 1, 2).reshape(b, n, self.heads * self.head_dim)
        o = self.to_out[1](self.to_out[0](o))
        return o + x


class UNetMidBlockCausal3D(nn.Cell):
    def __init__(self, channels, groups, eps, add_attention, act):
        super().__init__()
        self.add_attention = add_attention
        if add_attention:
            self.attentions = nn.CellList([Attention(channels, 1, channels, groups, eps)])
        else:
            self.attentions = None
        self.resnets = nn.CellList([ResnetBlockCausal3D(channels, channels, groups, eps, act) for _ in range(2)])

    def construct(self, x):
        x = self.resnets[0](x)
        if self.add_attention:
            b, c, t, h, w = x.shape
            mask = causal_attention_mask(t, h * w, x.dtype)
            tok = x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
            tok = self.attentions[0](tok, mask)
            x = tok.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return self.resnets[1](x)


class DownEncoderBlockCausal3D(nn.Cell):
    def __init__(self, in_ch, out_ch, num_layers, groups, eps, add_downsample, stride, act):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlockCausal3D(in_ch if i == 0 else out_ch, out_ch, groups, eps, act) for i in range(num_layers)]
        )
        self.has_down = bool(add_downsample)
        self.downsamplers = nn.CellList([DownsampleCausal3D(out_ch, stride=stride)]) if add_downsample else None

    def construct(self, x):
        for r in self.resnets:
            x = r(x)
        if self.has_down:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlockCausal3D(nn.Cell):
    def __init__(self, in_ch, out_ch, num_layers, groups, eps, add_upsample, factor, act):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlockCausal3D(in_ch if i == 0 else out_ch, out_ch, groups, eps, act) for i in range(num_layers)]
        )
        self.has_up = bool(add_upsample)
        self.upsamplers = nn.CellList([UpsampleCausal3D(out_ch, out_ch, factor)]) if add_upsample else None

    def construct(self, x):
        for r in self.resnets:
            x = r(x)
        if self.has_up:
            x = self.upsamplers[0](x)
        return x


def _check_act(name):
    if name.lower() not in ("silu", "swish"):
        raise ValueError(f"unsupported act_fn {name!r}")


class EncoderCausal3D(nn.Cell):
    def __init__(self, cfg: AutoEncoder3DConfig, act):
        super().__init__()
        ch = list(cfg.block_out_channels)
        g, eps = cfg.norm_num_groups, 1e-6
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], kernel_size=3)
        blocks = []
        out = ch[0]
        for i, (sp, tm) in enumerate(sampling_plan(len(ch), cfg.time_compression_ratio, cfg.spatial_compression_ratio)):
            inp, out = out, ch[i]
            stride = (2 if tm else 1, 2 if sp else 1, 2 if sp else 1)
            blocks.append(DownEncoderBlockCausal3D(inp, out, cfg.layers_per_block, g, eps, sp or tm, stride, act))
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlockCausal3D(ch[-1], g, eps, cfg.mid_block_add_attention, act)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=eps)
        self.conv_act = SiLU()
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, kernel_size=3)

    def construct(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DecoderCausal3D(nn.Cell):
    def __init__(self, cfg: AutoEncoder3DConfig, act):
        super().__init__()
        ch = list(cfg.block_out_channels)
        g, eps = cfg.norm_num_groups, 1e-6
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[-1], kernel_size=3)
        self.mid_block = UNetMidBlockCausal3D(ch[-1], g, eps, cfg.mid_block_add_attention, act)
        rev = list(reversed(ch))
        blocks = []
        out = rev[0]
        for i, (sp, tm) in enumerate(sampling_plan(len(ch), cfg.time_compression_ratio, cfg.spatial_compression_ratio)):
            prev, out = out, rev[i]
            factor = (2 if tm else 1, 2 if sp else 1, 2 if sp else 1)
            blocks.append(UpDecoderBlockCausal3D(prev, out, cfg.layers_per_block + 1, g, eps, sp or tm, factor, act))
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(g, ch[0], eps=eps)
        self.conv_act = SiLU()
        self.conv_out = CausalConv3d(ch[0], cfg.out_channels, kernel_size=3)

    def construct(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussianDistribution:
    def __init__(self, parameters):
        self.parameters = parameters
        c = parameters.shape[1] // 2
        self.mean = parameters[:, :c]
        self.logvar = clamp(parameters[:, c:], -30.0, 20.0)
        self.std = exp(0.5 * self.logvar)

    def sample(self, noise):
        """mean + std * noise; `noise` (same shape as the mean) comes from the caller (numpy/torch generated)."""
        if not isinstance(noise, Tensor):
            noise = Tensor(np.asarray(noise))
        return self.mean + self.std * noise.astype(self.mean.dtype)

    def mode(self):
        return self.mean


# ----------------------------------------------------------------------------------------------------------------
# blending (upstream blend_v / blend_h / blend_t, vectorised; same arithmetic)


def _blend(a, b, extent: int, axis: int):
    """The first `extent` slices of b along `axis` fade in from a's last ones: a*(1-y/e) + b*(y/e)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    w = np.arange(extent, dtype=np.float64) / extent
    shape = [1] * b.ndim
    shape[axis] = extent
    wb = Tensor(w.astype(np.float32).reshape(shape)).astype(b.dtype)
    wa = Tensor((1.0 - w).astype(np.float32).reshape(shape)).astype(b.dtype)
    n_a = a.shape[axis]
    a_tail = mint.narrow(a, axis, n_a - extent, extent)
    b_head = mint.narrow(b, axis, 0, extent)
    head = a_tail * wa + b_head * wb
    if extent == b.shape[axis]:
        return head
    rest = mint.narrow(b, axis, extent, b.shape[axis] - extent)
    return mint.cat((head, rest), axis)


def _stitch(rows, blend: int, limit: int):
    out_rows = []
    for i, row in enumerate(rows):
        res = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend, 3)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend, 4)
            row[j] = tile  # upstream blends in place: neighbours see the blended tile
            res.append(tile[:, :, :, :limit, :limit])
        out_rows.append(mint.cat(res, 4) if len(res) > 1 else res[0])
    return mint.cat(out_rows, 3) if len(out_rows) > 1 else out_rows[0]


def _stitch_t(row, blend: int, limit: int):
    res = []
    for i in range(len(row)):
        tile = row[i]
        if i > 0:
            tile = _blend(row[i - 1], tile, blend, 2)
            row[i] = tile
            res.append(tile[:, :, :limit])
        else:
            res.append(tile[:, :, : limit + 1])
    return mint.cat(res, 2) if len(res) > 1 else res[0]


# ----------------------------------------------------------------------------------------------------------------
# the autoencoder


class AutoencoderKLCausal3D(nn.Cell, TilingKnobs):
    def __init__(
        self,
        config,
        *,
        tile_sample_min_size: Optional[int] = None,
        tile_latent_min_size: Optional[int] = None,
        tile_sample_min_tsize: Optional[int] = None,
        tile_latent_min_tsize: Optional[int] = None,
        jit: bool = False,
        conv_settings: Optional[ConvSettings] = None,
    ):
        super().__init__()
        cfg = _cfg(config)
        _check_act(cfg.act_fn)
        self.config = cfg
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor
        self.time_compression_ratio = cfg.time_compression_ratio
        self.spatial_compression_ratio = cfg.spatial_compression_ratio
        self.z_channels = cfg.latent_channels
        act = SiLU()
        self.encoder = EncoderCausal3D(cfg, act)
        self.decoder = DecoderCausal3D(cfg, act)
        self.quant_conv = Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = Conv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.use_slicing = cfg.use_slicing
        self.use_spatial_tiling = cfg.use_spatial_tiling
        self.use_temporal_tiling = cfg.use_temporal_tiling
        self.tile_overlap_factor = cfg.tile_overlap_factor
        self.set_tile_sizes(sample_size=cfg.sample_size, sample_tsize=cfg.sample_tsize)
        if tile_sample_min_size is not None:
            self.tile_sample_min_size = int(tile_sample_min_size)
        if tile_latent_min_size is not None:
            self.tile_latent_min_size = int(tile_latent_min_size)
        if tile_sample_min_tsize is not None:
            self.tile_sample_min_tsize = int(tile_sample_min_tsize)
        if tile_latent_min_tsize is not None:
            self.tile_latent_min_tsize = int(tile_latent_min_tsize)
        self.use_jit = bool(jit)
        self._enc_jit = None
        self._dec_jit = None
        # how the op layer's CPU convs run (slab budget, per-slab graphs); one instance for every conv cell
        apply_conv_settings(self, DEFAULT_CONV_SETTINGS if conv_settings is None else conv_settings)

    # ---- settings
    def set_jit(self, on: bool = True) -> None:
        self.use_jit = bool(on)

    # ---- the two graph entry points
    def _encode_core(self, x):
        return self.quant_conv(self.encoder(x))

    def _decode_core(self, z):
        return self.decoder(self.post_quant_conv(z))

    def _run_encoder(self, x):
        if self.use_jit:
            if self._enc_jit is None:
                self._enc_jit = ms.jit(self._encode_core)
            return self._enc_jit(x)
        return self._encode_core(x)

    def _run_decoder(self, z):
        if self.use_jit:
            if self._dec_jit is None:
                self._dec_jit = ms.jit(self._decode_core)
            return self._dec_jit(z)
        return self._decode_core(z)

    # ---- encode
    def _moments(self, x):
        if self.use_temporal_tiling and x.shape[2] > self.tile_sample_min_tsize:
            return self.temporal_tiled_encode(x)
        if self.use_spatial_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self.spatial_tiled_encode(x)
        if self.use_slicing and x.shape[0] > 1:
            return mint.cat([self._run_encoder(x[i : i + 1]) for i in range(x.shape[0])], 0)
        return self._run_encoder(x)

    def encode(self, x, sample_posterior: bool = False, return_posterior: bool = False, noise=None):
        """Latent of x (B, C, T, H, W). ``sample_posterior=True`` needs ``noise`` (the mean's shape): MindSpore and
        torch RNG streams differ, so the caller supplies it. Unlike upstream the default is the posterior mode."""
        if not isinstance(x, Tensor):
            x = Tensor(np.asarray(x))
        posterior = DiagonalGaussianDistribution(self._moments(x))
        if sample_posterior:
            if noise is None:
                raise ValueError("encode(sample_posterior=True) needs `noise` (RNG streams differ across frameworks)")
            z = posterior.sample(noise)
        else:
            z = posterior.mode()
        z = self.scale_factor * (z - self.shift_factor)
        return (z, posterior) if return_posterior else z

    def spatial_tiled_encode(self, x):
        """Moments of x from overlapping spatial tiles (upstream ``spatial_tiled_encode(return_moments=True)``)."""
        overlap = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_latent_min_size * self.tile_overlap_factor)
        limit = self.tile_latent_min_size - blend
        ts = self.tile_sample_min_size
        rows = []
        for i in range(0, x.shape[-2], overlap):
            rows.append([self._run_encoder(x[:, :, :, i : i + ts, j : j + ts]) for j in range(0, x.shape[-1], overlap)])
        return _stitch(rows, blend, limit)

    def temporal_tiled_encode(self, x):
        overlap = int(self.tile_sample_min_tsize * (1 - self.tile_overlap_factor))
        blend = int(self.tile_latent_min_tsize * self.tile_overlap_factor)
        limit = self.tile_latent_min_tsize - blend
        row = []
        for i in range(0, x.shape[2], overlap):
            tile = x[:, :, i : i + self.tile_sample_min_tsize + 1]
            if self.use_spatial_tiling and (tile.shape[-1] > self.tile_sample_min_size or tile.shape[-2] > self.tile_sample_min_size):
                tile = self.spatial_tiled_encode(tile)
            else:
                tile = self._run_encoder(tile)
            row.append(tile if i == 0 else tile[:, :, 1:])
        return _stitch_t(row, blend, limit)

    # ---- decode
    def _decode(self, z):
        if self.use_temporal_tiling and z.shape[2] > self.tile_latent_min_tsize:
            return self.temporal_tiled_decode(z)
        if self.use_spatial_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            return self.spatial_tiled_decode(z)
        return self._run_decoder(z)

    def decode(self, z):
        if not isinstance(z, Tensor):
            z = Tensor(np.asarray(z))
        z = z / self.scale_factor + self.shift_factor
        if self.use_slicing and z.shape[0] > 1:
            return mint.cat([self._decode(z[i : i + 1]) for i in range(z.shape[0])], 0)
        return self._decode(z)

    def spatial_tiled_decode(self, z):
        overlap = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_sample_min_size * self.tile_overlap_factor)
        limit = self.tile_sample_min_size - blend
        tl = self.tile_latent_min_size
        rows = []
        for i in range(0, z.shape[-2], overlap):
            rows.append([self._run_decoder(z[:, :, :, i : i + tl, j : j + tl]) for j in range(0, z.shape[-1], overlap)])
        return _stitch(rows, blend, limit)

    def temporal_tiled_decode(self, z):
        overlap = int(self.tile_latent_min_tsize * (1 - self.tile_overlap_factor))
        blend = int(self.tile_sample_min_tsize * self.tile_overlap_factor)
        limit = self.tile_sample_min_tsize - blend
        row = []
        for i in range(0, z.shape[2], overlap):
            tile = z[:, :, i : i + self.tile_latent_min_tsize + 1]
            if self.use_spatial_tiling and (tile.shape[-1] > self.tile_latent_min_size or tile.shape[-2] > self.tile_latent_min_size):
                dec = self.spatial_tiled_decode(tile)
            else:
                dec = self._run_decoder(tile)
            row.append(dec if i == 0 else dec[:, :, 1:])
        return _stitch_t(row, blend, limit)

    def construct(self, x, noise=None):
        """x -> (decoded, z): the posterior mode, or a sample when `noise` is given."""
        z = self.encode(x, sample_posterior=noise is not None, noise=noise)
        return self.decode(z), z


# ----------------------------------------------------------------------------------------------------------------
# inventory / factory


def param_inventory(cfg) -> dict:
    """{name: (shape, "F32")} of every parameter at `cfg`, computed from the architecture (no allocation)."""
    cfg = _cfg(cfg)
    ch = list(cfg.block_out_channels)
    inv = {}

    def conv(prefix, ci, co, k):
        inv[f"{prefix}.weight"] = ((co, ci, k, k, k), "F32")
        inv[f"{prefix}.bias"] = ((co,), "F32")

    def norm(prefix, c):
        inv[f"{prefix}.weight"] = ((c,), "F32")
        inv[f"{prefix}.bias"] = ((c,), "F32")

    def resnet(prefix, ci, co):
        norm(f"{prefix}.norm1", ci)
        conv(f"{prefix}.conv1.conv", ci, co, 3)
        norm(f"{prefix}.norm2", co)
        conv(f"{prefix}.conv2.conv", co, co, 3)
        if ci != co:
            conv(f"{prefix}.conv_shortcut.conv", ci, co, 1)

    def mid(prefix, c):
        if cfg.mid_block_add_attention:
            a = f"{prefix}.attentions.0"
            norm(f"{a}.group_norm", c)
            for n in ("to_q", "to_k", "to_v", "to_out.0"):
                inv[f"{a}.{n}.weight"] = ((c, c), "F32")
                inv[f"{a}.{n}.bias"] = ((c,), "F32")
        resnet(f"{prefix}.resnets.0", c, c)
        resnet(f"{prefix}.resnets.1", c, c)

    plan = sampling_plan(len(ch), cfg.time_compression_ratio, cfg.spatial_compression_ratio)
    # encoder
    conv("encoder.conv_in.conv", cfg.in_channels, ch[0], 3)
    out = ch[0]
    for i, (sp, tm) in enumerate(plan):
        inp, out = out, ch[i]
        for r in range(cfg.layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{r}", inp if r == 0 else out, out)
        if sp or tm:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv.conv", out, out, 3)
    mid("encoder.mid_block", ch[-1])
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out.conv", ch[-1], 2 * cfg.latent_channels, 3)
    # decoder
    conv("decoder.conv_in.conv", cfg.latent_channels, ch[-1], 3)
    mid("decoder.mid_block", ch[-1])
    rev = list(reversed(ch))
    out = rev[0]
    for i, (sp, tm) in enumerate(plan):
        prev, out = out, rev[i]
        for r in range(cfg.layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{r}", prev if r == 0 else out, out)
        if sp or tm:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv.conv", out, out, 3)
    norm("decoder.conv_norm_out", ch[0])
    conv("decoder.conv_out.conv", ch[0], cfg.out_channels, 3)
    conv("quant_conv", 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    conv("post_quant_conv", cfg.latent_channels, cfg.latent_channels, 1)
    return inv


def build(cfg, **kw) -> AutoencoderKLCausal3D:
    """The model at `cfg` (dict or AutoEncoder3DConfig), fp32; keyword args as ``AutoencoderKLCausal3D``."""
    model = AutoencoderKLCausal3D(_cfg(cfg), **kw)
    model.set_train(False)
    return model
