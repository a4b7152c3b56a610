"""Open a checkpoint: one .safetensors file, a sharded index, a directory, or a torch .bin/.pt file.

Every source exposes the same thing: `inventory()` ({key: (shape, dtype)}) from headers only, and
`tensors[key]` telling where the bytes are, so the engine can copy them without decoding.
"""
from __future__ import annotations

import glob
import json
import os
import stat
from dataclasses import dataclass

import numpy as np

from .errors import FormatError, show
from .safetensors_io import SafetensorsFile, TensorInfo, read_storage
from .tensor import DTYPES


@dataclass(frozen=True)
class MemTensor:
    """A tensor already in memory (from torch.load with mmap): storage array + dtype."""

    key: str
    dtype: str
    shape: tuple
    array: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.array.nbytes


def _regular(path: str, what: str) -> None:
    """Refuse what is not a regular file (a FIFO or a device would block or never end)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: the {what} is not a regular file")


def _unique_pairs(items):
    d = {}
    for k, v in items:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


class Source:
    """A checkpoint as a flat {key: TensorInfo | MemTensor} table plus the list of files it came from."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.files: list[str] = []
        self.tensors: dict[str, TensorInfo | MemTensor] = {}
        self.metadata: dict[str, str] = {}
        self._open()
        if not self.tensors:
            raise FormatError(f"{self.path}: holds no tensors (an empty checkpoint converts to nothing)")

    # -- opening ------------------------------------------------------------------------------------------
    def _add(self, key, info, where):
        if key in self.tensors:
            raise FormatError(f"{where}: tensor {key!r} appears twice (also in {getattr(self.tensors[key], 'path', self.path)})")
        self.tensors[key] = info

    def _open_st(self, path):
        f = SafetensorsFile(path)
        self.files.append(f.path)
        self.metadata.update(f.metadata)
        for k, t in f.tensors.items():
            self._add(k, t, f.path)
        return f

    def _open_index(self, index):
        _regular(index, "index")
        try:
            with open(index, encoding="utf-8") as fh:
                idx = json.load(fh, object_pairs_hook=_unique_pairs)
        except OSError as e:
            raise FormatError(f"{index}: cannot read the index: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a key twice, nesting too deep
            raise FormatError(f"{index}: not a valid safetensors index ({e.__class__.__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wmap, dict):
            raise FormatError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)")
        if not wmap:
            raise FormatError(f"{index}: the index's weight_map lists no tensors")
        base = os.path.dirname(index)
        by_file: dict[str, set] = {}
        for k, fn in wmap.items():
            if not isinstance(fn, str) or not fn or os.path.isabs(fn) or ".." in fn.replace("\\", "/").split("/"):
                raise FormatError(f"{index}: weight_map entry {k!r} -> {show(fn)} must be a relative path inside the index's folder (no '..')")
            by_file.setdefault(fn, set()).add(k)
        for fn in sorted(by_file):
            p = os.path.join(base, fn)
            if not os.path.exists(p):
                raise FormatError(f"{index}: shard {fn!r} listed in the index does not exist")
            if fn.endswith((".bin", ".pt", ".pth")):  # pytorch_model.bin.index.json shards
                before = set(self.tensors)
                self._open_torch(p)
                have = set(self.tensors) - before
            else:
                have = set(self._open_st(p).tensors)
            missing = sorted(by_file[fn] - have)
            extra = sorted(have - by_file[fn])
            if missing:
                raise FormatError(f"{p}: index lists tensor {missing[0]!r} in this shard but it is absent ({len(missing)} such)")
            if extra:
                raise FormatError(f"{p}: shard holds tensor {extra[0]!r} that the index does not list ({len(extra)} such)")

    def _open_torch(self, path):
        import torch  # only for .bin/.pt sources

        _regular(path, "torch checkpoint")
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise FormatError(f"{path}: cannot load as a torch checkpoint with weights_only=True ({msg[:200]})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise FormatError(f"{path}: torch checkpoint is a {type(sd).__name__}, expected a dict of tensors")
        self.files.append(path)
        rev = {getattr(torch, n): d for n, d in [
            ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("float64", "F64"), ("int64", "I64"),
            ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL")]}
        for k, t in sd.items():
            if not isinstance(k, str):
                raise FormatError(f"{path}: key {show(k)} is a {type(k).__name__}; tensor names must be strings")
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{path}: entry {k!r} is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type != "cpu":
                what = t.layout if t.layout != torch.strided else "quantized" if t.is_quantized else \
                    "nested" if t.is_nested else f"on device {t.device.type}"
                raise FormatError(f"{path}: tensor {k!r} is {str(what).replace('torch.', '')}; only dense CPU "
                                  "tensors can be converted (call .to_dense() / .dequantize() before saving)")
            if t.dtype not in rev:
                raise FormatError(f"{path}: tensor {k!r} has unsupported dtype {t.dtype}")
            dt = rev[t.dtype]
            arr = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._add(k, MemTensor(k, dt, tuple(t.shape), arr.view(DTYPES[dt][1]).reshape(tuple(t.shape))), path)

    def _open(self):
        p = self.path
        if not os.path.exists(p):
            raise FormatError(f"{p}: no such file or directory")
        if os.path.isdir(p):
            if not os.access(p, os.R_OK | os.X_OK):
                raise FormatError(f"{p}: cannot read the directory: Permission denied")
            g = glob.escape(p)  # a folder named like a pattern ("ckpt[1]") is a name, not a pattern
            idx = sorted(glob.glob(os.path.join(g, "*.safetensors.index.json")))
            if len(idx) > 1:
                raise FormatError(f"{p}: several *.safetensors.index.json files ({', '.join(os.path.basename(i) for i in idx)}); pass one")
            if idx:
                return self._open_index(idx[0])
            sts = sorted(glob.glob(os.path.join(g, "*.safetensors")))
            if sts:
                for f in sts:
                    self._open_st(f)
                return
            bin_idx = sorted(glob.glob(os.path.join(g, "*.bin.index.json")))
            if len(bin_idx) > 1:
                raise FormatError(f"{p}: several *.bin.index.json files ({', '.join(os.path.basename(i) for i in bin_idx)}); pass one")
            if bin_idx:  # sharded torch checkpoint (transformers' pytorch_model.bin.index.json)
                return self._open_index(bin_idx[0])
            bins = sorted(f for e in ("*.bin", "*.pt", "*.pth") for f in glob.glob(os.path.join(g, e)))
            if bins:
                for f in bins:
                    self._open_torch(f)
                return
            raise FormatError(f"{p}: directory holds no *.safetensors, *.safetensors.index.json or *.bin/*.pt files")
        if p.endswith(".index.json"):
            return self._open_index(p)
        if p.endswith((".bin", ".pt", ".pth")):
            return self._open_torch(p)
        return self._open_st(p)

    # -- access -------------------------------------------------------------------------------------------
    def inventory(self) -> dict[str, tuple[tuple, str]]:
        return {k: (t.shape, t.dtype) for k, t in self.tensors.items()}

    def storage(self, key: str) -> np.ndarray:
        t = self.tensors[key]
        if isinstance(t, MemTensor):
            return t.array
        return read_storage(t)

    def load(self) -> dict:
        """Every tensor as numpy (RawTensor for bf16) — small checkpoints only."""
        from .tensor import from_storage

        return {k: from_storage(self.storage(k), t.dtype) for k, t in self.tensors.items()}

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def load_file(path) -> dict:
    """{key: numpy array or RawTensor} of a checkpoint (any supported form)."""
    return Source(path).load()
