"""PyTorch reference of Open-Sora 2.0's MMDiT (hpcaitech/Open-Sora `opensora/models/mmdit/{model,layers,math}.py`).

Written for msconv from ../shared/upstream/SPEC.md §c/§g; parameter names and module paths equal upstream's, so the
real checkpoints (`Open_Sora_v2.safetensors`, `Open_Sora_v2_Video_DC_AE.safetensors`, `flux1-dev.safetensors`) load
with `strict=True` and forward hooks carry upstream's names (`double_blocks.0.img_attn.q_proj`, `img_mod.0.shift`, ...).

Covered: double/single-stream blocks, modulation (shift, scale, gate), QK RMSNorm with `scale` ("llama" casting),
joint attention text-first, GELU-tanh, rotate-half ("liger") and interleaved (Flux `EmbedND`) RoPE, `cond_in`,
`guidance_in`, fused (`qkv`, `linear1`) and unfused (`q_proj`/`k_proj`/`v_proj`, `v_mlp`) projections.

Precision (SPEC §g): the model runs in its parameter dtype. Upstream's fp32 islands are kept for low-precision runs:
the timestep embedding multiplies by 1000 in the input dtype (bf16 double rounding of t) and computes cos/sin in fp32;
the RoPE tables and the rotation run in fp32; the RMSNorm statistics run in fp32 and the normalised value is cast
to the input dtype before the `scale` multiply. In float64 (the parity oracle) every island runs in float64.
Attention is `torch.nn.functional.scaled_dot_product_attention` (flash-attn semantics: non-causal, no mask,
scale 1/sqrt(head_dim)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from opensora_ms.configs import MMDiTConfig

__all__ = [
    "MMDiTConfig",
    "MMDiTModel",
    "timestep_embedding",
    "build",
]


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------


def _island(dtype: torch.dtype) -> torch.dtype:
    """Dtype of upstream's fp32 islands: fp32 for fp32/bf16/fp16 models, fp64 for the fp64 oracle."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# positional embeddings
# ----------------------------------------------------------------------------------------------------------------


def _omega(dim: int, theta: float, dtype: torch.dtype, device) -> Tensor:
    scale = torch.arange(0, dim, 2, dtype=dtype, device=device) / dim
    return 1.0 / (theta**scale)


class EmbedND(nn.Module):
    """Flux's interleaved RoPE table (B, 1, L, D/2, 2, 2), computed in float64, returned in fp32 (fp64 oracle: fp64)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        out_dtype = _island(ids.dtype)
        parts = []
        for i in range(ids.shape[-1]):
            omega = _omega(self.axes_dim[i], self.theta, torch.float64, ids.device)
            ang = ids[..., i].to(torch.float64)[..., None] * omega  # (B, L, d/2)
            c, s = torch.cos(ang), torch.sin(ang)
            parts.append(torch.stack([c, -s, s, c], dim=-1).reshape(*ang.shape, 2, 2))
        return torch.cat(parts, dim=-3).unsqueeze(1).to(out_dtype)


class LigerEmbedND(nn.Module):
    """Open-Sora v2's rotate-half RoPE tables: (cos, sin) each (B, L, D), frequencies repeated twice; fp32 (fp64 oracle)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        isl = _island(ids.dtype)
        cos_list, sin_list = [], []
        for i in range(ids.shape[-1]):
            omega = _omega(self.axes_dim[i], self.theta, isl, ids.device)
            ang = ids[..., i].to(isl)[..., None] * omega
            cos_list.append(ang.cos())
            sin_list.append(ang.sin())
        cos = torch.cat(cos_list, dim=-1).repeat(1, 1, 2).contiguous()
        sin = torch.cat(sin_list, dim=-1).repeat(1, 1, 2).contiguous()
        return cos, sin


