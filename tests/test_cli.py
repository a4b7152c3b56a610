"""`msconv inspect` / `msconv convert` through the CLI: listings, exact differences, and one test per bad
input — each checks exit code 2, a one-line message naming the file/key/shape, and that nothing
half-written exists under the output name."""
from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from conftest import TINY, torch_like_state
from converter.safetensors_io import save_file

TINY_WEIGHTS = sorted(TINY.glob("*.weights.safetensors"))

# A small mapping of our own so these error tests do not depend on the model engineers' files.
QKV_YAML = """
name: {name}
version: 1
description: test mapping (fuse q/k/v)
rules:
  - source: ["blk.{{i}}.q.{{p}}", "blk.{{i}}.k.{{p}}", "blk.{{i}}.v.{{p}}"]
    target: "blk.{{i}}.qkv.{{p}}"
    ops: [{{concat: {{axis: 0}}}}]
  - {{source: "blk.{{i}}.proj.{{p}}", target: "blk.{{i}}.out.{{p}}"}}
  - {{source: "head.{{p}}", target: "head.{{p}}"}}
"""
QKV_FILES = """source: {manifest: qkv_source.json}
target: {inventory: qkv_targets.json}
"""


def _inventory_json(path: Path, inv: dict) -> Path:
    path.write_text(json.dumps({"tensors": [{"key": k, "shape": list(s), "dtype": d} for k, (s, d) in inv.items()]}))
    return path


@pytest.fixture
def qkv(tmp_path):
    """(source file, mapping path) for the small fused-qkv case. The mapping names its source manifest and target
    inventory (files beside it), as the real mappings do, so the source is "the real checkpoint" of this mapping."""
    from converter.mapping import Mapping

    src_inv = {k: (v.shape, "F32") for k, v in torch_like_state().items()}
    _inventory_json(tmp_path / "qkv_source.json", src_inv)
    import yaml

    _inventory_json(tmp_path / "qkv_targets.json", Mapping(yaml.safe_load(QKV_YAML.format(name="x"))).plan(src_inv).inventory())
    mp = tmp_path / "qkv_test.yaml"
    mp.write_text(QKV_YAML.format(name="qkv_test") + QKV_FILES)
    src = tmp_path / "src.safetensors"
    save_file(torch_like_state(), src)
    return src, mp


def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _nothing_under(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.msconv-*")), list(out.parent.iterdir())


# -- inspect ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", TINY_WEIGHTS, ids=lambda p: p.name)
def test_inspect_lists_every_tensor(cli, path):
    res = cli("inspect", path, "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    with safe_open(str(path), "np") as f:  # the reference implementation's view of the same file
        keys = list(f.keys())
        ref = {k: list(f.get_slice(k).get_shape()) for k in keys}
    assert {t["key"]: t["shape"] for t in got["tensors"]} == ref
    assert all(t["dtype"] == "F32" and t["bytes"] == 4 * int(np.prod(t["shape"])) for t in got["tensors"])
    assert got["count"] == len(keys) and got["total_bytes"] == sum(t["bytes"] for t in got["tensors"])


def test_inspect_table_output(cli):
    res = cli("inspect", TINY / "mmdit_tiny.weights.safetensors")
    assert res.exit_code == 0
    assert "double_blocks.0.img_attn.q_proj.weight" in res.stdout and "106 tensors" in res.stdout


def test_inspect_against_reports_exact_differences(cli, tmp_path):
    path = TINY / "mmdit_tiny.weights.safetensors"
    inv = json.loads(cli("inspect", path, "--json").stdout)["tensors"]
    doctored = [dict(t) for t in inv if t["key"] != "img_in.bias"]  # -> extra in the file
    doctored.append({"key": "img_in.scale", "shape": [64], "dtype": "F32"})  # -> missing from the file
    for t in doctored:
        if t["key"] == "txt_in.weight":
            t["shape"] = [64, 49]
        if t["key"] == "cond_in.bias":
            t["dtype"] = "BF16"
    man = tmp_path / "doctored.json"
    man.write_text(json.dumps({"model": "doctored", "tensors": doctored}))
    res = cli("inspect", path, "--against", man, "--json")
    _one_line_error(res, "4 difference(s)", str(path))
    diff = json.loads(res.stdout)["differences"]
    assert diff == {"missing": ["img_in.scale"], "extra": ["img_in.bias"],
                    "shape": [{"key": "txt_in.weight", "actual": [64, 48], "expected": [64, 49]}],
                    "dtype": [{"key": "cond_in.bias", "actual": "F32", "expected": "BF16"}]}
    res = cli("inspect", path, "--against", man)  # human form lists them too
    assert "missing  img_in.scale" in res.stdout and "shape    txt_in.weight" in res.stdout


def test_inspect_against_identical_manifest_is_clean(cli, tmp_path):
    path = TINY / "dc_ae_tiny.weights.safetensors"
    inv = json.loads(cli("inspect", path, "--json").stdout)["tensors"]
    man = tmp_path / "same.json"
    man.write_text(json.dumps({"tensors": inv}))
    res = cli("inspect", path, "--against", man)
    assert res.exit_code == 0 and "0 difference(s)" in res.stdout


# -- bad source files ---------------------------------------------------------------------------------------
def _raw_file(path: Path, header, data: bytes = b"", length: int | None = None):
    js = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(js) if length is None else length) + js + data)
    return path


