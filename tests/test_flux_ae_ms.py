"""Flux 2D AE MindSpore port: inventory / mapping against the real manifest, the 2-D conv op, and a dumped tiny
case replayed on MindSpore in free and teacher modes (every hook aligned, outputs <= 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from converter.errors import MappingError
from converter.mapping import load_mapping
from opensora_ms.models import flux_ae as M
from parity.adapters import flux_ae as A
from parity.adapters.base import AdapterError
from parity.cli import app

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT.parent / "shared" / "upstream" / "manifests" / "flux1_dev_ae.json"
OUTPUTS = {"z", "decoded", "posterior_mean", "posterior_logvar", "z_sampled", "z_video", "decoded_video",
           "decoded_latent"}


def test_inventory_equals_target_file_and_manifest():
    man = json.loads(MAN.read_text())
    inv = M.param_inventory(man["config"])
    target = json.loads((ROOT / "mappings" / "targets" / "flux_ae.json").read_text())
    assert [(t["key"], tuple(t["shape"])) for t in target["tensors"]] == [(k, s) for k, (s, _) in inv.items()]
    assert [(t["key"], tuple(t["shape"])) for t in man["tensors"]] == [(k, s) for k, (s, _) in inv.items()]
    net = M.build(A.PRESETS["tiny"])
    assert [(n, tuple(p.shape)) for n, p in net.parameters_and_names()] == [
        (k, s) for k, (s, _) in M.param_inventory(A.PRESETS["tiny"]).items()]


def test_mapping_validates_and_rejects_a_foreign_key():
    m = load_mapping("flux_ae")
    src, tgt = m.source_manifest(), m.target_inventory()
    plan = m.plan(src, tgt)
    assert len(src) == len(tgt) == 244 and set(plan.targets) == set(tgt)
    assert not plan.dropped and not plan.unused_rules and m.align == []
    src = dict(src, **{"decoder.up.0.bogus.weight": ((4,), "F32")})
    with pytest.raises(MappingError):
        m.plan(src, tgt)


@pytest.mark.parametrize("n,ci,co,hw,k,kw", [
    (2, 8, 16, (9, 7), 3, {"padding": 1}), (1, 8, 3, (9, 7), 3, {"padding": 1}),
    (3, 8, 8, (10, 6), 3, {"stride": 2, "pad": (0, 1, 0, 1)}), (2, 8, 8, (5, 6), 3, {"padding": 1, "upsample": (2, 2)}),
    (2, 8, 12, (5, 6), 1, {})])
def test_conv2d_matches_torch(n, ci, co, hw, k, kw):
    import mindspore as ms
    import torch
    import torch.nn.functional as F

    from opensora_ms.ops.conv2d import conv2d

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, ci) + hw).astype(np.float32)
    w = rng.standard_normal((co, ci, k, k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    xt = torch.from_numpy(x)
    if "upsample" in kw:
        xt = F.interpolate(xt, scale_factor=2.0, mode="nearest")
    if "pad" in kw:
        xt = F.pad(xt, kw["pad"])
    ref = F.conv2d(xt, torch.from_numpy(w), torch.from_numpy(b), kw.get("stride", 1), kw.get("padding", 0)).numpy()
    y = conv2d(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b), **kw).asnumpy()
    assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_adapter_rejects_ambiguous_inputs_and_sampling_needs_noise():
    with pytest.raises(AdapterError):
        A._plan({"x": 0, "x_a": 0, "z_a": 0}, None)
    with pytest.raises(AdapterError):
        A._plan({"z": 0, "posterior_eps": 0}, None)
    assert A._plan({"z": 0}, None) == ([], [("z", "decoded")], False)
    net = M.build(A.PRESETS["tiny"])
    with pytest.raises(ValueError):
        net.encode(np.zeros((1, 3, 16, 16), np.float32), sample_posterior=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("flux_ae") / "flux_ae_tiny"
    r = CliRunner().invoke(app, ["dump", "flux_ae", "--config", "tiny", "--out", str(prefix)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return prefix


@pytest.mark.parametrize("mode", ["free", "teacher"])
def test_replay_mindspore_dumped_case(case, mode, tmp_path):
    r = CliRunner().invoke(app, ["replay", str(case), "--framework", "mindspore", "--mode", mode, "--report",
                                 str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    outs = {t["name"]: t["max_rel"] for t in rep["tensors"] if t["kind"] == "output"}
    assert set(outs) == OUTPUTS and max(outs.values()) <= 1e-4
    assert rep["unaligned"] == [] and rep["unaligned_candidate"] == []
    assert len([t for t in rep["tensors"] if t["kind"] == "hook"]) == 96
    if mode == "teacher":
        assert any("18 block calls" in n for n in rep["notes"])
