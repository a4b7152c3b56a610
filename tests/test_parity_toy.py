"""The parity harness end to end on a toy model: a torch module, a MindSpore cell with a fused layer, a toy
mapping (rename + concat + an explicitly unaligned module) and a toy adapter, all made here in tmp dirs."""

from __future__ import annotations

import json
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
    from mindspore import nn as mnn

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
    replay(toy, ReplayOptions(framework="torch", perturb={"blocks.2.out.bias": 0.5}, report_dir=tmp_path))
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


# ---------------------------------------------------------------------------------------------- review fixes
def _toy_mod():
    return adapters.REGISTERED["toy"]


def _copy_case(prefix, dest):
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for f in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(f, dest / f.name)
    return dest / prefix.name


def _cli(*args):
    from typer.testing import CliRunner

    from parity.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_missing_output_fails_unless_the_adapter_declares_it_optional(toy, monkeypatch):
    """Finding 2: a case output the candidate does not produce fails the verdict; OPTIONAL_OUTPUTS exempts it."""
    mod = _toy_mod()
    run_ms = mod.run_ms
    monkeypatch.setattr(mod, "run_ms", lambda net, inputs, case_cfg=None: {} if run_ms(net, inputs) else {})
    rep = replay(toy, ReplayOptions(framework="mindspore"))
    assert rep["verdict"] == "fail" and rep["missing_outputs"] == ["output"]
    assert any("output" in n and "does not produce" in n for n in rep["notes"])
    from parity.report import summary_line, to_junit

    assert "missing outputs: output" in summary_line(rep)
    assert 'name="output"' in to_junit(rep) and "not produced" in to_junit(rep)
    # optional for this framework (globs, or {framework: globs}): listed, not failed
    monkeypatch.setattr(mod, "OPTIONAL_OUTPUTS", {"mindspore": ["out*"]}, raising=False)
    rep = replay(toy, ReplayOptions(framework="mindspore"))
    assert rep["verdict"] == "pass" and rep["missing_outputs"] == []
    assert rep["missing_optional_outputs"] == ["output"]
    # optional for another framework only: still a failure here
    monkeypatch.setattr(mod, "OPTIONAL_OUTPUTS", {"torch": ["output"]})
    assert replay(toy, ReplayOptions(framework="mindspore"))["verdict"] == "fail"


def test_suite_user_errors_and_default_cases_folder(tmp_path, monkeypatch):
    """Finding 1: the default cases folder does not depend on cwd; nothing to run is a user error (exit 2)."""
    from parity.ci import DEFAULT_CASES, SuiteError, run_suite

    assert DEFAULT_CASES.is_absolute() and (DEFAULT_CASES / "mmdit_tiny.config.json").is_file()
    monkeypatch.chdir(tmp_path)                      # `../shared/upstream/tiny` relative to here does not exist
    r = _cli("suite", "--only", "mmdit_tinyy", "--report", tmp_path / "r")
    assert r.exit_code == 2 and "mmdit_tinyy" in r.output and "no such case in" in r.output, r.output
    r = _cli("suite", tmp_path / "nowhere", "--report", tmp_path / "r")
    assert r.exit_code == 2 and "no such cases folder" in r.output, r.output
    (tmp_path / "empty").mkdir()
    r = _cli("suite", tmp_path / "empty", "--report", tmp_path / "r")
    assert r.exit_code == 2 and "no case" in r.output, r.output
    with pytest.raises(SuiteError):
        run_suite(tmp_path / "empty", tmp_path / "r")


def test_suite_counts_only_not_covered_as_not_covered(toy, tmp_path, monkeypatch):
    """Finding 1/5: a ReplayError of a covered run fails the suite; NotCoveredError does not; a malformed case is
    reported as failed and the others still run."""
    import parity.engine as E
    from parity.ci import run_suite

    cases = tmp_path / "cases"
    _copy_case(toy, cases)
    lines = []

    def boom(prefix, opts):
        raise E.ReplayError("a bad option in a covered run")

    monkeypatch.setattr(E, "replay", boom)
    rc = run_suite(cases, tmp_path / "r1", ["torch"], ["free"], echo=lines.append)
    assert rc == 1 and "ERROR ReplayError" in lines[-1], lines
    assert (tmp_path / "r1" / "toy_tiny" / "torch-free" / "error.txt").is_file()

    def not_covered(prefix, opts):
        raise E.NotCoveredError("the port cannot be imported")

    monkeypatch.setattr(E, "replay", not_covered)
    rc = run_suite(cases, tmp_path / "r2", ["torch"], ["free"], echo=lines.append)
    assert rc == 0 and "not covered" in lines[-1], lines
    # a malformed case: that case fails, the next one still runs
    (cases / "aaa_bad.config.json").write_text("{not json")
    for kind in ("weights", "inputs", "outputs"):
        (cases / f"aaa_bad.{kind}.safetensors").write_bytes((cases / f"toy_tiny.{kind}.safetensors").read_bytes())
    lines.clear()
    rc = run_suite(cases, tmp_path / "r3", ["torch"], ["free"], echo=lines.append)
    assert rc == 1 and len(lines) == 2
    assert lines[0].startswith("aaa_bad") and "ERROR" in lines[0] and "not valid JSON" in lines[0]
    assert lines[1].startswith("toy_tiny") and "not covered" in lines[1]
    assert not list((tmp_path / "r3").glob("*.tmp"))


