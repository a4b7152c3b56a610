"""Metrics on known arrays, verdict rules, thresholds config, the streaming safetensors writer, alignment ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from parity import metrics
from parity.align import Aligner, apply_ops, split_hook_name
from parity.case import HookStore
from parity.metrics import Thresholds, compare_arrays, oracle_ratio, verdict
from parity.tensorio import SafetensorsReader, SafetensorsWriter


def test_metrics_on_known_arrays():
    r = np.array([1.0, -2.0, 4.0, 0.0], np.float32)
    x = np.array([1.0, -2.0, 4.004, 0.002], np.float32)
    m = compare_arrays(x, r)
    assert m["max_abs"] == pytest.approx(0.004, rel=1e-4)
    assert m["max_rel"] == pytest.approx(0.004 / 4.0, rel=1e-4)          # / max|ref|
    assert m["mean_abs"] == pytest.approx(0.006 / 4, rel=1e-4)
    assert m["rmse"] == pytest.approx(math.sqrt((0.004 ** 2 + 0.002 ** 2) / 4), rel=1e-4)
    x64, r64 = x.astype(np.float64), r.astype(np.float64)
    cos = float(np.dot(x64, r64) / (np.linalg.norm(x64) * np.linalg.norm(r64)))
    assert m["cosine"] == pytest.approx(cos, rel=1e-12)
    # element rel errors: 0, 0, 1e-3 (not < 1e-3), 0.002/eps (huge) -> 2 of 4 under 1e-3, 3 of 4 under 5e-3
    assert m["ratio_1e-3"] == pytest.approx(0.5)
    assert m["ratio_5e-3"] == pytest.approx(0.75)
    assert (m["nan"], m["inf"], m["shape"], m["dtype"]) == (0, 0, [4], "float32")


def test_metrics_edge_cases_and_chunking(monkeypatch):
    z = np.zeros((3, 3), np.float32)
    m = compare_arrays(z, z)
    assert (m["max_rel"], m["cosine"], m["ratio_1e-3"]) == (0.0, 1.0, 1.0)
    m = compare_arrays(z + 1, z)
    assert m["max_rel"] == math.inf and m["cosine"] == 0.0
    assert compare_arrays(np.ones(3), np.ones(4))["shape_mismatch"]
    x = np.array([1.0, np.nan, np.inf, 2.0])
    m = compare_arrays(x, np.array([1.0, 1.0, 1.0, 2.0]))
    assert (m["nan"], m["inf"], m["max_abs"]) == (1, 1, 0.0)
    # chunked accumulation gives the same numbers as one chunk
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(10_001), rng.standard_normal(10_001)
    full = compare_arrays(a, b)
    monkeypatch.setattr(metrics, "CHUNK", 97)
    chunked = compare_arrays(a, b)
    for k in ("max_abs", "max_rel", "mean_abs", "rmse", "cosine", "ratio_1e-3", "ratio_5e-3"):
        assert chunked[k] == pytest.approx(full[k], rel=1e-12), k


def test_verdicts_and_thresholds():
    th = Thresholds.load()
    # the documented fp32 limits
    assert th.limit("output", "output", "float32") == 1e-4
    assert th.limit("double_blocks.0.img_attn.q_proj", "hook", "float32") == 1e-4
    assert th.for_dtype("bfloat16")["oracle_ratio"] == 2.0
    m = compare_arrays(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert verdict(m, 1e-3, 0.5)[0] == "pass"
    m = compare_arrays(np.array([1.0, 2.0006]), np.array([1.0, 2.0]))      # 3e-4 of max -> pass
    assert verdict(m, 1e-3, 0.5)[0] == "pass"
    m = compare_arrays(np.array([1.0, 2.0014]), np.array([1.0, 2.0]))      # 7e-4 -> warn band
    assert verdict(m, 1e-3, 0.5)[0] == "warn"
    m = compare_arrays(np.array([1.0, 2.01]), np.array([1.0, 2.0]))        # 5e-3 -> fail
    v, reason = verdict(m, 1e-3, 0.5)
    assert v == "fail" and "max_rel" in reason
    m = compare_arrays(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert verdict(m, 1e-3, 0.5)[0] == "fail"
    # oracle decides for low precision regardless of max_rel
    m = compare_arrays(np.array([1.0, 2.01]), np.array([1.0, 2.0]))
    assert verdict(m, 1e-3, 0.5, oracle={"ratio": 1.9}, oracle_limit=2.0, oracle_warn=1.5)[0] == "warn"
    assert verdict(m, 1e-3, 0.5, oracle={"ratio": 1.0}, oracle_limit=2.0, oracle_warn=1.5)[0] == "pass"
    assert verdict(m, 1e-3, 0.5, oracle={"ratio": 2.5}, oracle_limit=2.0, oracle_warn=1.5)[0] == "fail"


def test_oracle_ratio():
    assert oracle_ratio(0.0, 0.0, 1.0, "bfloat16") == 1.0
    floor = 0.01 * 2.0 ** -8
    assert oracle_ratio(2e-3, 1e-3, 1.0, "bfloat16") == pytest.approx((2e-3 + floor) / (1e-3 + floor), rel=1e-12)
    # a near-exact torch result does not blow up a negligible error: floor = 0.01 * 2^-8 * rms
    assert oracle_ratio(1e-9, 0.0, 1.0, "bfloat16") < 1.01


def test_streaming_writer_keeps_order_and_is_valid_safetensors(tmp_path):
    p = tmp_path / "a.safetensors"
    arrays = {"z": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, 2], np.int64),
              "m": np.zeros((0, 4), np.float32), "d": np.ones(3, np.float64)}
    with SafetensorsWriter(p, {"case": "x"}) as w:
        for k, v in arrays.items():
            w.add(k, v)
    assert not (tmp_path / "a.safetensors.data.tmp").exists()
    loaded = load_file(str(p))                     # the reference implementation reads it
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
    r = SafetensorsReader(p)
    assert r.keys() == ["z", "a", "m", "d"] and r.metadata["case"] == "x"
    with pytest.raises(ValueError):
        w2 = SafetensorsWriter(tmp_path / "b.safetensors")
        w2.add("x", np.ones(1))
        w2.add("x", np.ones(1))


def test_alignment_concat_ops_aliases_and_identity():
    store = {"b.0.q": np.ones((2, 3, 4)), "b.0.k": 2 * np.ones((2, 3, 4)),
             "b.0.norm": np.arange(2 * 3 * 2 * 4, dtype=np.float64).reshape(2, 3, 2, 4), "plain": np.zeros(2)}
    hs = {"alias": "plain"}

    def has(n):
        return n in store or (n in hs and hs[n] in store)

    def get(n):
        return store[n] if n in store else store[hs[n]]

    al = Aligner([
        {"torch": ["b.{i}.q", "b.{i}.k"], "ms": "b.{i}.qk", "concat": -1},
        {"torch": "b.{i}.norm", "ms": "b.{i}.norm", "ops": [{"transpose": {"axes": [0, 2, 1, 3]}}]},
        {"torch": "b.{i}.attn", "ms": None, "reason": "no single output"},
    ], vars={"head_dim": 4})
    e = al.expected("b.0.qk", "", has, get)
    assert e.torch_names == ["b.0.q", "b.0.k"] and e.array.shape == (2, 3, 8) and e.array[..., 4:].min() == 2
    e = al.expected("b.0.norm", "", has, get)
    assert e.array.shape == (2, 2, 3, 4)
    np.testing.assert_array_equal(e.array, store["b.0.norm"].transpose(0, 2, 1, 3))
    assert al.expected("alias", "", has, get).array is not None           # identity by path, via the alias
    assert al.expected("nothing", ".0", has, get).missing == ["nothing.0"]
    assert al.explicit_reason("b.3.attn") == "no single output"
    # per-head RoPE permutation along the last axis (converter.ops semantics)
    x = np.arange(8, dtype=np.float32)[None]
    y = apply_ops(x, [{"permute_rows": {"head_dim": "head_dim", "convention": "interleaved_to_half", "axis": -1}}],
                  {"head_dim": 4})
    np.testing.assert_array_equal(y[0], [0, 2, 1, 3, 4, 6, 5, 7])


def test_split_hook_name():
    mods = {"double_blocks.0", "double_blocks.0.img_mod", "double_blocks.0.img_mod.lin", "a.nonlinearity", "__root__"}
    assert split_hook_name("double_blocks.0.img_mod.0.shift", mods) == ("double_blocks.0.img_mod", ".0.shift")
    assert split_hook_name("double_blocks.0.1", mods) == ("double_blocks.0", ".1")
    assert split_hook_name("a.nonlinearity#12", mods) == ("a.nonlinearity", "#12")
    assert split_hook_name("x.y#3.0", None) == ("x.y", "#3.0")


def test_hook_store_resolves_alias_chains(tmp_path):
    p = tmp_path / "h.safetensors"
    with SafetensorsWriter(p) as w:
        w.add("real", np.ones(2, np.float32))
    hs = HookStore(SafetensorsReader(p), {"a": "b", "b": "real", "loop1": "loop2", "loop2": "loop1"})
    assert "a" in hs and hs.get("a").sum() == 2
    assert "loop1" not in hs and "missing" not in hs


def test_writer_streams_and_replaces_atomically(tmp_path, monkeypatch):
    """Finding 5/8: data streams to `<path>.data.tmp` while adding (bounded RAM); the file appears under its final
    name only by rename; a failure keeps the old file and leaves no temporaries."""
    import parity.tensorio as T

    p = tmp_path / "a.safetensors"
    p.write_bytes(b"old")
    w = SafetensorsWriter(p)
    w.add("x", np.ones(100_000, np.float32))
    assert (tmp_path / "a.safetensors.data.tmp").stat().st_size == 400_000   # on disk already, not in RAM
    assert p.read_bytes() == b"old"

    def broken(src, dst, n):
        dst.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(T.shutil, "copyfileobj", broken)
    with pytest.raises(OSError):
        w.close()
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors"]
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "b.safetensors") as w2:
            w2.add("x", np.ones(3, np.float32))
            raise RuntimeError("interrupted")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors"]


def test_tensorio_uses_the_converter_and_decodes_bf16(tmp_path):
    """Finding 8: no private dtype table / header code; BF16 files (written by torch) decode exactly to float32."""
    import torch
    from safetensors.torch import save_file

    import parity.align as A
    import parity.tensorio as T

    assert not hasattr(T, "_NP_TO_ST") and not hasattr(A, "_NP_TO_ST") and not hasattr(T, "struct")
    assert not hasattr(A, "resolve_vars") and not hasattr(A, "ROOT")
    t = torch.tensor([1.5, -2.25, 3.0e-3], dtype=torch.bfloat16)
    save_file({"b": t, "i": torch.arange(3)}, str(tmp_path / "x.safetensors"))
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert r.dtype("b") == "BF16" and r.get("b").dtype == np.float32
    np.testing.assert_array_equal(r.get("b"), t.float().numpy())
    assert r.get("i").tolist() == [0, 1, 2] and r.keys() == ["b", "i"]
    with pytest.raises(TypeError, match="b: "):
        SafetensorsWriter(tmp_path / "c.safetensors").add("b", np.ones(2, np.complex64))


def test_apply_ops_keeps_dtypes_and_refuses_unknown_ones():
    """Finding 8: align ops work on the converter's storage view; an unknown dtype is an error, not 'F32'."""
    x = np.arange(8, dtype=np.float16).reshape(2, 4)
    y = apply_ops(x, [{"transpose": {"axes": [1, 0]}}], {})
    assert y.dtype == np.float16 and y.shape == (4, 2)
    with pytest.raises(TypeError):
        apply_ops(x.astype(np.complex64), [{"transpose": {"axes": [1, 0]}}], {})
    z = apply_ops(np.array([1.0, 1.00390625 + 1e-3], np.float32), [{"cast": {"dtype": "BF16"}}], {})
    assert z.dtype == np.float32 and z.tolist() == [1.0, 1.0078125]     # values rounded to bf16, as values
