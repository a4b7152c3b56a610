"""2-D convolution for the op layer (the Flux 2D AE), and its torch-named cell.

Why a separate file: a 2-D conv is a 3-D conv over one frame. On CPU, MindSpore's own ``Conv2D`` runs oneDNN's
reference kernel on plain NCHW (orders of magnitude slower than torch: ../shared/notes/mindspore-cpu.md §0.5,
docs/cpu_kernels.md), while ``ops.conv.conv3d`` runs GEMMs over slabs with padding and nearest upsampling fused. So on CPU
``conv2d`` views (N, C, H, W) as (N, C, 1, H, W), the weight (C_out, C_in, kh, kw) as (C_out, C_in, 1, kh, kw),
and calls ``conv3d`` (free reshapes); a batch of N > 1 images becomes the N frames of one clip (one transposing copy in and
out) so the slab GEMMs cover the whole batch at once instead of looping over it. Same extras as ``conv3d``: ``upsample`` (fh, fw) nearest
upsampling and ``pad`` (W_l, W_r, H_t, H_b, F.pad order) applied to the input first, so model code passes them
instead of materialising the upsampled / padded tensor.

Ascend (bf16; **not verified on hardware**): nearest upsampling (broadcast + reshape), ``pad``, then
``mint.nn.functional.conv2d``. CPU-bf16 (docs/bf16.md): the CPU path on fp32 copies, output rounded to bf16.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, mint, nn
from mindspore.common.initializer import initializer

from .conv import DEFAULT_CONV_SETTINGS, ConvSettings, conv3d, interpolate_nearest, pad as _pad
from .bf16 import f32, is_low
from .device import BF16_EMU, IS_CPU

__all__ = ["conv2d", "Conv2d"]


def _pair(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected 2 values, got {v}")
        return tuple(int(i) for i in v)
    return (int(v),) * 2


def conv2d(x, weight, bias=None, stride=1, padding=0, pad=None, pad_mode="constant", upsample=None,
           settings: ConvSettings | None = None):
    """torch.nn.functional.conv2d (groups 1, dilation 1, zero `padding`) of `x` (N, C, H, W) first upsampled
    (nearest, integer factors `upsample` = (fh, fw)) and padded by `pad` (W_l, W_r, H_t, H_b) in `pad_mode`
    ("constant" or "replicate"); weight (C_out, C_in, kh, kw); `settings` as ``conv3d``'s (CPU only)."""
    if BF16_EMU and is_low(x):  # one Ascend conv kernel: fp32 accumulation, bf16 out
        return conv2d(f32(x), f32(weight), f32(bias), stride, padding, pad, pad_mode, upsample,
                      settings).astype(x.dtype)
    stride, padding = _pair(stride), _pair(padding)
    up = _pair(upsample) if upsample is not None else (1, 1)
    pads = tuple(int(p) for p in pad) if pad is not None else (0, 0, 0, 0)
    if len(pads) != 4 or min(pads) < 0:
        raise ValueError(f"conv2d: pad must be 4 non-negative ints (W_l, W_r, H_t, H_b), got {pad}")
    if IS_CPU:
        n, c, h, w = x.shape
        co, ci, kh, kw = weight.shape
        w5 = weight.reshape(co, ci, 1, kh, kw)
        kw_ = dict(pad=pads + (0, 0), pad_mode=pad_mode, upsample=(1,) + up, settings=settings)
        if n == 1:
            y = conv3d(x.reshape(1, c, 1, h, w), w5, bias, (1,) + stride, (0,) + padding, **kw_)
            return y.reshape(1, co, y.shape[3], y.shape[4])
        # a batch (or frames folded into it) = the frames of one (1, C, N, H, W) clip under a 1 x kh x kw kernel:
        # one set of slab GEMMs instead of one per image (conv3d loops over its batch)
        y = conv3d(x.permute(1, 0, 2, 3).reshape(1, c, n, h, w), w5, bias, (1,) + stride, (0,) + padding, **kw_)
        return y.reshape(co, n, y.shape[3], y.shape[4]).permute(1, 0, 2, 3)
    if up != (1, 1):
        x = interpolate_nearest(x, up)
    if any(pads):
        x = _pad(x, pads, mode=pad_mode)
    return mint.nn.functional.conv2d(x, weight, bias, stride, padding)


class Conv2d(nn.Cell):
    """torch.nn.Conv2d (zero padding, groups 1): `weight` (C_out, C_in, kh, kw), `bias` (C_out). `upsample`,
    `pad` / `pad_mode`: a nearest upsampling and an F.pad the cell applies to its input first (fused into the CPU
    kernel); torch does both outside the conv, the output is the same. `conv_settings` as ``Conv3d``'s."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype=ms.float32,
                 pad=None, pad_mode="constant", upsample=None, conv_settings: ConvSettings | None = None):
        super().__init__()
        self.conv_settings = DEFAULT_CONV_SETTINGS if conv_settings is None else conv_settings
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.pad = tuple(int(p) for p in pad) if pad is not None else None
        self.pad_mode = pad_mode
        self.upsample = _pair(upsample) if upsample is not None else None
        self.weight = Parameter(initializer("normal", (out_channels, in_channels) + self.kernel_size, dtype))
        self.bias = Parameter(initializer("zeros", (out_channels,), dtype)) if bias else None

    def construct(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.pad, self.pad_mode, self.upsample,
                      self.conv_settings)
