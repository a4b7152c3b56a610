"""Shared test fixtures. `SHARED` is the read-only ground truth beside the checkout (never copied in)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def run_msconv(*args, env=None, input=None, timeout=300):
    """The installed entry point's code path (cli.app() as a program) in its own process: what a user's shell
    runs, with that process's own memory and exit status."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", "import sys, cli; sys.argv[0] = 'msconv'; cli.app()", *map(str, args)],
                          cwd=ROOT, env=e, capture_output=True, text=True, input=input, timeout=timeout)


def write_embeddings(path, rows: int = 3, L: int = 7, seed: int = 0, t2i: bool = False):
    """A `--text-embeddings` file for the synthetic repo's tiny MMDiT (`t2i`: also the t2i2v image step's)."""
    from safetensors.numpy import save_file

    from parity import synthetic_repo

    rng = np.random.default_rng(seed)
    m = synthetic_repo.MMDIT
    emb = {"txt": rng.standard_normal((rows, L, m["context_in_dim"]), dtype=np.float32),
           "y_vec": rng.standard_normal((rows, m["vec_in_dim"]), dtype=np.float32)}
    if t2i:
        emb.update({"t2i/txt": rng.standard_normal((1, L, m["context_in_dim"]), dtype=np.float32),
                    "t2i/y_vec": rng.standard_normal((1, m["vec_in_dim"]), dtype=np.float32)})
    save_file(emb, str(path))
    return path


def torch_like_state(d=8, blocks=2, seed=0) -> dict:
    """A small torch-layout state dict (blocks of q/k/v/proj + a head) for converter and loader tests."""
    rng = np.random.default_rng(seed)
    sd = {}
    for i in range(blocks):
        for n in ("q", "k", "v", "proj"):
            sd[f"blk.{i}.{n}.weight"] = rng.standard_normal((d, d)).astype(np.float32)
            sd[f"blk.{i}.{n}.bias"] = rng.standard_normal((d,)).astype(np.float32)
    sd["head.weight"] = rng.standard_normal((3, d)).astype(np.float32)
    return sd
