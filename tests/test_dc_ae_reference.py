"""PyTorch reference of the Video DC-AE against upstream ground truth (manifest, case `dc_ae_tiny`) and the
adapter's case conventions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from opensora_ms.configs import DCAEConfig
from parity.adapters import base
from parity.adapters import dc_ae as A
from parity.reference import dc_ae as R

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "upstream"
CASE = SHARED / "tiny" / "dc_ae_tiny"
MANIFEST = SHARED / "manifests" / "video_dc_ae_f32t4c128.json"
REAL_CFG = SHARED / "manifests" / "video_dc_ae_f32t4c128.dcaeconfig.json"
TOL = 1e-5


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _case_cfg():
    return json.loads(Path(str(CASE) + ".config.json").read_text())


@pytest.fixture(scope="module")
def case():
    cfg = _case_cfg()
    model = R.build(cfg["DCAEConfig"])
    model.load_state_dict(load_file(str(CASE) + ".weights.safetensors"), strict=True)
    return dict(model=model, cfg=cfg, inputs=load_file(str(CASE) + ".inputs.safetensors"),
                outputs=load_file(str(CASE) + ".outputs.safetensors"))


# ---------------------------------------------------------------------------------------------- static
def test_manifest_equality_real_config_on_meta():
    man = json.loads(MANIFEST.read_text())
    model = R.build(json.loads(REAL_CFG.read_text()), device="meta")
    sd = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert next(model.parameters()).device.type == "meta"
    assert sd == {t["key"]: t["shape"] for t in man["tensors"]}
    assert sum(int(np.prod(s)) for s in sd.values()) == man["num_params"] == 459462147
    # upstream inference defaults: no latent scaling, 256 px / 32 frame tiles (latent 8 / 8), overlap 0.25
    assert model.scaling_factor is None
    assert (model.spatial_tile_size, model.spatial_tile_latent_size) == (256, 8)
    assert (model.temporal_tile_size, model.temporal_tile_latent_size) == (32, 8)


def test_presets_are_the_case_and_the_real_config():
    assert DCAEConfig.from_dict(A.PRESETS["real"]) == DCAEConfig.from_dict(json.loads(REAL_CFG.read_text()))
    cfg = _case_cfg()
    assert DCAEConfig.from_dict(A.PRESETS["tiny"]) == DCAEConfig.from_dict(cfg["DCAEConfig"])
    assert A.PRESET_CASE_FIELDS["tiny"]["tiling"] == cfg["tiling"]


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        DCAEConfig.from_dict({"latent_channels": 32, "bogus": 1})
    with pytest.raises(ValueError, match="encoder"):
        DCAEConfig.from_dict({"encoder": {"width_listt": [1]}})


# ---------------------------------------------------------------------------------------------- the case
def test_reproduces_every_output_and_hook(case):
    model, inputs, outputs = case["model"], case["inputs"], case["outputs"]
    hooks = load_file(str(CASE) + ".hooks.safetensors")
    aliases = json.loads(Path(str(CASE) + ".hooks_aliases.json").read_text())
    cap = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: cap.setdefault(n, o.detach().clone()))
               for n, m in model.named_modules() if n]
    try:
        got = A.run_torch(model, inputs, case["cfg"])
    finally:
        for h in handles:
            h.remove()
    assert set(got) == set(outputs)
    for k, v in outputs.items():
        assert got[k].shape == tuple(v.shape), k
        assert rel(got[k], v) <= TOL, k
    names = list(hooks) + list(aliases)
    assert len(names) == 228 + len(aliases)
    for k in names:
        ref = hooks[aliases.get(k, k)]
        assert k in cap, k
        assert rel(cap[k], ref) <= TOL, k


def test_tiling_changes_the_decode_and_matches_upstream(case):
    """The tiled decodes differ from the plain ones (so the case really tests the tiling) and are upstream's."""
    out = case["outputs"]
    for n in ("sp", "tp"):
        assert rel(out[f"tiling/{n}/dec_tiled"], out[f"tiling/{n}/dec_plain"]) > 1e-3