BAD_FILES = {
    "not_safetensors": (lambda p: (p.write_text("this is a README, not weights\n" * 10), p)[1], "not a safetensors file"),
    "too_short": (lambda p: (p.write_bytes(b"abc"), p)[1], "shorter than the 8-byte header length"),
    "corrupt_json": (lambda p: _raw_file(p, b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'), "corrupt header JSON"),
    "header_over_100mb": (lambda p: _raw_file(p, b"{}", length=200_000_000), "exceeds the 100 MB limit"),
    "offsets_out_of_range": (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                             "'w' data_offsets [0, 16] beyond the data section of 8 bytes"),
    "offsets_overlap": (lambda p: _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
                        "overlap"),
    "unsupported_dtype": (lambda p: _raw_file(p, {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
                          "tensor 'w' has unsupported dtype 'F4'"),
    "size_vs_shape": (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "'w' F32[3] needs 12 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_convert_rejects_bad_file(cli, qkv, tmp_path, case):
    make, needle = BAD_FILES[case]
    src = make(tmp_path / f"{case}.safetensors")
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", qkv[1], "--out", out)
    _one_line_error(res, str(src), needle)
    _nothing_under(out)
    res = cli("inspect", src)  # inspect refuses the same file the same way
    _one_line_error(res, str(src), needle)


def test_convert_missing_file(cli, qkv, tmp_path):
    out = tmp_path / "out"
    res = cli("convert", tmp_path / "nope.safetensors", "--mapping", qkv[1], "--out", out)
    _one_line_error(res, "nope.safetensors", "no such file")
    _nothing_under(out)


def test_convert_truncated_file(cli, qkv, tmp_path):
    data = qkv[0].read_bytes()
    src = tmp_path / "cut.safetensors"
    src.write_bytes(data[:-100])
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", qkv[1], "--out", out)
    _one_line_error(res, str(src), "truncated")
    _nothing_under(out)


def test_unknown_mapping_name(cli, qkv, tmp_path):
    res = cli("convert", qkv[0], "--mapping", "video_dc_aee", "--out", tmp_path / "o")
    _one_line_error(res, "mapping 'video_dc_aee' not found", "did you mean 'video_dc_ae'")


# -- mapping does not fit ------------------------------------------------------------------------------------
def test_keys_the_mapping_does_not_know(cli, qkv, tmp_path):
    sd = torch_like_state()
    sd["blk.0.q_norm.weight"] = np.ones(8, np.float32)
    src = tmp_path / "extra.safetensors"
    save_file(sd, src)
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", qkv[1], "--out", out)
    _one_line_error(res, str(src), "'blk.0.q_norm.weight' [8] F32 matches no rule", "did you mean")
    _nothing_under(out)


def test_keys_the_mapping_needs_but_are_absent(cli, qkv, tmp_path):
    sd = torch_like_state()
    del sd["blk.1.k.weight"]
    src = tmp_path / "nok.safetensors"
    save_file(sd, src)
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", qkv[1], "--out", out)
    _one_line_error(res, str(src), "'blk.1.k.weight' is needed by", "is absent")
    _nothing_under(out)


def test_target_absent_names_the_needed_source_key(cli, qkv, tmp_path):
    """With a target inventory, a target nobody produces names the source key that would produce it."""
    sd = torch_like_state()
    del sd["head.weight"]
    src = tmp_path / "nohead.safetensors"
    save_file(sd, src)
    tinv = tmp_path / "targets.json"
    from converter.mapping import load_mapping

    full = load_mapping(qkv[1]).plan({k: (v.shape, "F32") for k, v in torch_like_state().items()}).inventory()
    tinv.write_text(json.dumps({"tensors": [{"key": k, "shape": list(s), "dtype": d} for k, (s, d) in full.items()]}))
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", qkv[1], "--out", out, "--target-inventory", tinv)
    _one_line_error(res, "target 'head.weight' [3, 8] is produced by no rule", "needs source key 'head.weight' which is absent")
    _nothing_under(out)


def test_shape_mismatch(cli, qkv, tmp_path):
    from converter.mapping import load_mapping

    full = load_mapping(qkv[1]).plan({k: (v.shape, "F32") for k, v in torch_like_state().items()}).inventory()
    full["blk.1.qkv.weight"] = ((24, 9), "F32")
    tinv = tmp_path / "targets.json"
    tinv.write_text(json.dumps({"tensors": [{"key": k, "shape": list(s), "dtype": d} for k, (s, d) in full.items()]}))
    out = tmp_path / "out"
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--target-inventory", tinv)
    _one_line_error(res, str(qkv[0]), "'blk.1.qkv.weight' would be [24, 8] but the target expects [24, 9]")
    _nothing_under(out)


def test_concat_shape_mismatch_between_sources(cli, qkv, tmp_path):
    sd = torch_like_state()
    sd["blk.0.v.weight"] = np.zeros((8, 7), np.float32)
    src = tmp_path / "badv.safetensors"
    save_file(sd, src)
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", qkv[1], "--out", out)
    _one_line_error(res, "blk.0.q.weight [8, 8]", "concat: shapes [[8, 8], [8, 8], [8, 7]] differ outside axis 0")
    _nothing_under(out)


def test_two_rules_producing_one_target(cli, qkv, tmp_path):
    mp = tmp_path / "twice.yaml"
    mp.write_text(QKV_YAML.format(name="twice") + '  - {source: "blk.{i}.extra.{p}", target: "blk.{i}.out.{p}"}\n' + QKV_FILES)
    sd = torch_like_state()
    sd["blk.0.extra.weight"] = np.zeros((8, 8), np.float32)
    src = tmp_path / "twice.safetensors"
    save_file(sd, src)
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", mp, "--out", out)
    _one_line_error(res, "two rules produce 'blk.0.out.weight'", "twice rule 2", "twice rule 4")
    _nothing_under(out)


# -- output handling ----------------------------------------------------------------------------------------
def test_output_folder_exists_refused_unless_overwrite(cli, qkv, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out)
    _one_line_error(res, str(out), "output folder exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--overwrite")  # not an msconv output: still refused
    _one_line_error(res, str(out), "not an msconv output")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--overwrite")  # empty folder: replaced
    assert res.exit_code == 0, res.output
    first = (out / "msconv-manifest.json").read_text()
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--overwrite")  # an msconv output: replaced
    assert res.exit_code == 0, res.output
    assert json.loads(first)["tensors"] == json.loads((out / "msconv-manifest.json").read_text())["tensors"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model.safetensors.index.json", "msconv-manifest.json"]
    assert not list(tmp_path.glob(".out.msconv-*"))


def test_disk_full_leaves_nothing(cli, qkv, tmp_path, monkeypatch):
    import converter.engine as eng

    calls = {"n": 0}
    real = eng._write

    def full(fd, mv):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, mv)

    monkeypatch.setattr(eng, "_write", full)
    monkeypatch.setattr(eng, "CHUNK", 64)  # many small writes so the failure is mid-stream
    out = tmp_path / "out"
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--shard-size", "500B")
    _one_line_error(res, str(out), "disk full")
    _nothing_under(out)


def test_not_enough_space_is_refused_before_writing(cli, qkv, tmp_path, monkeypatch):
    import converter.engine as eng

    class Usage:
        free = 10

    monkeypatch.setattr(eng.shutil, "disk_usage", lambda p: Usage)
    out = tmp_path / "out"
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out)
    _one_line_error(res, "not enough disk space", "GB free")
    _nothing_under(out)


def test_interrupt_mid_write_then_rerun_restarts_cleanly(cli, qkv, tmp_path, monkeypatch):
    import converter.engine as eng

    real = eng._write
    calls = {"n": 0}

    def interrupted(fd, mv):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(fd, mv)

    monkeypatch.setattr(eng, "_write", interrupted)
    monkeypatch.setattr(eng, "CHUNK", 64)
    out = tmp_path / "out"
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out)
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.stderr and "\n" not in res.stderr.strip()
    _nothing_under(out)
    monkeypatch.setattr(eng, "_write", real)
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out)
    assert res.exit_code == 0, res.output
    _check_output(out, qkv)


def test_killed_run_leftovers_are_cleaned_on_rerun(cli, qkv, tmp_path):
    """A SIGKILLed run leaves its staging folder (with a half-written .tmp shard); the next run removes it."""
    out = tmp_path / "out"
    stale = tmp_path / ".out.msconv-partial"
    stale.mkdir()
    (stale / "model.safetensors.tmp").write_bytes(b"\0" * 100)
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out)
    assert res.exit_code == 0, res.output
    assert not stale.exists()
    _check_output(out, qkv)


def _check_output(out: Path, qkv):
    from converter.mapping import load_mapping
    from converter.sources import Source

    want = load_mapping(qkv[1]).convert(Source(qkv[0]).load())
    got = Source(out).load()
    assert set(got) == set(want)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k


def test_dry_run_prints_compressed_plan_and_writes_nothing(cli, qkv, tmp_path):
    out = tmp_path / "out"
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--dry-run")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "blk.{0,1}.qkv.weight ← cat(q, k, v)" in lines
    assert "blk.{0,1}.out.bias ← blk.{0,1}.proj.bias" in lines
    assert "head.weight ← (unchanged)" in lines
    assert not out.exists()
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--dry-run", "--json")
    info = json.loads(res.stdout)
    assert info["targets"] == 9 and info["bytes"] == sum(v.nbytes for v in torch_like_state().values())


def test_convert_json_and_sharding(cli, qkv, tmp_path):
    out = tmp_path / "out"
    res = cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--shard-size", "600B", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"].values()) == set(shards) and len(idx["weight_map"]) == info["tensors"] == 9
    _check_output(out, qkv)


