"""Issue 9 §2: the verdict counts what was not compared. Each test breaks one thing the verdict must notice
(a renamed cell, a non-finite or empty reference, a missing hooks file, an error hidden in the small-magnitude
part of a tensor, an ImportError inside a port, a stored bf16 output off by ulps) and sees the verdict fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from parity.engine import NotCoveredError, ReplayOptions, replay
from parity.metrics import Thresholds, bf16_ulps, compare_arrays, verdict
from parity.tensorio import load_dict, save_dict

from tests.test_parity_toy import _toy_mod, toy  # noqa: F401  (the toy model, mapping and case fixture)

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "upstream" / "tiny"


def _copy(prefix: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(f, dest / f.name)
    return dest / prefix.name


def _file(prefix: Path, kind: str) -> Path:
    return prefix.with_name(f"{prefix.name}.{kind}.safetensors")


def test_a_renamed_mindspore_cell_fails_the_verdict(toy, monkeypatch):  # noqa: F811
    import parity.engine as E

    orig = E.build_ms_loaded

    def renamed(adapter, cfg, weights):
        net, mapping = orig(adapter, cfg, weights)
        blk = net.blocks[1]
        cell = blk._cells.pop("out")
        object.__setattr__(blk, "out", cell)       # construct still finds it; its capture name changes
        blk._cells["out_renamed"] = cell
        return net, mapping

    assert replay(toy, ReplayOptions(framework="mindspore"))["verdict"] == "pass"
    monkeypatch.setattr(E, "build_ms_loaded", renamed)
    rep = replay(toy, ReplayOptions(framework="mindspore"))
    assert rep["verdict"] == "fail" and rep["first_divergence"] is None      # no tensor failed: what was not compared did
    assert "blocks.1.out" in rep["unaligned"] and "blocks.1.out_renamed" in rep["unaligned_candidate"]
    assert any("aligned with nothing" in n and "blocks.1.out" in n for n in rep["notes"])
    assert any("matched nothing" in n and "blocks.1.out_renamed" in n for n in rep["notes"])


def test_declared_candidate_only_cells_pass_with_their_reason(toy, tmp_path, monkeypatch):  # noqa: F811
    import parity.engine as E
    from tests.test_parity_toy import MAPPING

    mp = tmp_path / "toy_map_decl.yaml"
    mp.write_text(MAPPING.replace("name: toy_map", "name: toy_map_decl")
                  + '  - {ms: "blocks.{i}.out_renamed", torch: null, reason: "renamed on purpose"}\n'
                  + '  - {torch: "blocks.{i}.out", ms: null, reason: "renamed on purpose"}\n')
    monkeypatch.setattr(_toy_mod(), "mapping_name", lambda cfg: str(mp))
    orig = E.build_ms_loaded

    def renamed(adapter, cfg, weights):
        net, mapping = orig(adapter, cfg, weights)
        blk = net.blocks[1]
        cell = blk._cells.pop("out")
        object.__setattr__(blk, "out", cell)
        blk._cells["out_renamed"] = cell
        return net, mapping

    monkeypatch.setattr(E, "build_ms_loaded", renamed)
    rep = replay(toy, ReplayOptions(framework="mindspore"))
    assert rep["verdict"] == "pass", rep["notes"]
    assert rep["unaligned_candidate_reasons"]["blocks.1.out_renamed"] == "renamed on purpose"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_reference_fails(toy, tmp_path, bad):  # noqa: F811
    case = _copy(toy, tmp_path)
    out = load_dict(_file(case, "outputs"))
    save_dict(_file(case, "outputs"), {k: np.full_like(v, bad) for k, v in out.items()})
    for fw in ("torch", "mindspore"):
        rep = replay(case, ReplayOptions(framework=fw))
        assert rep["verdict"] == "fail", fw
        row = next(t for t in rep["tensors"] if t["name"] == "output")
        assert row["verdict"] == "fail" and "reference holds non-finite" in row["reason"]


def test_non_finite_values_are_compared_by_position():
    r = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
    x = np.array([np.nan, 2.0, 3.0, np.inf], np.float32)          # same counts, other positions
    m = compare_arrays(x, r)
    assert m["nan"] == m["ref_nan"] == 1 and m["nonfinite_mismatch"] == 2
    assert verdict(m, 1e-4, 0.5)[0] == "fail"
    m = compare_arrays(np.array([-np.inf], np.float32), np.array([np.inf], np.float32))
    assert m["nonfinite_mismatch"] == 1


def test_an_empty_outputs_file_or_a_missing_claimed_hooks_file_fails(toy, tmp_path):  # noqa: F811
    case = _copy(toy, tmp_path / "a")
    save_dict(_file(case, "outputs"), {})
    rep = replay(case, ReplayOptions(framework="torch"))
    assert rep["verdict"] == "fail" and any("holds no tensor" in n for n in rep["notes"])
    case = _copy(toy, tmp_path / "b")
    _file(case, "hooks").unlink()          # hooks_aliases.json stays: the case claims hooks
    rep = replay(case, ReplayOptions(framework="torch"))
    assert rep["verdict"] == "fail" and any("missing, but the case claims hooks" in n for n in rep["notes"])
    # a case that never had hooks (no aliases either) compares its outputs only and may pass
    case.with_name(case.name + ".hooks_aliases.json").unlink()
    rep = replay(case, ReplayOptions(framework="torch"))
    assert rep["verdict"] == "pass" and any("outputs only" in n for n in rep["notes"])
    assert [t["kind"] for t in rep["tensors"]] == ["output"]


def test_an_error_in_the_small_magnitude_half_fails_elementwise():
    th = Thresholds.load()
    limit = th.limit("output", "output", "float32")
    frac = th.for_dtype("float32")["elem_max_fraction"]
    rng = np.random.default_rng(0)
    r = np.concatenate([rng.standard_normal(4096), 1e-3 * rng.standard_normal(4096)]).astype(np.float32)
    x = r.copy()
    x[4096:] *= 1.05                       # 5 % wrong where the values are 1000x smaller
    m = compare_arrays(x, r, elem_limit=limit)
    assert m["max_rel"] < limit            # the global maximum does not see it ...
    v, reason = verdict(m, limit, 0.5, elem_max_fraction=frac)
    assert v == "fail" and "elementwise" in reason     # ... the elementwise criterion does
    # fp32-sized noise everywhere (relative 1e-6 of the tensor's scale) passes
    noise = (r + 1e-6 * np.abs(r).max() * rng.standard_normal(r.size)).astype(np.float32)
    m = compare_arrays(noise, r, elem_limit=limit)
    assert verdict(m, limit, 0.5, elem_max_fraction=frac)[0] == "pass" and m["elem_bad"] == 0


def test_an_import_error_inside_a_port_is_an_error_not_not_covered(toy, tmp_path, monkeypatch):  # noqa: F811
    from parity.ci import run_suite

    mod = _toy_mod()

    def broken(cfg):
        raise ModuleNotFoundError("No module named 'flash_attn_missing'", name="flash_attn_missing")

    monkeypatch.setattr(mod, "build_ms", broken)
    with pytest.raises(ModuleNotFoundError):
        replay(toy, ReplayOptions(framework="mindspore"))
    cases = _copy(toy, tmp_path / "cases").parent
    lines = []
    assert run_suite(cases, tmp_path / "r", ["mindspore"], ["free"], echo=lines.append) == 1
    assert "ERROR ModuleNotFoundError" in lines[-1], lines

    def absent(cfg):
        raise ModuleNotFoundError("No module named 'opensora_ms.models.toy'", name="opensora_ms.models.toy")

    monkeypatch.setattr(mod, "build_ms", absent)
    with pytest.raises(NotCoveredError):
        replay(toy, ReplayOptions(framework="mindspore"))


def test_bf16_ulps():
    import torch

    a = torch.tensor([1.0, 0.5, -3.0, 0.0, 1e-3]).bfloat16()
    assert bf16_ulps(a.float().numpy(), a.float().numpy()) == 0
    nxt = (a.view(torch.int16) + 1).view(torch.bfloat16)   # one ulp up in magnitude
    assert bf16_ulps(nxt.float().numpy()[:3], a.float().numpy()[:3]) == pytest.approx(1.0, abs=0.01)


def test_stored_bf16_outputs_replay_bit_exact_on_torch_and_fail_when_off(tmp_path):
    """clip_tiny's `bf16/pooler_output`: the torch reference in bf16 reproduces it (≤ 1 ulp allowed); moved by
    4 ulps the replay fails naming it. A float32 MindSpore replay defers it, by name."""
    rep = replay(TINY / "clip_tiny", ReplayOptions(framework="torch"))
    assert rep["verdict"] == "pass" and rep["stored_lowp"]["compared"] == ["bf16/pooler_output"]
    assert rep["stored_lowp"]["max_ulps"] <= 1
    row = next(t for t in rep["tensors"] if t["name"] == "bf16/pooler_output")
    assert "oracle" in row and row["oracle"]["vs"] == "stored"
    case = _copy(TINY / "clip_tiny", tmp_path)
    out = load_dict(_file(case, "outputs"))
    import torch

    bits = torch.from_numpy(out["bf16/pooler_output"]).bfloat16().view(torch.int16)
    out["bf16/pooler_output"] = (bits + 4).view(torch.bfloat16).float().numpy()
    from safetensors.torch import save_file

    save_file({k: (torch.from_numpy(v).bfloat16() if k.startswith("bf16/") else torch.from_numpy(v))
               for k, v in out.items()}, str(_file(case, "outputs")))
    rep = replay(case, ReplayOptions(framework="torch"))
    assert rep["verdict"] == "fail" and rep["first_divergence"]["name"] == "bf16/pooler_output"
    ms = replay(TINY / "clip_tiny", ReplayOptions(framework="mindspore"))
    assert ms["verdict"] == "pass" and ms["deferred_outputs"] == ["bf16/pooler_output"]


def test_the_case_dtype_comes_from_its_files(toy, tmp_path):  # noqa: F811
    """A case whose weights are bfloat16 replays in bfloat16 without --dtype; the torch replay is compared with its
    stored bf16 outputs; MindSpore CPU refuses it (fp32 only) in one line."""
    import torch
    from safetensors.torch import save_file

    from parity.engine import ReplayError, build_torch_loaded, torch_numerics

    case = _copy(toy, tmp_path)
    w = load_dict(_file(case, "weights"))
    save_file({k: torch.from_numpy(v).bfloat16() for k, v in w.items()}, str(_file(case, "weights")))
    mod = _toy_mod()
    model = build_torch_loaded(mod, {"d": 8}, load_dict(_file(case, "weights")), "bfloat16")
    with torch_numerics("bfloat16"):
        y = mod.run_torch(model, load_dict(_file(case, "inputs")))["output"]
    save_file({"output": torch.from_numpy(y).bfloat16()}, str(_file(case, "outputs")))
    for kind in ("hooks",):
        _file(case, kind).unlink()
    case.with_name(case.name + ".hooks_aliases.json").unlink()
    rep = replay(case, ReplayOptions(framework="torch"))
    assert rep["dtype"] == "bfloat16" and rep["verdict"] == "pass", rep["notes"]
    assert rep["stored_lowp"]["compared"] == ["output"] and rep["stored_lowp"]["max_ulps"] == 0
    assert any("made in bfloat16" in n for n in rep["notes"])
    with pytest.raises(ReplayError, match="float32 only"):
        replay(case, ReplayOptions(framework="mindspore"))