def apply_rope_interleaved(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Flux `apply_rope`: pairs (2i, 2i+1); computed in the table's dtype, cast back to the input dtype."""
    isl = freqs_cis.dtype
    xq_ = xq.to(isl).reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.to(isl).reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def apply_rope_half(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """liger-kernel 0.5.2 `LigerRopeFunction` forward: rotate-half on (B, H, L, D), tables (B|1, L, D).

    The kernel takes the cos/sin row by sequence index only (batch row 0), computes in the table dtype (fp32) and
    writes back in q's dtype.
    """
    isl = cos.dtype
    c = cos[:1, None]  # (1, 1, L, D)
    s = sin[:1, None]
    half = q.shape[-1] // 2

    def rot(x):
        xf = x.to(isl)
        x1, x2 = xf[..., :half], xf[..., half:]
        c1, s1 = c[..., :half], s[..., :half]
        return torch.cat([x1 * c1 - x2 * s1, x2 * c1 + x1 * s1], dim=-1).to(x.dtype)

    return rot(q), rot(k)


def attention(q: Tensor, k: Tensor, v: Tensor, pe) -> Tensor:
    """RoPE then non-causal attention without mask; q/k/v (B, H, L, D) -> (B, L, H*D)."""
    if isinstance(pe, torch.Tensor):
        q, k = apply_rope_interleaved(q, k, pe)
    else:
        cos, sin = pe
        q, k = apply_rope_half(q, k, cos, sin)
    x = F.scaled_dot_product_attention(q, k, v)
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding, cos first. `time_factor * t` happens in t's dtype (the bf16 double rounding of SPEC §g),
    then the arguments and cos/sin run in fp32 (fp64 for fp64 t); the result is cast back to t's dtype."""
    isl = _island(t.dtype)
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=isl, device=t.device) / half)
    args = t[:, None].to(isl) * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


