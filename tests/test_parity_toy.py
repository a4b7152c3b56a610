"""The parity harness end to end on a toy model: a torch module, a MindSpore cell with a fused layer, a toy
mapping (rename + concat + an explicitly unaligned module) and a toy adapter, all made here in tmp dirs."""

from __future__ import annotations

import json
import sys
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from torch import nn as tnn

from parity import adapters
from parity.capture import Capture, ModuleFilter, Sink
from parity.case import Case
from parity.engine import ReplayOptions, dump, replay
from parity.tensorio import SafetensorsReader

D = 8

MAPPING = """
name: toy_map
version: 1
description: toy torch -> toy MindSpore (q/k fused into qk)
source: {layout: toy}
target: {model: toy}
rules:
  - source: ["blocks.{i}.q_proj.{p}", "blocks.{i}.k_proj.{p}"]
    target: "blocks.{i}.qk.{p}"
    ops: [{concat: {axis: 0}}]
  - {source: "blocks.{i}.out.{p}", target: "blocks.{i}.out.{p}"}
  - {source: "{a}.{p}", target: "{a}.{p}"}
align:
  - torch: ["blocks.{i}.q_proj", "blocks.{i}.k_proj"]
    ms: "blocks.{i}.qk"
    concat: -1
  - {torch: "blocks.{i}.drop", ms: null, reason: "dropout: identity at inference"}
"""


