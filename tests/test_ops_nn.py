"""The op layer (opensora_ms/ops/nn.py) against torch, fp32 CPU, PyNative and ms.jit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mindspore as ms
from mindspore import Tensor

from opensora_ms.ops import nn as onn

rng = np.random.default_rng(0)


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _run(fn, *args, mode):
    targs = [Tensor(a) if isinstance(a, np.ndarray) else a for a in args]
    if mode == "jit":
        fn = ms.jit(fn)
    out = fn(*targs)
    if isinstance(out, tuple):
        return [o.asnumpy() for o in out]
    return out.asnumpy()


def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


MODES = ["pynative", "jit"]


# jit parses source: named module-level functions only (no inline lambdas)
def f_lin_b(x, w, b):
    return onn.linear(x, w, b)


def f_lin(x, w):
    return onn.linear(x, w)


def f_gelu_tanh(x):
    return onn.gelu(x, "tanh")


def f_gelu_none(x):
    return onn.gelu(x, "none")


def f_ln(x):
    return onn.layer_norm(x, eps=1e-6)


def f_ln_aff(x, w, b):
    return onn.layer_norm(x, w, b, 1e-5)


def f_rms(x, w):
    return onn.rms_norm(x, w, 1e-6)


def f_attn_mask(q, k, v, m):
    return onn.attention(q, k, v, m)


def f_attn_scale(q, k, v):
    return onn.attention(q, k, v, scale=0.3)


def f_rope(x, ids):
    cos, sin = onn.rope_tables(ids, [8, 12, 12], 10000)
    return onn.apply_rope(x, cos, sin)


def f_rope_int(x, ch, sh):
    return onn.apply_rope_interleaved(x, ch, sh)


@pytest.mark.parametrize("mode", MODES)
def test_linear(mode):
    x, w, b = r(2, 5, 8), r(6, 8), r(6)
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    assert _rel(_run(f_lin_b, x, w, b, mode=mode), ref) < 1e-6
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    assert _rel(_run(f_lin, x, w, mode=mode), ref) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_activations(mode):
    x = r(3, 7, 16) * 3
    t = torch.from_numpy(x)
    assert _rel(_run(onn.silu, x, mode=mode), F.silu(t).numpy()) < 1e-6
    assert _rel(_run(f_gelu_tanh, x, mode=mode), F.gelu(t, approximate="tanh").numpy()) < 1e-6
    assert _rel(_run(f_gelu_none, x, mode=mode), F.gelu(t).numpy()) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_norms(mode):
    x = r(2, 9, 32) * 2 + 0.5
    w, b = 1 + 0.1 * r(32), r(32)
    t = torch.from_numpy(x)
    ref = F.layer_norm(t, (32,), None, None, 1e-6).numpy()
    assert _rel(_run(f_ln, x, mode=mode), ref) < 2e-6
    ref = F.layer_norm(t, (32,), torch.from_numpy(w), torch.from_numpy(b), 1e-5).numpy()
    assert _rel(_run(f_ln_aff, x, w, b, mode=mode), ref) < 2e-6
    ref = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.from_numpy(w)).numpy()
    assert _rel(_run(f_rms, x, w, mode=mode), ref) < 2e-6


@pytest.mark.parametrize("mode", MODES)
def test_cells(mode):
    x = r(2, 4, 8)
    lin = onn.Linear(8, 5)
    assert [n for n, _ in lin.parameters_and_names()] == ["weight", "bias"]
    assert tuple(lin.weight.shape) == (5, 8)
    assert [n for n, _ in onn.Linear(8, 5, bias=False).parameters_and_names()] == ["weight"]
    ln = onn.LayerNorm(8, eps=1e-6, elementwise_affine=False)
    assert list(ln.parameters_and_names()) == []
    assert [n for n, _ in onn.LayerNorm(8).parameters_and_names()] == ["weight", "bias"]
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(lin.weight.asnumpy()), torch.from_numpy(lin.bias.asnumpy()))
    assert _rel(_run(lin, x, mode=mode), ref.numpy()) < 1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_attention(mode, masked):
    q, k, v = r(2, 3, 10, 16), r(2, 3, 12, 16), r(2, 3, 12, 16)
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    if masked:
        m = np.where(rng.random((2, 1, 10, 12)) < 0.3, -1e9, 0.0).astype(np.float32)
        ref = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(m)).numpy()
        out = _run(f_attn_mask, q, k, v, m, mode=mode)
    else:
        ref = F.scaled_dot_product_attention(tq, tk, tv, scale=0.3).numpy()
        out = _run(f_attn_scale, q, k, v, mode=mode)
    assert out.shape == (2, 3, 10, 16)
    assert _rel(out, ref) < 2e-6


def _torch_rotate_half_tables(ids, axes_dim, theta):
    # liger / LigerEmbedND: fp32 omega per axis, cos/sin of pos*omega, cat over axes, repeated twice
    cos, sin = [], []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = ids[..., i:i + 1].double() * omega
        cos.append(torch.cos(ang))
        sin.append(torch.sin(ang))
    c = torch.cat(cos, -1).float()
    s = torch.cat(sin, -1).float()
    return c, s


@pytest.mark.parametrize("mode", MODES)
def test_rope_rotate_half_and_interleaved(mode):
    axes = [8, 12, 12]
    D = sum(axes)
    B, H, L = 2, 3, 7
    ids = rng.integers(0, 9, size=(B, L, 3)).astype(np.float32)
    x = r(B, H, L, D)
    c, s = _torch_rotate_half_tables(torch.from_numpy(ids), axes, 10000)  # (B, L, D/2)
    tx = torch.from_numpy(x)
    c4, s4 = c[:, None], s[:, None]
    x1, x2 = tx[..., : D // 2], tx[..., D // 2:]
    ref_half = torch.cat([x1 * c4 - x2 * s4, x2 * c4 + x1 * s4], -1).numpy()

    assert _rel(_run(f_rope, x, ids, mode=mode), ref_half) < 2e-6

    xr = tx.reshape(B, H, L, D // 2, 2)
    ref_int = torch.stack([xr[..., 0] * c4 - xr[..., 1] * s4, xr[..., 0] * s4 + xr[..., 1] * c4], -1).reshape(x.shape)

    out = _run(f_rope_int, x, c4.numpy(), s4.numpy(), mode=mode)
    assert _rel(out, ref_int.numpy()) < 2e-6
