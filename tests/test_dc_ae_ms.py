"""MindSpore port of the Video DC-AE: inventory, mapping, strict loading, and every output and hook of `dc_ae_tiny`
(tiled decodes included)."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mindspore as ms

from converter.mapping import load_mapping
from opensora_ms.loading import LoadError, load_strict
from opensora_ms.models import dc_ae as M
from parity.adapters import base
from parity.adapters import dc_ae as A

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "upstream"
CASE = SHARED / "tiny" / "dc_ae_tiny"
MANIFEST = SHARED / "manifests" / "video_dc_ae_f32t4c128.json"
REAL_CFG = SHARED / "manifests" / "video_dc_ae_f32t4c128.dcaeconfig.json"
TOL_OUT, TOL_HOOK = 1e-4, 1e-3


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _case_cfg():
    return json.loads(Path(str(CASE) + ".config.json").read_text())


@pytest.fixture(scope="module")
def net():
    n = M.build(_case_cfg())
    load_strict(n, base.convert_state("video_dc_ae", load_file(str(CASE) + ".weights.safetensors")))
    return n


# ---------------------------------------------------------------------------------------------- static
def test_param_inventory_real_config_equals_target_file_and_manifest():
    man = json.loads(MANIFEST.read_text())
    inv = M.param_inventory(json.loads(REAL_CFG.read_text()))
    target = json.loads((ROOT / "mappings" / "targets" / "video_dc_ae.json").read_text())
    assert [(t["key"], tuple(t["shape"]), t["dtype"]) for t in target["tensors"]] == [
        (k, tuple(s), d) for k, (s, d) in inv.items()
    ]
    assert {k: tuple(s) for k, (s, _) in inv.items()} == {t["key"]: tuple(t["shape"]) for t in man["tensors"]}
    assert sum(int(np.prod(s)) for s, _ in inv.values()) == target["num_params"] == 459462147


def test_mapping_validates_against_full_manifest_and_target():
    m = load_mapping("video_dc_ae")
    src, tgt = m.source_manifest(), m.target_inventory()
    assert len(src) == len(tgt) == 339
    plan = m.plan(src, tgt)
    assert set(plan.targets) == set(tgt)
    assert not plan.dropped and not plan.unused_rules
    # same cell tree on both sides: the only align entries declare captures the case does not store, with reasons
    assert m.align and all(e["torch"] is None and e["ms"] and e["reason"] for e in m.align)


def test_mapping_rejects_a_foreign_key():
    from converter.errors import MappingError

    m = load_mapping("video_dc_ae")
    src = dict(m.source_manifest())
    src["decoder.stages.3.op_list.1.context_module.main.bogus.weight"] = ((4,), "BF16")
    with pytest.raises(MappingError):
        m.plan(src, m.target_inventory())


def test_tiny_inventory_matches_built_cells_and_strict_loading(net):
    cfg = _case_cfg()
    assert {n: tuple(p.shape) for n, p in net.parameters_and_names()} == {
        k: s for k, (s, _) in M.param_inventory(cfg).items()
    }
    w = load_file(str(CASE) + ".weights.safetensors")
    assert set(w) == {n for n, _ in net.parameters_and_names()}
    w.pop("decoder.project_out.op_list.0.bias")
    with pytest.raises(LoadError):
        load_strict(M.build(cfg), w)
    # grouped convs keep torch's weight layout (C_out, C_in / groups, k, k, k)
    p = dict(net.parameters_and_names())
    assert tuple(p["encoder.stages.3.op_list.0.context_module.main.aggreg.0.0.weight"].shape) == (96, 1, 5, 5, 5)
    assert tuple(p["encoder.stages.3.op_list.0.context_module.main.aggreg.0.1.weight"].shape) == (96, 32, 1, 1, 1)


# ---------------------------------------------------------------------------------------------- the case
def test_port_reproduces_every_output_and_hook(net):
    inputs = load_file(str(CASE) + ".inputs.safetensors")
    outputs = load_file(str(CASE) + ".outputs.safetensors")
    hooks = load_file(str(CASE) + ".hooks.safetensors")
    aliases = json.loads(Path(str(CASE) + ".hooks_aliases.json").read_text())
    cap = {}

    def mk(name):
        def fn(cell, args, out):
            if name not in cap:
                cap[name] = out.asnumpy().copy()
        return fn

    handles = [c.register_forward_hook(mk(n)) for n, c in net.cells_and_names() if n]
    try:
        got = A.run_ms(net, inputs, _case_cfg())
    finally:
        for h in handles:
            h.remove()
    assert set(got) == set(outputs)
    for k, v in outputs.items():
        assert got[k].shape == v.shape, k
        assert rel(got[k], v) <= TOL_OUT, (k, rel(got[k], v))
    for k in list(hooks) + list(aliases):
        assert k in cap, k
        assert rel(cap[k], hooks[aliases.get(k, k)]) <= TOL_HOOK, k


def test_frame_counts_and_bad_sizes(net):
    z1 = net.encode(np.zeros((1, 3, 1, 32, 32), np.float32))
    assert tuple(z1.shape) == (1, 32, 1, 1, 1)
    assert tuple(net.decode(z1).shape) == (1, 3, 1, 32, 32)
    assert tuple(net.decode(np.zeros((1, 32, 2, 1, 1), np.float32)).shape) == (1, 3, 8, 32, 32)
    for shape in [(1, 3, 4, 33, 32), (1, 3, 4, 32, 48), (1, 3, 3, 32, 32), (1, 3, 6, 32, 32), (3, 4, 32, 32)]:
        with pytest.raises(ValueError, match="DC-AE"):
            net.encode(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="DC-AE decode"):
        net.decode(np.zeros((1, 16, 1, 1, 1), np.float32))


def test_scaling_factor_is_a_config_value_defaulting_to_none():
    cfg = dict(A.PRESETS["tiny"])
    assert M.build(cfg).scaling_factor is None
    assert M.build(dict(cfg, scaling_factor=0.493)).scaling_factor == 0.493
