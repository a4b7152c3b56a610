"""Linear / norm / attention / RoPE / activation functionals and the torch-named cells built on them.

Every function picks its kernel from `opensora_ms.ops.device.IS_CPU`, a module constant that `ms.jit` folds, so the
same model code compiles on CPU (fp32 kernels verified in ../shared/notes/mindspore-cpu.md) and on Ascend (`mint` /
aclnn kernels, bf16, `ops.flash_attention_score`; **not verified on hardware**).

Layouts and conventions (shared by every model in the project):

* `linear(x, weight, bias)`: `weight` is [out, in] as in torch.
* `attention(q, k, v, mask=None, scale=None)`: q/k/v in (B, H, L, D) ("BNSD"); `mask` is an additive float mask
  broadcastable to (B, H, Lq, Lk); returns (B, H, Lq, D).
* RoPE: the project's convention is **rotate-half** (HF-Llama / liger): head-dim index d pairs with d + D/2.
  `rope_tables(ids, axes_dim, theta)` builds `(cos, sin)` of shape (B, 1, L, D) with the rotate-half sign already
  folded into `sin` (first half negated), so `apply_rope(x, cos, sin) = x * cos + swap_halves(x) * sin`.
  `apply_rope_interleaved` is the Flux convention (pairs 2i, 2i+1), kept for tests and for models that need it.

Numerics: RMSNorm is computed in fp32 "llama" style (normalised value cast back to the input dtype before the
scale multiply); LayerNorm statistics in fp32; RoPE in fp32 and cast back; attention softmax in fp32 on CPU.

CPU-bf16 (`device.BF16_EMU`, docs/bf16.md): every op whose Ascend kernel takes/returns bf16 runs the CPU fp32 kernel
on fp32 copies of its bf16 inputs and rounds its output to bf16 (`bf16.emulate`); multi-kernel Ascend branches
(attention with a mask) run as written with `matmul` emulated. The fp32 islands stay fp32; one flipped off in
`device.ISLANDS` runs as a chain of bf16-rounded ops (`_*_bf16_chain`).
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from . import device as _D
from .bf16 import emulate, f32, is_low, rnd
from .device import BF16_EMU, IS_CPU

__all__ = [
    "linear",
    "matmul",
    "relu",
    "mean",
    "clamp",
    "exp",
    "sigmoid",
    "silu",
    "gelu",
    "layer_norm",
    "rms_norm",
    "attention",
    "rope_omega",
    "rope_freq_matrix",
    "rope_angles",
    "rope_cos_sin",
    "rope_fold_sign",
    "rope_tables",
    "apply_rope",
    "apply_rope_interleaved",
    "swap_halves",
    "Linear",
    "LayerNorm",
    "RMSNorm",
    "SiLU",
    "GELU",
    "Identity",
]

_bmm_nt = ops.BatchMatMul(transpose_b=True)  # (.., M, K) x (.., N, K)^T
_bmm_nn = ops.BatchMatMul()


# ----------------------------------------------------------------------------------------------------------------
# functionals
# ----------------------------------------------------------------------------------------------------------------


def linear(x, weight, bias=None):
    """torch.nn.functional.linear: x @ weight.T + bias; weight is [out, in]."""
    if BF16_EMU:
        return emulate(mint.nn.functional.linear, x, weight, bias)
    return mint.nn.functional.linear(x, weight, bias)


def matmul(a, b):
    """torch.matmul (batched, broadcasting); bf16 in -> fp32 accumulation -> bf16 out on Ascend and in CPU-bf16."""
    if BF16_EMU:
        return emulate(mint.matmul, a, b)
    return mint.matmul(a, b)


def silu(x):
    if BF16_EMU:
        return emulate(mint.nn.functional.silu, x)
    return mint.nn.functional.silu(x)


def relu(x):
    if BF16_EMU:
        return emulate(ops.relu, x)
    return ops.relu(x)


def mean(x, axis):
    """Mean over `axis` (Ascend: fp32 accumulation, result in x's dtype; MindSpore CPU has no bf16 Reduce kernel)."""
    if BF16_EMU:
        return emulate(mint.mean, x, axis)
    return x.mean(axis)


def clamp(x, lo, hi):
    if BF16_EMU:   # no bf16 Maximum/Minimum CPU kernel
        return emulate(mint.clamp, x, lo, hi)
    return mint.clamp(x, lo, hi)


def exp(x):
    if BF16_EMU:   # no bf16 Exp CPU kernel
        return emulate(mint.exp, x)
    return mint.exp(x)


def sigmoid(x):
    if BF16_EMU:
        return emulate(ops.sigmoid, x)
    return ops.sigmoid(x)


_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_K3 = _GELU_K * 0.044715


def gelu(x, approximate="none"):
    """GELU; `approximate` is "none" (erf, torch's default) or "tanh".

    CPU tanh form: 0.5*x*(1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi)*(x + 0.044715 x^3). MindSpore's CPU
    `GeLU` kernel is several times slower than this form (docs/cpu_kernels.md) and its `tanh` loses ~1e-4; the
    sigmoid form is exact to 1e-7.
    """
    if BF16_EMU:
        return emulate(_gelu_cpu, x, approximate)
    if IS_CPU:
        return _gelu_cpu(x, approximate)
    return mint.nn.functional.gelu(x, approximate=approximate)


def _gelu_cpu(x, approximate):
    if approximate == "tanh":
        return x * ops.sigmoid(x * (_GELU_K + _GELU_K3 * (x * x)))
    return ops.gelu(x, approximate="none")


def layer_norm(x, weight=None, bias=None, eps=1e-6):
    """LayerNorm over the last axis (torch semantics: biased variance), statistics in fp32, result in x's dtype.

    CPU: the fused `ops.LayerNorm` primitive (fp32; faster than mean/var in separate kernels, 2e-7 from torch)."""
    if BF16_EMU and is_low(x):
        if not _D.ISLANDS.norm_stats:
            return _layer_norm_bf16_chain(x, weight, bias, eps)
        return emulate(layer_norm, x, weight, bias, eps)
    if IS_CPU:
        c = x.shape[-1]
        g = weight if weight is not None else mint.ones((c,), dtype=x.dtype)
        b = bias if bias is not None else mint.zeros((c,), dtype=x.dtype)
        return ops.LayerNorm(-1, -1, eps)(x, g, b)[0]
    return mint.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_bf16_chain(x, weight, bias, eps):
    """LayerNorm with its statistics island flipped to bf16: mean, deviation, variance, rstd each rounded."""
    xf = f32(x)
    mu = rnd(xf.mean(-1, keep_dims=True))
    d = rnd(xf - mu)
    var = rnd(rnd(d * d).mean(-1, keep_dims=True))
    y = rnd(d * rnd(ops.rsqrt(var + eps)))
    if weight is not None:
        y = rnd(y * f32(weight))
    if bias is not None:
        y = rnd(y + f32(bias))
    return y.astype(x.dtype)


def rms_norm(x, weight=None, eps=1e-6):
    """RMSNorm over the last axis, liger/HF "llama" casting: y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype) * w.

    CPU: the mean of squares is a matmul with a constant 1/D column (faster than ReduceMean over short rows)."""
    if BF16_EMU and is_low(x) and not _D.ISLANDS.rms_norm:
        return _rms_norm_bf16_chain(x, weight, eps)
    xf = x.astype(ms.float32)
    if IS_CPU:
        d = x.shape[-1]
        ms2 = mint.matmul(xf * xf, mint.ones((d, 1), dtype=ms.float32) * (1.0 / d))
    else:
        ms2 = (xf * xf).mean(-1, keep_dims=True)
    y = (xf * ops.rsqrt(ms2 + eps)).astype(x.dtype)
    if weight is not None:
        y = y * weight
    return y


def _rms_norm_bf16_chain(x, weight, eps):
    """RMSNorm with its fp32 island flipped to bf16: squares, mean, rstd and the normalised value each rounded."""
    xf = f32(x)
    ms2 = rnd(rnd(xf * xf).mean(-1, keep_dims=True))
    y = rnd(xf * rnd(ops.rsqrt(ms2 + eps))).astype(x.dtype)
    if weight is not None:
        y = y * weight
    return y


def attention(q, k, v, mask=None, scale=None):
    """Scaled dot-product attention, (B, H, L, D) in and out; optional additive float mask.

    CPU: q is pre-scaled, then BatchMatMul(q, k^T) -> softmax (fp32) -> BatchMatMul(p, v); no transposes.
    Ascend: `ops.flash_attention_score` in BNSD layout when there is no mask (bf16/fp16), manual mint otherwise.
    """
    head_dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if BF16_EMU and is_low(q) and not _D.ISLANDS.softmax:
        return _attention_bf16_chain(q, k, v, mask, scale)
    if IS_CPU and not (BF16_EMU and is_low(q)):
        return _attention_cpu(q, k, v, mask, scale)
    if mask is None:  # one fused kernel: fp32 scores, softmax and accumulation, bf16 out
        if BF16_EMU:
            return emulate(_attention_cpu, q, k, v, None, scale)
        return ops.flash_attention_score(q, k, v, q.shape[1], scalar_value=scale, input_layout="BNSD")
    s = matmul(q, mint.transpose(k, -1, -2)) * scale
    s = s.astype(ms.float32) + mask.astype(ms.float32)
    p = mint.softmax(s, -1).astype(v.dtype)
    return matmul(p, v)


def _attention_cpu(q, k, v, mask, scale):
    """fp32: q pre-scaled, BatchMatMul(q, k^T) -> softmax -> BatchMatMul(p, v); no transposes."""
    s = _bmm_nt(q * scale, k)
    if mask is not None:
        s = s + mask
    p = ops.softmax(s, -1)
    return _bmm_nn(p, v)


def _attention_bf16_chain(q, k, v, mask, scale):
    """Attention with the softmax island flipped to bf16: scores, scaled scores, masked scores and probabilities
    each rounded to bf16 (the output of every matmul too)."""
    s = rnd(rnd(_bmm_nt(f32(q), f32(k))) * scale)
    if mask is not None:
        s = rnd(s + f32(mask))
    p = rnd(ops.softmax(s, -1))
    return _bmm_nn(p, f32(v)).astype(q.dtype)


def rope_omega(dim: int, theta: float) -> np.ndarray:
    """Frequencies 1 / theta^(arange(0, dim, 2) / dim), float64 numpy (dim/2 values)."""
    return 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_freq_matrix(axes_dim, theta) -> np.ndarray:
    """(n_axes, sum(axes_dim)/2) fp32: row i holds axis i's frequencies in its own column block, zeros elsewhere, so
    `ids @ matrix` gives every angle pos_i * omega_j exactly (the other terms are exact zeros)."""
    omega = np.concatenate([rope_omega(d, theta) for d in axes_dim]).astype(np.float32)
    sel = np.zeros((len(axes_dim), omega.shape[0]), dtype=np.float32)
    start = 0
    for i, d in enumerate(axes_dim):
        sel[i, start:start + d // 2] = omega[start:start + d // 2]
        start += d // 2
    return sel


def rope_angles(ids, axes_dim, theta, freqs=None):
    """Angles (B, L, sum(axes_dim)/2) in fp32: per axis i, ids[..., i] * omega_i, axes concatenated in order.
    `freqs`: the Tensor of `rope_freq_matrix(axes_dim, theta)`, precomputed by cells (a graph constant)."""
    if freqs is None:
        freqs = Tensor(rope_freq_matrix(axes_dim, theta))
    if BF16_EMU and not _D.ISLANDS.rope:  # island flipped: the angles of a bf16 matmul
        return rnd(mint.matmul(rnd(f32(ids)), rnd(freqs)))
    return mint.matmul(ids.astype(ms.float32), freqs)


def rope_cos_sin(ids, axes_dim, theta, freqs=None):
    """Rotate-half ("liger") tables from position ids (B, L, n_axes): (cos, sin) each (B, L, D), fp32, frequencies
    of all axes concatenated then repeated twice (the layout of upstream's `LigerEmbedND`)."""
    ang = rope_angles(ids, axes_dim, theta, freqs)
    c = ops.cos(ang)
    s = ops.sin(ang)
    if BF16_EMU and not _D.ISLANDS.rope:  # island flipped: bf16 tables
        c, s = c.astype(ms.bfloat16), s.astype(ms.bfloat16)
    return mint.cat((c, c), -1), mint.cat((s, s), -1)


def rope_fold_sign(sin):
    """[s, s] -> [-s, s]: fold rotate-half's sign into the sin table once, so `apply_rope` needs no negation."""
    d = sin.shape[-1] // 2
    return mint.cat((-sin[..., :d], sin[..., d:]), -1)


def rope_tables(ids, axes_dim, theta):
    """Rotate-half RoPE tables ready for `apply_rope`: (cos, sin) each (B, 1, L, D), fp32, sign folded into sin."""
    cos, sin = rope_cos_sin(ids, axes_dim, theta)
    return cos.unsqueeze(1), rope_fold_sign(sin).unsqueeze(1)


def swap_halves(x):
    """cat(x[..., D/2:], x[..., :D/2])."""
    d = x.shape[-1] // 2
    return mint.cat((x[..., d:], x[..., :d]), -1)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE with tables from `rope_tables`: x*cos + swap_halves(x)*sin, computed in fp32, cast back."""
    xf = x.astype(ms.float32)
    if BF16_EMU and is_low(x) and not _D.ISLANDS.rope:  # island flipped: each product and the sum rounded
        y = rnd(rnd(xf * rnd(f32(cos))) + rnd(swap_halves(xf) * rnd(f32(sin))))
        return y.astype(x.dtype)
    y = xf * cos + swap_halves(xf) * sin
    return y.astype(x.dtype)


def apply_rope_interleaved(x, cos_half, sin_half):
    """Flux/EmbedND RoPE: pairs (2i, 2i+1) rotated by angle i; `cos_half`/`sin_half` are (..., D/2) (no sign fold)."""
    xf = x.astype(ms.float32)
    shp = xf.shape
    xr = xf.reshape(shp[:-1] + (shp[-1] // 2, 2))
    x0 = xr[..., 0]
    x1 = xr[..., 1]
    if BF16_EMU and is_low(x) and not _D.ISLANDS.rope:  # island flipped: bf16 tables, each op rounded
        c, s = rnd(f32(cos_half)), rnd(f32(sin_half))
        y0 = rnd(rnd(x0 * c) - rnd(x1 * s))
        y1 = rnd(rnd(x0 * s) + rnd(x1 * c))
        return ops.stack((y0, y1), -1).reshape(shp).astype(x.dtype)
    y0 = x0 * cos_half - x1 * sin_half
    y1 = x0 * sin_half + x1 * cos_half
    y = ops.stack((y0, y1), -1).reshape(shp)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# cells (torch parameter names)
# ----------------------------------------------------------------------------------------------------------------


def _param(shape, init, dtype):
    return Parameter(initializer(init, shape, dtype))


class Linear(nn.Cell):
    """torch.nn.Linear: `weight` [out, in], `bias` [out] (absent when bias=False)."""

    def __init__(self, in_features, out_features, bias=True, dtype=ms.float32, weight_init="normal", bias_init="zeros"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param((out_features, in_features), weight_init, dtype)
        self.bias = _param((out_features,), bias_init, dtype) if bias else None

    def construct(self, x):
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm over the last axis: `weight`, `bias` (absent when elementwise_affine=False)."""

    def __init__(self, normalized_shape, eps=1e-6, elementwise_affine=True, bias=True, dtype=ms.float32):
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError("LayerNorm: only normalisation over the last axis is supported")
            normalized_shape = normalized_shape[0]
        self.normalized_shape = (int(normalized_shape),)
        self.eps = float(eps)
        self.weight = _param(self.normalized_shape, "ones", dtype) if elementwise_affine else None
        self.bias = _param(self.normalized_shape, "zeros", dtype) if (elementwise_affine and bias) else None

    def construct(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Cell):
    """RMSNorm over the last axis with a learnable `weight` (llama casting, see `rms_norm`)."""

    def __init__(self, dim, eps=1e-6, dtype=ms.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = _param((int(dim),), "ones", dtype)

    def construct(self, x):
        return rms_norm(x, self.weight, self.eps)


class SiLU(nn.Cell):
    def construct(self, x):
        return silu(x)


class GELU(nn.Cell):
    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def construct(self, x):
        return gelu(x, self.approximate)


class Identity(nn.Cell):
    def construct(self, x):
        return x
