"""Parity adapter for the MMDiT (docs/architecture.md "Parity adapters").

Torch side: `parity/reference/mmdit.py` (upstream names and layouts). MindSpore side: `opensora_ms/models/mmdit.py`
(fused qkv / linear1, rotate-half RoPE), weights converted by `mapping_name(cfg)` (`mmdit_opensora_v2`, `mmdit_opensora_v2_hc`
for the Open-Sora v2 and high-compression layouts, `mmdit_flux_dev` for fused + interleaved RoPE) and loaded with
`opensora_ms.loading.load_strict`.

Beyond the contract: `teacher_adapt(torch_path, args, kwargs)` turns the recorded inputs of a torch block into the
MindSpore block's inputs (the RoPE tables differ in format: torch passes `pe` = liger (cos, sin) (B, L, D) or the Flux
(B, 1, L, D/2, 2, 2) table; MindSpore blocks take `cos, sin` (B|1, 1, L, D) in rotate-half with the sign folded into
sin); pass it as `TeacherForcer(adapt=...)`. `load_ms_from_torch(net, torch_model, cfg)` converts a torch model's
state dict through the mapping and loads it strictly.
"""

from __future__ import annotations

import math

import numpy as np

CONFIG_NAME = "MMDiTConfig"

TEACHER_BLOCKS = ["double_blocks.{i}", "single_blocks.{i}", "final_layer"]
# Flux's `pe` is EmbedND's interleaved (B, 1, L, D/2, 2, 2) rotation table; the port runs rotate-half RoPE from
# cos/sin tables and has no such tensor (every attention output downstream checks it instead).
OPTIONAL_OUTPUTS = {"mindspore": ["pe"]}

PRESETS = {
    # = ../shared/upstream/tiny/mmdit_tiny.config.json
    "tiny": {
        "in_channels": 64, "vec_in_dim": 32, "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0,
        "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
        "qkv_bias": True, "guidance_embed": False, "cond_embed": True, "fused_qkv": False, "use_liger_rope": True,
        "patch_size": 2,
    },
    # = mmdit_flux_tiny
    "flux_tiny": {
        "in_channels": 64, "vec_in_dim": 32, "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0,
        "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
        "qkv_bias": True, "guidance_embed": True, "cond_embed": False, "fused_qkv": True, "use_liger_rope": False,
        "patch_size": 2,
    },
    # = mmdit_hc_tiny
    "hc_tiny": {
        "in_channels": 32, "vec_in_dim": 32, "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0,
        "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
        "qkv_bias": True, "guidance_embed": False, "cond_embed": True, "fused_qkv": False, "use_liger_rope": True,
        "patch_size": 1,
    },
    # the benchmark's size (benchmarks/mmdit_bench.py)
    "bench": {
        "in_channels": 64, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 512, "mlp_ratio": 4.0,
        "num_heads": 8, "depth": 4, "depth_single_blocks": 4, "axes_dim": [8, 28, 28], "theta": 10000,
        "qkv_bias": True, "guidance_embed": False, "cond_embed": True, "fused_qkv": False, "use_liger_rope": True,
        "patch_size": 2,
    },
}

_MAPPINGS = {"opensora_v2": "mmdit_opensora_v2", "opensora_v2_hc": "mmdit_opensora_v2_hc", "flux_dev": "mmdit_flux_dev"}


def _cfg_dict(cfg) -> dict:
    if isinstance(cfg, dict):
        return cfg.get(CONFIG_NAME, cfg)
    return cfg.to_dict()


def mapping_name(cfg) -> str:
    """`mmdit_flux_dev` for the fused + interleaved-RoPE layout; `mmdit_opensora_v2` for the unfused rotate-half
    layout, `mmdit_opensora_v2_hc` for it with patch_size 1 (the high-compression checkpoint; same rules, its own
    manifest and target inventory)."""
    c = _cfg_dict(cfg)
    fused = c.get("fused_qkv", True)
    liger = c.get("use_liger_rope", False)
    if fused and not liger:
        return _MAPPINGS["flux_dev"]
    if not fused and liger:
        return _MAPPINGS["opensora_v2_hc" if c.get("patch_size", 2) == 1 else "opensora_v2"]
    raise ValueError(f"MMDiT: no mapping for fused_qkv={fused}, use_liger_rope={liger} (no real checkpoint has it)")