# ---------------------------------------------------------------------------------------------- torch toy
class TBlock(tnn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj = tnn.Linear(d, d), tnn.Linear(d, d)
        self.act = tnn.GELU()
        self.drop = tnn.Dropout(0.1)
        self.out = tnn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        h = torch.cat([self.q_proj(x), self.k_proj(x)], -1)
        return x + scale * self.out(self.drop(self.act(h))), h


class TToy(tnn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.inp = tnn.Linear(4, d)
        self.blocks = tnn.ModuleList([TBlock(d) for _ in range(3)])
        self.head = tnn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h, _ = b(h, scale=0.5)
        return self.head(h)


def _ms_classes():
    import mindspore as ms
    from mindspore import nn as mnn, ops

    class MBlock(mnn.Cell):
        def __init__(self, d):
            super().__init__()
            self.qk = mnn.Dense(d, 2 * d)
            self.act = mnn.GELU(approximate=False)
            self.out = mnn.Dense(2 * d, d)

        def construct(self, x, scale=1.0):
            h = self.qk(x)
            return x + scale * self.out(self.act(h)), h

    class MToy(mnn.Cell):
        def __init__(self, d=D):
            super().__init__()
            self.inp = mnn.Dense(4, d)
            self.blocks = mnn.CellList([MBlock(d) for _ in range(3)])
            self.head = mnn.Dense(d, 3)

        def construct(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h, _ = b(h, scale=0.5)
            return self.head(h)

    return MToy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    (d / "toy_map.yaml").write_text(MAPPING)
    mod = types.ModuleType("toy_adapter")
    mod.CONFIG_NAME = "ToyConfig"
    mod.TEACHER_BLOCKS = ["blocks.{i}"]
    mod.PRESETS = {"tiny": {"d": D}}
    mod.mapping_name = lambda cfg: str(d / "toy_map.yaml")

    def build_torch(cfg, dtype=torch.float32):
        torch.manual_seed(0)
        return TToy(cfg["d"]).to(dtype).eval()

    def run_torch(model, inputs, case_cfg=None):
        dt = next(model.parameters()).dtype
        with torch.no_grad():
            y = model(torch.from_numpy(inputs["x"]).to(dt))
        return {"output": y.float().numpy() if dt == torch.bfloat16 else y.numpy()}

    def build_ms(cfg):
        return _ms_classes()(cfg["d"])

    def run_ms(net, inputs, case_cfg=None):
        import mindspore as ms

        return {"output": net(ms.Tensor(inputs["x"])).asnumpy()}

    mod.build_torch, mod.run_torch, mod.build_ms, mod.run_ms = build_torch, run_torch, build_ms, run_ms
    mod.make_inputs = lambda cfg, seed: {"x": np.random.default_rng(seed).standard_normal((2, 5, 4)).astype(np.float32)}
    adapters.register("toy", mod)
    prefix = dump("toy", "tiny", d / "case" / "toy_tiny", seed=3)
    yield prefix
    adapters.REGISTERED.pop("toy", None)


def test_dump_writes_the_case_format(toy):
    files = sorted(p.name for p in toy.parent.iterdir())
    assert files == [f"toy_tiny.{s}" for s in ("config.json", "hooks.safetensors", "hooks_aliases.json",
                                               "inputs.safetensors", "outputs.safetensors", "weights.safetensors")]
    case = Case.open(toy)
    assert case.config_name == "ToyConfig" and case.model_cfg == {"d": D}
    hooks = case.hooks_reader()
    # dropout returns its input: stored once, the later name is an alias (upstream's convention); root -> head
    assert case.aliases["blocks.0.drop"] == "blocks.0.act"
    assert case.aliases["__root__"] == "head"
    assert "blocks.0.drop" not in hooks and "blocks.1.0" in hooks and "blocks.1.1" in hooks
    # execution order is kept in the file
    order = hooks.keys()
    assert order.index("blocks.0.q_proj") < order.index("blocks.0.out") < order.index("blocks.1.q_proj")


def test_capture_filters_and_repeated_calls(tmp_path):
    m = tnn.Sequential(tnn.Linear(3, 3), tnn.ReLU())
    act = m[1]

    class Twice(tnn.Module):
        def __init__(self):
            super().__init__()
            self.seq, self.act = m, act

        def forward(self, x):
            return self.act(self.seq(x))

    model = Twice()
    sink = Sink(tmp_path / "c.safetensors")
    with Capture(model, sink, ModuleFilter(exclude=["seq.0"], max_depth=2)):
        model(torch.ones(2, 3))
    names = [r.name for r in sink.records]
    # shared ReLU: first call under its first path, the second gets #1; seq.0 excluded
    assert names == ["seq.1", "seq", "seq.1#1", "__root__"]
    assert sorted(sink.reader().keys()) == sorted(names)


@pytest.mark.parametrize("mode", ["free", "teacher"])
def test_torch_replay_passes(toy, tmp_path, mode):
    rep = replay(toy, ReplayOptions(framework="torch", mode=mode, report_dir=tmp_path))
    assert rep["verdict"] == "pass", rep["first_divergence"]
    assert rep["unaligned"] == []
    assert {t["name"] for t in rep["tensors"]} >= {"blocks.0.drop", "__root__", "output"}
    if mode == "teacher":
        assert any("3 block calls" in n for n in rep["notes"])


@pytest.mark.parametrize("mode", ["free", "teacher"])
def test_mindspore_replay_aligns_through_the_mapping(toy, tmp_path, mode):
    rep = replay(toy, ReplayOptions(framework="mindspore", mode=mode, report_dir=tmp_path))
    assert rep["verdict"] == "pass", rep["first_divergence"]
    by = {t["name"]: t for t in rep["tensors"]}
    # fused qk compared with concat(q_proj, k_proj) of the torch side
    assert by["blocks.1.qk"]["torch"] == ["blocks.1.q_proj", "blocks.1.k_proj"]
    assert by["output"]["max_rel"] < 1e-5
    # the dropout has no MindSpore cell: listed with the mapping's reason, never dropped silently
    assert set(rep["unaligned"]) == {"blocks.0.drop", "blocks.1.drop", "blocks.2.drop"}
    assert rep["unaligned_reasons"]["blocks.0.drop"] == "dropout: identity at inference"


@pytest.mark.parametrize("framework", ["torch", "mindspore"])
@pytest.mark.parametrize("mode", ["free", "teacher"])
def test_perturbed_layer_is_the_first_divergence(toy, tmp_path, framework, mode):
    rep = replay(toy, ReplayOptions(framework=framework, mode=mode, perturb={"blocks.1.out.weight": 0.05}))
    assert rep["verdict"] == "fail"
    assert rep["first_divergence"]["name"] == "blocks.1.out"
    failed = {t["name"] for t in rep["tensors"] if t["verdict"] == "fail"}
    assert not any(n.startswith("blocks.0") for n in failed)
    if mode == "teacher":
        # block 2 gets block 1's torch inputs: its own layers stay clean; only its block output inherits nothing
        assert not any(n.startswith("blocks.2.") for n in failed), failed


def test_reports_are_written_and_valid(toy, tmp_path):
    rep = replay(toy, ReplayOptions(framework="torch", perturb={"blocks.2.out.bias": 0.5}, report_dir=tmp_path))
    j = json.loads((tmp_path / "report.json").read_text())
    for key in ("verdict", "case", "framework", "device", "mode", "dtype", "thresholds", "first_divergence",
                "tensors", "unaligned", "environment"):
        assert key in j
    assert j["verdict"] == "fail" and j["first_divergence"]["name"] == "blocks.2.out"
    for t in j["tensors"]:
        for key in ("name", "kind", "shape", "dtype", "max_abs", "max_rel", "mean_abs", "rmse", "cosine",
                    "ratio_1e-3", "ratio_5e-3", "nan", "inf", "verdict"):
            assert key in t, key
    assert {"torch", "mindspore", "msconv"} <= set(j["environment"])
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert suite.tag == "testsuite" and int(suite.get("tests")) == len(j["tensors"])
    assert int(suite.get("failures")) == sum(t["verdict"] == "fail" for t in j["tensors"]) >= 1
    assert len(suite.findall("testcase/failure")) == int(suite.get("failures"))
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html and "log10 max relative error" in html and "<circle" in html
    md = (tmp_path / "report.md").read_text()
    assert "| # | tensor |" in md and "⚠" in md and "**FAIL**" in md
    # execution order: the md rows follow the tensors list
    rows = [l for l in md.splitlines() if l.startswith("| ") and "`" in l]
    assert rows[0].split("|")[2].strip().strip("`⚠ ") == j["tensors"][0]["name"]


def test_depth_limit(tmp_path):
    model = tnn.Sequential(tnn.Sequential(tnn.Linear(3, 3)), tnn.ReLU())
    sink = Sink(tmp_path / "c.safetensors")
    with Capture(model, sink, ModuleFilter(max_depth=1)):
        model(torch.ones(2, 3))
    assert [r.name for r in sink.records] == ["0", "1", "__root__"]


def test_include_filter_limits_capture_and_unaligned(toy):
    rep = replay(toy, ReplayOptions(framework="mindspore", include=["blocks.1*"]))
    assert rep["verdict"] == "pass"
    assert {t["name"].split(".")[0] + "." + t["name"].split(".")[1] for t in rep["tensors"] if t["kind"] == "hook"} == {"blocks.1"}
    # modules left out on purpose are not reported; the one in scope without a counterpart still is
    assert rep["unaligned"] == ["blocks.1.drop"]
