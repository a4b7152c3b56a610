"""The mapping spec: parsing errors, plan validation, each op's math and inverse, include/prefix, vars."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from converter.errors import MappingError
from converter.inventory import compress_keys
from converter.mapping import Mapping, load_mapping
from converter.ops import rope_permutation
from converter.tensor import RawTensor, encode


def mk(rules, **top):
    return Mapping({"name": "t", "version": 1, "rules": rules, **top})


def inv(sd):
    return {k: (v.shape, "F32") for k, v in sd.items()}


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- op math ------------------------------------------------------------------------------------------------
def test_rope_permutation_matches_the_spec_formula():
    D = 8
    old = np.arange(D)
    new = old[rope_permutation(D, "half_to_interleave")]
    # rotate-half -> interleaved: new[2i] = old[i], new[2i+1] = old[i + D/2]
    assert all(new[2 * i] == old[i] and new[2 * i + 1] == old[i + D // 2] for i in range(D // 2))
    back = new[rope_permutation(D, "interleaved_to_half")]
    assert np.array_equal(back, old)


def test_permute_rows_on_fused_qkv_only_touches_selected_parts():
    D, H = 4, 2  # head_dim 4, 2 heads -> parts of 8 rows
    m = mk([{"source": "x.{p}", "target": "x.{p}",
             "ops": [{"permute_rows": {"head_dim": D, "convention": "half_to_interleave", "rows": [0, 2], "parts": 3}}]}])
    w = np.arange(3 * H * D, dtype=np.float32)[:, None] * np.ones((1, 5), np.float32)
    out = m.convert({"x.weight": w})["x.weight"]
    idx = rope_permutation(D, "half_to_interleave")
    expect = np.concatenate([w[h * D:(h + 1) * D][idx] for h in range(2 * H)] + [w[2 * H * D:]])
    assert np.array_equal(out, expect)
    assert np.array_equal(out[2 * H * D:], w[2 * H * D:])  # v untouched
    assert np.array_equal(m.invert().convert({"x.weight": out})["x.weight"], w)


def test_permute_rows_rejects_non_head_multiple():
    m = mk([{"source": "x", "target": "x", "ops": [{"permute_rows": {"head_dim": 4, "convention": "half_to_interleave", "parts": 3}}]}])
    with pytest.raises(MappingError, match=r"x \[10\].*not 3 part\(s\) of whole heads of 4"):
        m.plan({"x": ((10,), "F32")})


def test_concat_split_transpose_reshape_roundtrip_bf16_bit_exact():
    rng = np.random.default_rng(1)
    bits = lambda *s: RawTensor.from_storage(rng.integers(0, 2**16, size=s, dtype=np.uint16), "BF16")  # noqa: E731
    sd = {"a.q.w": bits(4, 3), "a.k.w": bits(4, 3), "a.v.w": bits(2, 3), "conv.w": bits(6, 2, 5), "t.w": bits(3, 7)}
    m = mk([
        {"source": ["a.q.{p}", "a.k.{p}", "a.v.{p}"], "target": "a.qkv.{p}", "ops": [{"concat": {"axis": 0, "sizes": [4, 4, 2]}}]},
        {"source": "conv.{p}", "target": "conv.{p}", "ops": [{"reshape": {"shape": [6, 2, 1, 5], "inverse": [6, 2, 5]}}]},
        {"source": "t.{p}", "target": "t.{p}", "ops": [{"transpose": {"axes": [1, 0]}}]},
    ])
    out = m.convert(sd)
    assert out["a.qkv.w"].shape == (10, 3) and out["a.qkv.w"].dtype == "BF16"
    assert out["a.qkv.w"].tobytes() == b"".join(sd[k].tobytes() for k in ("a.q.w", "a.k.w", "a.v.w"))
    assert out["conv.w"].shape == (6, 2, 1, 5)
    assert np.array_equal(out["t.w"].storage(), sd["t.w"].storage().T)
    back = m.invert().convert(out)  # sizes given in the spec: no inventory needed
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and back[k].tobytes() == sd[k].tobytes(), k


def test_split_sizes_from_target_inventory_and_errors():
    m = mk([{"source": "x.{p}", "target": ["x.a.{p}", "x.b.{p}"], "ops": [{"split": {"axis": 0}}]}])
    w = f32(7, 2)
    with pytest.raises(MappingError, match=r"needs 'sizes' or a target inventory"):
        m.convert({"x.w": w})
    out = m.convert({"x.w": w}, target_inventory={"x.a.w": ((3, 2), "F32"), "x.b.w": ((4, 2), "F32")})
    assert np.array_equal(out["x.a.w"], w[:3]) and np.array_equal(out["x.b.w"], w[3:])
    back = m.invert().convert(out)
    assert np.array_equal(back["x.w"], w)


def test_split_with_var_sizes():
    m = mk([{"source": "x", "target": ["q", "rest"], "ops": [{"split": {"axis": 0, "sizes": ["hidden", "3*hidden"]}}]}],
           vars={"hidden": {"source": "h", "dim": 0}})
    m.rules.append(mk([{"source": "h", "target": "h"}]).rules[0])
    out = m.convert({"x": f32(8, 2), "h": f32(2)})
    assert out["q"].shape == (2, 2) and out["rest"].shape == (6, 2)


def test_cast_is_explicit_and_only_invertible_with_from():
    m = mk([{"source": "x", "target": "x", "ops": [{"cast": {"dtype": "BF16"}}]}])
    out = m.convert({"x": np.array([1.0, 1.00390625, -2.5], np.float32)})["x"]
    assert out.dtype == "BF16" and np.array_equal(out.to_float32(), [1.0, 1.0, -2.5])  # round to nearest even
    with pytest.raises(MappingError, match="not invertible"):
        m.invert()
    m2 = mk([{"source": "x", "target": "x", "ops": [{"cast": {"dtype": "F32", "from": "BF16"}}]}])
    src = RawTensor.from_storage(encode(np.array([0.5, 3.0], np.float32), "BF16"), "BF16")
    up = m2.convert({"x": src})["x"]
    assert up.dtype == np.float32
    assert m2.invert().convert({"x": up})["x"].tobytes() == src.tobytes()


def test_fp8_is_never_decoded_silently():
    from converter.errors import UserError

    fp8 = RawTensor("F8_E4M3", (4,), bytes([1, 2, 3, 4]))
    m = mk([{"source": "x", "target": "x"}])
    assert m.convert({"x": fp8})["x"].tobytes() == fp8.tobytes()  # keep: bytes untouched
    with pytest.raises(UserError, match="x: F8_E4M3 values cannot be cast to BF16"):
        m.convert({"x": fp8}, dtype="bf16")
    with pytest.raises(MappingError, match="cannot decode or encode F8_E4M3"):
        mk([{"source": "x", "target": "x", "ops": [{"cast": {"dtype": "F32"}}]}]).plan({"x": ((4,), "F8_E4M3")})


def test_big_endian_arrays_are_written_little_endian(tmp_path):
    from converter.safetensors_io import save_file
    from converter.sources import Source
    from converter.tensor import as_storage

    be = np.arange(6, dtype=">f4").reshape(2, 3)
    st, dt = as_storage(be)
    assert dt == "F32" and st.tobytes() == be.astype("<f4").tobytes()
    assert np.array_equal(mk([{"source": "x", "target": "y"}]).convert({"x": be})["y"], be)
    save_file({"x": be}, tmp_path / "be.safetensors")
    assert np.array_equal(Source(tmp_path / "be.safetensors").load()["x"], be)


@pytest.mark.parametrize("ops, msg", [
    ([{"permute_rows": {"head_dim": 4, "convention": "interleaved_to_half", "rows": [0]}}], r"rows is \[first_part, end_part\]"),
    ([{"permute_rows": {"head_dim": 4, "convention": "interleaved_to_half", "rows": 2}}], "rows must be a list"),
    ([{"permute_rows": {"head_dim": "8 // 0", "convention": "interleaved_to_half"}}], "division by zero"),
    ([{"transpose": {"axes": 1}}], "axes must be a list"),
    ([{"transpose": {"axes": [0]}}], "not a permutation"),
])
def test_malformed_ops_are_mapping_errors(ops, msg):
    with pytest.raises(MappingError, match=msg) as e:
        mk([{"source": "x", "target": "x", "ops": ops}]).plan({"x": ((), "F32")} if ops[0].get("transpose") == {"axes": [0]}
                                                               else {"x": ((8, 2), "F32")})
    assert "rule 1" in str(e.value)  # the file (or mapping) and rule


def test_dtype_policy_rounds_like_torch():
    import torch
    x = f32(1000, seed=3) * 100
    m = mk([{"source": "x", "target": "x"}])
    got = m.convert({"x": x}, dtype="bf16")["x"]
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got.storage(), ref)
    with pytest.raises(Exception, match="overflow float16"):
        m.convert({"x": np.array([1e6], np.float32)}, dtype="fp16")


# -- planning -----------------------------------------------------------------------------------------------
def test_rules_chain_in_file_order():
    """A later rule sees an earlier rule's output: fuse, then permute the fused tensor."""
    m = mk([
        {"source": ["b.{i}.q", "b.{i}.k"], "target": "b.{i}.qk", "ops": [{"concat": {"axis": 0}}]},
        {"source": "b.{i}.qk", "target": "b.{i}.qk", "ops": [{"permute_rows": {"head_dim": 4, "convention": "half_to_interleave"}}]},
    ])
    q, k = f32(4, 2, seed=1), f32(4, 2, seed=2)
    out = m.convert({"b.0.q": q, "b.0.k": k})["b.0.qk"]
    idx = rope_permutation(4, "half_to_interleave")
    assert np.array_equal(out, np.concatenate([q[idx], k[idx]]))
    back = m.invert().convert({"b.0.qk": out}, target_inventory={"b.0.q": ((4, 2), "F32"), "b.0.k": ((4, 2), "F32")})
    assert np.array_equal(back["b.0.q"], q) and np.array_equal(back["b.0.k"], k)


