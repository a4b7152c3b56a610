"""MindSpore port of the Flux 2D autoencoder as Open-Sora 2.0 uses it (upstream ``opensora/models/vae/autoencoder_2d.py``
``AutoEncoder``; the t2i2v image AE, ``flux1-dev-ae.safetensors``).

Cell paths and parameter names are upstream's (``encoder.down.0.block.1.conv2.weight``,
``decoder.mid.attn_1.q.weight`` ...), so the real checkpoint converts by renames only (``mappings/flux_ae.yaml``)
and the parity harness aligns every MindSpore cell with the torch module of the same path. All kernels come from
the op layer: 2-D convs are ``ops.conv2d`` (on CPU the fast slab-GEMM ``conv3d`` over one frame, with the
Downsample's asymmetric zero pad and the Upsample's nearest x2 fused into the conv cell: the cell takes the
unpadded / low-resolution input and returns torch's conv output), GroupNorm ``ops.conv``, attention ``ops.nn``.

Behaviour (``parity/reference/flux_ae.py`` has the details): resnets GN(32, eps 1e-6) -> SiLU -> conv3x3 twice
with a 1x1 ``nin_shortcut`` when channels change; mid attention one head over h*w tokens; video input
(B, C, T, H, W) folded into the batch; diagonal Gaussian posterior (logvar clamped to [-30, 20]);
``z = scale * (mean or sample - shift)`` (0.3611 / 0.1159), ``decode`` ``z / scale + shift``. Sampling takes the
noise from the caller (MindSpore's RNG stream never matches torch's).

Precision: CPU fp32; on Ascend build with ``dtype=ms.bfloat16`` (upstream runs this AE in bf16) -- inputs are
cast to the parameters' dtype, the kernels are ``mint`` (**not verified on hardware**).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from opensora_ms.configs import AutoEncoderConfig
from opensora_ms.ops.conv import GroupNorm
from opensora_ms.ops.conv2d import Conv2d
from opensora_ms.ops.nn import attention, clamp, exp, silu

__all__ = ["AutoEncoderConfig", "AutoEncoder", "DiagonalGaussianDistribution", "param_inventory", "build"]

GROUPS, EPS = 32, 1e-6


def _cfg(cfg) -> AutoEncoderConfig:
    return cfg if isinstance(cfg, AutoEncoderConfig) else AutoEncoderConfig.from_dict(cfg)


class AttnBlock(nn.Cell):
    def __init__(self, in_channels, dtype=ms.float32):
        super().__init__()
        self.in_channels = in_channels
        self.norm = GroupNorm(GROUPS, in_channels, eps=EPS, dtype=dtype)
        self.q = Conv2d(in_channels, in_channels, 1, dtype=dtype)
        self.k = Conv2d(in_channels, in_channels, 1, dtype=dtype)
        self.v = Conv2d(in_channels, in_channels, 1, dtype=dtype)
        self.proj_out = Conv2d(in_channels, in_channels, 1, dtype=dtype)
        self.scale = in_channels**-0.5

    def construct(self, x):
        h_ = self.norm(x)
        b, c, h, w = x.shape
        # b c h w -> b 1 (h w) c
        q = mint.transpose(self.q(h_).reshape(b, 1, c, h * w), 2, 3)
        k = mint.transpose(self.k(h_).reshape(b, 1, c, h * w), 2, 3)
        v = mint.transpose(self.v(h_).reshape(b, 1, c, h * w), 2, 3)
        o = attention(q, k, v, None, self.scale)
        o = o.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(o)


class ResnetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels=None, dtype=ms.float32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = GroupNorm(GROUPS, in_channels, eps=EPS, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(GROUPS, out_channels, eps=EPS, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1, dtype=dtype)
        else:
            self.nin_shortcut = None

    def construct(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Cell):
    """Zero pad (0, 1, 0, 1) then a stride-2 3x3 conv; the pad is the conv cell's own (fused on CPU)."""

    def __init__(self, in_channels, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, 3, stride=2, padding=0, pad=(0, 1, 0, 1), dtype=dtype)

    def construct(self, x):
        return self.conv(x)


class Upsample(nn.Cell):
    """Nearest x2 then a 3x3 conv; the upsampling is the conv cell's own (its input is the low-resolution tensor)."""

    def __init__(self, in_channels, dtype=ms.float32):
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, 3, padding=1, upsample=(2, 2), dtype=dtype)

    def construct(self, x):
        return self.conv(x)


class _Level(nn.Cell):
    """Upstream's bare ``nn.Module()`` holding one resolution level: ``block``, ``attn`` (always empty upstream)
    and ``downsample`` / ``upsample``. Never called itself (no hook), like upstream."""

    def __init__(self, blocks, resample_name=None, resample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList()
        if resample_name is not None:
            setattr(self, resample_name, resample)


class _Mid(nn.Cell):
    def __init__(self, c, dtype):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dtype)
        self.attn_1 = AttnBlock(c, dtype)
        self.block_2 = ResnetBlock(c, c, dtype)


