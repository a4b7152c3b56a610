"""msconv converter: declarative, reversible PyTorch -> MindSpore checkpoint conversion.

Imports numpy, yaml and (only for .bin/.pt sources) torch; never mindspore except in `converter.ckpt`.
"""
from __future__ import annotations

__all__ = ["__version__"]

try:  # the installed distribution is "msconv"; a plain checkout falls back to the source version
    from importlib.metadata import version as _v

    __version__ = _v("msconv")
except Exception:  # pragma: no cover - not installed
    __version__ = "0.1.0"
