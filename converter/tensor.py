"""Dtypes and the raw tensor type.

Tensors are moved as *storage arrays*: numpy arrays whose dtype has the right item size (bf16 -> uint16,
fp8 -> uint8). Layout ops (concat, split, row permutation, transpose, reshape) work on storage arrays and
never look at values, so bf16 stays bit-exact without a numpy bfloat16 type. Values are decoded only for
`cast` (bf16 <-> fp32 via uint32 bit shifts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# safetensors dtype name -> (item size, numpy storage dtype, numpy value dtype or None, kind)
DTYPES: dict[str, tuple[int, np.dtype, np.dtype | None, str]] = {
    "BOOL": (1, np.dtype(np.bool_), np.dtype(np.bool_), "bool"),
    "U8": (1, np.dtype(np.uint8), np.dtype(np.uint8), "int"),
    "I8": (1, np.dtype(np.int8), np.dtype(np.int8), "int"),
    "U16": (2, np.dtype("<u2"), np.dtype("<u2"), "int"),
    "I16": (2, np.dtype("<i2"), np.dtype("<i2"), "int"),
    "U32": (4, np.dtype("<u4"), np.dtype("<u4"), "int"),
    "I32": (4, np.dtype("<i4"), np.dtype("<i4"), "int"),
    "U64": (8, np.dtype("<u8"), np.dtype("<u8"), "int"),
    "I64": (8, np.dtype("<i8"), np.dtype("<i8"), "int"),
    "F16": (2, np.dtype("<f2"), np.dtype("<f2"), "float"),
    "BF16": (2, np.dtype("<u2"), None, "float"),
    "F32": (4, np.dtype("<f4"), np.dtype("<f4"), "float"),
    "F64": (8, np.dtype("<f8"), np.dtype("<f8"), "float"),
    "F8_E4M3": (1, np.dtype(np.uint8), None, "float"),
    "F8_E5M2": (1, np.dtype(np.uint8), None, "float"),
}

# numpy value dtype -> safetensors name (bf16 arrays of ml_dtypes/mindspore are recognised by name)
_NP_TO_ST = {v[2]: k for k, v in DTYPES.items() if v[2] is not None and k not in ("U16",)}
_NP_TO_ST[np.dtype("<u2")] = "U16"

POLICY_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "keep": None}


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


def numel(shape) -> int:
    return int(math.prod(shape))


def nbytes(shape, dtype: str) -> int:
    return numel(shape) * itemsize(dtype)


def np_to_st(arr: np.ndarray) -> str:
    """safetensors dtype name of a numpy array (bfloat16 from ml_dtypes / mindspore by dtype name)."""
    if arr.dtype.name == "bfloat16":
        return "BF16"
    try:
        return _NP_TO_ST[arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {arr.dtype} has no safetensors equivalent") from None


@dataclass
class RawTensor:
    """A tensor as bytes: safetensors dtype name, shape and a buffer (bytes, memoryview or uint8 array).

    Used for dtypes numpy cannot represent (BF16, F8); `storage()` gives the layout-only view.
    """

    dtype: str
    shape: tuple
    data: object

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.dtype not in DTYPES:
            raise TypeError(f"unknown dtype {self.dtype!r}")
        n = memoryview(self.data).nbytes
        if n != nbytes(self.shape, self.dtype):
            raise ValueError(f"RawTensor {self.dtype}{list(self.shape)} needs {nbytes(self.shape, self.dtype)} bytes, got {n}")

    def storage(self) -> np.ndarray:
        """The bytes viewed as the storage dtype (uint16 for bf16), no copy."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype][1]).reshape(self.shape)

    def tobytes(self) -> bytes:
        return bytes(memoryview(self.data).cast("B"))

    def to_float32(self) -> np.ndarray:
        """Decode the values (only where an op really needs them)."""
        return decode(self.storage(), self.dtype).astype(np.float32, copy=False)

    @classmethod
    def from_storage(cls, arr: np.ndarray, dtype: str) -> "RawTensor":
        arr = np.require(arr, requirements="C")
        return cls(dtype, arr.shape, arr.reshape(-1).view(np.uint8))