def test_plan_reports_every_problem_with_did_you_mean():
    m = mk([{"source": "blocks.{i}.attn.{p}", "target": "blocks.{i}.attn.{p}"}])
    with pytest.raises(MappingError) as e:
        m.plan({"blocks.0.attn.weight": ((2,), "F32"), "blocks.0.atn.weight": ((2,), "F32"), "other": ((1,), "F32")}, where="f.safetensors")
    assert len(e.value.problems) == 2
    assert e.value.problems[0] == ("key 'blocks.0.atn.weight' [2] F32 matches no rule of mapping t "
                                   "(did you mean 'blocks.0.attn.weight', matched by t rule 1 (blocks.{i}.attn.{p})?)")
    assert str(e.value).startswith("f.safetensors: mapping t: 2 problem(s): key 'blocks.0.atn.weight'")
    assert "\n" not in str(e.value)


def test_drop_needs_a_reason_and_is_reported():
    with pytest.raises(MappingError, match="drop needs a reason"):
        mk([{"source": "x", "drop": ""}])
    m = mk([{"source": "x", "target": "x"}, {"source": "ema.{p}", "drop": "EMA copy, not used for inference"}])
    plan = m.plan({"x": ((1,), "F32"), "ema.w": ((1,), "F32")})
    assert plan.dropped == {"ema.w": "EMA copy, not used for inference"} and list(plan.targets) == ["x"]
    assert m.invert().not_restored == ["ema.{p}"]


