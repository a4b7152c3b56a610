"""The conv op layer (opensora_ms/ops/conv.py): fast CPU conv3d vs `ops.conv3d`, pad / nearest / group norm vs torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mindspore as ms
from mindspore import Tensor, ops

from opensora_ms.ops import conv as oc

rng = np.random.default_rng(0)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# (x shape, weight shape, stride, padding)
CONV_CASES = [
    ((1, 8, 5, 6, 7), (16, 8, 3, 3, 3), 1, 0),
    ((2, 4, 4, 5, 6), (6, 4, 3, 3, 3), 1, 1),
    ((1, 3, 6, 9, 8), (5, 3, 3, 3, 3), (1, 2, 2), 0),
    ((1, 6, 7, 9, 9), (6, 6, 3, 3, 3), (2, 2, 2), 0),
    ((2, 5, 3, 4, 5), (7, 5, 1, 1, 1), 1, 0),
    ((1, 4, 5, 7, 6), (3, 4, 1, 3, 3), 1, (0, 1, 1)),
    ((1, 4, 6, 6, 6), (4, 4, 2, 3, 1), (2, 1, 1), (0, 1, 0)),
    ((1, 16, 3, 10, 10), (8, 16, 3, 3, 3), 1, 0),
]


def f_conv(x, w, b, stride, padding):
    return oc.conv3d(x, w, b, stride, padding)


def ref_conv(x, w, b, stride, padding):
    # MindSpore's own kernel: pad 6-tuple (front, back, top, bottom, left, right)
    p = oc._triple(padding)
    return ops.conv3d(x, w, b, stride=oc._triple(stride), pad_mode="pad", padding=p)


@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("xs,ws,stride,padding", CONV_CASES)
def test_conv3d_matches_ops_conv3d(xs, ws, stride, padding, mode):
    x, w, b = Tensor(r(*xs)), Tensor(r(*ws)), Tensor(r(ws[0]))
    want = ref_conv(x, w, b, stride, padding).asnumpy()
    fn = ms.jit(f_conv) if mode == "jit" else f_conv
    got = fn(x, w, b, stride, padding).asnumpy()
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-5
    # and torch agrees too
    tw = F.conv3d(torch.from_numpy(x.asnumpy()), torch.from_numpy(w.asnumpy()), torch.from_numpy(b.asnumpy()),
                  stride=stride, padding=padding).numpy()
    assert rel(got, tw) <= 1e-5


def test_conv3d_chunked_equals_unchunked():
    """A tiny column budget forces many chunks (positions for stride 1, frames for strided) — same result."""
    x, w, b = Tensor(r(1, 8, 5, 9, 10)), Tensor(r(6, 8, 3, 3, 3)), Tensor(r(6))
    full = oc.conv3d(x, w, b).asnumpy()
    fs = oc.conv3d(x, w, b, (2, 2, 2)).asnumpy()
    tiny = oc.ConvSettings(budget_bytes=1)
    assert rel(oc.conv3d(x, w, b, settings=tiny).asnumpy(), full) <= 1e-6
    assert rel(oc.conv3d(x, w, b, (2, 2, 2), settings=tiny).asnumpy(), fs) <= 1e-6
    assert rel(full, ref_conv(x, w, b, 1, 0).asnumpy()) <= 1e-5


def f_pad_rep(x):
    return oc.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate")


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_replicate_pad(mode):
    x = r(1, 3, 4, 5, 6)
    fn = ms.jit(f_pad_rep) if mode == "jit" else f_pad_rep
    got = fn(Tensor(x)).asnumpy()
    want = F.pad(torch.from_numpy(x), (1, 1, 1, 1, 2, 0), mode="replicate").numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2), (2, 2)])
def test_interpolate_nearest(factor):
    x = r(1, 3, 3, 4, 5) if len(factor) == 3 else r(1, 3, 4, 5)
    got = oc.interpolate_nearest(Tensor(x), factor).asnumpy()
    want = F.interpolate(torch.from_numpy(x), scale_factor=factor, mode="nearest").numpy()
    assert np.array_equal(got, want)


def test_group_norm_cell():
    x = r(2, 8, 3, 4, 5)
    gn = oc.GroupNorm(4, 8, eps=1e-6)
    w, b = r(8), r(8)
    gn.weight.set_data(Tensor(w))
    gn.bias.set_data(Tensor(b))
    got = gn(Tensor(x)).asnumpy()
    want = F.group_norm(torch.from_numpy(x), 4, torch.from_numpy(w), torch.from_numpy(b), 1e-6).numpy()
    assert rel(got, want) <= 1e-5
    assert [n for n, _ in gn.parameters_and_names()] == ["weight", "bias"]


def test_conv3d_cell_names():
    c = oc.Conv3d(4, 6, 3, bias=True)
    assert [(n, tuple(p.shape)) for n, p in c.parameters_and_names()] == [("weight", (6, 4, 3, 3, 3)), ("bias", (6,))]


# (x shape, weight shape, pad (W_l, W_r, H_t, H_b, T_f, T_b), mode): the fused F.pad of the causal convs,
# incl. few output channels (every tap on the GEMM's output side) and pads as large as the kernel allows
FUSED_CASES = [
    ((1, 8, 5, 6, 7), (16, 8, 3, 3, 3), (1, 1, 1, 1, 2, 0), "replicate"),
    ((2, 32, 3, 5, 4), (2, 32, 3, 3, 3), (1, 1, 1, 1, 2, 0), "replicate"),
    ((1, 4, 1, 4, 5), (6, 4, 3, 3, 3), (1, 1, 1, 1, 2, 0), "replicate"),
    ((1, 5, 4, 5, 6), (7, 5, 3, 3, 3), (2, 0, 0, 2, 1, 2), "constant"),
    ((1, 5, 4, 5, 6), (7, 5, 3, 3, 3), (2, 0, 0, 2, 1, 2), "replicate"),
    ((1, 4, 3, 4, 4), (5, 4, 3, 3, 3), (3, 3, 1, 1, 2, 0), "replicate"),  # pad >= kernel: materialised first
]


def f_conv_pad(x, w, b, pads, mode, settings):
    return oc.conv3d(x, w, b, pad=pads, pad_mode=mode, settings=settings)


@pytest.mark.parametrize("budget", [None, 1])
@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("xs,ws,pads,pad_mode", FUSED_CASES)
def test_conv3d_fused_pad_matches_torch(xs, ws, pads, pad_mode, mode, budget):
    """conv3d(pad=, pad_mode=) == torch F.pad then F.conv3d, whole and in one-row slabs (budget 1)."""
    x, w, b = r(*xs), r(*ws), r(ws[0])
    want = F.conv3d(F.pad(torch.from_numpy(x), pads, mode=pad_mode), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    fn = ms.jit(f_conv_pad) if mode == "jit" else f_conv_pad
    settings = oc.ConvSettings(budget_bytes=budget) if budget else oc.DEFAULT_CONV_SETTINGS
    got = fn(Tensor(x), Tensor(w), Tensor(b), pads, pad_mode, settings).asnumpy()
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-5


def test_fused_path_choice():
    """Few output channels put every tap on the GEMM's output side (no im2col columns)."""
    assert oc._taps_on_output(32, 2, (3, 3, 3)) and oc._taps_on_output(128, 3, (3, 3, 3))
    assert not oc._taps_on_output(128, 128, (3, 3, 3)) and not oc._taps_on_output(16, 512, (3, 3, 3))


