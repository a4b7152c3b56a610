"""Ops the text encoders (T5-v1.1, CLIP text) need beyond `ops.nn`: embedding lookup, T5's RMS norm with
transformers' casting, quick-GELU, attention that also returns its probabilities (transformers' eager attention
returns them and the parity hooks compare them), and a first-occurrence argmax.

Same dispatch rule as `ops.nn`: `IS_CPU` is a module constant that `ms.jit` folds. CPU computes fp32; the Ascend
branch keeps transformers' bf16 rounding points (scores in the input dtype, softmax in fp32, probabilities cast back
to the input dtype) and is **not verified on hardware**. CPU-bf16 (docs/bf16.md) runs that Ascend branch with each
kernel emulated (fp32 on bf16 inputs, output rounded to bf16).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import mint, ops

import math

from . import device as _D
from .bf16 import emulate, f32, is_low, rnd
from .device import BF16_EMU, IS_CPU
from .nn import gelu, matmul, sigmoid

__all__ = ["embedding", "t5_rms_norm", "mul_scalar", "quick_gelu", "gelu_new", "attention_with_probs",
           "first_argmax"]

_bmm_nt = ops.BatchMatMul(transpose_b=True)
_bmm_nn = ops.BatchMatMul()
_HALF = (ms.float16, ms.bfloat16)


def embedding(ids, weight):
    """torch.nn.functional.embedding: rows of `weight` [num, dim] at integer `ids` (any shape) -> ids.shape + (dim,)."""
    if BF16_EMU and is_low(weight):  # exact; CPU Gather has no bf16 kernel
        return ops.gather(f32(weight), ids, 0).astype(weight.dtype)
    return ops.gather(weight, ids, 0)


def t5_rms_norm(x, weight, eps=1e-6):
    """transformers' `T5LayerNorm`: variance of x in fp32, y = x * rsqrt(var + eps) (fp32), cast to the *weight's*
    dtype only when the weight is half precision, then `weight * y`. Unlike `ops.nn.rms_norm` the cast follows the
    weight, not the input: after an fp32 `wo` the residual stream is fp32 while the norm weights are bf16."""
    xf = x.astype(ms.float32)
    if BF16_EMU and weight.dtype in _HALF and not _D.ISLANDS.rms_norm:  # island flipped: each op rounded
        var = rnd(rnd(xf * xf).mean(-1, keep_dims=True))
        return weight * rnd(xf * rnd(ops.rsqrt(var + eps))).astype(weight.dtype)
    var = (xf * xf).mean(-1, keep_dims=True)
    y = xf * ops.rsqrt(var + eps)
    if weight.dtype in _HALF:
        y = y.astype(weight.dtype)
    return weight * y


def mul_scalar(x, c: float):
    """x * c as torch computes it: for half-precision x in fp32 with c in fp32, rounded once. (MindSpore rounds
    a Python scalar to the tensor's dtype first: 1.702 * bf16 x differs from torch in ~14% of elements.)"""
    if x.dtype in _HALF:
        return (x.astype(ms.float32) * c).astype(x.dtype)
    return x * c


def quick_gelu(x):
    """transformers' `QuickGELUActivation`: x * sigmoid(1.702 x) (three bf16 ops on Ascend, as in torch)."""
    return x * sigmoid(mul_scalar(x, 1.702))


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_new(x):
    """transformers' `NewGELUActivation` (T5-v1.1's gated-GELU): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    fp32: the op layer's tanh GELU (the same function to ~1e-7). Half precision: the chain of ops transformers
    runs, each rounded to x's dtype as torch rounds it, not a fused GELU kernel whose single rounding would differ
    from upstream's bf16 T5: torch's `pow(x, 3.0)` is `x * x * x` (two rounded products), tanh one kernel."""
    if x.dtype not in _HALF:
        return gelu(x, "tanh")
    u = mul_scalar(x + mul_scalar(x * x * x, 0.044715), _GELU_C)
    t = emulate(ops.tanh, u) if BF16_EMU else mint.tanh(u)
    return mul_scalar(x, 0.5) * (t + 1.0)


def attention_with_probs(q, k, v, bias=None, scale=1.0):
    """Eager attention as transformers' T5/CLIP write it, (B, H, L, D) in and out; returns (out, probs).

    scores = (q @ k^T) * scale + bias (bias: additive, broadcastable to (B, H, Lq, Lk): T5's position bias, CLIP's
    causal mask); probs = softmax in fp32, cast to q's dtype; out = probs @ v. CPU: BatchMatMul without transposes
    (scale 1.0 is skipped, T5 never scales). In bf16 the scores are already bf16 (as in transformers), so there is
    no softmax island to flip here (`ISLANDS.softmax` concerns `ops.nn.attention`)."""
    if IS_CPU and not (BF16_EMU and is_low(q)):
        s = _bmm_nt(q, k)
        if scale != 1.0:
            s = s * scale
        if bias is not None:
            s = s + bias
        p = ops.softmax(s, -1)
        return _bmm_nn(p, v), p
    s = matmul(q, mint.transpose(k, -1, -2))
    if scale != 1.0:
        s = mul_scalar(s, scale)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    p = mint.softmax(s.astype(ms.float32), -1).astype(q.dtype)
    return matmul(p, v), p


def first_argmax(x):
    """Index of the first maximum along the last axis (torch.argmax's documented tie rule), for integer ids:
    min over positions where x equals its row maximum (no reliance on a kernel's tie behaviour)."""
    n = x.shape[-1]
    pos = ops.arange(n, dtype=ms.int32).reshape((1,) * (x.ndim - 1) + (n,))
    is_max = x == x.max(-1, keepdims=True)
    cand = ops.where(is_max, pos, ops.full_like(pos, n))
    return ops.ReduceMin()(cand, -1)