def test_produce_over_an_unconsumed_source_key_is_an_error():
    m = mk([{"source": "a", "target": "b"}])
    with pytest.raises(MappingError, match=r"two rules produce 'b'.*source checkpoint"):
        m.plan({"a": ((1,), "F32"), "b": ((1,), "F32")})


def test_target_inventory_extra_and_kind():
    m = mk([{"source": "{x}", "target": "{x}"}])
    with pytest.raises(MappingError) as e:
        m.plan({"a": ((1,), "F32"), "c": ((2,), "I64")}, {"a": ((1,), "F32"), "c": ((2,), "F32"), "d": ((1,), "F32")})
    msgs = " | ".join(e.value.problems)
    assert "target 'd' [1] is produced by no rule" in msgs and "'c' is I64 but the target expects F32" in msgs
    # float widths may differ (load_strict casts): bf16 file for an fp32 net is fine
    m.plan({"a": ((1,), "BF16")}, {"a": ((1,), "F32")})
    with pytest.raises(MappingError, match="would be BF16"):
        m.plan({"a": ((1,), "BF16")}, {"a": ((1,), "F32")}, check_dtypes=True)


@pytest.mark.parametrize("rule, msg", [
    ({"source": "a.{i}", "target": "b.{j}"}, "same placeholders"),
    ({"source": "a", "target": "b", "ops": [{"frobnicate": {}}]}, "unknown op 'frobnicate'"),
    ({"source": "a", "target": "b", "ops": [{"concat": {"axis": 0, "dim": 1}}]}, "does not take"),
    ({"source": "a", "target": "b", "colour": "red"}, "unknown field"),
    ({"source": ["a", "b"], "target": "c"}, "give 2 tensor"),
    ({"source": "a", "target": ["b", "c"], "ops": ["concat"]}, "give 1 tensor"),
    ({"source": "a", "target": "b", "ops": [{"permute_rows": {"head_dim": 4, "convention": "sideways"}}]}, "convention must be"),
    ({"target": "b"}, "needs 'source'"),
])
def test_parse_errors(rule, msg):
    with pytest.raises(MappingError, match=msg):
        mk([rule])