# ----------------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class FusedRMSNorm(nn.Module):
    """liger `LigerRMSNormFunction(x, scale, 1e-6, offset 0, "llama")`: (x_f32 * rstd).to(x.dtype) * scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        isl = _island(x.dtype)
        xf = x.to(isl)
        rrms = torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + 1e-6)
        return (xf * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = FusedRMSNorm(dim)
        self.key_norm = FusedRMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query_norm(q)
        k = self.key_norm(k)
        return q.to(v), k.to(v)


class SelfAttention(nn.Module):
    """Parameter container (the blocks drive its submodules directly, as upstream's processors do)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, fused_qkv: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.fused_qkv = fused_qkv
        head_dim = dim // num_heads
        if fused_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x -> normalised q, k and v, each (B, H, L, D)."""
        B, L, _ = x.shape
        H = self.num_heads
        if self.fused_qkv:
            q, k, v = self.qkv(x).reshape(B, L, 3, H, -1).permute(2, 0, 3, 1, 4)  # B L (K H D) -> K B H L D
            q, k = self.norm(q, k, v)
            return q, k, v
        q = self.q_proj(x).reshape(B, L, H, -1)
        k = self.k_proj(x).reshape(B, L, H, -1)
        v = self.v_proj(x).reshape(B, L, H, -1)
        q, k = self.norm(q, k, v)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, pe) -> Tensor:
        q, k, v = self.project(x)
        return self.proj(attention(q, k, v, pe=pe))


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 fused_qkv: bool = True):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.head_dim = hidden_size // num_heads

        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias, fused_qkv=fused_qkv)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
        )

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias, fused_qkv=fused_qkv)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
        )

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_modulated = (1 + img_mod1.scale) * self.img_norm1(img) + img_mod1.shift
        img_q, img_k, img_v = self.img_attn.project(img_modulated)

        txt_modulated = (1 + txt_mod1.scale) * self.txt_norm1(txt) + txt_mod1.shift
        txt_q, txt_k, txt_v = self.txt_attn.project(txt_modulated)

        # joint attention, text first
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe)
        n_txt = txt_q.shape[2]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_scale: float | None = None,
                 fused_qkv: bool = True):
        super().__init__()
        self.hidden_dim = hidden_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = qk_scale or self.head_dim**-0.5  # unused upstream too
        self.fused_qkv = fused_qkv
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        if fused_qkv:
            self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        else:
            self.q_proj = nn.Linear(hidden_size, hidden_size)
            self.k_proj = nn.Linear(hidden_size, hidden_size)
            self.v_mlp = nn.Linear(hidden_size, hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(self.head_dim)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe) -> Tensor:
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        B, L, _ = x_mod.shape
        H = self.num_heads
        if self.fused_qkv:
            qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
            q, k, v = qkv.reshape(B, L, 3, H, -1).permute(2, 0, 3, 1, 4)
            q, k = self.norm(q, k, v)
        else:
            q = self.q_proj(x_mod).reshape(B, L, H, -1)
            k = self.k_proj(x_mod).reshape(B, L, H, -1)
            v, mlp = torch.split(self.v_mlp(x_mod), [self.hidden_size, self.mlp_hidden_dim], dim=-1)
            v = v.reshape(B, L, H, -1)
            q, k = self.norm(q, k, v)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn_1 = attention(q, k, v, pe=pe)
        output = self.linear2(torch.cat((attn_1, self.mlp_act(mlp)), 2))
        return x + mod.gate * output


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------


class MMDiTModel(nn.Module):
    config_class = MMDiTConfig

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        if isinstance(config, dict):
            config = MMDiTConfig.from_dict(config)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels
        self.patch_size = config.patch_size
        if config.hidden_size % config.num_heads != 0:
            raise ValueError(f"Hidden size {config.hidden_size} must be divisible by num_heads {config.num_heads}")
        pe_dim = config.hidden_size // config.num_heads
        if sum(config.axes_dim) != pe_dim:
            raise ValueError(f"Got {config.axes_dim} but expected positional dim {pe_dim}")
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads

        pe_cls = LigerEmbedND if config.use_liger_rope else EmbedND
        self.pe_embedder = pe_cls(dim=pe_dim, theta=config.theta, axes_dim=config.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(config.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if config.guidance_embed else nn.Identity()
        self.cond_in = (nn.Linear(self.in_channels + self.patch_size**2, self.hidden_size, bias=True)
                        if config.cond_embed else nn.Identity())
        self.txt_in = nn.Linear(config.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList([
            DoubleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                              fused_qkv=config.fused_qkv)
            for _ in range(config.depth)
        ])
        self.single_blocks = nn.ModuleList([
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=config.mlp_ratio, fused_qkv=config.fused_qkv)
            for _ in range(config.depth_single_blocks)
        ])
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def prepare_block_inputs(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        img = self.img_in(img)
        if self.config.cond_embed:
            if cond is None:
                raise ValueError("Didn't get conditional input for conditional model.")
            img = img + self.cond_in(cond)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y_vec)
        txt = self.txt_in(txt)
        ids = torch.cat((txt_ids, img_ids), dim=1)  # text first
        pe = self.pe_embedder(ids)
        return img, txt, vec, pe

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y_vec: Tensor,
                cond: Tensor | None = None, guidance: Tensor | None = None, **kwargs) -> Tensor:
        img, txt, vec, pe = self.prepare_block_inputs(img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec, pe)
        img = img[:, txt.shape[1]:, ...]
        return self.final_layer(img, vec)


INPUT_NAMES = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y_vec", "cond", "guidance")


def build(cfg, dtype: torch.dtype = torch.float32, device="cpu") -> MMDiTModel:
    """Build the model from an `MMDiTConfig` or dict, in `dtype`, on `device` ("meta" allocates nothing)."""
    if isinstance(cfg, dict):
        cfg = MMDiTConfig.from_dict(cfg)
    with torch.device(device):
        model = MMDiTModel(cfg)
    return model.to(dtype).eval()


def run(model: MMDiTModel, inputs: dict) -> Tensor:
    """Forward with inputs cast to the model dtype (as upstream's pipeline does: ids, t and guidance included)."""
    dtype = next(model.parameters()).dtype
    kw = {}
    for name in INPUT_NAMES:
        if name in inputs and inputs[name] is not None:
            v = inputs[name]
            v = torch.as_tensor(v)
            kw[name] = v.to(dtype) if v.is_floating_point() else v
    with torch.no_grad():
        return model(**kw)
