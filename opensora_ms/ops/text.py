"""Ops the text encoders (T5-v1.1, CLIP text) need beyond `ops.nn`: embedding lookup, T5's RMS norm with
transformers' casting, quick-GELU, attention that also returns its probabilities (transformers' eager attention
returns them and the parity hooks compare them), and a first-occurrence argmax.

Same dispatch rule as `ops.nn`: `IS_CPU` is a module constant that `ms.jit` folds. CPU computes fp32; the Ascend
branch keeps transformers' bf16 rounding points (scores in the input dtype, softmax in fp32, probabilities cast back
to the input dtype) and is **not verified on hardware**.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import mint, ops

from .device import IS_CPU

__all__ = ["embedding", "t5_rms_norm", "quick_gelu", "attention_with_probs", "first_argmax"]

_bmm_nt = ops.BatchMatMul(transpose_b=True)
_bmm_nn = ops.BatchMatMul()
_HALF = (ms.float16, ms.bfloat16)


def embedding(ids, weight):
    """torch.nn.functional.embedding: rows of `weight` [num, dim] at integer `ids` (any shape) -> ids.shape + (dim,)."""
    return ops.gather(weight, ids, 0)


def t5_rms_norm(x, weight, eps=1e-6):
    """transformers' `T5LayerNorm`: variance of x in fp32, y = x * rsqrt(var + eps) (fp32), cast to the *weight's*
    dtype only when the weight is half precision, then `weight * y`. Unlike `ops.nn.rms_norm` the cast follows the
    weight, not the input: after an fp32 `wo` the residual stream is fp32 while the norm weights are bf16."""
    xf = x.astype(ms.float32)
    var = (xf * xf).mean(-1, keep_dims=True)
    y = xf * ops.rsqrt(var + eps)
    if weight.dtype in _HALF:
        y = y.astype(weight.dtype)
    return weight * y


def quick_gelu(x):
    """transformers' `QuickGELUActivation`: x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


def attention_with_probs(q, k, v, bias=None, scale=1.0):
    """Eager attention as transformers' T5/CLIP write it, (B, H, L, D) in and out; returns (out, probs).

    scores = (q @ k^T) * scale + bias (bias: additive, broadcastable to (B, H, Lq, Lk): T5's position bias, CLIP's
    causal mask); probs = softmax in fp32, cast to q's dtype; out = probs @ v. CPU: BatchMatMul without transposes
    (scale 1.0 is skipped, T5 never scales)."""
    if IS_CPU:
        s = _bmm_nt(q, k)
        if scale != 1.0:
            s = s * scale
        if bias is not None:
            s = s + bias
        p = ops.softmax(s, -1)
        return _bmm_nn(p, v), p
    s = mint.matmul(q, mint.transpose(k, -1, -2))
    if scale != 1.0:
        s = s * scale
    if bias is not None:
        s = s + bias.astype(s.dtype)
    p = mint.softmax(s.astype(ms.float32), -1).astype(q.dtype)
    return mint.matmul(p, v), p


def first_argmax(x):
    """Index of the first maximum along the last axis (torch.argmax's documented tie rule), for integer ids:
    min over positions where x equals its row maximum (no reliance on a kernel's tie behaviour)."""
    n = x.shape[-1]
    pos = ops.arange(n, dtype=ms.int32).reshape((1,) * (x.ndim - 1) + (n,))
    is_max = x == x.max(-1, keepdims=True)
    cand = ops.where(is_max, pos, ops.full_like(pos, n))
    return ops.ReduceMin()(cand, -1)
