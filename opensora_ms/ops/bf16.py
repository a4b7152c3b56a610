"""Casts for the CPU-bf16 mode (docs/bf16.md): Ascend's bf16 kernels emulated on MindSpore's CPU fp32 kernels.

An Ascend bf16 kernel (matmul, conv, norm, activation, flash attention) reads bf16, computes and accumulates in
fp32 and rounds its output to bf16 once. On CPU that is: cast the inputs to fp32 (exact), run the fp32 kernel,
cast the output back (round-to-nearest-even, bit-identical to torch's). `emulate` does that for one op; `rnd`
rounds an fp32 value to bf16 values, for the bf16-chain versions of flipped fp32 islands.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor

LOW = (ms.bfloat16, ms.float16)


def is_low(x) -> bool:
    return isinstance(x, Tensor) and x.dtype in LOW


def f32(x):
    """x as fp32 (a low-precision Tensor is cast exactly; anything else passes through)."""
    return x.astype(ms.float32) if is_low(x) else x


def like(y, x):
    """y rounded to x's dtype when x is low precision (the rounding of an Ascend kernel's output)."""
    return y.astype(x.dtype) if is_low(x) and y.dtype != x.dtype else y


def rnd(x, dtype=ms.bfloat16):
    """fp32 x rounded to `dtype` values, kept fp32 (one bf16 op of a chain)."""
    return x.astype(dtype).astype(ms.float32)


def emulate(fn, *args, **kwargs):
    """`fn` (a CPU fp32 kernel) on fp32 copies of the Tensor arguments; the result (or each item of a tuple result)
    rounded to the dtype of the first Tensor argument."""
    first = next(a for a in args if isinstance(a, Tensor))
    out = fn(*(f32(a) for a in args), **kwargs)
    if isinstance(out, tuple):
        return tuple(like(o, first) for o in out)
    return like(out, first)


def cast_parameters(net, dtype=ms.bfloat16):
    """Every floating-point parameter of `net` set to `dtype` (for models built without a dtype argument: the Hunyuan
    VAE, the DC-AE); `load_strict` then casts the loaded values to it. Returns `net`."""
    for p in net.get_parameters():
        if p.dtype in (ms.float32, ms.float16, ms.bfloat16, ms.float64) and p.dtype != dtype:
            p.set_dtype(dtype)
    return net
