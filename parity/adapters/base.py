"""What every parity adapter shares: config lookup, the cases' weight recipe, weight conversion through the
mapping, pausing hooks for calls the case's hooks do not cover, and the self-describing case conventions
(../shared/upstream/tiny/README.md, "Cases") read from structured config fields only.

Conventions (`tiling_plan`, `tagged_inputs`, `wants`):
- `config["tiling"] = {"sizes": {attr: value}, "cases": {n: {"use_spatial_tiling": b, "use_temporal_tiling": b}}}`;
  input `tiling/<n>/x` -> `tiling/<n>/{z_plain, z_tiled, dec_tiled}`; input `tiling/<n>/z` ->
  `tiling/<n>/{dec_plain, dec_tiled}`;
- input `posterior_eps` -> `z_sampled`; input `x_<tag>` -> `z_<tag>`, `decoded_<tag>`; input `z_<tag>` -> `decoded_<tag>`;
- a case may hold only some inputs: an adapter runs what they allow; the engine reports every case output the
  candidate did not produce by name (and fails).
The engine passes the case's output names as `case_cfg[WANT]` so an adapter can skip work nobody compares; a
dump passes none (everything the inputs allow is produced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from typing import Callable, Iterable

import numpy as np

# key of case_cfg under which the engine passes the names of the outputs the case holds (None: produce all)
WANT = "__outputs__"


class AdapterError(ValueError):
    """A case's structured fields are malformed (the engine turns it into a one-line user error)."""


def cfg_dict(cfg, config_name: str) -> dict:
    """The model config as a plain dict: a case config (`{config_name: {...}}`), a bare dict or a dataclass."""
    if isinstance(cfg, dict):
        inner = cfg.get(config_name, cfg)
        if not isinstance(inner, dict):
            raise AdapterError(f"{config_name} must be a JSON object, got {type(inner).__name__}")
        return inner
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return cfg.to_dict()


# ---------------------------------------------------------------------------------------------- weights
def init_weights_(model, seed: int = 0, is_scale: Callable[[str, object], bool] | None = None):
    """The cases' weight recipe: tensors with ndim >= 2 N(0, 1/fan_in) (fan_in = prod(shape[1:])), norm scales
    1 + 0.1 N (`is_scale(name, param)`), everything else (biases) 0.05 N; drawn in float64 from one generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(int(np.prod(p.shape[1:])))
            elif is_scale is not None and is_scale(name, p):
                v = 1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            else:
                v = 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(v.to(p.dtype))
    return model


def torch_state_numpy(torch_model) -> dict[str, np.ndarray]:
    """A torch model's state dict as numpy (bf16 upcast to fp32: exact)."""
    import torch

    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
            for k, v in torch_model.state_dict().items()}


def convert_state(mapping_name: str, state: dict) -> dict:
    """Torch (upstream) state dict as numpy -> MindSpore state dict through `mappings/<mapping_name>.yaml`."""
    from converter.mapping import load_mapping

    return load_mapping(mapping_name).convert(state)


def load_ms_from_torch(net, torch_model, mapping_name: str):
    """Convert `torch_model`'s weights with the mapping and load them strictly into `net`."""
    from opensora_ms.loading import load_strict

    load_strict(net, convert_state(mapping_name, torch_state_numpy(torch_model)))
    return net


# ---------------------------------------------------------------------------------------------- MindSpore dtype
# Upstream's dtype policy (SPEC §g): the model is built in the run's dtype (bf16 on Ascend and in the emulated
# CPU-bf16 mode, fp32 on CPU: `opensora_ms.ops.device.model_dtype()`) and floating inputs are cast to it.
def ms_dtype(net):
    """The dtype of `net`'s first floating parameter (fp32 for a net without one)."""
    import mindspore as ms

    for p in net.get_parameters():
        if p.dtype in (ms.float32, ms.bfloat16, ms.float16, ms.float64):
            return p.dtype
    return ms.float32


def ms_in_model_dtype(net):
    """`net` (built fp32, no dtype argument: the Hunyuan VAE, the DC-AE) with its parameters in the op layer's
    `model_dtype()`; untouched in an fp32 run."""
    import mindspore as ms

    from opensora_ms.ops.bf16 import cast_parameters
    from opensora_ms.ops.device import model_dtype

    dtype = model_dtype()
    return net if dtype == ms.float32 else cast_parameters(net, dtype)