def as_storage(value) -> tuple[np.ndarray, str]:
    """(storage array, dtype name) of a numpy array, a RawTensor or anything with `.asnumpy()` / `.numpy()`."""
    if isinstance(value, RawTensor):
        return value.storage(), value.dtype
    if not isinstance(value, np.ndarray):
        for attr in ("asnumpy", "numpy"):  # mindspore Parameter / Tensor, torch tensor (fp32 etc.)
            if hasattr(value, attr):
                value = getattr(value, attr)()
                break
        value = np.asarray(value)
    dt = np_to_st(value)
    if value.dtype.byteorder == ">":  # safetensors is little-endian: swap the bytes, not the values
        value = value.astype(value.dtype.newbyteorder("<"))
    if DTYPES[dt][2] is None or value.dtype.name == "bfloat16":
        return value.view(DTYPES[dt][1]), dt
    return value, dt


def from_storage(arr: np.ndarray, dtype: str, like=None):
    """Back from a storage array: a numpy array where numpy has the dtype, else a RawTensor.

    With `like` a numpy array of a custom bfloat16 dtype, the result is viewed back as that dtype.
    """
    if DTYPES[dtype][2] is not None:
        return np.require(arr, requirements="C").view(DTYPES[dtype][2])
    if isinstance(like, np.ndarray) and like.dtype.name == "bfloat16" and dtype == "BF16":
        return np.require(arr, requirements="C").view(like.dtype)
    return RawTensor.from_storage(arr, dtype)


def can_decode(dtype: str) -> bool:
    """Whether msconv can decode `dtype` values (everything but FP8)."""
    return dtype == "BF16" or DTYPES[dtype][2] is not None


def policy_dtype(dtype: str, want: str | None, key: str) -> str:
    """The dtype a `--dtype` policy (`want`: a POLICY_DTYPES value) gives a tensor of `dtype`: floats are cast,
    other kinds kept. UserError naming the key when a float cannot be decoded (FP8)."""
    if not want or DTYPES[dtype][3] != "float" or dtype == want:
        return dtype
    if not can_decode(dtype):
        from .errors import UserError

        policy = {v: k for k, v in POLICY_DTYPES.items()}[want]
        raise UserError(f"{key}: {dtype} values cannot be cast to {want} (msconv does not decode {dtype}); "
                        f"use --dtype keep instead of --dtype {policy}")
    return want


def decode(storage: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> numpy values (bf16 -> float32 by a 16-bit shift; exact)."""
    if dtype == "BF16":
        return (storage.astype(np.uint32) << 16).view(np.float32)
    if DTYPES[dtype][2] is None:
        raise TypeError(f"cannot decode {dtype} values")
    return storage.view(DTYPES[dtype][2])


def encode(values: np.ndarray, dtype: str, what: str = "tensor") -> np.ndarray:
    """numpy values -> storage array of `dtype` (fp32 -> bf16 rounds to nearest even, like torch)."""
    from .errors import UserError

    if dtype == "BF16":
        f = np.require(values, dtype=np.float32, requirements="C")
        u = f.view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(f)
        if nan.any():
            rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
        return rounded
    target = DTYPES[dtype][2]
    if target is None:
        raise TypeError(f"cannot encode values as {dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(target)
    if dtype == "F16" and values.dtype.kind == "f":
        bad = np.isfinite(values) & ~np.isfinite(out)
        if bad.any():
            raise UserError(f"{what}: {int(bad.sum())} values overflow float16 (max |x| = {float(np.abs(values[bad]).max()):g}); use --dtype bf16 or fp32")
    return out


def cast_storage(storage: np.ndarray, src: str, dst: str, what: str = "tensor") -> np.ndarray:
    """Convert a storage array between dtypes; identity when equal (bit-exact)."""
    if src == dst:
        return storage
    if DTYPES[src][3] not in ("float", "int", "bool") or DTYPES[dst][3] not in ("float", "int", "bool"):
        raise TypeError(f"cannot cast {src} to {dst}")
    return encode(decode(storage, src), dst, what)
