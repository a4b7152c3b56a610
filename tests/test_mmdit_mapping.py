"""The MMDiT mappings against the full manifests of the real checkpoints and the MindSpore parameter inventory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from converter.inventory import load_inventory
from converter.mapping import MAPPINGS_DIR, load_mapping
from opensora_ms.models import mmdit as M
from parity.adapters import mmdit as A
from test_mmdit_common import CASES, MANIFESTS, REAL, load_case


def _manifest(name):
    man = json.loads((MANIFESTS / name).read_text())
    return man, {t["key"]: (tuple(t["shape"]), t["dtype"]) for t in man["tensors"]}


@pytest.mark.parametrize("manifest", sorted(REAL))
def test_target_inventory_file_equals_param_inventory(manifest):
    mapping, target = REAL[manifest]
    man, _ = _manifest(manifest)
    inv = M.param_inventory(man["config"])
    stored = load_inventory(MAPPINGS_DIR / "targets" / f"{target}.json")
    assert list(stored.items()) == list(inv.items())


def test_param_inventory_equals_built_net():
    cfg = load_case("mmdit_flux_tiny")["config"]["MMDiTConfig"]
    net = M.build(cfg)
    built = {n: (tuple(p.shape), "F32") for n, p in net.parameters_and_names()}
    assert built == M.param_inventory(cfg)


@pytest.mark.parametrize("manifest", sorted(REAL))
def test_mapping_validates_against_full_manifest(manifest):
    """Every real key consumed, every MindSpore parameter produced, every shape equal to the inventory."""
    mapping, target = REAL[manifest]
    man, src = _manifest(manifest)
    cfg = man["config"]
    assert A.mapping_name(cfg) == mapping
    m = load_mapping(mapping)
    inv = M.param_inventory(cfg)
    plan = m.plan(src, inv)
    assert plan.inventory().keys() == inv.keys()
    assert all(tuple(plan.inventory()[k][0]) == inv[k][0] for k in inv)
    assert not plan.dropped and not plan.unused_rules
    consumed = {leaf for node in plan.targets.values() for leaf in node.leaves()}
    assert consumed == set(src)
    # the mapping names this manifest and this target inventory itself (so `msconv convert` validates fully)
    assert m.target_inventory() == inv and m.source_manifest() == src


def test_hc_mapping_includes_the_v2_rules_with_its_own_inventories():
    """mmdit_opensora_v2_hc.yaml is mmdit_opensora_v2 included, plus its own manifest and target inventory."""
    import yaml

    from converter.errors import MappingError

    raw = yaml.safe_load((MAPPINGS_DIR / "mmdit_opensora_v2_hc.yaml").read_text())
    assert raw["include"] == [{"mapping": "mmdit_opensora_v2"}] and "rules" not in raw and "align" not in raw
    hc, v2 = load_mapping("mmdit_opensora_v2_hc"), load_mapping("mmdit_opensora_v2")
    assert [r.spec() for r in hc.rules] == [r.spec() for r in v2.rules]
    assert all(r.scope.name == "mmdit_opensora_v2" for r in hc.rules)
    assert hc.align == v2.align
    _, src = _manifest("mmdit_open_sora_v2_video_dc_ae.json")
    assert hc.source_manifest() == src  # its own files, not the included ones
    assert hc.target_inventory() == load_inventory(MAPPINGS_DIR / "targets" / "mmdit_opensora_v2_hc.json")
    assert hc.target_inventory()["img_in.weight"][0] == (3072, 128)
    plan = hc.plan(src, hc.target_inventory())
    assert plan.inventory().keys() == hc.target_inventory().keys()
    assert hc.invert().source_manifest() == hc.target_inventory()
    # and the high-compression checkpoint is rejected by the v2 mapping's inventory (img_in is [3072, 128])
    with pytest.raises(MappingError, match="img_in.weight"):
        v2.plan(src, v2.target_inventory())


def test_v2_linear1_split_sizes_come_from_shapes():
    """The inverse split of linear1 reads v_mlp's rows off linear2 (no hard-coded mlp_ratio)."""
    m = load_mapping("mmdit_opensora_v2")
    for name in ("mmdit_open_sora_v2.json", "mmdit_open_sora_v2_video_dc_ae.json"):
        _, src = _manifest(name)
        assert m.resolve_vars(src)["v_mlp_rows"] == src["single_blocks.0.v_mlp.weight"][0][0]


def test_mapping_rejects_the_other_layout():
    from converter.errors import MappingError

    _, flux = _manifest("flux1_dev_t2i.json")
    with pytest.raises(MappingError):
        load_mapping("mmdit_opensora_v2").plan(flux, load_mapping("mmdit_opensora_v2").target_inventory())


@pytest.mark.parametrize("case_name", CASES)
def test_case_weights_convert_and_invert(case_name):
    case = load_case(case_name)
    cfg = case["config"]["MMDiTConfig"]
    m = load_mapping(A.mapping_name(cfg))
    out = m.convert(case["weights"], M.param_inventory(cfg))
    assert set(out) == set(M.param_inventory(cfg))
    back = m.invert().convert(out)
    assert set(back) == set(case["weights"])
    for k, v in case["weights"].items():
        np.testing.assert_array_equal(back[k], v)


def test_flux_permutation_is_upstreams_rearrange():
    """interleaved_to_half on a Flux qkv = upstream math.py `rearrange_tensor` (2d -> d, 2d+1 -> D/2 + d) per head."""
    case = load_case("mmdit_flux_tiny")
    cfg = case["config"]["MMDiTConfig"]
    D = cfg["hidden_size"] // cfg["num_heads"]
    C = cfg["hidden_size"]
    out = load_mapping("mmdit_flux_dev").convert(case["weights"])
    w = case["weights"]["double_blocks.0.img_attn.qkv.weight"]
    per_head = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])
    idx = np.concatenate([h * D + per_head for h in range(2 * C // D)] + [np.arange(2 * C, 3 * C)])
    np.testing.assert_array_equal(out["double_blocks.0.img_attn.qkv.weight"], w[idx])
    s = case["weights"]["single_blocks.1.norm.key_norm.scale"]
    np.testing.assert_array_equal(out["single_blocks.1.norm.key_norm.scale"], s[per_head])
    l1 = case["weights"]["single_blocks.0.linear1.bias"]
    idx1 = np.concatenate([idx, np.arange(3 * C, l1.shape[0])])
    np.testing.assert_array_equal(out["single_blocks.0.linear1.bias"], l1[idx1])


def test_param_inventory_allocates_nothing():
    """The 11.9 B-parameter inventory comes from a lazily initialised net (no 48 GB allocation)."""
    import psutil

    man, _ = _manifest("mmdit_open_sora_v2.json")
    proc = psutil.Process()
    before = proc.memory_info().rss
    inv = M.param_inventory(man["config"])
    grown = proc.memory_info().rss - before
    assert sum(int(np.prod(s)) for s, _ in inv.values()) == man["num_params"]
    assert grown < 512 * 2**20, grown