def _loop_blend(a, b, extent, dim):
    """Upstream's blend_v / blend_h / blend_t, literally (a Python loop over the blended slices, in place)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        ia = [slice(None)] * 5
        ib = [slice(None)] * 5
        ia[dim], ib[dim] = -extent + y, y
        b[tuple(ib)] = a[tuple(ia)] * (1 - y / extent) + b[tuple(ib)] * (y / extent)
    return b


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_vectorised_blend_equals_upstream_loop(dim):
    g = torch.Generator().manual_seed(dim)
    sa, sb = [1, 2, 4, 5, 6], [1, 2, 4, 5, 6]
    sa[dim] = 7
    a, b = torch.randn(sa, generator=g), torch.randn(sb, generator=g)
    want = _loop_blend(a, b.clone(), 3, dim)
    got = R._blend(a, b.clone(), 3, dim)
    assert torch.equal(got, want)


def test_tiled_encode_and_decode_any_tile_count(case):
    """A 3 x 3 spatial grid and 3 temporal tiles: upstream's strides, blends and crops (a tile as large as the
    input is the plain call)."""
    model = case["model"]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 8, 96, 96, generator=g) * 2 - 1
    with torch.no_grad():
        plain = model.encode(x)
        sizes = {"spatial_tile_size": 64, "spatial_tile_latent_size": 2, "temporal_tile_size": 16,
                 "temporal_tile_latent_size": 4, "tile_overlap_factor": 0.5}
        with base.tiling(model, sizes, True, False):
            zt = model.encode(x)
        assert zt.shape == plain.shape == (1, 32, 2, 3, 3)
        # tiles of 64 px every 32 px: columns 0, 32, 64 -> latent 2 / 2 / 1 wide, blend 1, keep 1 of each
        tiles = [[model._encode(x[:, :, :, i:i + 64, j:j + 64]) for j in (0, 32, 64)] for i in (0, 32, 64)]
        for i in range(3):
            for j in range(3):
                if i:
                    _loop_blend(tiles[i - 1][j], tiles[i][j], 1, 3)
                if j:
                    _loop_blend(tiles[i][j - 1], tiles[i][j], 1, 4)
        want = torch.cat([torch.cat([t[:, :, :, :1, :1] for t in row], -1) for row in tiles], -2)
        assert torch.equal(zt, want)
        z = torch.randn(1, 32, 10, 1, 1, generator=g)
        with base.tiling(model, sizes, False, True):
            dt = model.decode(z)
        # latent tiles of 4 every 2: 0..3, 2..5, 4..7, 6..9, 8..9 -> 16 frames each (8 for the last), blend 8, keep 8
        assert dt.shape == (1, 3, 40, 32, 32)
        with base.tiling(model, dict(sizes, temporal_tile_latent_size=10, temporal_tile_size=40), False, True):
            assert torch.equal(model.decode(z), model._decode(z))


def test_frame_counts_and_bad_sizes(case):
    model = case["model"]
    with torch.no_grad():
        z1 = model.encode(torch.zeros(1, 3, 1, 32, 32))
        assert z1.shape == (1, 32, 1, 1, 1)
        assert model.decode(z1).shape == (1, 3, 1, 32, 32)
        z4 = model.encode(torch.zeros(2, 3, 4, 32, 64))
        assert z4.shape == (2, 32, 1, 1, 2)
        assert model.decode(torch.zeros(1, 32, 3, 1, 1)).shape == (1, 3, 12, 32, 32)
    for shape in [(1, 3, 4, 33, 32), (1, 3, 4, 32, 48), (1, 3, 3, 32, 32), (1, 3, 6, 32, 32), (1, 4, 4, 32, 32),
                  (3, 4, 32, 32)]:
        with pytest.raises(ValueError, match="DC-AE"):
            model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="DC-AE decode"):
        model.decode(torch.zeros(1, 16, 1, 1, 1))


def test_scaling_factor_divides_latents(case):
    model = case["model"]
    x = case["inputs"]["x"]
    with torch.no_grad():
        z = model.encode(x)
        model.scaling_factor = 0.493
        try:
            zs = model.encode(x)
            d = model.decode(zs)
        finally:
            model.scaling_factor = None
        assert rel(zs, z / 0.493) < 1e-6
        assert rel(d, model.decode(z)) < 1e-5


# ---------------------------------------------------------------------------------------------- the adapter
def test_adapter_conventions(case):
    model, cfg = case["model"], case["cfg"]
    inp = {k: v.numpy() for k, v in case["inputs"].items()}
    x_small = inp["x"][:, :, :4, :, :32]
    # decode-only, tagged inputs, a tiling x input; wants() skips what the case does not hold
    extra = {"z": case["outputs"]["z"].numpy(), "x_small": x_small, "z_lat": inp["tiling/tp/z"][:, :, :2],
             "tiling/sp/x": np.concatenate([inp["x"]] * 5, axis=3)[:, :, :, :160, :]}
    got = A.run_torch(model, extra, cfg)
    assert set(got) == {"decoded", "z_small", "decoded_small", "decoded_lat", "tiling/sp/z_plain",
                        "tiling/sp/z_tiled", "tiling/sp/dec_tiled"}
    assert rel(got["decoded"], case["outputs"]["decoded"]) <= TOL
    # 4 frames -> 1 latent frame -> 1 frame: the decoder skips temporal upsampling at T == 1 (upstream)
    assert got["z_small"].shape == (1, 32, 1, 1, 1) and got["decoded_small"].shape == (1, 3, 1, 32, 32)
    assert got["tiling/sp/z_plain"].shape == got["tiling/sp/z_tiled"].shape == (1, 32, 2, 5, 2)
    assert rel(got["tiling/sp/z_tiled"], got["tiling/sp/z_plain"]) > 1e-3
    part = A.run_torch(model, {"tiling/tp/z": inp["tiling/tp/z"]}, dict(cfg, **{base.WANT: ["tiling/tp/dec_tiled"]}))
    assert set(part) == {"tiling/tp/dec_tiled"}
    assert rel(part["tiling/tp/dec_tiled"], case["outputs"]["tiling/tp/dec_tiled"]) <= TOL
    with pytest.raises(base.AdapterError, match="nope"):
        A.run_torch(model, {"tiling/nope/z": inp["tiling/tp/z"]}, cfg)


def test_make_inputs_and_seeded_build():
    fields = A.PRESET_CASE_FIELDS["tiny"]
    inp = A.make_inputs(A.PRESETS["tiny"], 0, case_fields=fields)
    assert set(inp) == {"x", "tiling/sp/z", "tiling/tp/z"}
    assert inp["x"].shape == (1, 3, 8, 32, 64)
    assert inp["tiling/sp/z"].shape == (1, 32, 2, 4, 6) and inp["tiling/tp/z"].shape == (1, 32, 8, 1, 1)
    assert set(A.make_inputs(A.PRESETS["tiny"], 0)) == {"x"}
    m1, m2 = A.build_torch(A.PRESETS["tiny"]), A.build_torch(A.PRESETS["tiny"])
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    w = s1["encoder.stages.0.op_list.0.main.conv2.norm.weight"]
    assert (w - 1).abs().max() < 0.5 and (w - 1).abs().max() > 0   # RMSNorm weights are scales (1 + 0.1 N)
    b = s1["encoder.project_in.conv.bias"]
    assert b.abs().max() < 0.3 and b.abs().max() > 0
    with torch.device("meta"):
        assert next(A.build_torch(A.PRESETS["real"]).parameters()).device.type == "meta"