def ms_tensor(a, dtype):
    """numpy -> MindSpore Tensor; a floating array in `dtype` (an fp32 run gets the fp32 Tensor it always got)."""
    import mindspore as ms

    a = np.ascontiguousarray(a)
    if a.dtype.kind != "f":
        return ms.Tensor(a)
    t = ms.Tensor(a.astype(np.float32, copy=False))
    return t if dtype == ms.float32 else t.astype(dtype)


def ms_numpy_inputs(inputs: dict, dtype) -> dict:
    """Floating numpy inputs rounded to `dtype` (bf16 as MindSpore's numpy bfloat16); unchanged in an fp32 run."""
    import mindspore as ms

    if dtype == ms.float32:
        return inputs
    return {k: ms_tensor(v, dtype).asnumpy() if np.asarray(v).dtype.kind == "f" else v for k, v in inputs.items()}


def ms_float32(a) -> np.ndarray:
    """A MindSpore output (Tensor, or numpy possibly in bfloat16) as numpy float32; fp32 passes unchanged, the
    bf16 upcast is exact."""
    import mindspore as ms

    if isinstance(a, ms.Tensor):
        return a.asnumpy() if a.dtype == ms.float32 else a.astype(ms.float32).asnumpy()
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "V" or a.dtype == np.float16 else a


# ---------------------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def paused_torch_hooks(model):
    """No forward (pre-)hook fires inside: for calls beyond those the case's hooks record."""
    saved = []
    for m in model.modules():
        saved.append((m, m._forward_hooks, m._forward_pre_hooks))
        m._forward_hooks, m._forward_pre_hooks = type(m._forward_hooks)(), type(m._forward_pre_hooks)()
    try:
        yield
    finally:
        for m, fh, fph in saved:
            m._forward_hooks, m._forward_pre_hooks = fh, fph


@contextlib.contextmanager
def paused_ms_hooks(net):
    saved = []
    for _, c in net.cells_and_names():
        saved.append((c, c.__dict__.get("_lazy_forward_hook"), c.__dict__.get("_lazy_forward_pre_hook")))
        object.__setattr__(c, "_lazy_forward_hook", None)
        object.__setattr__(c, "_lazy_forward_pre_hook", None)
    try:
        yield
    finally:
        for c, fh, fph in saved:
            object.__setattr__(c, "_lazy_forward_hook", fh)
            object.__setattr__(c, "_lazy_forward_pre_hook", fph)


# ---------------------------------------------------------------------------------------------- case conventions
@contextlib.contextmanager
def tiling(model, sizes: dict, spatial: bool, temporal: bool):
    """Set upstream's tiling attributes (`sizes`, by upstream name) and flags on `model`; restore them after."""
    names = list(sizes) + ["use_spatial_tiling", "use_temporal_tiling"]
    for k in sizes:
        if not hasattr(model, k):
            raise AdapterError(f"tiling.sizes: {type(model).__name__} has no attribute {k!r}")
    keep = {k: getattr(model, k) for k in names}
    for k, v in sizes.items():
        setattr(model, k, v)
    model.use_spatial_tiling, model.use_temporal_tiling = bool(spatial), bool(temporal)
    try:
        yield
    finally:
        for k, v in keep.items():
            setattr(model, k, v)


def tiling_plan(case_cfg: dict | None) -> tuple[dict, dict[str, tuple[bool, bool]]]:
    """(`sizes`, {case name: (use_spatial_tiling, use_temporal_tiling)}) from `config["tiling"]`; ({}, {}) when
    the case has no tiling field."""
    t = (case_cfg or {}).get("tiling")
    if t is None:
        return {}, {}
    if not isinstance(t, dict):
        raise AdapterError(f"config.tiling must be an object with 'sizes' and 'cases', got {type(t).__name__}")
    sizes, cases = t.get("sizes", {}), t.get("cases", {})
    if not isinstance(sizes, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in sizes.values()):
        raise AdapterError("config.tiling.sizes must map upstream attribute names to numbers")
    if not isinstance(cases, dict):
        raise AdapterError("config.tiling.cases must map case names to {use_spatial_tiling, use_temporal_tiling}")
    plan = {}
    for n, flags in cases.items():
        if not isinstance(flags, dict) or not {"use_spatial_tiling", "use_temporal_tiling"} <= set(flags):
            raise AdapterError(f"config.tiling.cases.{n} must hold use_spatial_tiling and use_temporal_tiling")
        plan[str(n)] = (bool(flags["use_spatial_tiling"]), bool(flags["use_temporal_tiling"]))
    return dict(sizes), plan


def tagged_inputs(inputs: dict, stem: str) -> dict[str, str]:
    """{tag: input name} for every input `<stem>_<tag>` (e.g. `x_small` -> {"small": "x_small"})."""
    p = stem + "_"
    return {k[len(p):]: k for k in inputs if k.startswith(p) and len(k) > len(p) and "/" not in k}


