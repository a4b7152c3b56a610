"""Convolution, padding, nearest interpolation and group norm for the op layer, plus torch-named cells.

CPU (fp32) notes — why this file exists (see ../shared/notes/mindspore-cpu.md §0.5, §5; the measurements behind
each choice are in docs/cpu_kernels.md, the conv's speed and memory in docs/vae.md):

* MindSpore 2.10's CPU ``Conv3D`` runs oneDNN's reference kernel on plain NCDHW layouts, orders of magnitude slower
  than torch; its GEMM (``MatMul`` inside an ``ms.jit`` graph) runs close to torch's direct conv.
  ``conv3d`` here is GEMMs over **slabs** of output frames (and rows, when one frame exceeds
  ``ConvSettings.budget_bytes``, default 512 MiB: the extra memory of one slab):

  - **stride 1** (every conv of the VAE decoder): each slab *gathers* its own padded input rows from the unpadded
    input (int32 row indices: clamped indices are replicate padding, repeated ones nearest upsampling in T and H),
    so neither the padded nor the upsampled tensor is ever materialised (``ops.pad`` copies its input many
    times, a PyNative slice is a view whose later copy is far slower than a graph's). The slab is flattened over
    (T, H, W); tap (a, b, c) of output position p reads position p + a*S + b*Wp + c, a *contiguous* window. The
    (T, W) windows are stacked as im2col columns (K = kt*kw*C_in) and one GEMM yields kh partial outputs that
    are summed shifted by b*Wp (3x fewer columns than full im2col, no halo frames in the GEMM). For few output
    channels (conv_out to RGB) every tap goes to the output side: one GEMM of the flat input, 27 shifted reads.
  - **stride > 1**: kt*kh*kw strided slices of the slab are concatenated -> one GEMM.
  - **1 x 1 x 1**: a single matmul.

  Slabs of equal shape share one cached ``ms.jit`` graph (``ConvSettings.jit``: graphs for convs >= 5e8 FLOPs,
  op-by-op PyNative below, where compiling would cost more than it saves). A compiled graph keeps its
  intermediate buffers, so the graphs' memory grows with the number of distinct slab shapes (docs/vae.md). All
  paths match torch / ``ops.conv3d`` to ~1e-6 relative in fp32 (tests/test_ops_conv.py).
* ``pad``: constant / replicate by one concatenation per axis (``mint`` replicate pad SEGFAULTs under jit on CPU,
  ``ops.pad`` is slow).
* ``interpolate_nearest`` / ``upsample_causal_nearest``: integer factors, via broadcast + reshape (exactly torch's
  ``nearest``); ``conv3d(upsample=...)`` fuses the causal one into the conv.
* ``group_norm``: ``mint.nn.functional.group_norm`` (CPU and Ascend).

Ascend (bf16; **not verified on hardware**): ``mint.nn.functional.conv3d`` / ``pad`` / ``group_norm``, with the
upsampling and padding applied before the conv.

CPU-bf16 (docs/bf16.md): ``conv3d``, ``pad`` and ``group_norm`` of a bf16 input run their CPU fp32 path on fp32
copies and round the output to bf16 (one rounding per Ascend kernel; padding and upsampling are exact, so fusing
them changes nothing); group norm with ``device.ISLANDS.norm_stats`` off runs as a chain of bf16-rounded ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from . import device as _D
from .bf16 import emulate, f32, is_low, rnd
from .device import BF16_EMU, IS_CPU

__all__ = [
    "conv3d",
    "pad",
    "interpolate_nearest",
    "upsample_causal_nearest",
    "group_norm",
    "ConvSettings",
    "DEFAULT_CONV_SETTINGS",
    "apply_conv_settings",
    "Conv3d",
    "GroupNorm",
]


@dataclass(frozen=True)
class ConvSettings:
    """How the CPU conv3d runs (Ascend ignores it); a model holds one (``model.conv_settings``, set on each of its
    ``Conv3d`` / ``Conv2d`` cells by ``apply_conv_settings``), a functional call takes one as ``settings=``.

    * ``budget_bytes``: what one slab may hold (padded copies, columns, GEMM output); bounds a conv's extra memory.
      Larger slabs are faster (fewer, bigger GEMMs) and each cached slab graph keeps about this much.
    * ``jit``: ``True`` = every slab as a per-shape ``ms.jit`` graph (compiled once per slab shape, then faster than
      op by op for large inputs), ``False`` = op by op, ``"auto"`` = a graph only when the conv costs >=
      ``jit_min_flops``, so small layers (tests, tiny configs) never pay a compilation.

    A whole-model graph (``set_jit(True)``) keeps the settings it was compiled with: choose them before it runs."""

    budget_bytes: int = 512 * 1024**2
    jit: bool | str = "auto"
    jit_min_flops: float = 5e8

    def __post_init__(self):
        if self.jit not in (True, False, "auto"):
            raise ValueError(f"ConvSettings: jit must be True, False or 'auto', got {self.jit!r}")
        if int(self.budget_bytes) < 1:
            raise ValueError(f"ConvSettings: budget_bytes must be >= 1, got {self.budget_bytes!r}")
        object.__setattr__(self, "budget_bytes", int(self.budget_bytes))  # slab counts are integer divisions
        object.__setattr__(self, "jit_min_flops", float(self.jit_min_flops))

    def use_jit(self, flops: float) -> bool:
        """Whether a conv costing `flops` (2 x its multiply-adds) runs as cached slab graphs."""
        return flops >= self.jit_min_flops if self.jit == "auto" else bool(self.jit)


DEFAULT_CONV_SETTINGS = ConvSettings()  # what every conv uses unless a model or a call gives its own


def apply_conv_settings(net, settings: ConvSettings) -> None:
    """Give every conv cell of `net` (``Conv3d``, ``Conv2d``; `net` itself included) these settings, and record them
    on `net` as ``net.conv_settings``."""
    if not isinstance(settings, ConvSettings):
        raise TypeError(f"apply_conv_settings: expected ConvSettings, got {type(settings).__name__}")
    for _, cell in net.cells_and_names():
        if "conv_settings" in cell.__dict__:
            cell.conv_settings = settings
    net.conv_settings = settings


def _triple(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 3:
            raise ValueError(f"expected 3 values, got {v}")
        return tuple(int(i) for i in v)
    return (int(v),) * 3


# ----------------------------------------------------------------------------------------------------------------
# functionals
# ----------------------------------------------------------------------------------------------------------------

_plain = ops.Identity()  # a Parameter's value as a plain Tensor (see `_graph_args`)
_mm = ops.MatMul()  # the primitive: in PyNative far cheaper to dispatch than mint.matmul on CPU
_slice = ops.Slice()  # primitive slice (Tensor.__getitem__ costs milliseconds per call in PyNative)
_strided = ops.StridedSlice()
_addn = ops.AddN()
_gather = ops.Gather()


def _edge(x, axis, start, count, mode, value):
    """`count` copies of x's slice `start` along `axis` (replicate), or a block of `value` of that shape."""
    shape = list(x.shape)
    shape[axis] = 1
    if mode == "replicate":
        begin = [0] * len(shape)
        begin[axis] = start
        e = _slice(x, tuple(begin), tuple(shape))
    else:
        e = ops.fill(x.dtype, tuple(shape), value)
    if count == 1:
        return e
    shape[axis] = count
    return mint.broadcast_to(e, tuple(shape))