@pytest.mark.parametrize("graphs", [False, True])
def test_conv3d_fused_without_bias(graphs):
    """No bias, through the op-by-op and the cached-graph slab paths (both compositions of the same code)."""
    x, w = r(1, 6, 3, 5, 4), r(4, 6, 3, 3, 3)
    pads = (1, 1, 1, 1, 2, 0)
    want = F.conv3d(F.pad(torch.from_numpy(x), pads, mode="replicate"), torch.from_numpy(w)).numpy()
    got = oc.conv3d(Tensor(x), Tensor(w), None, pad=pads, pad_mode="replicate",
                    settings=oc.ConvSettings(jit=graphs)).asnumpy()
    assert rel(got, want) <= 1e-5


def test_conv3d_bad_pad_is_a_clear_error():
    x, w = Tensor(r(1, 2, 3, 4, 4)), Tensor(r(2, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="pad must be 6"):
        oc.conv3d(x, w, pad=(1, 1))
    with pytest.raises(ValueError, match="pad_mode"):
        oc.conv3d(x, w, pad=(1,) * 6, pad_mode="reflect")


def test_pad_constant_value():
    x = r(1, 2, 3, 4, 5)
    got = oc.pad(Tensor(x), (1, 2, 0, 1, 2, 0), mode="constant", value=1.5).asnumpy()
    want = F.pad(torch.from_numpy(x), (1, 2, 0, 1, 2, 0), mode="constant", value=1.5).numpy()
    assert np.array_equal(got, want)


def torch_causal_upsample(x, f):
    first = F.interpolate(x[:, :, :1], scale_factor=(1, f[1], f[2]), mode="nearest")
    if x.shape[2] == 1:
        return first
    return torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=f, mode="nearest")], 2)


