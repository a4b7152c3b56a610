"""Hostile input (issue 15): every probe of the issue, as a CLI invocation, ends in exit 2 with ONE `error:` line
naming the file / key / field (or the documented success), and leaves nothing under the output name.

One test (or one parametrized case) per bullet of the issue's sections 1-3 and 5; the property-based fuzz suite
of section 4 is tests/test_fuzz.py. What is refused and how: docs/hostile_input.md.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, run_msconv
from converter.safetensors_io import save_file

MAPPING = """name: {name}
rules:
  - {{source: "blk.{{i}}.{{p}}", target: "blk.{{i}}.{{p}}"}}
"""


# -- helpers ------------------------------------------------------------------------------------------------
def _one_line_error(res, *needles, code=2):
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err, (n, err)
    return err


def _nothing_under(out: Path):
    assert not out.exists(), list(out.parent.iterdir())
    assert not list(out.parent.glob(f".{out.name}.msconv-*")), list(out.parent.iterdir())


def _header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _inventory(path: Path, inv: dict) -> Path:
    path.write_text(json.dumps({"tensors": [{"key": k, "shape": list(s), "dtype": d} for k, (s, d) in inv.items()]}))
    return path


@pytest.fixture
def small(tmp_path):
    """(source, mapping, target inventory) of a two-tensor rename conversion."""
    src = tmp_path / "src.safetensors"
    save_file({"blk.0.w": np.ones((2, 3), np.float32), "blk.1.w": np.zeros((4,), np.float32)}, src)
    mp = tmp_path / "hx.yaml"
    mp.write_text(MAPPING.format(name="hx"))
    inv = _inventory(tmp_path / "targets.json", {"blk.0.w": ((2, 3), "F32"), "blk.1.w": ((4,), "F32")})
    return src, mp, inv


def _convert(cli, small, out, *extra):
    src, mp, inv = small
    return cli("convert", src, "--mapping", mp, "--target-inventory", inv, "--out", out, *extra)


class _Unreadable:
    """Make `path` unreadable: mode 000, and (as root, who reads anyway) every open of it raises EACCES."""

    def __init__(self, monkeypatch, path: Path):
        self.path = os.path.realpath(path)
        os.chmod(path, 0)
        monkeypatch.setattr(builtins, "open", self._wrap(builtins.open))
        monkeypatch.setattr(io, "open", self._wrap(io.open))
        monkeypatch.setattr(os, "open", self._wrap(os.open))

    def _wrap(self, real):
        def opener(file, *a, **kw):
            if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == self.path:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return real(file, *a, **kw)
        return opener


# == 1. tracebacks where one line belongs ======================================================================
def test_header_dtype_that_is_a_list(cli, tmp_path):
    f = _header_file(tmp_path / "x.safetensors", json.dumps(
        {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4)
    _one_line_error(cli("inspect", f), str(f), "'w'", "unsupported dtype")


def test_header_nested_100k_deep(cli, tmp_path):
    f = _header_file(tmp_path / "x.safetensors", b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    _one_line_error(cli("inspect", f), str(f), "nested too deeply")


def test_pt_with_a_sparse_tensor(cli, tmp_path):
    import torch

    f = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse()}, f)
    _one_line_error(cli("inspect", f), str(f), "'w'", "sparse")


@pytest.mark.parametrize("key", [3, (1, 2)], ids=["int", "tuple"])
def test_pt_with_non_string_keys(cli, tmp_path, key):
    import torch

    f = tmp_path / "keys.pt"
    torch.save({key: torch.ones(2)}, f)
    _one_line_error(cli("inspect", f), str(f), repr(key), "must be strings")


@pytest.mark.parametrize("where", ["/proc/1/msconv-out/x", "/sys/msconv-out/x", "read-only"])
def test_out_where_nothing_can_be_written(cli, small, tmp_path, monkeypatch, where):
    if where == "read-only":  # a read-only file system: the parent folder cannot be made
        out = tmp_path / "ro" / "out"

        def erofs(self, *a, **kw):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        monkeypatch.setattr(Path, "mkdir", erofs)
    else:
        out = Path(where)
    err = _one_line_error(_convert(cli, small, out), "cannot create")
    assert "nothing was written" in err
    if where == "read-only":
        _nothing_under(out)
        assert not out.parent.exists()


def test_lock_path_is_a_directory(cli, small, tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.msconv-lock").mkdir()
    _one_line_error(_convert(cli, small, out), ".out.msconv-lock", "lock file")
    assert not out.exists()


def test_staging_path_is_a_file(cli, small, tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.msconv-partial").write_text("mine")
    _one_line_error(_convert(cli, small, out), ".out.msconv-partial", "remove it")
    assert not out.exists() and (tmp_path / ".out.msconv-partial").read_text() == "mine"  # not ours to delete


def test_unreadable_shard(cli, small, tmp_path, monkeypatch):
    _Unreadable(monkeypatch, small[0])
    out = tmp_path / "out"
    _one_line_error(_convert(cli, small, out), str(small[0]), "Permission denied")
    _nothing_under(out)


def test_unreadable_mapping(cli, small, tmp_path, monkeypatch):
    _Unreadable(monkeypatch, small[1])
    out = tmp_path / "out"
    _one_line_error(_convert(cli, small, out), str(small[1]), "Permission denied")
    _nothing_under(out)


def _case_copy(tmp_path: Path, name="mmdit_tiny", config=None, inputs=None) -> Path:
    """A copy of a shared tiny case (without hooks), optionally with another config or other inputs."""
    d = tmp_path / "case"
    d.mkdir(exist_ok=True)
    for kind in ("weights", "inputs", "outputs"):
        shutil.copy(TINY / f"{name}.{kind}.safetensors", d / f"{name}.{kind}.safetensors")
    cfg = json.loads((TINY / f"{name}.config.json").read_text())
    if config is not None:
        cfg = config(cfg)
    (d / f"{name}.config.json").write_text(json.dumps(cfg))
    if inputs is not None:
        from converter.sources import load_file

        save_file(inputs(load_file(d / f"{name}.inputs.safetensors")), d / f"{name}.inputs.safetensors")
    return d / name


def test_unreadable_case_config(cli, tmp_path, monkeypatch):
    case = _case_copy(tmp_path)
    _Unreadable(monkeypatch, case.with_name(case.name + ".config.json"))
    _one_line_error(cli("parity", "replay", case), "config.json", "Permission denied")


@pytest.mark.parametrize("what", ["directory", "binary"])
def test_inventory_arguments_that_are_not_json_files(cli, small, tmp_path, what):
    if what == "directory":
        bad = tmp_path / "inv_dir"
        bad.mkdir()
    else:
        bad = tmp_path / "inv.bin"
        bad.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    src, mp, _ = small
    _one_line_error(cli("convert", src, "--mapping", mp, "--target-inventory", bad, "--out", out), str(bad))
    _nothing_under(out)
    _one_line_error(cli("inspect", src, "--against", bad), str(bad))
    mv = tmp_path / "hm.yaml"  # validate: the mapping's own source manifest is the bad file
    mv.write_text(MAPPING.format(name="hm") + f"source: {{manifest: {json.dumps(str(bad))}}}\n")
    _one_line_error(cli("validate", mv, "--allow-partial"), str(bad))


def test_binary_mapping(cli, small, tmp_path):
    mp = tmp_path / "bin.yaml"
    mp.write_bytes(b"\xff\xfe\x00\x01" * 100)
    out = tmp_path / "out"
    _one_line_error(cli("convert", small[0], "--mapping", mp, "--out", out), str(mp), "not UTF-8")
    _nothing_under(out)


def test_var_dim_that_is_a_string(cli, small, tmp_path):
    mp = tmp_path / "hv.yaml"
    mp.write_text(MAPPING.format(name="hv") + 'vars:\n  d: {source: "blk.0.w", dim: "0"}\n')
    _one_line_error(cli("validate", mp, "--source", small[0], "--allow-partial"), str(mp), "var 'd'")


def test_deeply_nested_size_expression(cli, small, tmp_path):
    mp = tmp_path / "hn.yaml"
    expr = "(" * 5000 + "1" + ")" * 5000
    mp.write_text(f'name: hn\nrules:\n  - source: "blk.{{i}}.{{p}}"\n    target: "blk.{{i}}.{{p}}"\n'
                  f'    ops: [{{reshape: {{shape: ["{expr}"]}}}}]\n')
    _one_line_error(cli("validate", mp, "--source", small[0], "--allow-partial"), str(mp), "reshape.shape")


def test_shard_size_that_overflows(cli, small, tmp_path):
    out = tmp_path / "out"
    _one_line_error(_convert(cli, small, out, "--shard-size", "1e400GB"), "1e400GB")
    _nothing_under(out)


# parity replay: a case the model cannot run, and options that are nonsense (refused before anything is built)
def test_replay_inputs_without_txt(cli, tmp_path):
    case = _case_copy(tmp_path, inputs=lambda d: {k: v for k, v in d.items() if k != "txt"})
    _one_line_error(cli("parity", "replay", case), "inputs.safetensors", "'txt' is missing")


def test_replay_config_with_an_unknown_field(cli, tmp_path):
    case = _case_copy(tmp_path, config=lambda c: {**c, "MMDiTConfig": {**c["MMDiTConfig"], "depht": 2}})
    _one_line_error(cli("parity", "replay", case), "config.json", "depht")


def test_replay_config_with_zero_heads(cli, tmp_path):
    case = _case_copy(tmp_path, config=lambda c: {**c, "MMDiTConfig": {**c["MMDiTConfig"], "num_heads": 0}})
    _one_line_error(cli("parity", "replay", case), "config.json", "num_heads")


def test_replay_device_nonsense(cli, tmp_path):
    _one_line_error(cli("parity", "replay", TINY / "mmdit_tiny", "--device", "nonsense"), "--device", "'nonsense'")


def test_replay_thresholds_missing(cli, tmp_path):
    _one_line_error(cli("parity", "replay", TINY / "mmdit_tiny", "--thresholds", tmp_path / "nope.yaml"),
                    "nope.yaml", "no such file")


def _weird_keys_file(path: Path) -> Path:
    keys = ["[/foo]", "[bold red]x[/]", "\x1b[31mred\x1b[0m", "line\nbreak"]
    save_file({k: np.zeros(1, np.float32) for k in keys}, path)
    return path


def test_key_names_are_printed_literally(cli, tmp_path):
    f = _weird_keys_file(tmp_path / "weird.safetensors")
    res = cli("inspect", f)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "[/foo]" in res.stdout and "[bold red]x[/]" in res.stdout  # not markup
    assert "\\x1b[31mred\\x1b[0m" in res.stdout and "line\\nbreak" in res.stdout  # escaped, visible
    assert "\x1b" not in res.output
    res = cli("inspect", f, "--against", _inventory(tmp_path / "inv.json", {"[/other]": ((1,), "F32")}))
    err = _one_line_error(res, "[/other]")
    assert "\x1b" not in res.output and "[/foo]" in res.stdout


# == 2. succeeds when it must not ===============================================================================
def test_duplicate_keys_in_a_header(cli, tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    f = _header_file(tmp_path / "dup.safetensors", f'{{"w": {entry}, "w": {entry}}}'.encode(), b"\0" * 4)
    _one_line_error(cli("inspect", f), str(f), "'w' appears twice")


@pytest.mark.parametrize("meta", [[], "x", {"a": 1}, None], ids=["list", "str", "int-value", "null"])
def test_metadata_that_is_not_string_to_string(cli, tmp_path, meta):
    hdr = {"__metadata__": meta, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    f = _header_file(tmp_path / "meta.safetensors", json.dumps(hdr).encode(), b"\0" * 4)
    _one_line_error(cli("inspect", f), str(f), "__metadata__")


@pytest.mark.parametrize("kind", ["safetensors", "pt", "index"])
def test_empty_sources_do_not_convert(cli, small, tmp_path, kind):
    import torch

    if kind == "safetensors":
        src = _header_file(tmp_path / "empty.safetensors", b"{}      ")
    elif kind == "pt":
        src = tmp_path / "empty.pt"
        torch.save({}, src)
    else:
        src = tmp_path / "model.safetensors.index.json"
        src.write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    out = tmp_path / "out"
    _one_line_error(cli("convert", src, "--mapping", small[1], "--out", out), str(src))
    _nothing_under(out)


def test_key_with_a_newline_does_not_match_a_placeholder(cli, small, tmp_path):
    src = tmp_path / "nl.safetensors"
    save_file({"blk.0.w": np.ones((2, 3), np.float32), "blk.1.w\nx": np.zeros((4,), np.float32)}, src)
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", small[1], "--out", out, "--allow-partial")
    _one_line_error(res, "'blk.1.w\\nx'", "matches no rule")
    _nothing_under(out)


CAST = """name: {name}
rules:
  - source: "blk.{{i}}.{{p}}"
    target: "blk.{{i}}.{{p}}"
    ops: [{{cast: {{dtype: I64{extra}}}}}]