def _pad_axis(x, axis, before, after, mode, value=0.0):
    """Pad one axis by one concatenation (a single copy of x; ``ops.pad`` makes many on CPU)."""
    if before == 0 and after == 0:
        return x
    parts = []
    if before:
        parts.append(_edge(x, axis, 0, before, mode, value))
    parts.append(x)
    if after:
        parts.append(_edge(x, axis, x.shape[axis] - 1, after, mode, value))
    return ops.concat(parts, axis)


def _pad_cpu(x, pads, mode, value=0.0):
    for i in range(len(pads) // 2):
        x = _pad_axis(x, x.ndim - 1 - i, pads[2 * i], pads[2 * i + 1], mode, value)
    return x


def pad(x, pads, mode="constant", value=0.0):
    """torch.nn.functional.pad: `pads` from the last axis backwards ((W_l, W_r, H_t, H_b, T_f, T_b) for 5-D).
    CPU: "constant" and "replicate" are one concatenation per padded axis; other modes use ``ops.pad``."""
    pads = tuple(int(p) for p in pads)
    if BF16_EMU and is_low(x):  # exact; the CPU pad builds its edges with fill/gather (no bf16 kernels)
        return pad(f32(x), pads, mode, value).astype(x.dtype)
    if IS_CPU:
        if mode in ("constant", "replicate") and min(pads) >= 0:
            return _pad_cpu(x, pads, mode, value)
        if mode == "constant":
            return ops.pad(x, pads, mode="constant", value=value)
        return ops.pad(x, pads, mode=mode)
    if mode == "constant":
        return mint.nn.functional.pad(x, pads, mode="constant", value=value)
    return mint.nn.functional.pad(x, pads, mode=mode)


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


def upsample_causal_nearest(x, factor):
    """Nearest upsampling of (B, C, T, H, W) by integer (ft, fh, fw) where frame 0 is upsampled in H, W only
    (the causal VAE's upsampler): 1 + ft*(T-1) frames."""
    ft, fh, fw = (int(f) for f in factor)
    t = x.shape[2]
    first = interpolate_nearest(_slice(x, (0, 0, 0, 0, 0), (x.shape[0], x.shape[1], 1, x.shape[3], x.shape[4])),
                                (1, fh, fw))
    if t == 1:
        return first
    rest = _slice(x, (0, 0, 1, 0, 0), (x.shape[0], x.shape[1], t - 1, x.shape[3], x.shape[4]))
    return ops.concat((first, interpolate_nearest(rest, (ft, fh, fw))), 2)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.group_norm: statistics in fp32 (inside the kernel), output in x's dtype."""
    if BF16_EMU and is_low(x):
        if not _D.ISLANDS.norm_stats:
            return _group_norm_bf16_chain(x, num_groups, weight, bias, eps)
        return emulate(mint.nn.functional.group_norm, x, num_groups, weight, bias, eps)
    return mint.nn.functional.group_norm(x, num_groups, weight, bias, eps)


def _group_norm_bf16_chain(x, num_groups, weight, bias, eps):
    """Group norm with its statistics island flipped to bf16: mean, deviation, variance, rstd each rounded."""
    shp = x.shape
    xg = f32(x).reshape(shp[0], num_groups, -1)
    mu = rnd(xg.mean(-1, keep_dims=True))
    d = rnd(xg - mu)
    var = rnd(rnd(d * d).mean(-1, keep_dims=True))
    y = rnd(d * rnd(ops.rsqrt(var + eps))).reshape(shp)
    cshape = (1, shp[1]) + (1,) * (len(shp) - 2)
    if weight is not None:
        y = rnd(y * f32(weight).reshape(cshape))
    if bias is not None:
        y = rnd(y + f32(bias).reshape(cshape))
    return y.astype(x.dtype)




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


def _taps_on_output(ci, co, k):
    """True when putting every tap on the GEMM's output side moves less data than the (T, W)-tap columns
    (few output channels, e.g. the decoder's conv_out to RGB)."""
    kt, kh, kw = k
    return 2 * kt * kh * kw * co < kt * kw * ci + 2 * kh * co


def _s1_weight(weight, full):
    """The stride-1 GEMM's weight: rows (H tap, C_out) x columns (T tap, W tap, C_in), or, with every tap on the
    output side, rows (T, H, W tap, C_out) x columns C_in."""
    co, ci, kt, kh, kw = weight.shape
    if full:
        return weight.transpose(2, 3, 4, 0, 1).reshape(kt * kh * kw * co, ci)
    return weight.transpose(3, 0, 2, 4, 1).reshape(kh * co, kt * kw * ci)


_s1_weight_jit = ms.jit(_s1_weight)  # a graph's transpose is several times faster than PyNative's on big weights


def _slab_s1(x, rows, hp, wz, bias, wpad, fw, k, full):
    """Stride-1 valid conv of one slab of the padded input.

    `x` (C_in, T*H, W) is the whole input; `rows` (int32) lists, frame by frame, the input rows (t*H + h) of the
    slab's padded frames -- indices clamped to the edge give replicate padding, and repeated indices nearest
    upsampling, in T and H for free -- plus one spare frame; `fw` upsamples W (broadcast), `wpad` (W_l, W_r) is
    replicated by concatenation. The slab is flattened over (T, H, W): output position p of tap (a, b, c) reads
    position p + a*S + b*Wp + c (S = Hp*Wp), so every tap is a *contiguous* shifted window. Default: the (a, c) windows are stacked as im2col columns (K = kt*kw*C_in), one GEMM gives kh
    partial outputs (rows (b, C_out)) and the b-th is read shifted by b*Wp -- 3x fewer copied columns than full
    im2col and no halo frames in the GEMM. With every tap on the output side (`full`) there are no columns: one
    GEMM of the flat slab, then kt*kh*kw shifted reads. Windows running past the last frame read the spare frame;
    all such positions (right/bottom padding) are garbage and cropped."""
    kt, kh, kw = k
    ci, _, w = x.shape
    tq = rows.shape[0] // hp  # padded frames + the spare one
    xs = _gather(x, rows, 1)  # (C_in, tq * Hp, W)
    if fw > 1:  # nearest upsampling along W (T and H are in `rows`)
        xs = mint.broadcast_to(xs.reshape(ci, tq * hp, w, 1), (ci, tq * hp, w, fw)).reshape(ci, tq * hp, w * fw)
        w = w * fw
    xs = _pad_axis(xs, 2, wpad[0], wpad[1], "replicate")  # (C_in, tq * Hp, Wp)
    wp = w + wpad[0] + wpad[1]
    s = hp * wp
    to, ho, wo = tq - kt, hp - kh + 1, wp - kw + 1
    n = to * s
    co = wz.shape[0] // (kt * kh * kw) if full else wz.shape[0] // kh
    xf = xs.reshape(ci, tq * s)
    outs = []
    if full:
        z = _mm(wz, xf)
        for a in range(kt):
            for bb in range(kh):
                for c in range(kw):
                    outs.append(_slice(z, (((a * kh + bb) * kw + c) * co, a * s + bb * wp + c), (co, n)))
    else:
        length = n + (kh - 1) * wp
        cols = []
        for a in range(kt):
            for c in range(kw):
                cols.append(_slice(xf, (0, a * s + c), (ci, length)))
        z = _mm(wz, cols[0] if len(cols) == 1 else ops.concat(cols, 0))
        for bb in range(kh):
            outs.append(_slice(z, (bb * co, bb * wp), (co, n)))
    y = outs[0] if len(outs) == 1 else _addn(outs)
    y = _slice(y.reshape(co, to, hp, wp), (0, 0, 0, 0), (co, to, ho, wo))
    if bias is not None:
        y = y + bias.reshape(co, 1, 1, 1)
    return y


_slab_s1_jit = ms.jit(_slab_s1)


def _s1_frame_bytes(ci, co, k, rows, wp, full):
    """Memory of one output frame of `rows` output rows: padded copies, columns, GEMM output, shifted reads."""
    kt, kh, kw = k
    pos = (rows + kh - 1) * wp
    per = 3 * ci + 2 * kt * kh * kw * co + 2 * co if full else 3 * ci + kt * kw * ci + 2 * kh * co + 2 * co
    return 4 * pos * per


def _splits(total, size):
    """[(start, count)] of `total` in near-equal chunks of at most `size` (few distinct shapes = few graphs)."""
    n = -(-total // max(size, 1))
    size = -(-total // n)
    return [(i, min(size, total - i)) for i in range(0, total, size)]


def _slab_rows(t, h, f0, nf, g0, nh, up):
    """int32 row indices (t*H + h) of the input for padded frames f0.. (nf of them, + a spare) x padded rows g0..
    (nh) of the (upsampled) input: clamping is replicate padding, integer division nearest upsampling (`up` =
    (ft, fh), frame 0 not repeated in time)."""
    ft, fh = up
    fr = np.clip(np.arange(f0, f0 + nf + 1), 0, 1 + ft * (t - 1) - 1)
    fr[-1] = fr[-2]  # the spare frame
    if ft > 1:
        fr = np.where(fr == 0, 0, 1 + (fr - 1) // ft)
    hr = np.clip(np.arange(g0, g0 + nh), 0, h * fh - 1) // fh
    return Tensor((fr[:, None] * h + hr[None, :]).reshape(-1).astype(np.int32))


def _conv_s1(x, weight, bias, pads, mode, up, budget, use_jit):
    """Stride-1 conv of `x` causally nearest-upsampled by `up` (ft, fh, fw), then padded by `pads` (F.pad order) in
    `mode`, in slabs of output frames (and rows when one frame exceeds `budget` bytes); each slab gathers its own
    upsampled, padded input (replicate padding by clamped indices; zero padding is applied to the whole input
    first)."""
    if mode == "constant" and any(pads):
        if up != (1, 1, 1):
            x, up = upsample_causal_nearest(x, up), (1, 1, 1)
        x = _pad_cpu(x, pads, "constant")
        pads = (0,) * 6
    bsz, ci, t_in, h_in, w_in = x.shape
    ft, fh, fw = up
    t, h, w = 1 + ft * (t_in - 1), fh * h_in, fw * w_in
    co, _, kt, kh, kw = weight.shape
    wl, wr, ht, hb, tf, tb = pads
    to, ho = t + tf + tb - kt + 1, h + ht + hb - kh + 1
    wp = w + wl + wr
    full = _taps_on_output(ci, co, (kt, kh, kw))
    wz = (_s1_weight_jit if use_jit else _s1_weight)(weight, full)
    per_frame = _s1_frame_bytes(ci, co, (kt, kh, kw), ho, wp, full)
    if per_frame <= budget:
        nt, nr = max(1, budget // per_frame), ho
    else:
        nt, nr = 1, ho
        while nr > 1 and _s1_frame_bytes(ci, co, (kt, kh, kw), nr, wp, full) > budget:
            nr = (nr + 1) // 2
    fn = _slab_s1_jit if use_jit else _slab_s1
    outs = []
    for i in range(bsz):
        xb = (x[i] if bsz > 1 else x).reshape(ci, t_in * h_in, w_in)
        frames = []
        for t0, ct in _splits(to, nt):
            parts = []
            for h0, ch in _splits(ho, nr):
                rows = _slab_rows(t_in, h_in, t0 - tf, ct + kt - 1, h0 - ht, ch + kh - 1, (ft, fh))
                parts.append(fn(xb, rows, ch + kh - 1, wz, bias, (wl, wr), fw, (kt, kh, kw), full))
            frames.append(parts[0] if len(parts) == 1 else ops.concat(parts, 2))
        outs.append(frames[0] if len(frames) == 1 else ops.concat(frames, 1))
    if bsz == 1:
        return outs[0].reshape((1,) + tuple(outs[0].shape))
    return ops.stack(outs, 0)


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


# One small graph per slab shape: compiled once, reused by every slab / layer / call with the same shapes.
_slab_strided_jit = ms.jit(_slab_strided)


def _strided_plan(x_shape, w_shape, stride, budget):
    """(output frames, output rows) per slab of the strided path: its columns stay below `budget` bytes."""
    _, ci, tp, hp, wp = x_shape
    _, _, kt, kh, kw = w_shape
    st, sh, sw = stride
    to, ho, wo = (tp - kt) // st + 1, (hp - kh) // sh + 1, (wp - kw) // sw + 1
    per_row = 4 * ci * 2 * kt * kh * kw * wo  # strided slices + their concat
    if per_row * ho * to <= budget:
        return to, ho
    if per_row * ho <= budget:
        return max(1, budget // (per_row * ho)), ho
    return 1, max(1, budget // per_row)


def _conv_strided(x, weight, bias, stride, budget, use_jit):
    """Strided valid conv as a grid of (output-frames x output-rows) slabs, each one im2col GEMM; the extra memory
    is bounded by `budget` bytes (plus the output)."""
    bsz, ci, tp, hp, wp = x.shape
    _, _, kt, kh, kw = weight.shape
    st, sh, _ = stride
    to, ho = (tp - kt) // st + 1, (hp - kh) // sh + 1
    nt, nr = _strided_plan(x.shape, weight.shape, stride, budget)
    fn = _slab_strided_jit if use_jit else _slab_strided
    if nt >= to and nr >= ho:
        return fn(x, weight, bias, stride)
    rows_t = []
    for t0, ct in _splits(to, nt):
        cols_h = []
        for r0, cr in _splits(ho, nr):
            slab = _slice(x, (0, 0, t0 * st, r0 * sh, 0), (bsz, ci, (ct - 1) * st + kt, (cr - 1) * sh + kh, wp))
            cols_h.append(fn(slab, weight, bias, stride))
        rows_t.append(cols_h[0] if len(cols_h) == 1 else ops.concat(cols_h, 3))
    return rows_t[0] if len(rows_t) == 1 else ops.concat(rows_t, 2)


_conv_1x1_jit = ms.jit(_conv_1x1)


def _graph_args(weight, bias, use_jit):
    """The weight and bias as plain Tensors before they enter a cached slab graph: ``ms.jit`` keys a compiled graph
    on each *Parameter* it is given, so every conv layer compiled a graph of its own, and each graph kept its
    buffers (measured: +90 MB per 512-channel layer of the same shape, ~2.5 GB over a Hunyuan VAE decode; with
    plain Tensors, layers of one shape share a graph). In a whole-model graph ``Identity`` is a no-op."""
    if not use_jit:
        return weight, bias
    return _plain(weight), (None if bias is None else _plain(bias))


def _conv3d_cpu(x, weight, bias, stride, pads, mode, up, budget, use_jit):
    kt, kh, kw = weight.shape[2], weight.shape[3], weight.shape[4]
    fused = stride == (1, 1, 1) and kt * kh * kw > 1
    if fused and all(p < kk for p, kk in zip(pads, (kw, kw, kh, kh, kt, kt))):
        return _conv_s1(x, weight, bias, pads, mode, up, budget, use_jit)
    if up != (1, 1, 1):
        x = upsample_causal_nearest(x, up)
    if any(pads):
        x = _pad_cpu(x, pads, mode)
    if fused:
        return _conv_s1(x, weight, bias, (0,) * 6, "constant", (1, 1, 1), budget, use_jit)
    if kt * kh * kw == 1:
        if stride != (1, 1, 1):
            x = _strided(x, (0, 0, 0, 0, 0), tuple(x.shape), (1, 1) + stride)
        return (_conv_1x1_jit if use_jit else _conv_1x1)(x, weight, bias)
    return _conv_strided(x, weight, bias, stride, budget, use_jit)


def _conv_depthwise(x, weight, bias, stride):
    """Depthwise valid conv of a padded (B, C, Tp, Hp, Wp) input, weight (C, 1, kt, kh, kw): MindSpore's own
    grouped ``Conv3D``: oneDNN has a depthwise kernel, slower than torch's but faster than a tap-sum of shifted
    products (in a graph or op by op), and im2col would cost k^3 times the input (docs/cpu_kernels.md)."""
    y = ops.conv3d(x, weight, None, stride=stride, pad_mode="pad", padding=0, groups=x.shape[1])
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1, 1)
    return y


_bmm = ops.BatchMatMul()


def _conv_1x1_grouped(x, weight, bias, groups):
    """1x1x1 grouped conv: one batched GEMM (groups, C_out/g, C_in/g) x (groups, C_in/g, N) per sample."""
    b, ci = x.shape[0], x.shape[1]
    sp = tuple(x.shape[2:])
    co = weight.shape[0]
    n = sp[0] * sp[1] * sp[2]
    w3 = weight.reshape(groups, co // groups, ci // groups)
    ys = []
    for i in range(b):
        xb = (x[i] if b > 1 else x).reshape(groups, ci // groups, n)
        ys.append(_bmm(w3, xb).reshape(1, co, n))
    y = ys[0] if b == 1 else ops.concat(ys, 0)
    if bias is not None:
        y = y + bias.reshape(1, co, 1)
    return y.reshape((b, co) + sp)


_conv_1x1_grouped_jit = ms.jit(_conv_1x1_grouped)


def _conv3d_grouped_cpu(x, weight, bias, stride, pads, pad_mode, extra, up, groups, settings):
    co, cig, kt, kh, kw = weight.shape
    ci = x.shape[1]
    if ci != cig * groups or co % groups:
        raise ValueError(f"conv3d: groups={groups} does not fit C_in={ci}, weight {tuple(weight.shape)}")
    if up != (1, 1, 1):
        x = upsample_causal_nearest(x, up)
    if pad_mode == "constant":
        pads = tuple(p + e for p, e in zip(pads, extra))
    else:  # replicate first, then the zero `padding`
        if any(pads):
            x = _pad_cpu(x, pads, pad_mode)
        pads = extra
    if any(pads):
        x = _pad_cpu(x, pads, "constant")
    n = x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4]
    use = settings.use_jit(8 * 2.0 * co * cig * kt * kh * kw * n)  # grouped: graphs from 1/8 of the threshold
    weight, bias = _graph_args(weight, bias, use)
    if kt * kh * kw == 1:
        if stride != (1, 1, 1):
            x = _strided(x, (0, 0, 0, 0, 0), tuple(x.shape), (1, 1) + stride)
        return (_conv_1x1_grouped_jit if use else _conv_1x1_grouped)(x, weight, bias, groups)
    if cig == 1 and co == groups:
        return _conv_depthwise(x, weight, bias, stride)
    step_i, step_o = ci // groups, co // groups
    outs = []
    for g in range(groups):
        xg = _slice(x, (0, g * step_i, 0, 0, 0), (x.shape[0], step_i) + tuple(x.shape[2:]))
        wg = _slice(weight, (g * step_o, 0, 0, 0, 0), (step_o, cig, kt, kh, kw))
        bg = None if bias is None else _slice(bias, (g * step_o,), (step_o,))
        outs.append(_conv3d_cpu(xg, wg, bg, stride, (0,) * 6, "constant", (1, 1, 1), settings.budget_bytes, use))
    return ops.concat(outs, 1)


def conv3d(x, weight, bias=None, stride=1, padding=0, pad=None, pad_mode="constant", upsample=None, groups=1,
           settings: ConvSettings | None = None):
    """torch.nn.functional.conv3d (dilation 1, zero `padding`), NCDHW, weight (C_out, C_in, kt, kh, kw),
    of `x` first upsampled by `upsample` (ft, fh, fw; see `upsample_causal_nearest`), then padded by `pad` (F.pad
    order: (W_l, W_r, H_t, H_b, T_f, T_b)) in `pad_mode` ("constant" or "replicate"). On CPU the stride-1 path
    builds each slab's upsampled, padded input itself: neither is ever materialised.
    `groups` as torch (weight (C_out, C_in / groups, ...)); CPU: depthwise (groups = C_in = C_out) through
    MindSpore's grouped kernel, 1x1x1 as one batched GEMM over the groups, anything else group by group through the
    fast paths above. `settings`: how the CPU path runs (`ConvSettings`; None = `DEFAULT_CONV_SETTINGS`)."""
    if BF16_EMU and is_low(x):  # one Ascend conv kernel: fp32 accumulation, bf16 out
        return conv3d(f32(x), f32(weight), f32(bias), stride, padding, pad, pad_mode, upsample, groups,
                      settings).astype(x.dtype)
    settings = DEFAULT_CONV_SETTINGS if settings is None else settings
    groups = int(groups)
    up = _triple(upsample) if upsample is not None else (1, 1, 1)
    stride = _triple(stride)
    padding = _triple(padding)
    extra = (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0])
    pads = tuple(int(p) for p in pad) if pad is not None else (0,) * 6
    if len(pads) != 6 or min(pads) < 0:
        raise ValueError(f"conv3d: pad must be 6 non-negative ints (W_l, W_r, H_t, H_b, T_f, T_b), got {pad}")
    if pad_mode not in ("constant", "replicate"):
        raise ValueError(f"conv3d: pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
    if not IS_CPU:
        if up != (1, 1, 1):
            x = upsample_causal_nearest(x, up)
        if any(pads):
            x = mint.nn.functional.pad(x, pads, mode=pad_mode)
        return mint.nn.functional.conv3d(x, weight, bias, stride, padding, 1, groups)
    if groups != 1:
        return _conv3d_grouped_cpu(x, weight, bias, stride, pads, pad_mode, extra, up, groups, settings)
    if any(extra):
        if pad_mode == "constant" or not any(pads):
            pads, pad_mode = tuple(p + e for p, e in zip(pads, extra)), "constant"
        else:  # replicate first, then zeros: two different paddings, materialise the first
            if up != (1, 1, 1):
                x, up = upsample_causal_nearest(x, up), (1, 1, 1)
            x, pads, pad_mode = _pad_cpu(x, pads, pad_mode), extra, "constant"
    co, ci, kt, kh, kw = weight.shape
    n = x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4] * up[0] * up[1] * up[2]  # ~ output positions
    use = settings.use_jit(2.0 * co * ci * kt * kh * kw * n)
    weight, bias = _graph_args(weight, bias, use)
    return _conv3d_cpu(x, weight, bias, stride, pads, pad_mode, up, settings.budget_bytes, use)


# ----------------------------------------------------------------------------------------------------------------
# cells (torch parameter names)
# ----------------------------------------------------------------------------------------------------------------


class Conv3d(nn.Cell):
    """torch.nn.Conv3d (zero padding): `weight` (C_out, C_in / groups, kt, kh, kw), `bias` (C_out).
    `upsample`, `pad` / `pad_mode`: a causal nearest upsampling and an F.pad the cell applies to its input first (see
    `conv3d`); torch does both outside the conv, here the CPU kernel fuses them. The output is the same.
    `conv_settings`: how the CPU conv runs (`ConvSettings`; models set it with `apply_conv_settings`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype=ms.float32,
                 pad=None, pad_mode="constant", upsample=None, groups=1, conv_settings: ConvSettings | None = None):
        super().__init__()
        self.conv_settings = DEFAULT_CONV_SETTINGS if conv_settings is None else conv_settings
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv3d: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.groups = int(groups)
        self.pad = tuple(int(p) for p in pad) if pad is not None else None
        self.pad_mode = pad_mode
        self.upsample = tuple(int(f) for f in upsample) if upsample is not None else None
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.weight = Parameter(initializer("normal", (out_channels, in_channels // self.groups) + self.kernel_size, dtype))
        self.bias = Parameter(initializer("zeros", (out_channels,), dtype)) if bias else None

    def construct(self, x):
        return conv3d(x, self.weight, self.bias, self.stride, self.padding, self.pad, self.pad_mode, self.upsample,
                      self.groups, self.conv_settings)


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