class Encoder(nn.Cell):
    def __init__(self, cfg: AutoEncoderConfig, dtype=ms.float32):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, dtype=dtype)
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        levels = []
        block_in = cfg.ch
        for i in range(self.num_resolutions):
            block_in = cfg.ch * in_ch_mult[i]
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(self.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dtype))
                block_in = block_out
            last = i == self.num_resolutions - 1
            levels.append(_Level(blocks, None if last else "downsample", None if last else Downsample(block_in, dtype)))
        self.down = nn.CellList(levels)
        self.mid = _Mid(block_in, dtype)
        self.norm_out = GroupNorm(GROUPS, block_in, eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        h = self.conv_in(x)
        for i in range(self.num_resolutions):
            level = self.down[i]
            for j in range(self.num_res_blocks):
                h = level.block[j](h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Cell):
    def __init__(self, cfg: AutoEncoderConfig, dtype=ms.float32):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1, dtype=dtype)
        self.mid = _Mid(block_in, dtype)
        levels = []
        for i in reversed(range(self.num_resolutions)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(self.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dtype))
                block_in = block_out
            levels.insert(0, _Level(blocks, None if i == 0 else "upsample", None if i == 0 else Upsample(block_in, dtype)))
        self.up = nn.CellList(levels)  # up.0 = full resolution (runs last), as upstream
        self.norm_out = GroupNorm(GROUPS, block_in, eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(block_in, cfg.out_ch, 3, padding=1, dtype=dtype)

    def construct(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j in range(self.num_res_blocks + 1):
                h = level.block[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """mean / logvar = the two channel halves of the moments; logvar clamped to [-30, 20] (upstream's)."""

    def __init__(self, parameters):
        self.parameters = parameters
        c = parameters.shape[1] // 2
        self.mean = parameters[:, :c]
        self.logvar = clamp(parameters[:, c:], -30.0, 20.0)
        self.std = exp(0.5 * self.logvar)

    def sample(self, noise):
        """mean + std * noise; `noise` (the mean's shape) comes from the caller (numpy/torch generated)."""
        if not isinstance(noise, Tensor):
            noise = Tensor(np.asarray(noise))
        return self.mean + self.std * noise.astype(self.mean.dtype)

    def mode(self):
        return self.mean


def _fold(x):
    """b c t h w -> (b t) c h w."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _unfold(x, t: int):
    """(b t) c h w -> b c t h w."""
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).permute(0, 2, 1, 3, 4)


class AutoEncoder(nn.Cell):
    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        cfg = _cfg(config)
        self.config = cfg
        self.param_dtype = dtype
        self.encoder = Encoder(cfg, dtype)
        self.decoder = Decoder(cfg, dtype)
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor
        self.sample = cfg.sample

    def _input(self, x):
        if not isinstance(x, Tensor):
            x = Tensor(np.asarray(x))
        return x.astype(self.param_dtype)

    def encode(self, x, sample_posterior: Optional[bool] = None, return_posterior: bool = False, noise=None):
        """Latent of x (B, C, T, H, W) or (B, C, H, W): the posterior mode, or -- with ``noise`` (the mean's
        shape) -- the sample mean + std * noise. ``sample_posterior`` None = sample iff noise is given;
        True without noise raises (RNG streams differ across frameworks, the caller supplies the noise)."""
        x = self._input(x)
        video = x.ndim == 5
        if not video and x.ndim != 4:
            raise ValueError(f"AutoEncoder.encode: expected (B, C, T, H, W) or (B, C, H, W), got {tuple(x.shape)}")
        params = self.encoder(_fold(x) if video else x)
        if video:
            params = _unfold(params, x.shape[2])
        posterior = DiagonalGaussianDistribution(params)
        sample = noise is not None if sample_posterior is None else bool(sample_posterior)
        if sample and noise is None:
            raise ValueError("encode(sample_posterior=True) needs `noise` (RNG streams differ across frameworks)")
        z = posterior.sample(noise) if sample else posterior.mode()
        z = self.scale_factor * (z - self.shift_factor)
        return (z, posterior) if return_posterior else z

    def decode(self, z):
        """Pixels of a latent (B, z, T, h, w) or (B, z, h, w): ``z / scale + shift``, then the decoder per frame."""
        z = self._input(z)
        video = z.ndim == 5
        if not video and z.ndim != 4:
            raise ValueError(f"AutoEncoder.decode: expected (B, C, T, h, w) or (B, C, h, w), got {tuple(z.shape)}")
        t = z.shape[2] if video else 1
        if video:
            z = _fold(z)
        x = self.decoder(z / self.scale_factor + self.shift_factor)
        return _unfold(x, t) if video else x

    def construct(self, x, noise=None):
        """x -> (decoded, z): the posterior mode, or a sample when `noise` is given."""
        z = self.encode(x, noise=noise)
        return self.decode(z), z


# ----------------------------------------------------------------------------------------------------------------
# inventory / factory


def param_inventory(cfg) -> dict:
    """{name: (shape, "F32")} of every parameter at `cfg`, in registration order, without allocating."""
    cfg = _cfg(cfg)
    inv = {}

    def conv(prefix, ci, co, k):
        inv[f"{prefix}.weight"] = ((co, ci, k, k), "F32")
        inv[f"{prefix}.bias"] = ((co,), "F32")

    def norm(prefix, c):
        inv[f"{prefix}.weight"] = ((c,), "F32")
        inv[f"{prefix}.bias"] = ((c,), "F32")

    def resnet(prefix, ci, co):
        norm(f"{prefix}.norm1", ci)
        conv(f"{prefix}.conv1", ci, co, 3)
        norm(f"{prefix}.norm2", co)
        conv(f"{prefix}.conv2", co, co, 3)
        if ci != co:
            conv(f"{prefix}.nin_shortcut", ci, co, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.block_1", c, c)
        norm(f"{prefix}.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.attn_1.{n}", c, c, 1)
        resnet(f"{prefix}.block_2", c, c)

    n = len(cfg.ch_mult)
    conv("encoder.conv_in", cfg.in_channels, cfg.ch, 3)
    in_ch_mult = (1,) + tuple(cfg.ch_mult)
    block_in = cfg.ch
    for i in range(n):
        block_in, block_out = cfg.ch * in_ch_mult[i], cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder.mid", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * cfg.z_channels, 3)

    block_in = cfg.ch * cfg.ch_mult[-1]
    conv("decoder.conv_in", cfg.z_channels, block_in, 3)
    mid("decoder.mid", block_in)
    ups = {}
    for i in reversed(range(n)):  # built deepest first, registered as up.0 .. up.{n-1}
        block_out = cfg.ch * cfg.ch_mult[i]
        lvl = {}
        for j in range(cfg.num_res_blocks + 1):
            lvl[j] = (block_in, block_out)
            block_in = block_out
        ups[i] = (lvl, block_in)
    for i in range(n):
        lvl, c = ups[i]
        for j, (ci, co) in lvl.items():
            resnet(f"decoder.up.{i}.block.{j}", ci, co)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, cfg.out_ch, 3)
    return inv


def infer_config(inv: dict) -> dict:
    """An `AutoEncoderConfig` dict from the port's parameter shapes (for `converter.targets`).

    Inferred: in_channels, ch, ch_mult (each level's first resnet width / ch), num_res_blocks, z_channels, out_ch.
    No parameter carries resolution, scale_factor or shift_factor: they are `AutoEncoderConfig`'s defaults
    (upstream's flux1-dev-ae: 256, 0.3611, 0.1159), so pass --config FILE.json for an AE trained with others."""
    from converter.errors import MappingError
    from opensora_ms.models.t5 import inv_count, inv_shape

    def shape(k):  # every shape read is a 2-D conv weight (out, in, k, k)
        s = inv_shape(inv, k, "flux_ae")
        if len(s) != 4 or not all(s):
            raise MappingError(f"cannot infer the flux_ae config: {k!r} has shape {list(s)}, not a 2-D conv weight "
                               "[out, in, k, k] (pass --config FILE.json)")
        return s

    ch, in_ch = shape("encoder.conv_in.weight")[:2]
    n = inv_count(inv, "encoder.down")
    if not n:
        raise MappingError("cannot infer the flux_ae config from the checkpoint: no 'encoder.down.N.*' key "
                           "(pass --config FILE.json)")
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n)]
    if any(w % ch for w in widths):
        raise MappingError(f"cannot infer the flux_ae config: level widths {widths} (encoder.down.N.block.0.conv1) "
                           f"are not multiples of ch {ch} (encoder.conv_in); pass --config FILE.json")
    d = AutoEncoderConfig()
    return {"resolution": d.resolution, "in_channels": in_ch, "ch": ch, "out_ch": shape("decoder.conv_out.weight")[0],
            "ch_mult": [w // ch for w in widths], "num_res_blocks": inv_count(inv, "encoder.down.0.block"),
            "z_channels": shape("decoder.conv_in.weight")[1], "scale_factor": d.scale_factor,
            "shift_factor": d.shift_factor}


def build(cfg, dtype=ms.float32) -> AutoEncoder:
    """The model at `cfg` (dict or AutoEncoderConfig); fp32 on CPU, bf16 on Ascend."""
    model = AutoEncoder(_cfg(cfg), dtype)
    model.set_train(False)
    return model