@pytest.mark.parametrize("budget", [None, 1])
@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("xs,ws,up,pad_mode", [
    ((1, 6, 3, 4, 5), (8, 6, 3, 3, 3), (2, 2, 2), "replicate"),
    ((1, 6, 1, 4, 3), (8, 6, 3, 3, 3), (2, 2, 2), "replicate"),
    ((2, 5, 2, 3, 4), (4, 5, 3, 3, 3), (1, 2, 2), "replicate"),
    ((1, 16, 3, 4, 4), (2, 16, 3, 3, 3), (2, 1, 2), "replicate"),
    ((1, 4, 3, 3, 4), (5, 4, 3, 3, 3), (2, 2, 2), "constant"),
])
def test_conv3d_fused_upsample_matches_torch(xs, ws, up, pad_mode, mode, budget):
    """conv3d(upsample=, pad=) == torch causal nearest upsampling (frame 0 in H, W only), F.pad, F.conv3d."""
    x, w, b = r(*xs), r(*ws), r(ws[0])
    pads = (1, 1, 1, 1, 2, 0)
    xt = torch_causal_upsample(torch.from_numpy(x), up)
    want = F.conv3d(F.pad(xt, pads, mode=pad_mode), torch.from_numpy(w), torch.from_numpy(b)).numpy()

    settings = oc.ConvSettings(budget_bytes=budget) if budget else oc.DEFAULT_CONV_SETTINGS

    def f(x_, w_, b_):
        return oc.conv3d(x_, w_, b_, pad=pads, pad_mode=pad_mode, upsample=up, settings=settings)

    fn = ms.jit(f) if mode == "jit" else f
    got = fn(Tensor(x), Tensor(w), Tensor(b)).asnumpy()
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-5
    assert np.array_equal(oc.upsample_causal_nearest(Tensor(x), up).asnumpy(), xt.numpy())


# ------------------------------------------------------------------------------------------------ groups
# (x shape, weight shape, stride, padding, groups): depthwise k3 / k5 (LiteMLA aggregation, GLUMBConv), grouped
# 1x1x1 (LiteMLA's per-head mix), a general grouped conv (2 input channels per group), strided depthwise
GROUP_CASES = [
    ((1, 6, 4, 5, 6), (6, 1, 3, 3, 3), 1, 1, 6),
    ((2, 4, 3, 6, 5), (4, 1, 5, 5, 5), 1, 2, 4),
    ((1, 12, 3, 4, 5), (12, 4, 1, 1, 1), 1, 0, 3),
    ((2, 6, 2, 3, 3), (6, 2, 1, 1, 1), 1, 0, 3),
    ((1, 4, 5, 6, 7), (6, 2, 3, 3, 3), 1, 1, 2),
    ((1, 6, 6, 7, 8), (6, 1, 3, 3, 3), (2, 2, 2), 1, 6),
]


# depthwise runs MindSpore's own kernel either way; the GEMM paths also run as cached graphs
GROUP_RUNS = [(*c, m) for c in GROUP_CASES for m in (("pynative",) if c[1][1] == 1 else ("pynative", "jit"))]