"""


def test_cast_between_float_and_int_needs_allow_lossy(cli, small, tmp_path):
    src = small[0]
    mp = tmp_path / "hc.yaml"
    mp.write_text(CAST.format(name="hc", extra=""))
    out = tmp_path / "out"
    _one_line_error(cli("convert", src, "--mapping", mp, "--out", out, "--allow-partial"), "allow_lossy", "F32")
    _nothing_under(out)
    mp.write_text(CAST.format(name="hc", extra=", allow_lossy: true"))
    res = cli("convert", src, "--mapping", mp, "--out", out, "--allow-partial")
    assert res.exit_code == 0, res.output
    from converter.sources import load_file

    assert load_file(out)["blk.0.w"].dtype == np.int64


def test_inventory_shape_given_as_a_string(cli, small, tmp_path):
    inv = tmp_path / "str.json"
    inv.write_text(json.dumps({"tensors": [{"key": "blk.0.w", "shape": "96", "dtype": "F32"}]}))
    _one_line_error(cli("inspect", small[0], "--against", inv), str(inv), "'blk.0.w'", "shape")


def test_var_dim_out_of_range_says_so(cli, small, tmp_path):
    mp = tmp_path / "hd.yaml"
    mp.write_text("name: hd\nvars:\n  d: {source: \"blk.1.w\", dim: 5}\nrules:\n"
                  "  - {source: \"blk.{i}.{p}\", target: \"blk.{i}.{p}\", ops: [{reshape: {shape: [d, -1]}}]}\n")
    _one_line_error(cli("validate", mp, "--source", small[0], "--allow-partial"), "'d'", "dim 5 is out of range",
                    "blk.1.w")


@pytest.mark.parametrize("sizes", ['["x y"]', '[[1]]', "[true]", "[undefined_var]"])
def test_concat_sizes_are_validated_at_load(cli, small, tmp_path, sizes):
    mp = tmp_path / "hs.yaml"
    mp.write_text(f"name: hs\nrules:\n  - source: [\"blk.0.{{p}}\", \"blk.1.{{p}}\"]\n    target: \"cat.{{p}}\"\n"
                  f"    ops: [{{concat: {{axis: 0, sizes: {sizes}}}}}]\n")
    _one_line_error(cli("validate", mp, "--source", small[0], "--allow-partial"), str(mp), "concat")


def test_concat_sizes_that_do_not_fit_the_inputs(cli, tmp_path):
    src = tmp_path / "two.safetensors"
    save_file({"blk.0.w": np.ones((2, 3), np.float32), "blk.1.w": np.ones((4, 3), np.float32)}, src)
    mp = tmp_path / "hs.yaml"
    mp.write_text("name: hs\nrules:\n  - source: [\"blk.0.{p}\", \"blk.1.{p}\"]\n    target: \"cat.{p}\"\n"
                  "    ops: [{concat: {axis: 0, sizes: [3, 3]}}]\n")
    _one_line_error(cli("validate", mp, "--source", src, "--allow-partial"), "concat.sizes [3, 3]", "[2, 4]")


# == 3. signals and slow inputs ================================================================================
def _sigint_during(monkeypatch, step: str):
    """Send this process SIGINT from inside the publish step (`publish`) or while writing (`write`)."""
    import converter.engine as eng

    if step == "publish":
        real = eng.os.replace

        def replace(a, b, *x, **kw):
            real(a, b, *x, **kw)
            if str(a).endswith(".msconv-partial"):  # the new output just went under OUT; the old one still beside
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        monkeypatch.setattr(eng.os, "replace", replace)
    else:
        real_atomic = eng._atomic_json

        def atomic(path, obj):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            real_atomic(path, obj)
        monkeypatch.setattr(eng, "_atomic_json", atomic)


def test_sigint_while_publishing_tells_the_truth(cli, small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _convert(cli, small, out).exit_code == 0
    old_manifest = json.loads((out / "msconv-manifest.json").read_text())
    _sigint_during(monkeypatch, "publish")
    res = _convert(cli, small, out, "--overwrite", "--dtype", "bf16")
    err = _one_line_error(res, str(out), code=130)
    assert "holds the complete new output" in err, err
    assert not list(tmp_path.glob(".out.msconv-*")), list(tmp_path.iterdir())  # no .out.msconv-old left
    new = json.loads((out / "msconv-manifest.json").read_text())
    assert new["dtype_policy"] == "bf16" and new["created"] >= old_manifest["created"]


def test_sigint_before_publishing_keeps_the_previous_output(cli, small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _convert(cli, small, out).exit_code == 0
    before = (out / "msconv-manifest.json").read_bytes()
    _sigint_during(monkeypatch, "write")
    err = _one_line_error(_convert(cli, small, out, "--overwrite", "--dtype", "bf16"), code=130)
    assert "still holds the previous output, unchanged" in err, err
    assert (out / "msconv-manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".out.msconv-*"))


@pytest.fixture(scope="module")
def big_header(tmp_path_factory):
    """A 200k-key header (13 MB of JSON), as in the issue."""
    n = 200_000
    hdr = {f"model.layers.{i}.w": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    return _header_file(tmp_path_factory.mktemp("big") / "big.safetensors",
                        json.dumps(hdr, separators=(",", ":")).encode(), b"\0" * (4 * n))


@pytest.mark.parametrize("args", [(), ("--limit", "20"), ("--json",)], ids=["table", "limit", "json"])
def test_inspect_200k_keys_is_fast(cli, big_header, args):
    # CPU seconds of this process (the machine may be shared: wall time would measure the neighbours)
    t = time.process_time()
    res = cli("inspect", big_header, *args)
    dt = time.process_time() - t
    assert res.exit_code == 0, res.output[-500:]
    assert dt <= 5.0, f"inspect {' '.join(args)} took {dt:.1f} CPU s for 200k keys"
    if args and args[0] == "--limit":
        assert len(res.stdout.splitlines()) == 2 + 20 + 1 and "199980 more not shown" in res.stdout
    elif args == ("--json",):
        assert json.loads(res.stdout)["count"] == 200_000
    else:
        assert "model.layers.199999.w" in res.stdout


@pytest.mark.parametrize("depth,needle", [(1_000_000_000, "parameters"), (1e9, "must be an integer")],
                         ids=["int", "float"])
def test_replay_refuses_a_config_that_cannot_fit(cli, tmp_path, depth, needle):
    case = _case_copy(tmp_path, config=lambda c: {**c, "MMDiTConfig": {**c["MMDiTConfig"], "depth": depth}})
    t = time.perf_counter()
    err = _one_line_error(cli("parity", "replay", case), "config.json", needle)
    assert time.perf_counter() - t < 60
    if isinstance(depth, int):
        assert "GB of memory available" in err and "refusing" in err


def test_convert_refuses_a_config_with_a_billion_blocks(cli, tmp_path):
    cfg = json.loads((TINY / "mmdit_tiny.config.json").read_text())
    cfg["MMDiTConfig"]["depth"] = 1_000_000_000
    p = tmp_path / "huge.json"
    p.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _one_line_error(cli("convert", TINY / "mmdit_tiny.weights.safetensors", "--mapping", "mmdit_opensora_v2",
                        "--config", p, "--out", out), "depth=1000000000")
    _nothing_under(out)


# == 5. what a command-line user expects ========================================================================
_msconv = run_msconv


def test_version(cli):
    res = cli("--version")
    assert res.exit_code == 0
    from importlib.metadata import version

    assert res.stdout.strip() == (f"msconv {__import__('converter').__version__}, MindSpore {version('mindspore')}, "
                                  f"torch {version('torch')}")


def test_pipes_get_no_escape_codes(tmp_path):
    f = _weird_keys_file(tmp_path / "weird.safetensors")
    for args in (("inspect", f), ("inspect", tmp_path / "nope.safetensors"), ("convert", "--nope"), ("--help",)):
        r = _msconv(*args, env={"NO_COLOR": "1"})
        assert "\x1b" not in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        if r.returncode == 2:  # a usage error is one line too (no box)
            assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_quiet_and_verbose(cli, small, tmp_path):
    res = _convert(cli, small, tmp_path / "q", "--quiet")
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""
    res = _convert(cli, small, tmp_path / "v", "--verbose")
    assert res.exit_code == 0
    assert "wrote:   model.safetensors (2 tensors" in res.stdout and "mapping: hx" in res.stdout
    _one_line_error(_convert(cli, small, tmp_path / "qv", "--quiet", "--verbose"), "exclude each other")


def test_exit_codes_are_documented_and_kept(small, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Exit codes"):]
    for code, meaning in (("0", "success"), ("1", "bug"), ("2", "input"), ("130", "interrupted")):
        assert any(line.startswith(f"| {code} ") and meaning in line for line in section.splitlines()), code
    assert _msconv("inspect", small[0]).returncode == 0
    assert _msconv("inspect", tmp_path / "nope.safetensors").returncode == 2
    boom = ("import sys, cli, converter.sources as s\n"
            "def bad(*a, **k): raise {exc}\n"
            "s.Source = bad; sys.argv[0] = 'msconv'; cli.app()")
    r = subprocess.run([sys.executable, "-c", boom.format(exc="RuntimeError('a bug')"), "inspect", small[0]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "RuntimeError: a bug" in r.stderr
    r = subprocess.run([sys.executable, "-c", boom.format(exc="KeyboardInterrupt"), "inspect", small[0]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 130 and r.stderr.strip() == "error: interrupted", r.stderr
