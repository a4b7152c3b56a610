"""Parity adapters: one module per model family (docs/architecture.md "Parity adapters").

Each adapter module provides `CONFIG_NAME`, `mapping_name(cfg)`, `build_torch(cfg, dtype)`, `build_ms(cfg)`,
`run_torch(model, inputs, case_cfg)`, `run_ms(model, inputs, case_cfg)`, `TEACHER_BLOCKS`, `PRESETS`,
`make_inputs(cfg, seed)`; optionally `teacher_inputs(torch_path, args, kwargs) -> (args, kwargs)` (numpy in,
numpy out) converting a torch block's recorded inputs to the MindSpore block's signature for teacher forcing.

Model names on the command line are the adapter module names (`mmdit`, `hunyuan_vae`).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

# config name (the key in <case>.config.json) -> adapter module name
BY_CONFIG = {
    "T5Config": "t5",
    "CLIPTextConfig": "clip",
    "MMDiTConfig": "mmdit",
    "AutoEncoder3DConfig": "hunyuan_vae",
    "DCAEConfig": "dc_ae",
    "AutoEncoderConfig": "flux_ae",
    "SamplingOption": "pipeline",
}

REQUIRED = ("CONFIG_NAME", "mapping_name", "build_torch", "build_ms", "run_torch", "run_ms", "TEACHER_BLOCKS",
            "PRESETS", "make_inputs")


# adapters registered at run time (plugins, tests): name -> module
REGISTERED: dict[str, ModuleType] = {}


def register(name: str, module: ModuleType) -> None:
    REGISTERED[name] = module


class NotCovered(Exception):
    """No adapter (or no MindSpore port) covers this config/model yet."""


def available() -> list[str]:
    return sorted(set(REGISTERED) | {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})


def by_name(model: str) -> ModuleType:
    if model in REGISTERED:
        return REGISTERED[model]
    if model not in available():
        raise NotCovered(f"no parity adapter {model!r} (available: {', '.join(available()) or 'none'})")
    return importlib.import_module(f"{__name__}.{model}")


def for_config(config_name: str) -> ModuleType:
    for mod in REGISTERED.values():
        if getattr(mod, "CONFIG_NAME", None) == config_name:
            return mod
    name = BY_CONFIG.get(config_name)
    if name is None:
        for cand in available():   # an adapter not registered above still counts if it declares the name
            mod = importlib.import_module(f"{__name__}.{cand}")
            if getattr(mod, "CONFIG_NAME", None) == config_name:
                return mod
        raise NotCovered(f"no parity adapter for {config_name}")
    return by_name(name)


def missing_api(adapter: ModuleType) -> list[str]:
    return [a for a in REQUIRED if not hasattr(adapter, a)]