def test_bad_options(cli, qkv, tmp_path):
    _one_line_error(cli("convert", qkv[0], "--mapping", qkv[1], "--out", tmp_path / "o", "--dtype", "fp8"), "--dtype must be one of")
    _one_line_error(cli("convert", qkv[0], "--mapping", qkv[1], "--out", tmp_path / "o", "--shard-size", "lots"), "invalid size 'lots'")
    _one_line_error(cli("convert", qkv[0], "--mapping", qkv[1]), "needs --out")
    _nothing_under(tmp_path / "o")


def test_validate_command(cli):
    res = cli("validate", "mmdit_opensora_v2")
    assert res.exit_code == 0 and "1082 source keys -> 778 targets" in res.stdout, res.output
    assert "target inventory: mmdit_opensora_v2 target inventory" in res.stdout


def test_validate_without_target_inventory_fails_unless_allow_partial(cli, tmp_path):
    """A mapping whose model has no inventory does not validate silently."""
    import yaml

    from converter.mapping import MAPPINGS_DIR

    d = yaml.safe_load((MAPPINGS_DIR / "hunyuan_vae.yaml").read_text())
    d["name"], d["target"] = "vae_no_inventory", {"model": "no_such_model"}
    d["source"]["manifest"] = str(MAPPINGS_DIR / "manifests" / "hunyuan_vae.json")
    mp = tmp_path / "vae_no_inventory.yaml"
    mp.write_text(yaml.safe_dump(d))
    _one_line_error(cli("validate", mp), "no inventory for model 'no_such_model'", "--allow-partial")
    res = cli("validate", mp, "--allow-partial")
    assert res.exit_code == 0 and "PARTIAL" in res.stdout and "248 source keys -> 248 targets" in res.stdout, res.output


