"""MindSpore port of Open-Sora 2.0's MMDiT (one implementation for the Open-Sora v2, high-compression and FLUX.1-dev
layouts).

MindSpore parameter layout (docs/architecture.md): fused `img_attn.qkv` / `txt_attn.qkv` in double blocks and fused
`linear1` (= q, k, v, mlp_in) in single blocks, and **rotate-half RoPE** (Open-Sora v2's convention) for every
checkpoint. Every other parameter name equals upstream's. The mappings carry the differences:
`mappings/mmdit_opensora_v2.yaml` (unfused q/k/v -> concat; also the high-compression checkpoint) and
`mappings/mmdit_flux_dev.yaml` (fused, interleaved RoPE -> per-head row permutation of the q and k parts and of
the QK-norm scales).

Submodule names mirror upstream so per-layer outputs align by path (`double_blocks.0.img_mod.lin`,
`img_attn.norm.query_norm`, `img_mlp.0/1/2`, `final_layer.adaLN_modulation.1`, ...). Blocks return tuples like
upstream (the double block returns (img, txt)); `Modulation` returns the flat tuple (shift1, scale1, gate1[, shift2,
scale2, gate2]), each (B, 1, hidden). Layouts inside attention: q/k/v and the QK-norm outputs are (B, H, L, D).

Precision: CPU runs fp32 (the only dtype MindSpore's CPU kernels compute). On Ascend the model is built in bf16 and
keeps upstream's fp32 islands: the timestep embedding (1000*t in the model dtype -> the bf16 double rounding of
SPEC §g, then fp32 cos/sin), RoPE tables and rotation in fp32, QK RMSNorm statistics in fp32 (llama casting); the
attention kernel is `ops.flash_attention_score` via the op layer. The Ascend branch is not verified on hardware.

Everything goes through `opensora_ms.ops.nn`; this file calls no kernel with a CPU problem directly.
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn, ops

from ..ops import nn as onn
from ..configs import MMDiTConfig

__all__ = ["MMDiTConfig", "MMDiTModel", "build", "param_inventory", "jit_forward", "INPUT_NAMES"]

INPUT_NAMES = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y_vec", "cond", "guidance")


def _timestep_freqs(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """exp(-ln(max_period) * arange(half) / half), with upstream's fp32 rounding of each step."""
    half = dim // 2
    a = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    a = (a / np.float32(half)).astype(np.float32)
    return np.exp(a.astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------------


_T_FREQS = Tensor(_timestep_freqs(256)[None, :])


def timestep_embedding(t, dtype=ms.float32, time_factor: float = 1000.0):
    """Sinusoidal embedding (dim 256, cos first). `time_factor * t` runs in the model dtype (the bf16 double rounding
    of SPEC §g on Ascend), the arguments and cos/sin in fp32; the result is cast to the model dtype."""
    t = t.astype(dtype) * time_factor
    args = t.astype(ms.float32)[:, None] * _T_FREQS
    emb = mint.cat((ops.cos(args), ops.sin(args)), -1)
    return emb.astype(dtype)


class MLPEmbedder(nn.Cell):
    def __init__(self, in_dim: int, hidden_dim: int, dtype=ms.float32):
        super().__init__()
        self.in_layer = onn.Linear(in_dim, hidden_dim, bias=True, dtype=dtype)
        self.silu = onn.SiLU()
        self.out_layer = onn.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype)

    def construct(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class QKRMSNorm(nn.Cell):
    """Upstream `FusedRMSNorm`: learnable `scale` [head_dim], eps 1e-6, llama casting (fp32 statistics)."""

    def __init__(self, dim: int, dtype=ms.float32):
        super().__init__()
        self.scale = ms.Parameter(ms.common.initializer.initializer("ones", (dim,), dtype))

    def construct(self, x):
        return onn.rms_norm(x, self.scale, 1e-6)


class QKNorm(nn.Cell):
    def __init__(self, dim: int, dtype=ms.float32):
        super().__init__()
        self.query_norm = QKRMSNorm(dim, dtype)
        self.key_norm = QKRMSNorm(dim, dtype)

    def construct(self, q, k):
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Cell):
    """Parameter container (fused `qkv`, `norm`, `proj`); the blocks drive the submodules."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, dtype=ms.float32):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = onn.Linear(dim, dim * 3, bias=qkv_bias, dtype=dtype)
        self.norm = QKNorm(self.head_dim, dtype)
        self.proj = onn.Linear(dim, dim, bias=True, dtype=dtype)

    def qkv_heads(self, x):
        """x (B, L, C) -> normalised q, k and v, each (B, H, L, D)."""
        q, k, v = _split_heads(self.qkv(x), self.num_heads, self.head_dim)
        q, k = self.norm(q, k)
        return q, k, v


class Modulation(nn.Cell):
    """silu(vec) -> Linear -> (B, 1, n*dim) holding (shift1, scale1, gate1[, shift2, scale2, gate2]) along the last
    axis; the blocks split it with one op. (Upstream returns two `ModulationOut` dataclasses -- MindSpore graphs
    cannot return namedtuples; the mapping's `align:` concatenates upstream's six (three) hooks on the last axis.)"""

    def __init__(self, dim: int, double: bool, dtype=ms.float32):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = onn.Linear(dim, self.multiplier * dim, bias=True, dtype=dtype)

    def construct(self, vec):
        return self.lin(onn.silu(vec)).unsqueeze(1)


def _split_heads(qkv, num_heads, head_dim):
    """(B, L, 3*H*D) -> q, k, v each (B, H, L, D) (upstream's `B L (K H D) -> K B H L D`).

    One permute, then `ops.split` on the leading axis: on MindSpore CPU, indexing `x[0]` of a permuted tensor under
    jit costs several times the split (docs/cpu_kernels.md)."""
    b, l, _ = qkv.shape
    x = qkv.reshape(b, l, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = ops.split(x, 1, 0)
    shp = (b, num_heads, l, head_dim)
    return q.reshape(shp), k.reshape(shp), v.reshape(shp)


def _joint_attention(q, k, v, cos, sin):
    """RoPE (rotate-half, tables with folded sign) then attention; (B, H, L, D) -> (B, L, H*D)."""
    q = onn.apply_rope(q, cos, sin)
    k = onn.apply_rope(k, cos, sin)
    x = onn.attention(q, k, v)
    b, h, l, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, l, h * d)


class DoubleStreamBlock(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, dtype=ms.float32):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size

        self.img_mod = Modulation(hidden_size, True, dtype)
        self.img_norm1 = onn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, dtype)
        self.img_norm2 = onn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.img_mlp = nn.SequentialCell([
            onn.Linear(hidden_size, mlp_hidden, dtype=dtype),
            onn.GELU("tanh"),
            onn.Linear(mlp_hidden, hidden_size, dtype=dtype),
        ])

        self.txt_mod = Modulation(hidden_size, True, dtype)
        self.txt_norm1 = onn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, dtype)
        self.txt_norm2 = onn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.txt_mlp = nn.SequentialCell([
            onn.Linear(hidden_size, mlp_hidden, dtype=dtype),
            onn.GELU("tanh"),
            onn.Linear(mlp_hidden, hidden_size, dtype=dtype),
        ])

    def construct(self, img, txt, vec, cos, sin):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = ops.split(self.img_mod(vec), self.hidden_size, -1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = ops.split(self.txt_mod(vec), self.hidden_size, -1)

        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + i_scale1) * self.img_norm1(img) + i_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + t_scale1) * self.txt_norm1(txt) + t_shift1)

        # joint attention, text first
        q = mint.cat((txt_q, img_q), 2)
        k = mint.cat((txt_k, img_k), 2)
        v = mint.cat((txt_v, img_v), 2)
        attn = _joint_attention(q, k, v, cos, sin)
        n_txt = txt.shape[1]
        txt_attn = attn[:, :n_txt]
        img_attn = attn[:, n_txt:]

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * self.img_norm2(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * self.txt_norm2(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dtype=ms.float32):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = onn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim, dtype=dtype)
        self.linear2 = onn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, dtype=dtype)
        self.norm = QKNorm(self.head_dim, dtype)
        self.pre_norm = onn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp_act = onn.GELU("tanh")
        self.modulation = Modulation(hidden_size, False, dtype)

    def construct(self, x, vec, cos, sin):
        shift, scale, gate = ops.split(self.modulation(vec), self.hidden_size, -1)
        x_mod = (1 + scale) * self.pre_norm(x) + shift
        qkv, mlp = ops.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], -1)
        q, k, v = _split_heads(qkv, self.num_heads, self.head_dim)
        q, k = self.norm(q, k)
        attn = _joint_attention(q, k, v, cos, sin)
        out = self.linear2(mint.cat((attn, self.mlp_act(mlp)), 2))
        return x + gate * out


class LastLayer(nn.Cell):
    def __init__(self, hidden_size: int, out_channels: int, dtype=ms.float32):
        super().__init__()
        self.norm_final = onn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = onn.Linear(hidden_size, out_channels, bias=True, dtype=dtype)
        self.adaLN_modulation = nn.SequentialCell([onn.SiLU(), onn.Linear(hidden_size, 2 * hidden_size, dtype=dtype)])

    def construct(self, x, vec):
        shift, scale = mint.chunk(self.adaLN_modulation(vec), 2, 1)
        x = (1 + scale.unsqueeze(1)) * self.norm_final(x) + shift.unsqueeze(1)
        return self.linear(x)


class RoPEEmbedder(nn.Cell):
    """Position ids (B, L, n_axes) -> rotate-half (cos, sin), each (B, L, D) fp32 (upstream `LigerEmbedND` layout)."""

    def __init__(self, theta, axes_dim):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)
        self.freqs = Tensor(onn.rope_freq_matrix(self.axes_dim, theta))  # constant, not a Parameter

    def construct(self, ids):
        return onn.rope_cos_sin(ids, self.axes_dim, self.theta, self.freqs)


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------


class MMDiTModel(nn.Cell):
    """construct(img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None) -> (B, L_img, in_channels)."""

    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        if isinstance(config, dict):
            config = MMDiTConfig.from_dict(config)
        self.config = config
        if config.hidden_size % config.num_heads != 0:
            raise ValueError(f"Hidden size {config.hidden_size} must be divisible by num_heads {config.num_heads}")
        if sum(config.axes_dim) != config.hidden_size // config.num_heads:
            raise ValueError(f"Got {config.axes_dim} but expected positional dim {config.head_dim}")
        self.dtype = dtype
        self.hidden_size = config.hidden_size
        self.head_dim = config.head_dim
        self.cond_embed = bool(config.cond_embed)
        self.guidance_embed = bool(config.guidance_embed)
        self.use_liger_rope = bool(config.use_liger_rope)
        h = config.hidden_size

        self.pe_embedder = RoPEEmbedder(config.theta, config.axes_dim)
        self.img_in = onn.Linear(config.in_channels, h, dtype=dtype)
        self.time_in = MLPEmbedder(256, h, dtype)
        self.vector_in = MLPEmbedder(config.vec_in_dim, h, dtype)
        if self.guidance_embed:
            self.guidance_in = MLPEmbedder(256, h, dtype)
        if self.cond_embed:
            self.cond_in = onn.Linear(config.in_channels + config.patch_size**2, h, dtype=dtype)
        self.txt_in = onn.Linear(config.context_in_dim, h, dtype=dtype)
        self.double_blocks = nn.CellList([
            DoubleStreamBlock(h, config.num_heads, config.mlp_ratio, config.qkv_bias, dtype)
            for _ in range(config.depth)
        ])
        self.single_blocks = nn.CellList([
            SingleStreamBlock(h, config.num_heads, config.mlp_ratio, dtype) for _ in range(config.depth_single_blocks)
        ])
        self.final_layer = LastLayer(h, config.in_channels, dtype)

    def construct(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None):
        dt = self.dtype
        img = self.img_in(img.astype(dt))
        if self.cond_embed:
            img = img + self.cond_in(cond.astype(dt))
        vec = self.time_in(timestep_embedding(timesteps, dt))
        if self.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, dt))
        vec = vec + self.vector_in(y_vec.astype(dt))
        txt = self.txt_in(txt.astype(dt))

        ids = mint.cat((txt_ids, img_ids), 1)  # text first
        cos, sin = self.pe_embedder(ids.astype(dt))
        if self.use_liger_rope:  # liger's kernel reads the tables of batch row 0 only
            cos = cos[:1]
            sin = sin[:1]
        cos = cos.unsqueeze(1)
        sin = onn.rope_fold_sign(sin).unsqueeze(1)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin)
        n_txt = txt.shape[1]
        x = mint.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, cos, sin)
        return self.final_layer(x[:, n_txt:], vec)


def build(cfg, dtype=ms.float32) -> MMDiTModel:
    if isinstance(cfg, dict):
        cfg = MMDiTConfig.from_dict(cfg)
    net = MMDiTModel(cfg, dtype)
    net.set_train(False)
    return net


def param_inventory(cfg, dtype: str = "F32") -> dict:
    """{name: (shape tuple, dtype)} of the MindSpore model at `cfg`, without allocating any parameter."""
    from mindspore.nn.utils import no_init_parameters

    if isinstance(cfg, dict):
        cfg = MMDiTConfig.from_dict(cfg)
    with no_init_parameters():
        net = MMDiTModel(cfg)
    return {name: (tuple(int(s) for s in p.shape), dtype) for name, p in net.parameters_and_names()}


def jit_forward(net: MMDiTModel):
    """The net's forward under `ms.jit`, created on first use and kept on the net (`net._jit_forward`): jit
    compiles once per function object, so every caller must get the same one for as long as the net lives."""
    fn = net.__dict__.get("_jit_forward")
    if fn is not None:
        return fn

    def forward(img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None):
        return net(img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance)

    fn = ms.jit(forward)
    net._jit_forward = fn
    return fn


def run(net: MMDiTModel, inputs: dict, jit: bool = False) -> np.ndarray:
    """Forward on numpy inputs (by upstream's argument names); returns the output as numpy."""
    args = []
    for name in INPUT_NAMES:
        v = inputs.get(name)
        args.append(None if v is None else Tensor(np.ascontiguousarray(v)))
    fn = jit_forward(net) if jit else net
    out = fn(*args)
    return out.asnumpy()


# (manifest in ../shared/upstream/manifests, target inventory file in mappings/targets)
REAL_TARGETS = {
    "mmdit_open_sora_v2.json": "mmdit_opensora_v2.json",
    "mmdit_open_sora_v2_video_dc_ae.json": "mmdit_opensora_v2_hc.json",
    "flux1_dev_t2i.json": "mmdit_flux_dev.json",
}


def write_target_inventories(manifests_dir, targets_dir) -> list:
    """Regenerate mappings/targets/mmdit_*.json from `param_inventory` at each real config (no allocation):
    `python -m opensora_ms.models.mmdit [MANIFESTS_DIR [TARGETS_DIR]]`."""
    import json
    import os

    written = []
    for manifest, target in REAL_TARGETS.items():
        with open(os.path.join(manifests_dir, manifest), encoding="utf-8") as f:
            cfg = MMDiTConfig.from_dict(json.load(f)["config"])
        inv = param_inventory(cfg)
        doc = {"model": "mmdit", "config": cfg.to_dict(),
               "note": "MindSpore parameter inventory of opensora_ms.models.mmdit at the real config "
                       "(param_inventory); fp32 on CPU",
               "tensors": [{"key": k, "shape": list(s), "dtype": d} for k, (s, d) in inv.items()]}
        path = os.path.join(targets_dir, target)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        written.append(path)
    return written


if __name__ == "__main__":
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    mdir = sys.argv[1] if len(sys.argv) > 1 else str(root.parent / "shared" / "upstream" / "manifests")
    tdir = sys.argv[2] if len(sys.argv) > 2 else str(root / "mappings" / "targets")
    for p in write_target_inventories(mdir, tdir):
        print("wrote", p)
