"""Strict weight loading: every parameter present, no unexpected key, every shape equal — or LoadError.

`mindspore.load_param_into_net` only *returns* missing/unexpected lists (it never raises for them) and, for
trailing-singleton shapes, silently loads a wrongly shaped value (../shared/notes/mindspore-cpu.md §10), so
we compare names and shapes ourselves BEFORE calling it, cast each value to its parameter's dtype (a bf16
file into an fp32 CPU net), and still check both lists it returns.
"""
from __future__ import annotations

import os

import numpy as np

from converter.errors import UserError, summarize
from converter.inventory import compress_keys

__all__ = ["LoadError", "load_strict", "read_params"]


class LoadError(UserError):
    """The weights do not fit the network (missing / unexpected keys, shape mismatches)."""


def _ms():
    import mindspore as ms

    return ms


def _files(path: str) -> list[str]:
    """The safetensors files of a file, an index or a directory (validated by the converter's reader)."""
    from converter.sources import Source

    src = Source(path)
    for f in src.files:
        if not f.endswith(".safetensors"):
            raise LoadError(f"{f}: load_strict reads .safetensors (convert .bin/.pt with `msconv convert` first)")
    return src.files, src.inventory()


def read_params(src) -> tuple[dict, dict, str]:
    """({name: Parameter-or-array}, {name: (shape, dtype)}, description) for a path or a dict."""
    ms = _ms()
    if isinstance(src, (str, os.PathLike)):
        where = os.fspath(src)
        files, inv = _files(where)
        values = {}
        for f in files:
            values.update(ms.load_checkpoint(f, format="safetensors"))  # lazy (mmap), bf16 kept
        return values, inv, where
    if isinstance(src, dict):
        from converter.tensor import RawTensor, as_storage

        inv = {}
        for k, v in src.items():
            if isinstance(v, ms.Parameter) or isinstance(v, ms.Tensor):
                inv[k] = (tuple(v.shape), str(v.dtype))
            elif isinstance(v, RawTensor):
                inv[k] = (v.shape, v.dtype)
            else:
                a, dt = as_storage(v)
                inv[k] = (tuple(a.shape), dt)
        return dict(src), inv, "state dict"
    raise TypeError(f"load_strict: expected a path or a dict, got {type(src).__name__}")


def _to_param(name: str, value, param):
    """A Parameter holding `value` in `param`'s dtype (bf16 raw bytes decoded exactly on the way)."""
    ms = _ms()
    from converter.tensor import RawTensor, as_storage, can_decode, decode

    if isinstance(value, (ms.Parameter, ms.Tensor)):
        t = value if value.dtype == param.dtype else value.astype(param.dtype)
        return ms.Parameter(t, name=name, requires_grad=param.requires_grad)
    if isinstance(value, RawTensor):
        if not can_decode(value.dtype):
            raise LoadError(f"{name}: {value.dtype} values cannot be loaded (msconv does not decode {value.dtype}; "
                            "convert the checkpoint to bf16/fp32 first)")
        arr = decode(value.storage(), value.dtype)
    else:
        st, dt = as_storage(value)
        arr = decode(st, dt) if dt == "BF16" else np.asarray(value)
    t = ms.Tensor(np.require(arr, requirements="C"))
    if t.dtype != param.dtype:
        t = t.astype(param.dtype)
    return ms.Parameter(t, name=name, requires_grad=param.requires_grad)


def _kind(dtype) -> str:
    """'float', 'int' or 'bool' of a safetensors dtype name or a MindSpore / numpy dtype."""
    from converter.tensor import DTYPES

    s = str(dtype)
    if s in DTYPES:
        return DTYPES[s][3]
    s = s.lower()
    if "bool" in s:
        return "bool"
    return "float" if "float" in s else "int" if "int" in s else s


def load_strict(net, src) -> None:
    """Load `src` (a .safetensors file, a folder / index of shards, or a dict of numpy arrays / RawTensors /
    Parameters) into `net`; raise LoadError naming every missing, unexpected or mis-shaped key."""
    ms = _ms()
    values, inv, where = read_params(src)
    params = {name: p for name, p in net.parameters_and_names()}
    missing = sorted(set(params) - set(inv))
    unexpected = sorted(set(inv) - set(params))
    shapes = [f"{k}: file {list(inv[k][0])} vs net {list(params[k].shape)}"
              for k in sorted(set(params) & set(inv)) if tuple(inv[k][0]) != tuple(params[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(compress_keys(missing)[:4])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {', '.join(compress_keys(unexpected)[:4])}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:3])}")
    kinds = [f"{k}: file {inv[k][1]} ({_kind(inv[k][1])}) vs net {params[k].dtype} ({_kind(params[k].dtype)})"
             for k in sorted(set(params) & set(inv)) if _kind(inv[k][1]) != _kind(params[k].dtype)]
    if kinds:
        problems.append(f"{len(kinds)} dtype kind mismatch(es): {'; '.join(kinds[:3])}")
    if problems:
        detail = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected] + shapes + kinds
        raise LoadError(f"{where}: weights do not fit {type(net).__name__}: " + summarize(problems), detail)
    pdict = {k: _to_param(k, values[k], params[k]) for k in params}
    not_loaded, not_used = ms.load_param_into_net(net, pdict, strict_load=True)
    if not_loaded or not_used:
        raise LoadError(f"{where}: MindSpore did not load {len(not_loaded)} parameter(s) ({', '.join(compress_keys(not_loaded)[:3])}) "
                        f"and left {len(not_used)} unused ({', '.join(compress_keys(not_used)[:3])})")
    for k, p in params.items():  # guard against MindSpore's silent trailing-singleton reshape
        if tuple(p.shape) != tuple(inv[k][0]):
            raise LoadError(f"{where}: {k} loaded with shape {list(p.shape)} but the file has {list(inv[k][0])}")