def wants(case_cfg: dict | None) -> Callable[..., bool]:
    """`want(*names)`: does the case hold any of these outputs (always True when the caller passed no list)?"""
    names = (case_cfg or {}).get(WANT)
    if names is None:
        return lambda *ns: True
    have = set(names)
    return lambda *ns: any(n in have for n in ns)


def tiling_input_cases(inputs: dict, kind: str) -> Iterable[str]:
    """Case names `<n>` with an input `tiling/<n>/<kind>`."""
    for k in inputs:
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "tiling" and parts[2] == kind:
            yield parts[1]


# ---------------------------------------------------------------------------------------------- case validation
# Replay-time checks of a case before anything is built: the config's field types, its size against the memory
# at hand (a `depth: 1000000000` must not allocate until the machine stops) and the inputs the model needs.
# Every problem is one CaseError (a UserError: `error: ...`, exit 2) naming the case file and the field or input.

MAX_INT = 2**31 - 1  # no size or count of a real config comes near; beyond it shapes overflow in the frameworks
REPLAY_COPIES = 4  # fp32 copies of the weights a replay holds at once: case weights, torch model, converted, MindSpore


def _port_module(adapter):
    """`opensora_ms.models.<adapter name>` (its config dataclass and `param_inventory`), or None."""
    import importlib

    name = getattr(adapter, "__name__", "").rsplit(".", 1)[-1]
    try:
        return importlib.import_module(f"opensora_ms.models.{name}")
    except ImportError:
        return None


def _type_problem(value, annotation: str, where: str, module) -> str | None:
    """Why `value` does not fit the dataclass field annotation (a string: `int`, `float`, `tuple | None`, ...)."""
    ann = annotation.replace("typing.", "").replace(" ", "")
    if ann.startswith("Optional[") and ann.endswith("]"):
        ann = ann[len("Optional["):-1] + "|None"
    kinds = ann.split("|")
    if value is None:
        return None if "None" in kinds else f"{where} must not be null"
    kind = kinds[0]
    if kind == "int" and (type(value) is not int):
        return f"{where} must be an integer, got {_show(value)}"
    if kind == "float" and (type(value) not in (int, float) or not math.isfinite(value)):
        return f"{where} must be a finite number, got {_show(value)}"
    if kind == "bool" and type(value) is not bool:
        return f"{where} must be true or false, got {_show(value)}"
    if kind == "str" and type(value) is not str:
        return f"{where} must be a string, got {_show(value)}"
    if kind in ("list", "tuple") and type(value) is not list:
        return f"{where} must be a list, got {_show(value)}"
    if kind in ("int", "float") and value < 0:
        return f"{where} must not be negative, got {value}"
    if kind == "int" and value > MAX_INT:
        return f"{where} = {value} is beyond any model (at most {MAX_INT})"
    if kind == "int" and "heads" in where.rsplit(".", 1)[-1] and value < 1:
        return f"{where} must be at least 1, got {value}"
    sub = getattr(module, kind, None)
    if isinstance(value, dict) and dataclasses.is_dataclass(sub):
        return _config_problem(value, sub, where, module)
    if kind in ("list", "tuple"):
        for i, x in enumerate(value):
            if type(x) is int and not 0 <= x <= MAX_INT:
                return f"{where}[{i}] must be in [0, {MAX_INT}], got {x}"
    return None


def _config_problem(cfg: dict, cls, where: str, module) -> str | None:
    for f in dataclasses.fields(cls):
        if f.name in cfg and not f.name.startswith("_"):
            p = _type_problem(cfg[f.name], str(f.type), f"{where}.{f.name}", module)
            if p:
                return p
    return None


def _show(v) -> str:
    from converter.errors import show

    return show(v, 60)


def check_case(adapter, case, copies: int = REPLAY_COPIES) -> int | None:
    """Validate `case` for `adapter` before any model is built; returns the estimated parameter count (None when
    the adapter has no MindSpore port module to estimate it with). Raises `parity.case.CaseError`."""
    from converter.targets import CONFIG_ERRORS, inventory_size
    from parity.case import CaseError

    cfg_file = case.file("config")
    name = case.config_name
    cfg = case.model_cfg
    where = f"{cfg_file}: {name}"
    mod = _port_module(adapter)
    params = None
    if mod is not None and hasattr(mod, "param_inventory"):
        cls = getattr(mod, name, None)
        if dataclasses.is_dataclass(cls):
            p = _config_problem(cfg, cls, name, sys.modules.get(cls.__module__, mod))
            if p:
                raise CaseError(f"{cfg_file}: {p}")
        try:
            _, params = inventory_size(mod.param_inventory, dict(cfg))
        except CONFIG_ERRORS as e:
            raise CaseError(f"{where} cannot be built: {e.__class__.__name__}: {str(e)[:300]}") from None
        _check_memory(params, copies, where)
    _check_inputs(case, name, cfg)
    return params


