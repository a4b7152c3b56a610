"""The case format (../shared/DESIGN.md): a file prefix `<dir>/<name>` with six files.

| file | content |
|---|---|
| `<name>.config.json` | `{"<ConfigName>": {...}, "call"/"calls"/"notes": ...}` |
| `<name>.weights.safetensors` | weights in PyTorch (upstream) key names |
| `<name>.inputs.safetensors` | inputs by argument name |
| `<name>.outputs.safetensors` | outputs by name |
| `<name>.hooks.safetensors` | optional: every module's output by module path (`.0/.1`, `#n`) |
| `<name>.hooks_aliases.json` | optional: alias path -> stored path (same tensor, stored once) |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converter.errors import UserError
from converter.safetensors_io import SafetensorsFile
from parity.tensorio import SafetensorsReader, read_header

# Upstream config vocabulary (DESIGN.md); new kinds add a name here.
CONFIG_NAMES = ("MMDiTConfig", "AutoEncoder3DConfig", "DCAEConfig", "AutoEncoderConfig", "SamplingOption")
SUFFIXES = ("config.json", "weights.safetensors", "inputs.safetensors", "outputs.safetensors",
            "hooks.safetensors", "hooks_aliases.json")


class CaseError(UserError):
    """A case path or file is missing or malformed (user error, CLI exit 2)."""


def _read_json(path: Path, what: str):
    """The JSON in `path`; CaseError (one line, the file named) when it cannot be read or is not JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:  # no permission, a directory, an I/O error
        raise CaseError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad JSON, not UTF-8, nesting too deep, a 5000-digit number
        raise CaseError(f"{path}: {what} is not valid JSON ({e.__class__.__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None


def case_prefix(path: str | os.PathLike) -> Path:
    """Accept `<dir>/<name>`, any of the case files, or a directory holding exactly one case."""
    p = Path(path)
    for suf in SUFFIXES:
        if p.name.endswith("." + suf):
            return p.with_name(p.name[: -len(suf) - 1])
    if p.is_dir():
        configs = sorted(p.glob("*.config.json"))
        if len(configs) == 1:
            return case_prefix(configs[0])
        raise CaseError(f"{p}: a directory with {len(configs)} cases; name one (<dir>/<name>)")
    return p


def list_cases(directory: str | os.PathLike) -> list[Path]:
    return [case_prefix(c) for c in sorted(Path(directory).glob("*.config.json"))]


@dataclass
class Case:
    prefix: Path
    config: dict
    aliases: dict[str, str] = field(default_factory=dict)
    outputs_only: list[str] | None = None     # globs: compare (and compute) only these outputs (--outputs)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Case":
        prefix = case_prefix(path)
        cfg_path = prefix.with_name(prefix.name + ".config.json")
        if not cfg_path.is_file():
            raise CaseError(f"{cfg_path}: not a regular file" if cfg_path.exists() else
                            f"{cfg_path}: no such case config (a case is <dir>/<name> with <name>.config.json)")
        for kind in ("weights", "inputs", "outputs", "hooks"):
            f = prefix.with_name(f"{prefix.name}.{kind}.safetensors")
            if kind == "hooks" and not f.exists():
                continue  # optional
            if not f.is_file():
                raise CaseError(f"{f}: case file missing" if not f.exists() else f"{f}: not a regular file")
            SafetensorsFile(f)  # the header, validated (FormatError naming the file and tensor)
        config = _read_json(cfg_path, "the case config")
        if not isinstance(config, dict):
            raise CaseError(f"{cfg_path}: the case config must be a JSON object ({{\"<ConfigName>\": {{...}}, ...}}), "
                            f"got {type(config).__name__}")
        alias_path = prefix.with_name(prefix.name + ".hooks_aliases.json")
        aliases = _read_json(alias_path, "the hook aliases") if alias_path.exists() else {}
        if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise CaseError(f"{alias_path}: hook aliases must be a JSON object of alias -> stored hook name")
        return cls(prefix=prefix, config=config, aliases=aliases)

    # ---- names and files
    @property
    def name(self) -> str:
        return self.prefix.name

    def file(self, kind: str) -> Path:
        ext = "json" if kind in ("config", "hooks_aliases") else "safetensors"
        return self.prefix.with_name(f"{self.prefix.name}.{kind}.{ext}")

    @property
    def config_name(self) -> str:
        for name in CONFIG_NAMES:
            if name in self.config:
                return name
        for key, val in self.config.items():   # a new kind: the first *Config key holding a dict
            if key.endswith("Config") and isinstance(val, dict):
                return key
        raise CaseError(f"{self.file('config')}: no known config key ({', '.join(CONFIG_NAMES)})")

    @property
    def model_cfg(self) -> dict:
        name = self.config_name
        cfg = self.config[name]
        if not isinstance(cfg, dict):
            raise CaseError(f"{self.file('config')}: key {name!r} must hold the config fields (a JSON object), "
                            f"got {type(cfg).__name__}")
        return cfg

    # ---- tensors (lazy)
    def weights_reader(self) -> SafetensorsReader:
        return SafetensorsReader(self.file("weights"))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        index, _ = read_header(self.file("weights"))
        return {k: tuple(v["shape"]) for k, v in index.items()}

    def weights_numpy(self) -> dict[str, np.ndarray]:
        r = self.weights_reader()
        return {k: r.get(k) for k in r.keys()}

    def inputs(self) -> dict[str, np.ndarray]:
        r = SafetensorsReader(self.file("inputs"))
        return {k: r.get(k) for k in r.keys()}

    def output_names(self) -> list[str]:
        """The case's output names, restricted to `outputs_only` when set."""
        import fnmatch

        names = self.outputs_reader().keys()
        if self.outputs_only is None:
            return list(names)
        return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in self.outputs_only)]

    def outputs_reader(self) -> SafetensorsReader:
        return SafetensorsReader(self.file("outputs"))

    def hooks_reader(self) -> SafetensorsReader | None:
        f = self.file("hooks")
        return SafetensorsReader(f) if f.is_file() else None

    def hook_names(self) -> list[str]:
        """Every module output the case knows: stored names, then alias names."""
        r = self.hooks_reader()
        stored = r.keys() if r else []
        seen = set(stored)
        return list(stored) + [a for a in self.aliases if a not in seen]


class HookStore:
    """Name -> tensor lookup over stored hooks + aliases (an alias's expected tensor is the stored one)."""

    def __init__(self, reader: SafetensorsReader | None, aliases: dict[str, str] | None = None):
        self.reader = reader
        self.aliases = dict(aliases or {})

    def resolve(self, name: str) -> str | None:
        seen = set()
        while self.reader is not None and name not in self.reader:
            if name in seen or name not in self.aliases:
                return None
            seen.add(name)
            name = self.aliases[name]
        return name if self.reader is not None else None

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def get(self, name: str) -> np.ndarray:
        real = self.resolve(name)
        if real is None:
            raise KeyError(name)
        return self.reader.get(real)