@pytest.mark.parametrize("xs,ws,stride,padding,groups,mode", GROUP_RUNS)
def test_conv3d_groups_matches_torch(xs, ws, stride, padding, groups, mode):
    x, w, b = r(*xs), r(*ws), r(ws[0])
    want = F.conv3d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), oc._triple(stride),
                    oc._triple(padding), groups=groups).numpy()
    settings = oc.ConvSettings(jit=mode == "jit")
    got = oc.conv3d(Tensor(x), Tensor(w), Tensor(b), stride, padding, groups=groups, settings=settings).asnumpy()
    got_nb = oc.conv3d(Tensor(x), Tensor(w), None, stride, padding, groups=groups, settings=settings).asnumpy()
    assert got.shape == want.shape
    assert rel(got, want) < 1e-5
    want_nb = F.conv3d(torch.from_numpy(x), torch.from_numpy(w), None, oc._triple(stride), oc._triple(padding),
                       groups=groups).numpy()
    assert rel(got_nb, want_nb) < 1e-5


def test_conv3d_groups_with_replicate_pad_and_cell():
    x, w = r(1, 4, 3, 5, 5), r(4, 1, 3, 3, 3)
    want = F.conv3d(F.pad(torch.from_numpy(x), (1, 1, 1, 1, 2, 0), mode="replicate"), torch.from_numpy(w),
                    groups=4).numpy()
    got = oc.conv3d(Tensor(x), Tensor(w), None, pad=(1, 1, 1, 1, 2, 0), pad_mode="replicate", groups=4).asnumpy()
    assert rel(got, want) < 1e-5
    cell = oc.Conv3d(8, 8, 5, padding=2, groups=8, bias=False)
    assert tuple(cell.weight.shape) == (8, 1, 5, 5, 5) and cell.bias is None
    assert [n for n, _ in cell.parameters_and_names()] == ["weight"]
    with pytest.raises(ValueError):
        oc.Conv3d(6, 8, 3, groups=4)
    with pytest.raises(ValueError):
        oc.conv3d(Tensor(r(1, 6, 2, 3, 3)), Tensor(r(6, 1, 1, 1, 1)), groups=4)


def test_conv_settings_are_per_call_and_per_cell(monkeypatch):
    """The CPU conv's settings are arguments, not module state: two cells with different budgets in one process
    each slab by their own (counted slab calls), a model hands one instance to every conv cell, bad values raise."""
    calls = []
    real = oc._slab_s1
    monkeypatch.setattr(oc, "_slab_s1", lambda *a: calls.append(1) or real(*a))
    x = Tensor(r(1, 4, 3, 5, 6))
    small = oc.Conv3d(4, 4, 3, pad=(1, 1, 1, 1, 2, 0), pad_mode="replicate",
                      conv_settings=oc.ConvSettings(budget_bytes=1, jit=False))
    whole = oc.Conv3d(4, 4, 3, pad=(1, 1, 1, 1, 2, 0), pad_mode="replicate", conv_settings=oc.ConvSettings(jit=False))
    whole.weight.set_data(small.weight.data)
    a = small(x).asnumpy()
    n_small = len(calls)
    b = whole(x).asnumpy()
    assert n_small == 3 * 5 and len(calls) - n_small == 1  # one slab per output row vs one for the whole conv
    assert rel(a, b) <= 1e-6
    assert not any(hasattr(oc, n) for n in ("set_cpu_conv_budget", "set_cpu_conv_jit", "_BUDGET", "_USE_JIT"))

    net = ms.nn.SequentialCell([oc.Conv3d(4, 4, 3), ms.nn.SequentialCell([oc.Conv3d(4, 4, 1)])])
    s = oc.ConvSettings(budget_bytes=1 << 20, jit=True)
    oc.apply_conv_settings(net, s)
    assert net.conv_settings is s and all(c.conv_settings is s for c in (net[0], net[1][0]))
    with pytest.raises(ValueError, match="jit must be"):
        oc.ConvSettings(jit="sometimes")
    with pytest.raises(ValueError, match="budget_bytes"):
        oc.ConvSettings(budget_bytes=0)
