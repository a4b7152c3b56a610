"""A small, strict safetensors reader and header writer.

We parse the header ourselves (8-byte little-endian length + JSON) so that every check has a one-line error
naming the file, and so tensors are read lazily by offset: nothing but the header is read until a tensor's
bytes are needed (then `os.pread` or a read-only `np.memmap`).
"""
from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass

import numpy as np

from .errors import FormatError, show
from .tensor import DTYPES, nbytes

MAX_HEADER = 100_000_000  # same bound as the safetensors reference implementation


@dataclass(slots=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset and length, dtype name and shape."""

    key: str
    dtype: str
    shape: tuple
    path: str
    offset: int
    nbytes: int


class SafetensorsFile:
    """Header of one .safetensors file, validated; tensor bytes are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _fail(self, what: str):
        raise FormatError(f"{self.path}: {what}")

    def _parse(self):
        raw, n, size = self._read_header()
        if not raw.lstrip().startswith(b"{"):
            self._fail("not a safetensors file (header is not a JSON object)")
        header = self._load_json(raw)
        if not isinstance(header, dict):
            self._fail("corrupt header: JSON is not an object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            self._fail("corrupt header: __metadata__ must map strings to strings")
        self.metadata = meta
        spans = self._index_tensors(header, 8 + n, size - 8 - n)
        self._check_data_covered(spans, size - 8 - n)

    def _read_header(self) -> tuple[bytes, int, int]:
        """(header bytes, header length, file size) of a regular file whose declared header fits in it."""
        p = self.path
        if not os.path.exists(p):
            raise FormatError(f"{p}: no such file")
        if os.path.isdir(p):
            raise FormatError(f"{p}: is a directory, expected a .safetensors file")
        try:
            st = os.stat(p)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                self._fail("not a regular file")
            size = st.st_size
            if size < 8:
                self._fail(f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER:
                    self._fail(f"not a safetensors file or corrupt: header length {n} bytes exceeds the 100 MB limit")
                if 8 + n > size:
                    self._fail(f"truncated or not a safetensors file: header length {n} but file has {size} bytes")
                raw = f.read(n)
        except OSError as e:
            self._fail(f"cannot read: {e.strerror or e}")
        if len(raw) != n:
            self._fail(f"truncated while reading the {n}-byte header")
        return raw, n, size

    def _index_tensors(self, header: dict, base: int, data_len: int) -> list:
        """Check every entry (dtype, shape, byte count, offsets inside the data section) and record it in
        `self.tensors`; returns the (begin, end, key) spans."""
        p = self.path
        spans = []
        tensors = self.tensors
        isize = {k: v[0] for k, v in DTYPES.items()}
        for key, e in header.items():  # one tight pass: a 200k-key header must stay fast (test_hostile_input)
            if type(e) is not dict or len(e) != 3 or "dtype" not in e or "shape" not in e or "data_offsets" not in e:
                self._fail(f"corrupt header entry for tensor {key!r}: expected dtype, shape, data_offsets")
            dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if type(dt) is not str or dt not in isize:
                self._fail(f"tensor {key!r} has unsupported dtype {show(dt)} (known: {', '.join(DTYPES)})")
            if type(shape) is not list:
                self._fail(f"tensor {key!r} has an invalid shape {show(shape)}")
            want = isize[dt]
            for d in shape:
                if type(d) is not int or d < 0:  # bool, float, negative
                    self._fail(f"tensor {key!r} has an invalid shape {show(shape)}")
                want *= d
            if (type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int
                    or offs[0] < 0 or offs[0] > offs[1]):
                self._fail(f"tensor {key!r} has invalid data_offsets {show(offs)}")
            b, end = offs
            if end - b != want:
                self._fail(f"tensor {key!r} {dt}{shape} needs {want} bytes but data_offsets {offs} span {end - b}")
            if end > data_len:
                self._fail(f"truncated or corrupt: tensor {key!r} data_offsets {offs} beyond the data section of {data_len} bytes")
            spans.append((b, end, key))
            tensors[key] = TensorInfo(key, dt, tuple(shape), p, base + b, want)
        return spans

    def _check_data_covered(self, spans: list, data_len: int) -> None:
        """The tensors tile the data section exactly: no overlap, no gap, no trailing or missing bytes."""
        spans.sort()
        pos = 0
        for b, e, key in spans:
            if b < pos:
                self._fail(f"tensor {key!r} data_offsets [{b}, {e}] overlap the previous tensor (ends at {pos})")
            if b > pos:
                self._fail(f"gap in the data section before tensor {key!r} (bytes {pos}..{b} belong to no tensor)")
            pos = e
        if pos != data_len:
            self._fail(f"data section has {data_len} bytes but tensors cover {pos}" + (" (truncated)" if pos > data_len else " (trailing bytes)"))

    def _load_json(self, raw: bytes) -> dict:
        """The header JSON; a key given twice is an error (json keeps the last silently), and so is nesting too
        deep for the parser."""
        def pairs(items):
            d = dict(items)
            if len(d) != len(items):
                seen = set()
                for k, _ in items:
                    if k in seen:
                        self._fail(f"corrupt header: key {k!r} appears twice")
                    seen.add(k)
            return d

        try:
            return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
            self._fail(f"corrupt header JSON ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:200]})")
        except RecursionError:
            self._fail("corrupt header JSON (nested too deeply)")

    # -- reading ----------------------------------------------------------------------------------------
    def inventory(self) -> dict[str, tuple[tuple, str]]:
        return {k: (t.shape, t.dtype) for k, t in self.tensors.items()}

    def storage(self, key: str) -> np.ndarray:
        """Storage array of one tensor, read with pread (owned copy, bf16 as uint16)."""
        return read_storage(self.tensors[key])


def read_storage(t: TensorInfo) -> np.ndarray:
    buf = np.empty(t.nbytes, dtype=np.uint8)
    if t.nbytes:
        with open(t.path, "rb", buffering=0) as f:
            mv = memoryview(buf)
            done = 0
            while done < t.nbytes:
                got = os.preadv(f.fileno(), [mv[done:]], t.offset + done)
                if got <= 0:
                    raise FormatError(f"{t.path}: truncated while reading tensor {t.key!r}")
                done += got
    return buf.view(DTYPES[t.dtype][1]).reshape(t.shape)


def build_header(entries: list[tuple[str, str, tuple]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix + JSON padded to 8 bytes) for tensors laid out in the given order.

    Returns the header and each tensor's [begin, end) offsets inside the data section.
    """
    hdr: dict = {}
    if metadata:
        hdr["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offs = []
    pos = 0
    for key, dt, shape in entries:
        n = nbytes(shape, dt)
        hdr[key] = {"dtype": dt, "shape": [int(s) for s in shape], "data_offsets": [pos, pos + n]}
        offs.append((pos, pos + n))
        pos += n
    js = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    js += b" " * ((8 - (len(js) + 8) % 8) % 8)
    return struct.pack("<Q", len(js)) + js, offs


def save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays / RawTensors to one safetensors file (small files: tests, dumps)."""
    from .tensor import as_storage

    items = []
    for k, v in tensors.items():
        st, dt = as_storage(v)
        items.append((k, dt, np.require(st, requirements="C")))
    header, _ = build_header([(k, dt, a.shape) for k, dt, a in items], metadata)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for _, _, a in items:
            f.write(a.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
