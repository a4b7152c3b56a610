"""Streaming safetensors writer and lazy reader (numpy), built on the converter's safetensors code.

The writer keeps RAM bounded: each tensor's bytes are appended to a temporary data file as soon as it is added,
only the (small) header index stays in memory, and `close()` assembles header + data into `<path>.tmp` with a
buffered copy and renames it onto `<path>` (a crash never leaves a half-written file under the final name;
`abort()` removes every temporary). Header layout, dtype names and decoding are the converter's
(`converter.safetensors_io.build_header` / `SafetensorsFile`, `converter.tensor.np_to_st` / `decode`).

Capture order matters for reports (execution order) but safetensors readers list keys sorted, so the writer
stores the insertion order in `__metadata__["order"]` (JSON list) and `SafetensorsReader.keys()` returns it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from converter.safetensors_io import SafetensorsFile, build_header, read_storage
from converter.tensor import DTYPES, RawTensor, decode, np_to_st


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `path` through `path.tmp` + rename (never a half-written file under the final name)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class SafetensorsWriter:
    """Append tensors one by one; `close()` assembles `<path>` (also usable as a context manager)."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data_path = self.path.with_name(self.path.name + ".data.tmp")
        self._tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._data = open(self._data_path, "w+b")
        self._entries: list[tuple[str, str, tuple]] = []
        self._names: set[str] = set()
        self.metadata = dict(metadata or {})
        self.closed = False

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return [e[0] for e in self._entries]

    def add(self, name: str, array: np.ndarray) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: writer already closed")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r} in {self.path}")
        if isinstance(array, RawTensor):   # values numpy has no type for (a dump's bf16 outputs): stored as they are
            arr, dt = np.ascontiguousarray(array.storage()), array.dtype
        else:
            arr = np.ascontiguousarray(array)
            try:
                dt = np_to_st(arr)
            except TypeError as e:
                raise TypeError(f"{name}: {e}") from None
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.nbytes:
            self._data.write(arr.reshape(-1).view(np.uint8).data)
        self._entries.append((name, dt, tuple(int(s) for s in arr.shape)))
        self._names.add(name)

    def close(self) -> Path:
        if self.closed:
            return self.path
        meta = dict(self.metadata)
        meta["order"] = json.dumps(self.keys())
        header, _ = build_header(self._entries, meta)
        try:
            self._data.flush()
            self._data.seek(0)
            with open(self._tmp_path, "wb") as out:
                out.write(header)
                shutil.copyfileobj(self._data, out, 16 << 20)
            os.replace(self._tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._data.close()
        self._data_path.unlink(missing_ok=True)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (temporaries only; the final file is never touched)."""
        if not self.closed:
            self._data.close()
            self.closed = True
        self._data_path.unlink(missing_ok=True)
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor index {name: {dtype, shape}}, metadata) of a safetensors file without reading the data."""
    f = SafetensorsFile(path)
    return {k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in f.tensors.items()}, dict(f.metadata)


class SafetensorsReader:
    """Lazy numpy access by name (converter.safetensors_io); keys in writer order when the file recorded it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = SafetensorsFile(self.path)
        self.metadata = dict(self._file.metadata)
        order = self.metadata.get("order")
        self._keys = json.loads(order) if order else sorted(self._file.tensors)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._file.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.tensors[name].shape)

    def dtype(self, name: str) -> str:
        return self._file.tensors[name].dtype

    def get(self, name: str) -> np.ndarray:
        """Values as numpy (BF16 decoded exactly to float32, converter.tensor.decode)."""
        info = self._file.tensors[name]
        out = decode(read_storage(info), info.dtype)
        return out if DTYPES[info.dtype][2] is not None else out.astype(np.float32, copy=False)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)


def save_dict(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    with SafetensorsWriter(path, metadata) as w:
        for k, v in tensors.items():
            w.add(k, v if isinstance(v, RawTensor) else np.asarray(v))
    return Path(path)


def load_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    r = SafetensorsReader(path)
    return {k: r.get(k) for k in r.keys()}