def test_parity_subcommand_is_mounted(cli):
    res = cli("parity", "--help")
    assert res.exit_code == 0, res.output
    assert "parity" in res.stdout.lower()


# -- review fixes -----------------------------------------------------------------------------------------
def _fp8_source(tmp_path):
    from converter.tensor import RawTensor

    src = tmp_path / "fp8.safetensors"
    sd = {k: v for k, v in torch_like_state().items()}
    sd["head.weight"] = RawTensor("F8_E4M3", (3, 8), bytes(range(24)))
    save_file(sd, src)
    return src


def test_dtype_policy_on_fp8_is_refused_before_writing(cli, qkv, tmp_path):
    src = _fp8_source(tmp_path)
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", qkv[1], "--out", out, "--dtype", "bf16")
    _one_line_error(res, "head.weight", "F8_E4M3", "--dtype keep")
    _nothing_under(out)
    _one_line_error(cli("convert", src, "--mapping", qkv[1], "--dry-run", "--dtype", "fp32"), "head.weight", "F8_E4M3")
    res = cli("convert", src, "--mapping", qkv[1], "--out", out)  # keep: copied as bytes
    assert res.exit_code == 0, res.output
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert "head.weight" in f.keys()


def test_format_ckpt_without_mindspore_is_a_user_error(cli, qkv, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mindspore" else real(n, *a))
    out = tmp_path / "out"
    _one_line_error(cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--format", "ckpt"), "--format ckpt", "MindSpore")
    _nothing_under(out)


def test_format_ckpt_needs_twice_the_space(cli, qkv, tmp_path, monkeypatch):
    import converter.engine as eng

    class Usage:
        free = 3000  # the qkv output is 2400 bytes

    monkeypatch.setattr(eng.shutil, "disk_usage", lambda p: Usage)
    out = tmp_path / "out"
    _one_line_error(cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--format", "ckpt"),
                    "not enough disk space", "safetensors + ckpt")
    _nothing_under(out)
    assert cli("convert", qkv[0], "--mapping", qkv[1], "--out", out).exit_code == 0


def test_ckpt_writer_errors_name_the_file(cli, qkv, tmp_path, monkeypatch):
    import mindspore as ms

    def broken(*a, **k):
        raise RuntimeError("protobuf says no\nmore lines")

    monkeypatch.setattr(ms, "save_checkpoint", broken)
    out = tmp_path / "out"
    _one_line_error(cli("convert", qkv[0], "--mapping", qkv[1], "--out", out, "--format", "ckpt"),
                    "model.ckpt", "MindSpore cannot write the checkpoint", "protobuf says no")
    _nothing_under(out)


def test_publish_failure_restores_the_previous_output(tmp_path, monkeypatch):
    import os

    import converter.engine as eng

    out, staging = tmp_path / "out", tmp_path / ".out.msconv-partial"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging.mkdir()
    real = os.replace

    def failing(a, b):
        if Path(a) == staging:
            raise OSError(errno.EIO, "I/O error")
        real(a, b)

    monkeypatch.setattr(eng.os, "replace", failing)
    with pytest.raises(OSError):
        eng._publish(staging, out, overwrite=True)
    monkeypatch.setattr(eng.os, "replace", real)
    assert (out / "old.txt").read_text() == "old"
    assert not (tmp_path / ".out.msconv-old").exists()


def test_source_read_errors_name_the_source_file(tmp_path):
    import os

    from converter.engine import _SourceHasher, _Window
    from converter.errors import FormatError

    f = tmp_path / "small.bin"
    f.write_bytes(b"x" * 10)
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(FormatError, match=f"{f}: source file shrank during conversion"):
            _Window(fd, 0, 100, str(f))
    finally:
        os.close(fd)
    h = _SourceHasher([str(tmp_path / "gone.safetensors")])
    h.run()
    assert isinstance(h.error, FormatError) and "gone.safetensors: cannot read source file" in str(h.error)