def test_top_level_and_file_errors(tmp_path):
    with pytest.raises(MappingError, match="unknown top-level"):
        Mapping({"name": "t", "rules": [{"source": "a", "target": "a"}], "rulez": []})
    p = tmp_path / "right.yaml"
    p.write_text(yaml.safe_dump({"name": "wrong", "rules": [{"source": "a", "target": "a"}]}))
    with pytest.raises(MappingError, match="must equal the file stem"):
        load_mapping(p)
    p.write_text("rules: [unclosed")
    with pytest.raises(MappingError, match="invalid YAML"):
        load_mapping(p)


def test_vars_are_read_off_shapes():
    m = mk([{"source": "w", "target": "w", "ops": [{"permute_rows": {"head_dim": "hd", "convention": "half_to_interleave"}}]},
            {"source": "s", "target": "s"}], vars={"hd": {"source": "s", "target": "s", "dim": 0}})
    m.plan({"w": ((8, 2), "F32"), "s": ((4,), "F32")})
    with pytest.raises(MappingError, match="var 'hd' cannot be read"):
        m.plan({"w": ((8, 2), "F32")})


def test_resolve_vars_public(tmp_path):
    (tmp_path / "inner.yaml").write_text(yaml.safe_dump({
        "name": "inner", "vars": {"hd": {"source": "n.s", "target": "n.s", "dim": 0}, "k": 3},
        "rules": [{"source": "n.{p}", "target": "n.{p}"}]}))
    (tmp_path / "outer.yaml").write_text(yaml.safe_dump({
        "name": "outer", "include": [{"mapping": "inner", "prefix": "m."}],
        "vars": {"w0": {"source": "w", "dim": 1}}, "rules": [{"source": "w", "target": "w"}]}))
    m = load_mapping(tmp_path / "outer.yaml")
    assert m.resolve_vars({"m.n.s": ((4,), "F32"), "w": ((2, 5), "F32")}) == {"hd": 4, "k": 3, "w0": 5}
    assert m.resolve_vars({"m.n.s": (4,), "w": f32(2, 5)}) == {"hd": 4, "k": 3, "w0": 5}  # bare shapes / arrays
    with pytest.raises(MappingError, match=r"var 'hd' cannot be read: m\.n\.s"):
        m.resolve_vars({"w": (2, 5)})


