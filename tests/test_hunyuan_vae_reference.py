"""PyTorch reference of the Hunyuan VAE against upstream ground truth (manifest, case `hunyuan_vae_tiny`)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from parity.reference.hunyuan_vae import AutoEncoder3DConfig, build, prepare_causal_attention_mask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "upstream"
CASE = SHARED / "tiny" / "hunyuan_vae_tiny"
CASE_CFG = json.loads(Path(str(CASE) + ".config.json").read_text())
TILING = CASE_CFG["tiling"]   # the case's structured tiling field (../shared/upstream/tiny/README.md, "Cases")


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def case():
    model = build(CASE_CFG["AutoEncoder3DConfig"])
    for k, v in TILING["sizes"].items():   # upstream's attribute names, set on the model as the case says
        setattr(model, k, v)
    model.load_state_dict(load_file(str(CASE) + ".weights.safetensors"), strict=True)
    return dict(
        model=model,
        inputs=load_file(str(CASE) + ".inputs.safetensors"),
        outputs=load_file(str(CASE) + ".outputs.safetensors"),
    )


def test_manifest_equality_real_config():
    man = json.loads((SHARED / "manifests" / "hunyuan_vae.json").read_text())
    cfg = {k: v for k, v in man["config"].items() if k != "type"}
    model = build(cfg, device="meta")
    sd = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {t["key"]: t["shape"] for t in man["tensors"]}
    assert sd == want
    assert sum(int(np.prod(s)) for s in sd.values()) == man["num_params"] == 246478803
    # real-config defaults: latent scale / shift, default tile sizes (upstream: 256 / 32 / 64 / 16)
    assert (model.scale_factor, model.shift_factor) == (0.476986, 0.0)
    assert (model.tile_sample_min_size, model.tile_latent_min_size) == (256, 32)
    assert (model.tile_sample_min_tsize, model.tile_latent_min_tsize) == (64, 16)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError):
        AutoEncoder3DConfig.from_dict({"in_channels": 3, "bogus": 1})


def test_causal_mask():
    m = prepare_causal_attention_mask(3, 2, torch.float32)
    frame = torch.arange(6) // 2
    assert torch.equal(m == 0, frame[None, :] <= frame[:, None])
    assert torch.isinf(m[0, 2]) and m[0, 2] < 0


@torch.no_grad()
def test_plain_outputs(case):
    m, x, o = case["model"], case["inputs"]["x"], case["outputs"]
    m.use_spatial_tiling = m.use_temporal_tiling = False
    z, post = m.encode(x, sample_posterior=False, return_posterior=True)
    assert rel(z, o["z"]) <= 1e-5
    assert rel(post.mean, o["posterior_mean"]) <= 1e-5
    assert rel(post.logvar, o["posterior_logvar"]) <= 1e-5
    assert rel(m.decode(o["z"]), o["decoded"]) <= 1e-5
    assert rel(m.encode(x[:, :, :1], sample_posterior=False), o["z_first_frame"]) <= 1e-5
    assert rel(m.decode(o["z_first_frame"]), o["decoded_first_frame_latent"]) <= 1e-5
    # the posterior noise is an input of the case
    eps = case["inputs"]["posterior_eps"]
    assert rel(m.encode(x, sample_posterior=True, noise=eps), o["z_sampled"]) <= 1e-5


@pytest.mark.parametrize("name", sorted(TILING["cases"]))
@torch.no_grad()
def test_tiled_outputs(case, name):
    m, o = case["model"], case["outputs"]
    xt = case["inputs"][f"tiling/{name}/x"]
    flags = TILING["cases"][name]
    m.use_spatial_tiling = m.use_temporal_tiling = False
    z_plain = m.encode(xt, sample_posterior=False)
    assert rel(z_plain, o[f"tiling/{name}/z_plain"]) <= 1e-5
    m.use_spatial_tiling, m.use_temporal_tiling = flags["use_spatial_tiling"], flags["use_temporal_tiling"]
    try:
        assert rel(m.encode(xt, sample_posterior=False), o[f"tiling/{name}/z_tiled"]) <= 1e-5
        assert rel(m.decode(o[f"tiling/{name}/z_plain"]), o[f"tiling/{name}/dec_tiled"]) <= 1e-5
    finally:
        m.use_spatial_tiling = m.use_temporal_tiling = False


def capture_hooks(model, fn):
    """Every module's forward output by upstream path (`#n` for repeated calls, `.i` for tuple items)."""
    cap, counts, handles = {}, {}, []

    def mk(name):
        def hook(mod, inp, out):
            n = counts.get(name, 0)
            counts[name] = n + 1
            key = name if n == 0 else f"{name}#{n}"
            if isinstance(out, (tuple, list)):
                for i, t in enumerate(out):
                    cap[f"{key}.{i}"] = t.detach().clone()
            else:
                cap[key] = out.detach().clone()
        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(mk(name)))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return cap


@torch.no_grad()
def test_every_hook(case):
    m, x = case["model"], case["inputs"]["x"]
    m.use_spatial_tiling = m.use_temporal_tiling = False
    hooks = load_file(str(CASE) + ".hooks.safetensors")
    aliases = json.loads(Path(str(CASE) + ".hooks_aliases.json").read_text())
    cap = capture_hooks(m, lambda: m.decode(m.encode(x, sample_posterior=False)))
    assert set(hooks) <= set(cap), sorted(set(hooks) - set(cap))[:10]
    worst = ("", 0.0)
    for name, got in cap.items():
        ref = hooks[name] if name in hooks else hooks[aliases[name]]
        r = rel(got, ref)
        worst = max(worst, (name, r), key=lambda t: t[1])
    assert worst[1] <= 1e-5, worst
