"""Property-based fuzzing of everything that reads the user's input (issue 15, section 4): the safetensors header
parser, the mapping loader and its key patterns, the case loader and the CLI commands.

Property: arbitrary input ends in success or in the project's own error types (`converter.errors.UserError`,
`parity.adapters.NotCovered`): never another exception, never a hang (a deadline per example), never a file under
the output name after a failure.

CI runs the derandomized `ci` profile (bounded example counts, well under a minute in total). A longer, randomized
run is one command:

    MSCONV_FUZZ=long python -m pytest -q tests/test_fuzz.py
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import TINY
from converter.errors import UserError
from converter.safetensors_io import SafetensorsFile, save_file
from converter.tensor import DTYPES

PROFILES = {  # examples per test; deadline per example (ms)
    "ci": dict(max_examples=30, derandomize=True, deadline=3000),
    "long": dict(max_examples=1500, derandomize=False, deadline=20000),
}
PROFILE = PROFILES[os.environ.get("MSCONV_FUZZ", "ci")]


def fuzz(scale: float = 1.0):
    """The profile's settings (`scale` shrinks the example count of the costlier tests); no example database is
    written into the checkout."""
    return settings(max_examples=max(5, int(PROFILE["max_examples"] * scale)), derandomize=PROFILE["derandomize"],
                    deadline=PROFILE["deadline"], database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# -- strategies ----------------------------------------------------------------------------------------------
texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12) | st.sampled_from(
    ["", "w", "blk.0.w", "a\nb", "\x1b[31m", "[/x]", "__metadata__", "dtype", "{p}", "..", "x" * 300])
leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | texts
          | st.sampled_from([0, 1, -1, 2**63, 1e400, "F32", "BF16", "I64", [1], [0, 4], ["F32"], {"F32": 1}]))
json_values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                           max_leaves=25)


def _safe_dumps(v) -> bytes:
    return json.dumps(v, allow_nan=True).encode("utf-8", "surrogatepass")


# -- the safetensors header parser -----------------------------------------------------------------------------
def _parse(path: Path):
    try:
        f = SafetensorsFile(path)
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return None
    size = path.stat().st_size
    for t in f.tensors.values():  # what the reader accepts is consistent with the file
        assert t.offset + t.nbytes <= size and t.dtype in DTYPES
    return f


@fuzz()
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes(tmp_path, raw):
    p = tmp_path / "x.safetensors"
    p.write_bytes(raw)
    _parse(p)


deep = st.integers(1, 200_000).map(lambda n: b'{"w": ' + b"[" * n + b"]" * n + b"}")
duplicated = st.sampled_from([b'{"w": 1, "w": 2}', b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [], '
                              b'"data_offsets": [0, 4]}}', b'{"__metadata__": {}, "__metadata__": {}}'])


@fuzz()
@given(header=json_values.map(_safe_dumps) | deep | duplicated, data=st.binary(max_size=64), lie=st.integers(-8, 8))
def test_arbitrary_json_header(tmp_path, header, data, lie):
    js = header
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", max(0, len(js) + lie)) + js + data)
    _parse(p)


entry_values = {
    "dtype": st.sampled_from(list(DTYPES)) | json_values,
    "shape": st.lists(st.integers(0, 4), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2) | json_values,
}
entries = st.fixed_dictionaries({}, optional={**entry_values, "extra": json_values})


@fuzz()
@given(tensors=st.dictionaries(texts, entries, max_size=5), meta=st.none() | json_values,
       data=st.binary(max_size=96))
def test_near_valid_headers(tmp_path, tensors, meta, data):
    hdr = dict(tensors)
    if meta is not None:
        hdr["__metadata__"] = meta
    p = tmp_path / "x.safetensors"
    js = _safe_dumps(hdr)
    p.write_bytes(struct.pack("<Q", len(js)) + js + data)
    _parse(p)


# -- the mapping loader, its patterns and plans ---------------------------------------------------------------
patterns = st.sampled_from(["blk.{i}.{p}", "blk.{i}.w", "{p}", "x.{i}.{i}", "cat.{p}", "blk.0.{p}", "{a}.{b}",
                            "blk.{i}.q.{p}"]) | texts
ops = st.dictionaries(st.sampled_from(["concat", "split", "permute_rows", "transpose", "reshape", "cast", "nope"]),
                      st.dictionaries(st.sampled_from(["axis", "sizes", "axes", "shape", "inverse", "rows", "parts",
                                                       "head_dim", "convention", "dtype", "from", "allow_lossy"]),
                                      json_values | st.sampled_from([0, 1, -1, [0], [1, 0], [2, 4], "d", "2*d",
                                                                     "F32", "I64", "interleaved_to_half", True]),
                                      max_size=3) | json_values, min_size=1, max_size=1)
rules = st.fixed_dictionaries({"source": patterns | st.lists(patterns, max_size=3)},
                              optional={"target": patterns | st.lists(patterns, max_size=3),
                                        "ops": st.lists(ops, max_size=2) | json_values,
                                        "drop": texts | json_values, "junk": json_values})
mappings = st.fixed_dictionaries({"rules": st.lists(rules, max_size=3) | json_values},
                                 optional={"vars": st.dictionaries(texts | st.just("d"), json_values | st.fixed_dictionaries(
                                     {"source": st.sampled_from(["blk.0.w", "blk.1.w", "nope"])},
                                     optional={"dim": json_values | st.integers(-3, 3)}), max_size=2) | json_values,
                                     "source": json_values, "target": json_values, "include": json_values,
                                     "align": json_values, "name": json_values})

SOURCE = {"blk.0.w": np.arange(6, dtype=np.float32).reshape(2, 3), "blk.1.w": np.ones((4, 3), np.float32),
          "blk.0.b": np.zeros(4, np.float32)}


@fuzz()
@given(data=mappings | json_values)
def test_mapping_specs(data):
    from converter.mapping import Mapping

    try:
        m = Mapping(data, None)
    except UserError:
        return
    inv = {k: (v.shape, "F32") for k, v in SOURCE.items()}
    for step in (lambda: m.plan(inv), lambda: m.convert(SOURCE), lambda: m.invert().plan(m.plan(inv).inventory())):
        try:
            step()
        except UserError:
            return


@fuzz()
@given(text=st.text(max_size=400) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_mapping_yaml_text(tmp_path, text):
    from converter.mapping import load_mapping

    p = tmp_path / "fz.yaml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_mapping(p)
    except UserError:
        pass


segments = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=6)


@fuzz()
@given(keys=st.lists(st.lists(segments, min_size=1, max_size=3).map(".".join), min_size=1, max_size=6, unique=True))
def test_placeholders_match_only_plain_segments(keys):
    import re

    from converter.mapping import Mapping, _compile

    rx = _compile("{a}.{b}")
    for k in keys:
        m = rx.match(k)
        if m:
            assert all(re.fullmatch(r"[A-Za-z0-9_-]+", v) for v in m.groupdict().values()), (k, m.groupdict())
    m = Mapping({"name": "fz", "rules": [{"source": "{a}.{b}", "target": "{a}.{b}"}, {"source": "{a}", "target": "{a}"}]})
    try:
        plan = m.plan({k: ((1,), "F32") for k in keys})
    except UserError:
        return
    assert all(k.isprintable() for k in plan.targets), list(plan.targets)


# -- the case loader -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzcase")
    for kind in ("weights", "inputs", "outputs"):
        shutil.copy(TINY / f"mmdit_tiny.{kind}.safetensors", d / f"mmdit_tiny.{kind}.safetensors")
    import opensora_ms.models.mmdit  # noqa: F401  (the first import is slow: not inside a deadline)
    return d


TINY_CFG = json.loads((TINY / "mmdit_tiny.config.json").read_text())["MMDiTConfig"]
field_values = st.integers(-2, 300) | st.sampled_from([2**40, 10**9, 1e9, 2.5, True, None, "64", [64], {}]) | json_values
configs = (st.dictionaries(st.sampled_from(sorted(TINY_CFG) + ["depht", "type"]), field_values, max_size=3)
           .map(lambda over: {"MMDiTConfig": {**TINY_CFG, **over}}))
whole = json_values.map(lambda v: v if not isinstance(v, dict) else {"MMDiTConfig": v})


@fuzz(scale=0.5)
@given(config=configs | whole | st.just({"AutoEncoder3DConfig": {"layers_per_block": 10**9}}))
def test_case_configs(case_dir, config):
    from parity import adapters
    from parity.adapters.base import check_case
    from parity.case import Case

    (case_dir / "mmdit_tiny.config.json").write_bytes(_safe_dumps(config))
    try:
        case = Case.open(case_dir / "mmdit_tiny")
        check_case(adapters.for_config(case.config_name), case)
    except (UserError, adapters.NotCovered):
        pass


@fuzz(scale=0.5)
@given(header=json_values | st.dictionaries(st.sampled_from(["img", "txt", "txt_ids", "img_ids", "y_vec",
                                                             "timesteps", "cond"]), entries, max_size=7))
def test_case_input_files(case_dir, header):
    from parity import adapters
    from parity.adapters.base import check_case
    from parity.case import Case

    (case_dir / "mmdit_tiny.config.json").write_text(json.dumps({"MMDiTConfig": TINY_CFG}))
    f = case_dir / "mmdit_tiny.inputs.safetensors"
    keep = f.read_bytes()
    js = _safe_dumps(header)
    f.write_bytes(struct.pack("<Q", len(js)) + js + b"\0" * 64)
    try:
        case = Case.open(case_dir / "mmdit_tiny")
        check_case(adapters.for_config(case.config_name), case)
    except (UserError, adapters.NotCovered):
        pass
    finally:
        f.write_bytes(keep)


# -- the CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzcli")
    save_file(SOURCE, d / "src.safetensors")
    (d / "hx.yaml").write_text('name: hx\nrules:\n  - {source: "blk.{i}.{p}", target: "blk.{i}.{p}"}\n')
    (d / "junk.bin").write_bytes(bytes(range(256)))
    (d / "adir").mkdir()
    return d


_outs = itertools.count()


def _app(args) -> tuple[int, str, str]:
    """`msconv ARGS` through the program entry (cli.app(): exit codes and one-line usage errors)."""
    import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.app(args, prog_name="msconv")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@fuzz(scale=0.7)
@given(data=st.data())
def test_cli_commands(cli_files, data):
    d = cli_files
    paths = st.sampled_from([d / "src.safetensors", d / "hx.yaml", d / "junk.bin", d / "adir", d / "nope",
                             TINY / "mmdit_tiny.weights.safetensors", "", "-", "\x1b[31m", "a\nb"])
    cmd = data.draw(st.sampled_from(["inspect", "convert", "validate", "verify"]))
    args = [cmd, str(data.draw(paths))]
    out = d / f"out{next(_outs)}"
    options = {"inspect": ["--json", "--limit", "--against"],
               "convert": ["--mapping", "--dtype", "--format", "--shard-size", "--overwrite", "--dry-run",
                           "--target-inventory", "--config", "--allow-partial", "--json", "--quiet", "--verbose"],
               "validate": ["--source", "--config", "--allow-partial", "--json"],
               "verify": ["--json"]}[cmd]
    values = st.sampled_from(["hx", str(d / "hx.yaml"), "mmdit_opensora_v2", "bf16", "keep", "ckpt", "1e400GB",
                              "0", "-1", "nan", "5GB", str(d / "junk.bin"), str(d / "adir"), "none", "auto", "x" * 500,
                              str(d / "src.safetensors")])
    for opt in data.draw(st.lists(st.sampled_from(options), max_size=4)):
        args.append(opt)
        if opt not in ("--json", "--overwrite", "--dry-run", "--allow-partial", "--quiet", "--verbose"):
            args.append(data.draw(values))
    if cmd == "convert":
        args += ["--out", str(out)]
    code, stdout, stderr = _app(args)
    assert code in (0, 2), (args, code, stdout[-500:], stderr[-2000:])
    assert "Traceback" not in stderr, (args, stderr)
    if code == 2:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        assert last.startswith("error: "), (args, stderr)
        if cmd == "convert":
            assert not out.exists() and not list(d.glob(f".{out.name}.msconv-*")), args
