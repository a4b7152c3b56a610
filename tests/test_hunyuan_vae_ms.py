"""MindSpore port of the Hunyuan VAE: inventory, mapping, strict loading, and every output of `hunyuan_vae_tiny`."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mindspore as ms

from converter.mapping import load_mapping
from opensora_ms.loading import load_strict
from opensora_ms.models import hunyuan_vae as M
from parity.adapters import hunyuan_vae as A

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "upstream"
CASE = SHARED / "tiny" / "hunyuan_vae_tiny"
TOL = 1e-4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _case_cfg():
    return json.loads(Path(str(CASE) + ".config.json").read_text())


def _manifest():
    return json.loads((SHARED / "manifests" / "hunyuan_vae.json").read_text())


# ---------------------------------------------------------------------------------------------------------------- static
def test_param_inventory_real_config_equals_target_file_and_manifest():
    man = _manifest()
    cfg = {k: v for k, v in man["config"].items() if k != "type"}
    inv = M.param_inventory(cfg)
    target = json.loads((ROOT / "mappings" / "targets" / "hunyuan_vae.json").read_text())
    assert [(t["key"], tuple(t["shape"]), t["dtype"]) for t in target["tensors"]] == [
        (k, tuple(s), d) for k, (s, d) in inv.items()
    ]
    assert {k: tuple(s) for k, (s, _) in inv.items()} == {t["key"]: tuple(t["shape"]) for t in man["tensors"]}
    assert sum(int(np.prod(s)) for s, _ in inv.values()) == 246478803


def test_mapping_validates_against_full_manifest_and_target():
    m = load_mapping("hunyuan_vae")
    assert m.name == "hunyuan_vae"
    src, tgt = m.source_manifest(), m.target_inventory()
    assert len(src) == len(tgt) == 248
    plan = m.plan(src, tgt)
    assert set(plan.targets) == set(tgt)
    assert not plan.dropped and not plan.unused_rules
    assert m.align == []


def test_mapping_rejects_a_foreign_key():
    from converter.errors import MappingError

    m = load_mapping("hunyuan_vae")
    src = dict(m.source_manifest())
    src["decoder.up_blocks.0.bogus.weight"] = ((4,), "BF16")
    with pytest.raises(MappingError):
        m.plan(src, m.target_inventory())


def test_tiny_inventory_matches_built_cells_and_shared_silu():
    cfg = _case_cfg()["AutoEncoder3DConfig"]
    net = M.build(cfg)
    assert {n: tuple(p.shape) for n, p in net.parameters_and_names()} == {
        k: s for k, (s, _) in M.param_inventory(cfg).items()
    }
    names = [n for n, _ in net.cells_and_names()]
    # one SiLU cell shared by every resnet (upstream / diffusers): listed once, under the first resnet's path
    assert "encoder.down_blocks.0.resnets.0.nonlinearity" in names
    assert "decoder.up_blocks.0.resnets.0.nonlinearity" not in names
    for p in ("decoder.mid_block.attentions.0.to_out.0", "encoder.down_blocks.0.resnets.0.conv1.conv",
              "decoder.up_blocks.0.upsamplers.0.conv.conv", "quant_conv", "post_quant_conv"):
        assert p in names


def test_conv_settings_held_by_the_model():
    """`build(cfg, conv_settings=...)`: the model and every one of its conv cells hold that one instance."""
    from opensora_ms.ops.conv import DEFAULT_CONV_SETTINGS, Conv3d, ConvSettings

    cfg = _case_cfg()["AutoEncoder3DConfig"]
    s = ConvSettings(budget_bytes=1 << 20, jit=False)
    convs = [c for _, c in M.build(cfg, conv_settings=s).cells_and_names() if isinstance(c, Conv3d)]
    assert len(convs) > 20 and all(c.conv_settings is s for c in convs)
    assert M.build(cfg).conv_settings is DEFAULT_CONV_SETTINGS


def test_load_strict_rejects_missing_key():
    from opensora_ms.loading import LoadError

    cfg = _case_cfg()["AutoEncoder3DConfig"]
    w = load_mapping("hunyuan_vae").convert(load_file(str(CASE) + ".weights.safetensors"))
    w.pop("quant_conv.bias")
    with pytest.raises(LoadError):
        load_strict(M.build(cfg), w)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError):
        M.AutoEncoder3DConfig.from_dict({"block_out_channels": [8], "nope": 1})


# ---------------------------------------------------------------------------------------------------------------- case
@pytest.fixture(scope="module")
def loaded():
    case_cfg = _case_cfg()
    net = A.build_ms(case_cfg)
    load_strict(net, load_mapping(A.mapping_name(case_cfg)).convert(load_file(str(CASE) + ".weights.safetensors")))
    return net, case_cfg


@pytest.fixture(scope="module")
def ms_outputs(loaded):
    net, case_cfg = loaded
    return A.run_ms(net, load_file(str(CASE) + ".inputs.safetensors"), case_cfg)


def test_every_case_output_pynative(ms_outputs):
    want = load_file(str(CASE) + ".outputs.safetensors")
    assert set(ms_outputs) == set(want)
    errs = {k: rel(ms_outputs[k], want[k]) for k in want}
    assert all(ms_outputs[k].shape == want[k].shape for k in want)
    assert max(errs.values()) <= TOL, errs


def test_tiled_outputs_differ_from_plain(ms_outputs):
    """The tiled variants really tiled (they differ from the plain run by more than the tolerance)."""
    cases = _case_cfg()["tiling"]["cases"]
    assert cases
    for name in cases:
        assert rel(ms_outputs[f"tiling/{name}/z_tiled"], ms_outputs[f"tiling/{name}/z_plain"]) > 10 * TOL


def test_decode_only_and_tagged_inputs(loaded):
    """A case holding only some inputs: `z` alone gives `decoded`; `x_<tag>` gives `z_<tag>`/`decoded_<tag>`; a
    tiling case with only `tiling/<n>/z` gives `dec_plain`/`dec_tiled`; nothing else, no KeyError."""
    net, case_cfg = loaded
    inputs = load_file(str(CASE) + ".inputs.safetensors")
    want = load_file(str(CASE) + ".outputs.safetensors")
    z_only = A.run_ms(net, {"z": want["z"]}, case_cfg)
    assert set(z_only) == {"decoded"} and rel(z_only["decoded"], want["decoded"]) <= TOL
    tagged = A.run_ms(net, {"x_small": inputs["x"]}, case_cfg)
    assert set(tagged) == {"z_small", "decoded_small"}
    assert rel(tagged["z_small"], want["z"]) <= TOL and rel(tagged["decoded_small"], want["decoded"]) <= TOL
    tz = A.run_ms(net, {"tiling/sp/z": want["tiling/sp/z_plain"]}, case_cfg)
    assert set(tz) == {"tiling/sp/dec_plain", "tiling/sp/dec_tiled"}
    assert rel(tz["tiling/sp/dec_tiled"], want["tiling/sp/dec_tiled"]) <= TOL


def test_tiling_sizes_come_from_the_case_config(loaded):
    """Other tile sizes in `config.tiling.sizes` change the tiled result (nothing is hard-coded)."""
    import copy

    net, case_cfg = loaded
    inputs = load_file(str(CASE) + ".inputs.safetensors")
    other = copy.deepcopy(case_cfg)
    other["tiling"]["sizes"].update(tile_sample_min_size=16, tile_latent_min_size=2)
    x = {"tiling/sp/x": inputs["tiling/sp/x"]}
    a = A.run_ms(net, x, case_cfg)["tiling/sp/z_tiled"]
    b = A.run_ms(net, x, other)["tiling/sp/z_tiled"]
    # upstream's blend crops to the tile stride, so other sizes may even change the shape
    assert a.shape != b.shape or rel(a, b) > 10 * TOL


def test_encode_decode_jit(loaded):
    """Whole-graph mode (ms.jit encoder / decoder) gives the same `z` and `decoded`."""
    net, _ = loaded
    x = load_file(str(CASE) + ".inputs.safetensors")["x"]
    want = load_file(str(CASE) + ".outputs.safetensors")
    net.set_jit(True)
    try:
        z = net.encode(ms.Tensor(x))
        assert rel(z.asnumpy(), want["z"]) <= TOL
        assert rel(net.decode(z).asnumpy(), want["decoded"]) <= TOL
    finally:
        net.set_jit(False)


def test_sample_needs_noise(loaded):
    net, _ = loaded
    with pytest.raises(ValueError):
        net.encode(ms.Tensor(np.zeros((1, 3, 1, 16, 24), np.float32)), sample_posterior=True)
