"""Convolution, padding, nearest interpolation and group norm for the op layer, plus torch-named cells.

CPU (fp32) notes — why this file exists (see ../shared/notes/mindspore-cpu.md §0.5, §5):

* MindSpore 2.10's CPU ``Conv3D`` runs oneDNN's reference kernel on plain NCDHW layouts and is ~100x slower than
  torch. ``conv3d`` here rewrites a k x k x k convolution as GEMMs over **slabs** (blocks of output frames x
  output rows, sized so one slab's im2col columns stay below ``set_cpu_conv_budget`` bytes, default 256 MiB: the
  working set of one conv is input + output + one slab's columns):

  - **stride 1** ("shifted-window im2col"): the slab is flattened per channel over (T, H, W); output position p
    (padded coordinates) of tap (a, b, c) reads input position p + a*H*W + b*W + c, so each tap is a
    *contiguous* window (cheap memcpy, unlike strided gathers). The columns are stacked hierarchically — the kw
    W-shifts, then kh H-shifts of that, then kt T-shifts — three concats, one GEMM with K = 27*C_in. Positions in
    the right/bottom padding are garbage and cropped.
  - **stride > 1**: kt*kh*kw strided slices of the slab are concatenated -> one GEMM.
  - **1 x 1 x 1**: a single matmul.

  Slabs of equal shape share one cached ``ms.jit`` graph (``set_cpu_conv_jit``: graphs for convs >= 5e8 FLOPs,
  op-by-op PyNative below, where compiling would cost more than it saves). All paths match ``ops.conv3d`` to
  ~1e-6 relative in fp32 (tests/test_ops_conv.py). Measured speed: ~2x torch's oneDNN direct conv for large
  layers (MindSpore's fp32 GEMM reaches about half the throughput of torch's AVX-512 conv kernel on the test CPU),
  more for small slabs (docs/vae.md).
* ``pad``: ``ops.pad`` (``mint`` replicate/reflect pad SEGFAULTs under jit on CPU).
* ``interpolate_nearest``: integer scale factors only, via broadcast + reshape (exactly torch's ``nearest``).
* ``group_norm``: ``mint.nn.functional.group_norm`` (CPU and Ascend).

Ascend (bf16; **not verified on hardware**): ``mint.nn.functional.conv3d`` / ``pad`` / ``group_norm``.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, mint, nn, ops
from mindspore.common.initializer import initializer

from .device import IS_CPU

__all__ = [
    "conv3d",
    "pad",
    "interpolate_nearest",
    "group_norm",
    "set_cpu_conv_budget",
    "set_cpu_conv_jit",
    "get_cpu_conv_budget",
    "Conv3d",
    "GroupNorm",
]

_BUDGET = [256 * 1024**2]  # bytes of im2col columns per slab (CPU path)
_USE_JIT = ["auto"]  # CPU conv3d as a cached per-shape ms.jit graph: True / False / "auto" (by work size)
_JIT_MIN_FLOPS = [5e8]


def set_cpu_conv_jit(mode="auto", min_flops: float | None = None) -> None:
    """How the CPU conv3d runs when called from PyNative: ``True`` = always as a per-shape ``ms.jit`` graph
    (compiled once per input/weight shape, ~0.5-1 s each, then 3-4x faster than op-by-op for large inputs),
    ``False`` = op by op, ``"auto"`` (default) = graph only when the conv costs >= ``min_flops`` (default 5e8),
    so small layers (tests, tiny configs) never pay a compilation."""
    if mode not in (True, False, "auto"):
        raise ValueError(f"set_cpu_conv_jit: mode must be True, False or 'auto', got {mode!r}")
    _USE_JIT[0] = mode
    if min_flops is not None:
        _JIT_MIN_FLOPS[0] = float(min_flops)


def set_cpu_conv_budget(nbytes: int) -> None:
    """Bytes of im2col columns one chunk of the CPU conv3d may hold (bounds its extra memory)."""
    _BUDGET[0] = int(max(nbytes, 1))


def get_cpu_conv_budget() -> int:
    return _BUDGET[0]


def _triple(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 3:
            raise ValueError(f"expected 3 values, got {v}")
        return tuple(int(i) for i in v)
    return (int(v),) * 3


# ----------------------------------------------------------------------------------------------------------------
# functionals
# ----------------------------------------------------------------------------------------------------------------


def pad(x, pads, mode="constant", value=0.0):
    """torch.nn.functional.pad: `pads` from the last axis backwards ((W_l, W_r, H_t, H_b, T_f, T_b) for 5-D)."""
    if IS_CPU:
        if mode == "constant":
            return ops.pad(x, tuple(pads), mode="constant", value=value)
        return ops.pad(x, tuple(pads), mode=mode)
    if mode == "constant":
        return mint.nn.functional.pad(x, tuple(pads), mode="constant", value=value)
    return mint.nn.functional.pad(x, tuple(pads), mode=mode)


def interpolate_nearest(x, scale_factor):
    """Nearest upsampling by integer factors over the trailing len(scale_factor) axes (4-D or 5-D input)."""
    f = tuple(int(s) for s in scale_factor)
    shp = x.shape
    nd = len(f)
    lead = shp[: len(shp) - nd]
    if all(s == 1 for s in f):
        return x
    # (lead, d0, 1, d1, 1, ...) -> broadcast -> (lead, d0*f0, d1*f1, ...)
    expanded = lead
    target = lead
    final = lead
    for i in range(nd):
        d = shp[len(lead) + i]
        expanded = expanded + (d, 1)
        target = target + (d, f[i])
        final = final + (d * f[i],)
    y = mint.broadcast_to(x.reshape(expanded), target)
    return y.reshape(final)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    return mint.nn.functional.group_norm(x, num_groups, weight, bias, eps)


_mm = ops.MatMul()  # the primitive: in PyNative far cheaper to dispatch than mint.matmul on CPU
_slice = ops.Slice()  # primitive slice (Tensor.__getitem__ costs milliseconds per call in PyNative)
_strided = ops.StridedSlice()


def _conv_1x1(x, weight, bias):
    b, ci = x.shape[0], x.shape[1]
    sp = x.shape[2:]
    co = weight.shape[0]
    n = 1
    for s in sp:
        n *= s
    w2 = weight.reshape(co, ci)
    xf = x.reshape(b, ci, n)
    ys = []
    for i in range(b):
        ys.append(_mm(w2, xf[i] if b > 1 else xf.reshape(ci, n)))
    y = ys[0].reshape(1, co, n) if b == 1 else ops.stack(ys, 0)
    if bias is not None:
        y = y + bias.reshape(1, co, 1)
    return y.reshape((b, co) + tuple(sp))


def _shift_stack(xb, rows, offsets, n):
    """Row block k of the result = xb[:, off_k : off_k + n] (xb has `rows` rows)."""
    if len(offsets) == 1:
        return _slice(xb, (0, offsets[0]), (rows, n))
    return ops.concat([_slice(xb, (0, o), (rows, n)) for o in offsets], 0)


def _slab_s1(x, weight, bias):
    """Valid stride-1 conv of a whole (slab-sized) padded input with one im2col GEMM.

    The (T, H, W) axes are flattened; output position p (padded coordinates) of tap (a, b, c) reads input position
    p + a*H*W + b*W + c, so the columns are contiguous shifted windows, stacked hierarchically (W taps, then H,
    then T: three concats). Positions in the right/bottom padding are garbage and cropped."""
    bsz, ci, tp, hp, wp = x.shape
    co, _, kt, kh, kw = weight.shape
    to, ho, wo = tp - kt + 1, hp - kh + 1, wp - kw + 1
    s = hp * wp
    n = to * s
    tail = (kh - 1) * wp + (kw - 1)
    xf = x.reshape(bsz, ci, tp * s)
    if tail > 0:
        xf = ops.pad(xf, (0, tail))
    w_all = weight.transpose(0, 2, 3, 4, 1).reshape(co, kt * kh * kw * ci)  # columns ordered (a, b, c, ci)
    ys = []
    for i in range(bsz):
        xb = xf[i] if bsz > 1 else xf.reshape(ci, tp * s + tail)
        x3 = _shift_stack(xb, ci, list(range(kw)), n + (kt - 1) * s + (kh - 1) * wp)
        x9 = _shift_stack(x3, kw * ci, [bb * wp for bb in range(kh)], n + (kt - 1) * s)
        x27 = _shift_stack(x9, kh * kw * ci, [a * s for a in range(kt)], n)
        ys.append(_mm(w_all, x27))
    y = ys[0].reshape(1, co, to, hp, wp) if bsz == 1 else ops.stack(ys, 0).reshape(bsz, co, to, hp, wp)
    if ho != hp or wo != wp:
        y = _slice(y, (0, 0, 0, 0, 0), (bsz, co, to, ho, wo))
    if bias is not None:
        y = y + bias.reshape(1, co, 1, 1, 1)
    return y


def _slab_strided(x, weight, bias, stride):
    """Valid strided conv of a whole (slab-sized) input: kt*kh*kw strided slices -> one GEMM."""
    bsz, ci, tp, hp, wp = x.shape
    co, _, kt, kh, kw = weight.shape
    st, sh, sw = stride
    to, ho, wo = (tp - kt) // st + 1, (hp - kh) // sh + 1, (wp - kw) // sw + 1
    w_all = weight.transpose(0, 2, 3, 4, 1).reshape(co, kt * kh * kw * ci)
    ys = []
    for i in range(bsz):
        xb = x[i] if bsz > 1 else x.reshape(ci, tp, hp, wp)
        parts = []
        for a in range(kt):
            for bb in range(kh):
                for c in range(kw):
                    sl = _strided(xb, (0, a, bb, c),
                                  (ci, a + st * (to - 1) + 1, bb + sh * (ho - 1) + 1, c + sw * (wo - 1) + 1),
                                  (1, st, sh, sw))
                    parts.append(sl.reshape(ci, to * ho * wo))
        cols = parts[0] if len(parts) == 1 else ops.concat(parts, 0)
        ys.append(_mm(w_all, cols))
    y = ys[0].reshape(1, co, to, ho, wo) if bsz == 1 else ops.stack(ys, 0).reshape(bsz, co, to, ho, wo)
    if bias is not None:
        y = y + bias.reshape(1, co, 1, 1, 1)
    return y


def _slab(x, weight, bias, stride):
    if stride == (1, 1, 1):
        return _slab_s1(x, weight, bias)
    return _slab_strided(x, weight, bias, stride)


# One small graph per slab shape: compiled once, reused by every slab / layer / call with the same shapes.
_slab_jit = ms.jit(_slab)


def _slab_bytes(ci, k, nt, nr, wp, wo, kt, kh, stride):
    """Upper bound of the im2col memory of one slab of nt output frames x nr output rows."""
    if stride == (1, 1, 1):
        pos = (nt + kt - 1) * (nr + kh - 1) * wp  # padded slab positions; x3 + x9 + x27 + the slab copy
        return 4 * ci * pos * (k + k // max(kt, 1) + max(k // max(kt * kh, 1), 1) + 1)
    return 4 * ci * 2 * k * nt * nr * wo  # strided slices + their concat


def _slab_plan(x_shape, w_shape, stride, budget):
    _, ci, tp, hp, wp = x_shape
    _, _, kt, kh, kw = w_shape
    st, sh, sw = stride
    to, ho, wo = (tp - kt) // st + 1, (hp - kh) // sh + 1, (wp - kw) // sw + 1
    k = kt * kh * kw

    def cost(nt, nr):
        return _slab_bytes(ci, k, nt, nr, wp, wo, kt, kh, stride)

    if cost(to, ho) <= budget:
        return to, ho, to, ho
    if cost(1, ho) <= budget:
        nt = 1
        while nt < to and cost(nt + 1, ho) <= budget:
            nt += 1
        return to, ho, nt, ho
    nr = 1
    while nr < ho and cost(1, nr + 1) <= budget:
        nr += 1
    return to, ho, 1, nr


def _conv_slabs(x, weight, bias, stride, budget, use_jit):
    """Valid conv as a grid of (output-frames x output-rows) slabs, each one im2col GEMM; the extra memory is
    bounded by `budget` bytes (plus the output)."""
    bsz, ci, tp, hp, wp = x.shape
    _, _, kt, kh, kw = weight.shape
    st, sh, _ = stride
    to, ho, nt, nr = _slab_plan(x.shape, weight.shape, stride, budget)
    fn = _slab_jit if use_jit else _slab
    if nt == to and nr == ho:
        return fn(x, weight, bias, stride)
    rows_t = []
    for t0 in range(0, to, nt):
        ct = min(nt, to - t0)
        cols_h = []
        for r0 in range(0, ho, nr):
            cr = min(nr, ho - r0)
            slab = _slice(x, (0, 0, t0 * st, r0 * sh, 0), (bsz, ci, (ct - 1) * st + kt, (cr - 1) * sh + kh, wp))
            cols_h.append(fn(slab, weight, bias, stride))
        rows_t.append(cols_h[0] if len(cols_h) == 1 else ops.concat(cols_h, 3))
    return rows_t[0] if len(rows_t) == 1 else ops.concat(rows_t, 2)


def _conv3d_cpu(x, weight, bias, stride, padding, budget, use_jit):
    if padding != (0, 0, 0):
        pt, ph, pw = padding
        x = ops.pad(x, (pw, pw, ph, ph, pt, pt), mode="constant", value=0.0)
    kt, kh, kw = weight.shape[2], weight.shape[3], weight.shape[4]
    if kt * kh * kw == 1:
        if stride != (1, 1, 1):
            x = _strided(x, (0, 0, 0, 0, 0), tuple(x.shape), (1, 1) + stride)
        return _conv_1x1(x, weight, bias)
    return _conv_slabs(x, weight, bias, stride, budget, use_jit)


def conv3d(x, weight, bias=None, stride=1, padding=0):
    """torch.nn.functional.conv3d (groups 1, dilation 1, zero padding), NCDHW, weight (C_out, C_in, kt, kh, kw)."""
    stride = _triple(stride)
    padding = _triple(padding)
    if not IS_CPU:
        return mint.nn.functional.conv3d(x, weight, bias, stride, padding)
    use = _USE_JIT[0]
    if use == "auto":
        co, ci, kt, kh, kw = weight.shape
        n = x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4]  # ~ output positions (stride 1)
        use = 2.0 * co * ci * kt * kh * kw * n >= _JIT_MIN_FLOPS[0]
    return _conv3d_cpu(x, weight, bias, stride, padding, _BUDGET[0], bool(use))


# ----------------------------------------------------------------------------------------------------------------
# cells (torch parameter names)
# ----------------------------------------------------------------------------------------------------------------


class Conv3d(nn.Cell):
    """torch.nn.Conv3d (zero padding, groups 1): `weight` (C_out, C_in, kt, kh, kw), `bias` (C_out)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype=ms.float32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.weight = Parameter(initializer("normal", (out_channels, in_channels) + self.kernel_size, dtype))
        self.bias = Parameter(initializer("zeros", (out_channels,), dtype)) if bias else None

    def construct(self, x):
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm: `weight`, `bias` (C,)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=ms.float32):
        super().__init__()
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.weight = Parameter(initializer("ones", (num_channels,), dtype)) if affine else None
        self.bias = Parameter(initializer("zeros", (num_channels,), dtype)) if affine else None

    def construct(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
