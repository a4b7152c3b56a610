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


# ------------------------------------------------------------------------------------------------ Video DC-AE
@dataclass
class DCAEEncoderConfig:
    """Upstream's `EncoderConfig` (opensora/models/dc_ae/models/dc_ae.py); only the video path (`is_video`) with
    the block types the released F32T4C128 checkpoint uses is built."""

    in_channels: int = 3
    latent_channels: int = 32
    width_list: tuple = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple = (2, 2, 2, 2, 2, 2)
    block_type: object = "ResBlock"
    norm: str = "rms2d"
    act: str = "silu"
    downsample_block_type: str = "ConvPixelUnshuffle"
    downsample_match_channel: bool = True
    downsample_shortcut: Optional[str] = "averaging"
    out_norm: Optional[str] = None
    out_act: Optional[str] = None
    out_shortcut: Optional[str] = "averaging"
    double_latent: bool = False
    is_video: bool = False
    temporal_downsample: tuple = ()
    tune_channel_proj: bool = False


@dataclass
class DCAEDecoderConfig:
    """Upstream's `DecoderConfig`."""

    in_channels: int = 3
    latent_channels: int = 32
    in_shortcut: Optional[str] = "duplicating"
    width_list: tuple = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple = (2, 2, 2, 2, 2, 2)
    block_type: object = "ResBlock"
    norm: object = "rms2d"
    act: object = "silu"
    upsample_block_type: str = "ConvPixelShuffle"
    upsample_match_channel: bool = True
    upsample_shortcut: str = "duplicating"
    out_norm: str = "rms2d"
    out_act: str = "relu"
    is_video: bool = False
    temporal_upsample: tuple = ()
    tune_channel_proj: bool = False


def _sub_from_dict(cls, d, where):
    if isinstance(d, cls):
        return d
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    for k in ("width_list", "depth_list", "temporal_downsample", "temporal_upsample"):
        if k in d:
            d[k] = tuple(d[k])
    for k in ("block_type", "norm", "act"):
        if isinstance(d.get(k), tuple):
            d[k] = list(d[k])
    return cls(**d)


@dataclass
class DCAEConfig:
    """Upstream's `DCAEConfig` (field names and defaults of dc_ae.py). `scaling_factor` defaults to upstream's
    inference config (None: latents unscaled; training used 0.493, ../shared/upstream/SPEC.md §8)."""

    in_channels: int = 3
    latent_channels: int = 32
    time_compression_ratio: int = 1
    spatial_compression_ratio: int = 32
    encoder: DCAEEncoderConfig = dataclasses.field(default_factory=DCAEEncoderConfig)
    decoder: DCAEDecoderConfig = dataclasses.field(default_factory=DCAEDecoderConfig)
    use_quant_conv: bool = False
    pretrained_path: Optional[str] = None
    pretrained_source: str = "dc-ae"
    scaling_factor: Optional[float] = None
    is_image_model: bool = False
    tune_channel_proj: bool = False
    train_decoder_only: bool = False
    is_training: bool = False
    use_spatial_tiling: bool = False
    use_temporal_tiling: bool = False
    spatial_tile_size: int = 256
    temporal_tile_size: int = 32
    tile_overlap_factor: float = 0.25

    @classmethod
    def from_dict(cls, d: dict) -> "DCAEConfig":
        """Build from a config dict (nested `encoder` / `decoder` dicts); unknown fields raise. Sub-configs inherit
        `in_channels` / `latent_channels` when they do not set them (upstream's `${..in_channels}`)."""
        if isinstance(d, cls):
            return d
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"DCAEConfig: unknown field(s) {unknown}")
        top = {k: d[k] for k in ("in_channels", "latent_channels") if k in d}
        for key, sub in (("encoder", DCAEEncoderConfig), ("decoder", DCAEDecoderConfig)):
            v = d.get(key, {})
            if isinstance(v, dict):
                v = {**{k: top.get(k, getattr(cls, k)) for k in ("in_channels", "latent_channels")}, **v}
            d[key] = _sub_from_dict(sub, v, f"DCAEConfig.{key}")
        return cls(**d)

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v

        return plain(dataclasses.asdict(self))

    @property
    def spatial_tile_latent_size(self) -> int:
        return self.spatial_tile_size // self.spatial_compression_ratio

    @property
    def temporal_tile_latent_size(self) -> int:
        return self.temporal_tile_size // self.time_compression_ratio


__all__ += ["DCAEConfig", "DCAEEncoderConfig", "DCAEDecoderConfig"]


@dataclass
class AutoEncoderConfig:
    """Upstream's Flux 2D AE config (``opensora/models/vae/autoencoder_2d.py``; defaults = its ``autoencoder_2d``
    registry function, i.e. ``flux1-dev-ae.safetensors``). GroupNorm has 32 groups (eps 1e-6) everywhere, fixed
    by upstream's code, so every width ``ch * m`` must be a multiple of 32."""

    from_pretrained: Optional[str] = None
    cache_dir: Optional[str] = None
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    sample: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "AutoEncoderConfig":
        """Unknown fields raise; `type` (upstream's registry name) must be "autoencoder_2d" if present."""
        d = dict(d)
        typ = d.pop("type", "autoencoder_2d")
        if typ != "autoencoder_2d":
            raise ValueError(f"AutoEncoderConfig: unsupported model type {typ!r} (expected 'autoencoder_2d')")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"AutoEncoderConfig: unknown field(s) {unknown}")
        if "ch_mult" in d:
            d["ch_mult"] = tuple(int(m) for m in d["ch_mult"])
        cfg = cls(**d)
        bad = [cfg.ch * m for m in cfg.ch_mult if (cfg.ch * m) % 32]
        if bad:
            raise ValueError(f"AutoEncoderConfig: widths {bad} are not multiples of GroupNorm's 32 groups")
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(d["ch_mult"])
        return d

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


__all__ += ["AutoEncoderConfig"]