def _check_memory(params: int, copies: int, where: str) -> None:
    import psutil

    from parity.case import CaseError

    need = params * 4 * copies
    avail = psutil.virtual_memory().available
    if need > avail:
        raise CaseError(f"{where} describes about {params:,} parameters: a replay needs ~{need / 1e9:.1f} GB "
                        f"({copies} float32 copies), more than the {avail / 1e9:.1f} GB of memory available; "
                        "refusing to build it")


# inputs each kind of case needs: name -> (ndim, config field of the last / channel dim or None)
def _mmdit_inputs(c: dict) -> dict:
    n_axes = len(c.get("axes_dim") or [])
    need = {"img": (3, c.get("in_channels")), "img_ids": (3, n_axes), "txt": (3, c.get("context_in_dim")),
            "txt_ids": (3, n_axes), "timesteps": (1, None), "y_vec": (2, c.get("vec_in_dim"))}
    if c.get("cond_embed", False):
        need["cond"] = (3, (c.get("in_channels") or 0) + c.get("patch_size", 2) ** 2)
    if c.get("guidance_embed", False):
        need["guidance"] = (1, None)
    return need


VAE_INPUTS = {"AutoEncoder3DConfig": ((5,), "in_channels", "latent_channels"),
              "DCAEConfig": ((5,), "in_channels", "latent_channels"),
              "AutoEncoderConfig": ((4, 5), "in_channels", "z_channels")}  # images, or videos folded into the batch


def _check_inputs(case, name: str, cfg: dict) -> None:
    from converter.safetensors_io import SafetensorsFile
    from parity.case import CaseError

    f = case.file("inputs")
    inv = SafetensorsFile(f).inventory()

    def fail(msg):
        raise CaseError(f"{f}: {msg}")

    def dims(key, ndim, last, axis=-1):
        shape, ndims = inv[key][0], ndim if isinstance(ndim, tuple) else (ndim,)
        if len(shape) not in ndims:
            fail(f"input {key!r} has shape {list(shape)}; {name} needs a {' or '.join(map(str, ndims))}-d tensor")
        if last is not None and shape[axis] != last:
            fail(f"input {key!r} has shape {list(shape)}; {name} needs {last} along axis {axis} (from the config)")
        return shape

    if name == "MMDiTConfig":
        need = _mmdit_inputs(cfg)
        absent = [k for k in need if k not in inv]
        if absent:
            fail(f"input {absent[0]!r} is missing; {name} needs {', '.join(need)}")
        s = {k: dims(k, *v) for k, v in need.items()}
        if len({v[0] for v in s.values()}) != 1:
            fail(f"inputs disagree on the batch size: {', '.join(f'{k} {list(v)}' for k, v in s.items())}")
        for a, b in (("img", "img_ids"), ("txt", "txt_ids")) + ((("img", "cond"),) if "cond" in s else ()):
            if s[a][1] != s[b][1]:
                fail(f"inputs {a!r} {list(s[a])} and {b!r} {list(s[b])} disagree on the number of tokens")
    elif name in ("T5Config", "CLIPTextConfig"):
        if "input_ids" not in inv:
            fail(f"input 'input_ids' is missing; {name} needs it")
        dims("input_ids", 2, None)
        if not inv["input_ids"][1].startswith(("I", "U")):
            fail(f"input 'input_ids' is {inv['input_ids'][1]}; token ids are integers")
        ids = SafetensorsFile(f).storage("input_ids")
        vocab = cfg.get("vocab_size")
        if ids.size and type(vocab) is int and (ids.min() < 0 or ids.max() >= vocab):
            fail(f"input 'input_ids' holds ids in [{ids.min()}, {ids.max()}], outside the vocabulary [0, {vocab})")
    elif name in VAE_INPUTS:
        ndim, cin, clat = VAE_INPUTS[name]
        for key in inv:
            leaf = key.rsplit("/", 1)[-1]
            if leaf == "x" or leaf.startswith("x_"):
                dims(key, ndim, cfg.get(cin, 3), axis=1)
            elif leaf == "z" or leaf.startswith("z_"):
                dims(key, ndim, cfg.get(clat), axis=1)