def test_include_with_prefix(tmp_path):
    (tmp_path / "inner.yaml").write_text(yaml.safe_dump({
        "name": "inner", "vars": {"hd": {"source": "n.s", "target": "n.s", "dim": 0}},
        "rules": [{"source": "w", "target": "w", "ops": [{"permute_rows": {"head_dim": "hd", "convention": "half_to_interleave"}}]},
                  {"source": "n.{p}", "target": "n.{p}"}]}))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"name": "other", "rules": [{"source": "{a}.{b}", "target": "{a}.{b}"}]}))
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({"name": "both", "include": [
        {"mapping": "inner", "prefix": "m."}, {"mapping": "other", "source_prefix": "vae.", "target_prefix": "ae."}]}))
    m = load_mapping(tmp_path / "both.yaml")
    sd = {"m.w": f32(8, 3), "m.n.s": f32(4), "vae.x.y": f32(1)}
    out = m.convert(sd)
    assert sorted(out) == ["ae.x.y", "m.n.s", "m.w"]
    idx = rope_permutation(4, "half_to_interleave")
    assert np.array_equal(out["m.w"], sd["m.w"].reshape(2, 4, 3)[:, idx].reshape(8, 3))
    back = m.invert().convert(out)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"name": "loop", "include": [{"mapping": "loop"}]}))
    with pytest.raises(MappingError, match="include cycle"):
        load_mapping(tmp_path / "loop.yaml")


def test_include_top_level_inventories_override_and_align_is_inherited(tmp_path):
    def inv_file(name, keys):
        (tmp_path / name).write_text(json.dumps({"tensors": [{"key": k, "shape": [2], "dtype": "F32"} for k in keys]}))

    inv_file("inner_src.json", ["w"])
    inv_file("inner_tgt.json", ["w"])
    inv_file("own_src.json", ["m.w", "m.extra"])
    inv_file("own_tgt.json", ["n.w"])
    (tmp_path / "inner.yaml").write_text(yaml.safe_dump({
        "name": "inner", "source": {"manifest": "inner_src.json"}, "target": {"inventory": "inner_tgt.json"},
        "rules": [{"source": "w", "target": "w"}],
        "align": [{"torch": ["a.{i}", "b.{i}"], "ms": "c.{i}", "concat": -1}, {"torch": "d", "ms": None, "reason": "x"}]}))
    (tmp_path / "outer.yaml").write_text(yaml.safe_dump({
        "name": "outer", "include": [{"mapping": "inner", "source_prefix": "m.", "target_prefix": "n."}],
        "align": [{"torch": "own", "ms": "own"}]}))
    m = load_mapping(tmp_path / "outer.yaml")
    assert m.source_manifest() == {"m.w": ((2,), "F32")}  # no own files: the prefixed included ones
    assert m.align == [{"torch": ["m.a.{i}", "m.b.{i}"], "ms": "n.c.{i}", "concat": -1},
                       {"torch": "m.d", "ms": None, "reason": "x"}, {"torch": "own", "ms": "own"}]
    data = yaml.safe_load((tmp_path / "outer.yaml").read_text())
    data.update(source={"manifest": "own_src.json"}, target={"inventory": "own_tgt.json"})
    (tmp_path / "outer.yaml").write_text(yaml.safe_dump(data))
    m = load_mapping(tmp_path / "outer.yaml")
    assert set(m.source_manifest()) == {"m.w", "m.extra"} and set(m.target_inventory()) == {"n.w"}
    assert set(m.invert().source_manifest()) == {"n.w"} and set(m.invert().target_inventory()) == {"m.w", "m.extra"}


def test_compress_keys():
    keys = [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(19)]
    assert compress_keys(keys) == ["double_blocks.{0..18}.img_attn.qkv.weight"]
    assert compress_keys(["a.0.b", "a.2.b", "c"]) == ["a.{0,2}.b", "c"]
    assert compress_keys(["a.0.b.1", "a.0.b.2", "a.1.b.1"]) == ["a.0.b.{1,2}", "a.1.b.1"]


def test_converter_imports_neither_mindspore_nor_torch():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, converter.engine, converter.mapping, converter.sources, converter.inventory; "
            "print('mindspore' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
