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
