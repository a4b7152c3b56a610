"""Shared test fixtures. `SHARED` is the read-only ground truth beside the checkout (never copied in)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "upstream" / "tiny"
MANIFESTS = SHARED / "upstream" / "manifests"

if str(ROOT) not in sys.path:  # `cli` is a top-level module of the checkout
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def tiny() -> Path:
    return TINY


@pytest.fixture
def cli():
    """Run `msconv ARGS...` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    import cli as cli_module

    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli_module.app, [str(a) for a in args])

    return run
