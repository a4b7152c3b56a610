"""Model configs shared by the PyTorch reference (`parity/reference/`) and the MindSpore port (`opensora_ms/models/`).

Plain dataclasses with upstream's field names and defaults, so case files (`<case>.config.json`) and upstream
configs load directly; this module imports no framework, so both sides use the very same definition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

__all__ = ["MMDiTConfig", "AutoEncoder3DConfig"]


@dataclass
class MMDiTConfig:
    """Upstream's `MMDiTConfig` fields (model.py:39-60); defaults are upstream's dataclass defaults."""

    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    cond_embed: bool = False
    fused_qkv: bool = True
    grad_ckpt_settings: tuple | None = None
    use_liger_rope: bool = False
    patch_size: int = 2
    from_pretrained: str | None = None
    cache_dir: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        """Build from a config dict; unknown fields raise. `type` (upstream's registry name) must be "flux"."""
        d = dict(d)
        typ = d.pop("type", "flux")
        if typ != "flux":
            raise ValueError(f"MMDiTConfig: unsupported model type {typ!r} (expected 'flux')")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"MMDiTConfig: unknown field(s) {unknown}")
        cfg = cls(**d)
        cfg.axes_dim = list(cfg.axes_dim)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass
class AutoEncoder3DConfig:
    """Upstream's config dataclass (field names and defaults of ``autoencoder_kl_causal_3d.py``)."""

    from_pretrained: Optional[str] = None
    act_fn: str = "silu"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scale_factor: float = 0.476986
    shift_factor: float = 0.0
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True
    block_out_channels: tuple = (128, 256, 512, 512)
    sample_size: int = 256
    sample_tsize: int = 64
    use_slicing: bool = False
    use_spatial_tiling: bool = False
    use_temporal_tiling: bool = False
    tile_overlap_factor: float = 0.25
    dropout: float = 0.0
    channel: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "AutoEncoder3DConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"AutoEncoder3DConfig: unknown field(s) {unknown}")
        kw = dict(d)
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(d["block_out_channels"])
        return d