# ---------------------------------------------------------------------------------------------------------------- torch
def init_weights_(model, seed: int = 0):
    """The cases' weight recipe: matrices N(0, 1/fan_in), norm scales 1 + 0.1 N, biases 0.05 N (cond_in included)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[1])
            elif name.endswith(".scale"):
                v = 1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            else:
                v = 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(v.to(p.dtype))
    return model


def build_torch(cfg, dtype=None, seed: int = 0):
    import torch

    from parity.reference import mmdit as R

    dtype = dtype or torch.float32
    model = R.build(_cfg_dict(cfg), dtype=torch.float32)
    init_weights_(model, seed)
    return model.to(dtype).eval()


def run_torch(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import torch

    from parity.reference import mmdit as R

    out = R.run(model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
    res = {"output": out.float().numpy() if out.dtype == torch.bfloat16 else out.numpy()}
    # the RoPE tables, as the cases store them
    dtype = next(model.parameters()).dtype
    ids = torch.cat((torch.from_numpy(inputs["txt_ids"]), torch.from_numpy(inputs["img_ids"])), 1).to(dtype)
    emb = model.pe_embedder
    with torch.no_grad():  # a fresh (unhooked) embedder: a second call of model.pe_embedder would be an extra hook
        pe = type(emb)(emb.dim, emb.theta, emb.axes_dim)(ids)
    if isinstance(pe, tuple):
        res["pe.0"], res["pe.1"] = pe[0].numpy(), pe[1].numpy()
    else:
        res["pe"] = pe.numpy()
    return res


# ---------------------------------------------------------------------------------------------------------------- ms
def build_ms(cfg):
    """In the op layer's model dtype: fp32 on CPU, bf16 in CPU-bf16 and on Ascend (upstream's policy)."""
    from opensora_ms.models import mmdit as M
    from opensora_ms.ops.device import model_dtype

    return M.build(_cfg_dict(cfg), dtype=model_dtype())


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    """PyNative by default (hooks only run there); `case_cfg={"jit": True}` runs the cached `ms.jit` forward."""
    import mindspore as ms

    from opensora_ms.models import mmdit as M

    from parity.adapters.base import ms_float32, ms_numpy_inputs, ms_tensor

    jit = bool((case_cfg or {}).get("jit", False))
    inputs = ms_numpy_inputs(inputs, model.dtype)  # floating inputs (ids, t included) in the model dtype, as upstream
    res = {"output": ms_float32(M.run(model, inputs, jit=jit))}
    if model.use_liger_rope:  # MindSpore's table equals liger's (cos, sin) layout; Flux's 6-D table has no equivalent
        from opensora_ms.ops import nn as onn

        # the op, not the `pe_embedder` cell: a second call of the cell would show up as an extra hook capture
        ids = ms.ops.cat([ms_tensor(inputs["txt_ids"], model.dtype), ms_tensor(inputs["img_ids"], model.dtype)], 1)
        cos, sin = onn.rope_cos_sin(ids, model.pe_embedder.axes_dim, model.pe_embedder.theta)
        res["pe.0"], res["pe.1"] = ms_float32(cos), ms_float32(sin)
    return res


def convert_state(state: dict, cfg) -> dict:
    """Torch (upstream) state dict as numpy -> MindSpore state dict via the config's mapping."""
    from converter.mapping import load_mapping

    return load_mapping(mapping_name(cfg)).convert(state)


def load_ms_from_torch(net, torch_model, cfg):
    """Convert `torch_model`'s weights with the mapping and load them strictly into `net`."""
    import torch

    from opensora_ms.loading import load_strict

    state = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
             for k, v in torch_model.state_dict().items()}
    load_strict(net, convert_state(state, cfg))
    return net


def teacher_adapt(torch_path: str, args: tuple, kwargs: dict):
    """Recorded torch block inputs -> MindSpore block inputs (tensors are MindSpore tensors already).

    double_blocks.i: (img, txt, vec, pe) -> (img, txt, vec, cos, sin); single_blocks.i: (x, vec, pe) -> (x, vec, cos,
    sin); final_layer: unchanged. `pe` is liger (cos, sin) (B, L, D) -- MindSpore uses batch row 0 like liger's
    kernel -- or the Flux table (B, 1, L, D/2, 2, 2) with [..., 0, 0] = cos and [..., 1, 0] = sin.
    """
    import mindspore as ms

    from opensora_ms.ops import nn as onn

    if torch_path.startswith("double_blocks."):
        names = ("img", "txt", "vec", "pe")
    elif torch_path.startswith("single_blocks."):
        names = ("x", "vec", "pe")
    else:
        return tuple(args), kwargs
    kwargs = dict(kwargs)
    args = list(args) + [kwargs.pop(n) for n in names[len(args):] if n in kwargs]
    if len(args) != len(names):
        raise ValueError(f"teacher_adapt({torch_path}): expected inputs {names}, got {len(args)} positional")
    pe = args[-1]
    if isinstance(pe, (tuple, list)):
        cos, sin = pe
        cos, sin = cos[:1], sin[:1]
    else:
        t = pe.asnumpy()[:, 0]  # (B, L, D/2, 2, 2)
        c, s = t[..., 0, 0], t[..., 1, 0]
        cos = ms.Tensor(np.concatenate([c, c], -1).astype(np.float32))
        sin = ms.Tensor(np.concatenate([s, s], -1).astype(np.float32))
    cos = cos.astype(ms.float32).unsqueeze(1)
    sin = onn.rope_fold_sign(sin.astype(ms.float32)).unsqueeze(1)
    return tuple(args[:-1]) + (cos, sin), kwargs


# ---------------------------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, seed: int, grid=None, n_txt: int = 7, batch: int = 2) -> dict:
    """Seeded inputs by upstream argument name. `grid` = (T, H, W) latent tokens (default (3, 2, 3): 18 tokens, the
    cases' size); ids follow upstream (`img_ids[t, h, w] = (t, h, w)`, `txt_ids = 0`)."""
    c = _cfg_dict(cfg)
    rng = np.random.default_rng(seed)
    T, H, W = grid or (3, 2, 3)
    n_img = T * H * W
    tt, hh, ww = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    img_ids = np.stack([tt, hh, ww], -1).reshape(1, n_img, 3).astype(np.float32)
    f32 = np.float32
    out = {
        "img": rng.standard_normal((batch, n_img, c["in_channels"])).astype(f32),
        "img_ids": np.repeat(img_ids, batch, 0),
        "txt": rng.standard_normal((batch, n_txt, c["context_in_dim"])).astype(f32),
        "txt_ids": np.zeros((batch, n_txt, 3), f32),
        "timesteps": rng.uniform(0.05, 1.0, (batch,)).astype(f32),
        "y_vec": rng.standard_normal((batch, c["vec_in_dim"])).astype(f32),
    }
    if c.get("cond_embed", False):
        out["cond"] = rng.standard_normal((batch, n_img, c["in_channels"] + c.get("patch_size", 2) ** 2)).astype(f32)
    if c.get("guidance_embed", False):
        out["guidance"] = rng.uniform(1.0, 5.0, (batch,)).astype(f32)
    return out
