"""The Flux 2D AE torch reference: the real checkpoint's state dict (meta device), upstream's wrapper semantics
(frame folding, scale/shift, posterior sample with given noise, asymmetric downsampling pad), and a cross-check
against diffusers' own `AutoencoderKL` in the Flux configuration, weights converted by diffusers' key conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MANIFESTS
from parity.adapters import flux_ae as A
from parity.reference import flux_ae as R

XCHECK_TOL = 1e-5


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _manifest():
    return json.loads((MANIFESTS / "flux1_dev_ae.json").read_text())


def test_state_dict_equals_real_checkpoint_manifest_on_meta():
    man = _manifest()
    with torch.device("meta"):
        model = R.AutoEncoder(R.AutoEncoderConfig.from_dict(man["config"]))
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(t["key"], t["shape"]) for t in man["tensors"]]
    assert sum(v.numel() for v in sd.values()) == man["num_params"] == 83819683


def test_config_vocabulary_and_validation():
    cfg = R.AutoEncoderConfig.from_dict(_manifest()["config"])
    assert (cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.scale_factor, cfg.shift_factor) == (128, (1, 2, 4, 4), 16, 0.3611, 0.1159)
    assert R.AutoEncoderConfig() == cfg.__class__(from_pretrained=None)  # defaults = upstream's registry function
    with pytest.raises(ValueError, match="unknown"):
        R.AutoEncoderConfig.from_dict({"ch": 32, "channels": 3})
    with pytest.raises(ValueError, match="autoencoder_2d"):
        R.AutoEncoderConfig.from_dict({"type": "hunyuan_vae"})
    with pytest.raises(ValueError, match="multiples"):
        R.AutoEncoderConfig.from_dict({"ch": 48, "ch_mult": [1, 2]})


def _diffusers_twin(model: R.AutoEncoder):
    """diffusers' AutoencoderKL with the Flux configuration, loaded (strictly) through diffusers' own LDM key
    conversion of the reference's state dict."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = model.config
    widths = [cfg.ch * m for m in cfg.ch_mult]
    dcfg = dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch, down_block_types=["DownEncoderBlock2D"] * len(widths),
                up_block_types=["UpDecoderBlock2D"] * len(widths), block_out_channels=widths,
                layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32,
                sample_size=cfg.resolution, scaling_factor=cfg.scale_factor, shift_factor=cfg.shift_factor,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    twin = diffusers.AutoencoderKL(**dcfg).eval()
    twin.load_state_dict(convert_ldm_vae_checkpoint(model.state_dict(), dcfg), strict=True)
    return twin


def test_matches_diffusers_autoencoderkl():
    """The real checkpoint's structure (4 levels, 2 resnets, z 16) at width 32 (the real widths agree as closely,
    5.5e-6 on decode, docs/vae.md, but cost ~6 s here)."""
    hw = 32
    model = A.build_torch({"ch": 32, "ch_mult": [1, 2, 4, 4]})
    twin = _diffusers_twin(model)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, 3, hw, hw + 8)).astype(np.float32))
    with torch.no_grad():
        z, post = model.encode(x, sample_posterior=False, return_posterior=True)
        dist = twin.encode(x).latent_dist
        s, b = model.scale_factor, model.shift_factor
        errs = {"mean": rel(post.mean, dist.mean), "logvar": rel(post.logvar, dist.logvar),
                "z": rel(z, (dist.mean - b) * s),
                "decoded": rel(model.decode(z), twin.decode(z / s + b).sample)}
    assert max(errs.values()) <= XCHECK_TOL, errs
    assert z.shape == (2, 16, hw // 8, (hw + 8) // 8)


@pytest.fixture(scope="module")
def tiny():
    return A.build_torch(A.PRESETS["tiny"])


def test_video_frames_fold_into_the_batch(tiny):
    x = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (2, 3, 3, 12, 8)).astype(np.float32))
    with torch.no_grad():
        z = tiny.encode(x, sample_posterior=False)
        per_frame = torch.stack([tiny.encode(x[:, :, t], sample_posterior=False) for t in range(3)], 2)
        assert z.shape == (2, 16, 3, 6, 4) and rel(z, per_frame) <= 1e-6
        dec = tiny.decode(z)
        assert dec.shape == x.shape
        assert rel(dec, torch.stack([tiny.decode(z[:, :, t]) for t in range(3)], 2)) <= 1e-6


def test_scale_shift_and_posterior_sample_with_given_noise(tiny):
    x = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32))
    eps = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, post = tiny.encode(x, sample_posterior=False, return_posterior=True)
        assert torch.allclose(z, 0.3611 * (post.mean - 0.1159))
        zs = tiny.encode(x, sample_posterior=True, noise=eps)
        assert torch.allclose(zs, 0.3611 * (post.mean + torch.exp(post.logvar / 2) * eps - 0.1159), atol=1e-6)
        assert not torch.allclose(zs, z)
        # config.sample (upstream default True) decides when not told; decode inverts the scale/shift exactly
        assert tiny.sample and not torch.allclose(tiny.encode(x), z)
        seen = {}
        h = tiny.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
        tiny.decode(z)
        h.remove()
        assert torch.allclose(seen["in"], post.mean, atol=1e-6)


def test_downsample_pads_right_and_bottom_only(tiny):
    ds = tiny.encoder.down[0].downsample
    x = torch.randn(1, 32, 8, 6)
    with torch.no_grad():
        y = ds(x)
        assert y.shape == (1, 32, 4, 3)
        assert torch.equal(y, F.conv2d(F.pad(x, (0, 1, 0, 1)), ds.conv.weight, ds.conv.bias, stride=2))
        assert not torch.allclose(y, F.conv2d(F.pad(x, (1, 0, 1, 0)), ds.conv.weight, ds.conv.bias, stride=2))


def test_decoder_levels_run_deepest_first(tiny):
    """`up` is prepended upstream: up.1 (64 wide, with the upsampler) runs before up.0 (full resolution)."""
    order = []
    hooks = [tiny.decoder.up[i].block[0].register_forward_hook(lambda m, a, o, i=i: order.append(i)) for i in (0, 1)]
    with torch.no_grad():
        tiny.decode(torch.randn(1, 16, 4, 4))
    for h in hooks:
        h.remove()
    assert order == [1, 0]
    assert not hasattr(tiny.decoder.up[0], "upsample") and hasattr(tiny.decoder.up[1], "upsample")
