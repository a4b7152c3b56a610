"""Helpers shared by the MMDiT tests (imported as `test_mmdit_common`), and the config tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "upstream" / "tiny"
MANIFESTS = SHARED / "upstream" / "manifests"
CASES = ["mmdit_tiny", "mmdit_hc_tiny", "mmdit_flux_tiny"]
REAL = {  # manifest -> MindSpore target inventory (mappings/targets)
    "mmdit_open_sora_v2.json": ("mmdit_opensora_v2", "mmdit_opensora_v2"),
    "mmdit_open_sora_v2_video_dc_ae.json": ("mmdit_opensora_v2_hc", "mmdit_opensora_v2_hc"),
    "flux1_dev_t2i.json": ("mmdit_flux_dev", "mmdit_flux_dev"),
}


def rel(a, b) -> float:
    """max|a - b| / max|b| (DESIGN.md)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def load_case(case: str):
    from safetensors.numpy import load_file

    cfg = json.loads((TINY / f"{case}.config.json").read_text())
    out = {
        "config": cfg,
        "weights": load_file(str(TINY / f"{case}.weights.safetensors")),
        "inputs": load_file(str(TINY / f"{case}.inputs.safetensors")),
        "outputs": load_file(str(TINY / f"{case}.outputs.safetensors")),
        "hooks": load_file(str(TINY / f"{case}.hooks.safetensors")),
        "aliases": json.loads((TINY / f"{case}.hooks_aliases.json").read_text()),
    }
    return out


def case_hook(case: dict, name: str):
    """The stored hook tensor of `name`, following hooks_aliases."""
    h = case["hooks"]
    if name in h:
        return h[name]
    return h[case["aliases"][name]]


def case_hook_names(case: dict) -> set:
    return set(case["hooks"]) | set(case["aliases"])


def flatten(name, out, acc, to_numpy):
    """Case naming of structured outputs: `.i` for tuple items, `.field` for dataclass fields."""
    if isinstance(out, (tuple, list)):
        for i, o in enumerate(out):
            flatten(f"{name}.{i}", o, acc, to_numpy)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            flatten(f"{name}.{f.name}", getattr(out, f.name), acc, to_numpy)
    elif out is not None:
        acc[name] = to_numpy(out)


def capture(model, fn):
    """Run fn() with a forward hook on every torch module / MindSpore cell (PyNative); returns {path (+ `#n` for
    repeated calls, + suffix of structured outputs): numpy float64}. Framework glue: parity.capture."""
    from parity.capture import framework_of

    fw = framework_of(model)
    acc, count, handles = {}, {}, []

    def mk(path):
        def hook(out):
            key = path or "__root__"
            n = count.get(key, 0)
            count[key] = n + 1
            flatten(key if n == 0 else f"{key}#{n}", out, acc, lambda t: fw.to_numpy(t)[0].astype(np.float64))
        return hook

    for path, mod in fw.named_modules(model):
        handles.append(fw.forward_hook(mod, mk(path)))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return acc


# ------------------------------------------------------------------------------------------------------------ tests
def test_configs_from_dict_strict():
    import pytest

    from opensora_ms.models.mmdit import MMDiTConfig as MSConfig
    from parity.reference.mmdit import MMDiTConfig as TorchConfig

    for case in CASES:
        d = json.loads((TINY / f"{case}.config.json").read_text())["MMDiTConfig"]
        assert TorchConfig.from_dict(d).to_dict() == MSConfig.from_dict(d).to_dict()
    for man in REAL:
        d = json.loads((MANIFESTS / man).read_text())["config"]   # carries upstream's `type: flux`
        assert TorchConfig.from_dict(d).to_dict() == MSConfig.from_dict(d).to_dict()
    for cls in (TorchConfig, MSConfig):
        with pytest.raises(ValueError, match="unknown field"):
            cls.from_dict({**d, "hidden_sise": 3})
        with pytest.raises(ValueError, match="type"):
            cls.from_dict({**d, "type": "dit"})
