"""The safetensors reader against the reference implementation, and the header checks the CLI tests do not
reach."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file as st_save

from conftest import TINY
from converter.errors import FormatError
from converter.safetensors_io import SafetensorsFile, build_header, save_file
from converter.sources import Source


def test_reads_what_the_reference_writes(tmp_path):
    sd = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "i64": np.arange(3, dtype=np.int64),
          "b": np.array([True, False]), "f16": np.ones((2, 2), np.float16), "empty": np.zeros((0, 4), np.float32),
          "scalar": np.array(3.5, np.float64)}
    p = tmp_path / "ref.safetensors"
    st_save(sd, str(p), metadata={"format": "np"})
    src = Source(p)
    assert src.metadata == {"format": "np"}
    got = src.load()
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k


def test_writer_output_is_read_by_the_reference(tmp_path):
    from safetensors import safe_open

    sd = {"a": np.arange(5, dtype=np.float32), "z": np.zeros((2, 3), np.int32)}
    p = tmp_path / "ours.safetensors"
    save_file(sd, p, {"k": "v"})
    with safe_open(str(p), "np") as f:
        assert f.metadata() == {"k": "v"}
        for k in sd:
            assert np.array_equal(f.get_tensor(k), sd[k])


def test_tiny_files_parse_with_lazy_offsets():
    f = SafetensorsFile(TINY / "mmdit_tiny.weights.safetensors")
    t = f.tensors["img_in.weight"]
    assert t.dtype == "F32" and t.shape == (64, 64) and t.nbytes == 64 * 64 * 4 and t.offset > 8
    assert f.storage("img_in.weight").shape == (64, 64)


def _hdr(path, header: dict, data: bytes):
    js = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)
    return path


@pytest.mark.parametrize("header, data, msg", [
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap in the data section"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "trailing bytes"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "expected dtype, shape, data_offsets"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "invalid data_offsets"),
    ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map strings to strings"),
])
def test_header_checks(tmp_path, header, data, msg):
    p = _hdr(tmp_path / "x.safetensors", header, data)
    with pytest.raises(FormatError, match=msg):
        SafetensorsFile(p)


def test_header_length_beyond_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(FormatError, match="header length 1000 but file has 10 bytes"):
        SafetensorsFile(p)


def test_build_header_is_aligned_and_valid(tmp_path):
    header, offs = build_header([("a", "BF16", (3,)), ("b", "F32", (2, 2))], {"format": "ms"})
    assert len(header) % 8 == 0 and offs == [(0, 6), (6, 22)]
    p = tmp_path / "h.safetensors"
    p.write_bytes(header + b"\0" * 22)
    assert SafetensorsFile(p).inventory() == {"a": ((3,), "BF16"), "b": ((2, 2), "F32")}


def test_directory_with_duplicate_keys(tmp_path):
    save_file({"a": np.zeros(1, np.float32)}, tmp_path / "one.safetensors")
    save_file({"a": np.zeros(1, np.float32)}, tmp_path / "two.safetensors")
    with pytest.raises(FormatError, match="tensor 'a' appears twice"):
        Source(tmp_path)


def test_index_listing_a_key_the_shard_lacks(tmp_path):
    save_file({"a": np.zeros(1, np.float32)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(FormatError, match="index lists tensor 'b' in this shard but it is absent"):
        Source(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FormatError, match="not a valid safetensors index"):
        Source(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(FormatError, match="holds no"):
        Source(tmp_path)


@pytest.mark.parametrize("name", ["../s1.safetensors", "/abs/s1.safetensors", "sub/../../s1.safetensors"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, name):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"a": np.zeros(1, np.float32)}, tmp_path / "s1.safetensors")
    idx = d / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(FormatError, match=f"{idx}: weight_map entry 'a'"):
        Source(d)
