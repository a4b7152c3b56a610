"""Model configs shared by the PyTorch reference (`parity/reference/`) and the MindSpore port (`opensora_ms/models/`).

Plain dataclasses with upstream's field names and defaults, so case files (`<case>.config.json`) and upstream
configs load directly; this module imports no framework, so both sides use the very same definition.
"""

from __future__ import annotations

import dataclasses
import math
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


def sampling_plan(n_blocks: int, time_compression_ratio: int, spatial_compression_ratio: int):
    """(spatial, temporal) resampling flags per block of the causal VAE (encoder order; the decoder's up blocks use
    the same list)."""
    n_sp = int(math.log2(spatial_compression_ratio))
    n_t = int(math.log2(time_compression_ratio))
    plan = []
    for i in range(n_blocks):
        final = i == n_blocks - 1
        if time_compression_ratio == 4:
            sp, tm = i < n_sp, (i >= n_blocks - 1 - n_t) and not final
        elif time_compression_ratio == 8:
            sp = tm = i < n_sp
        else:
            raise ValueError(f"Unsupported time_compression_ratio: {time_compression_ratio}")
        plan.append((bool(sp), bool(tm)))
    return plan


class TilingKnobs:
    """Upstream's tiling knobs of the causal VAE, shared by the torch reference and the MindSpore port (plain
    attributes of the model: ``use_spatial_tiling``, ``use_temporal_tiling``, ``tile_sample_min_size`` (pixels),
    ``tile_latent_min_size`` (= pixels / 8), ``tile_sample_min_tsize`` (frames), ``tile_latent_min_tsize``
    (= frames / 4); the model also has ``config``, ``time_compression_ratio``, ``spatial_compression_ratio``)."""

    def set_tile_sizes(self, sample_size=None, sample_tsize=None) -> None:
        """Upstream derives the tile sizes from ``sample_size`` (pixels) and ``sample_tsize`` (frames)."""
        if sample_size is not None:
            s = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
            self.tile_sample_min_size = int(s)
            self.tile_latent_min_size = int(s / (2 ** (len(self.config.block_out_channels) - 1)))
        if sample_tsize is not None:
            self.tile_sample_min_tsize = int(sample_tsize)
            self.tile_latent_min_tsize = int(sample_tsize) // self.time_compression_ratio

    def configure_tiling(self, tile_size=None, spatial=None, temporal=None, tile_frames=None) -> None:
        """The user-facing knobs in one call (what ``--vae-tile-size`` / temporal tiling on|off map to):
        ``tile_size`` pixels per spatial tile (upstream 256; a multiple of 8 * 4 keeps the blend exact),
        ``tile_frames`` frames per temporal tile (upstream 64, a multiple of 4), ``spatial`` / ``temporal``
        switch the two tilings. ``None`` leaves a setting unchanged."""
        if tile_size is not None:
            if int(tile_size) < 16 or int(tile_size) % 8:
                raise ValueError(f"tile size must be a multiple of 8 and >= 16 pixels, got {tile_size}")
            self.set_tile_sizes(sample_size=int(tile_size))
        if tile_frames is not None:
            if int(tile_frames) < 4 or int(tile_frames) % self.time_compression_ratio:
                raise ValueError(f"tile frames must be a multiple of {self.time_compression_ratio}, got {tile_frames}")
            self.set_tile_sizes(sample_tsize=int(tile_frames))
        if spatial is not None:
            self.use_spatial_tiling = bool(spatial)
        if temporal is not None:
            self.use_temporal_tiling = bool(temporal)

    def enable_spatial_tiling(self, use_tiling: bool = True):
        self.use_spatial_tiling = use_tiling

    def enable_temporal_tiling(self, use_tiling: bool = True):
        self.use_temporal_tiling = use_tiling

    def enable_tiling(self, use_tiling: bool = True):
        self.enable_spatial_tiling(use_tiling)
        self.enable_temporal_tiling(use_tiling)

    def disable_tiling(self):
        self.enable_tiling(False)

    def get_latent_size(self, input_size):
        t, h, w = input_size
        r, s = self.time_compression_ratio, self.spatial_compression_ratio
        return [(t - 1) // r + 1, (h - 1) // s + 1, (w - 1) // s + 1]
