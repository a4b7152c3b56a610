"""Streaming safetensors writer and lazy reader (numpy only).

The writer keeps RAM bounded: each tensor's bytes are appended to a temporary data file as soon as it is added,
only the (small) header index stays in memory, and `close()` writes header + data into the final file with a
buffered copy. The reader opens files lazily (`safetensors.safe_open`), one tensor at a time.

Capture order matters for reports (execution order) but safetensors readers list keys sorted, so the writer
stores the insertion order in `__metadata__["order"]` (JSON list) and `SafetensorsReader.keys()` returns it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

# numpy dtype -> safetensors dtype string
_NP_TO_ST = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8", np.dtype("uint16"): "U16", np.dtype("uint32"): "U32", np.dtype("uint64"): "U64",
    np.dtype("bool"): "BOOL",
}


class SafetensorsWriter:
    """Append tensors one by one; `close()` assembles `<path>` (also usable as a context manager)."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data_path = self.path.with_name(self.path.name + ".data.tmp")
        self._data = open(self._data_path, "w+b")
        self._index: dict[str, dict] = {}
        self._offset = 0
        self.metadata = dict(metadata or {})
        self.closed = False

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._index:
            raise ValueError(f"duplicate tensor name {name!r} in {self.path}")
        arr = np.ascontiguousarray(array)
        if arr.dtype not in _NP_TO_ST:
            raise TypeError(f"{name}: dtype {arr.dtype} cannot be stored in safetensors by numpy")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        nbytes = arr.nbytes
        if nbytes:
            self._data.write(arr.reshape(-1).view(np.uint8).data)
        self._index[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                             "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes

    def close(self) -> Path:
        if self.closed:
            return self.path
        meta = dict(self.metadata)
        meta["order"] = json.dumps(list(self._index))
        header = {"__metadata__": {k: str(v) for k, v in meta.items()}, **self._index}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data.flush()
        self._data.seek(0)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(self._data, out, 16 << 20)
        self._data.close()
        self._data_path.unlink(missing_ok=True)
        self.closed = True
        return self.path

    def abort(self) -> None:
        if not self.closed:
            self._data.close()
            self._data_path.unlink(missing_ok=True)
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor index, metadata) of a safetensors file without reading the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    return header, meta


class SafetensorsReader:
    """Lazy numpy access by name; keys in writer order when the file recorded it."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        self.index, self.metadata = read_header(self.path)
        self._f = safe_open(str(self.path), framework="numpy")
        order = self.metadata.get("order")
        self._keys = json.loads(order) if order else sorted(self.index)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.index[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        if self.index[name]["dtype"] == "BF16":
            return _bf16_to_f32(self.path, self.index[name])
        return self._f.get_tensor(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)


def _bf16_to_f32(path: Path, entry: dict) -> np.ndarray:
    """Decode a BF16 entry through a uint16 bit view (exact; numpy has no bfloat16)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start, end = entry["data_offsets"]
        f.seek(8 + n + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def save_dict(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    with SafetensorsWriter(path, metadata) as w:
        for k, v in tensors.items():
            w.add(k, np.asarray(v))
    return Path(path)


def load_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    r = SafetensorsReader(path)
    return {k: r.get(k) for k in r.keys()}