def test_user_errors_exit_2_with_one_line(toy, tmp_path, monkeypatch):
    """Finding 6: ReplayError/CaseError are UserErrors; MappingError, bad JSON, bad --perturb, weights that do not
    fit: one `error:` line, exit 2."""
    from converter.errors import UserError
    from parity.case import CaseError
    from parity.engine import NotCoveredError, ReplayError

    assert issubclass(ReplayError, UserError) and issubclass(CaseError, UserError)
    assert issubclass(NotCoveredError, ReplayError)
    r = _cli("replay", toy, "--framework", "torch", "--perturb", "blocks.1.out.weight=abc")
    assert r.exit_code == 2 and "SCALE must be a number" in r.output, r.output
    bad = _copy_case(toy, tmp_path / "bad")
    Path_ = type(bad)
    Path_(str(bad) + ".config.json").write_text('{"ToyConfig": {"d": 8},')
    r = _cli("replay", bad, "--framework", "torch")
    assert r.exit_code == 2 and "config.json" in r.output and "not valid JSON" in r.output, r.output
    assert "Traceback" not in r.output
    # a MappingError (converter.errors.UserError) from the candidate's mapping
    monkeypatch.setattr(_toy_mod(), "mapping_name", lambda cfg: str(tmp_path / "no_such_map.yaml"))
    r = _cli("replay", toy, "--framework", "mindspore")
    assert r.exit_code == 2 and r.output.startswith("error:") and "no_such_map" in r.output, r.output
    # dump --weights that do not fit the config: names the file
    from parity.tensorio import save_dict

    w = save_dict(tmp_path / "wrong.safetensors", {"nope.weight": np.ones((2, 2), np.float32)})
    r = _cli("dump", "toy", "--config", "tiny", "--weights", w, "--out", tmp_path / "d" / "x")
    assert r.exit_code == 2 and "wrong.safetensors" in r.output and "do not fit" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_unresolvable_mapping_var_is_an_error_not_dropped(toy, tmp_path, monkeypatch):
    """Finding 9: the aligner's vars come from Mapping.resolve_vars (includes too); a var the case weights cannot
    give is a MappingError naming it, not silently dropped."""
    mp = tmp_path / "toy_map_vars.yaml"
    mp.write_text(MAPPING.replace("name: toy_map", "name: toy_map_vars").replace(
        "rules:", "vars:\n  width: {source: \"inp.weight\", dim: 0}\n  ghost: {source: \"no.such.key\", dim: 0}\nrules:"))
    monkeypatch.setattr(_toy_mod(), "mapping_name", lambda cfg: str(mp))
    from converter.errors import MappingError

    with pytest.raises(MappingError, match="ghost"):
        replay(toy, ReplayOptions(framework="mindspore"))
    mp.write_text(mp.read_text().replace('  ghost: {source: "no.such.key", dim: 0}\n', ""))
    import parity.engine as E

    seen = {}
    orig = E.Aligner

    def spy(entries, vars):
        seen.update(vars)
        return orig(entries, vars)

    monkeypatch.setattr(E, "Aligner", spy)
    assert replay(toy, ReplayOptions(framework="mindspore"))["verdict"] == "pass"
    assert seen == {"width": D}


def test_dump_is_atomic_and_cleans_up(toy, tmp_path, monkeypatch):
    """Finding 5: a dump that fails leaves no temporaries and no config.json (so no half case); config is last."""
    mod = _toy_mod()

    def crash(model, inputs, case_cfg=None):
        model(torch.from_numpy(inputs["x"]))
        raise RuntimeError("crash mid-run")

    monkeypatch.setattr(mod, "run_torch", crash)
    with pytest.raises(RuntimeError, match="crash mid-run"):
        dump("toy", "tiny", tmp_path / "a" / "c")
    assert list((tmp_path / "a").iterdir()) == []
    monkeypatch.undo()
    import parity.engine as E

    real = E.save_dict

    def fail_outputs(path, tensors, meta=None):
        if str(path).endswith(".outputs.safetensors"):
            raise OSError("disk full")
        return real(path, tensors, meta)

    monkeypatch.setattr(E, "save_dict", fail_outputs)
    with pytest.raises(OSError):
        dump("toy", "tiny", tmp_path / "b" / "c")
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "c.config.json" not in names and not any(n.endswith(".tmp") for n in names), names


def test_run_reports_a_dump_user_error_in_one_line(tmp_path):
    """Finding 6: `parity run` with a bad --config: the dump process's one-line user error, exit 2."""
    r = _cli("run", "mmdit", "--config", "no_such_preset", "--report", tmp_path / "rep", "--mode", "free")
    assert r.exit_code == 2 and "no_such_preset" in r.output and "Traceback" not in r.output, r.output
