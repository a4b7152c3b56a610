"""Converted output loads into a MindSpore net strictly; `load_strict` reports every misfit."""
from __future__ import annotations

import json

import numpy as np
import pytest

from converter.safetensors_io import save_file
from converter.sources import Source
from converter.tensor import RawTensor, encode

from conftest import torch_like_state  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402

from opensora_ms.loading import LoadError, load_strict  # noqa: E402

YAML = """
name: qkv_net
rules:
  - source: ["blk.{i}.q.{p}", "blk.{i}.k.{p}", "blk.{i}.v.{p}"]
    target: "blk.{i}.qkv.{p}"
    ops: [{concat: {axis: 0}}]
  - {source: "blk.{i}.proj.{p}", target: "blk.{i}.out.{p}"}
  - {source: "head.{p}", target: "head.{p}"}
"""


class Block(nn.Cell):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Dense(d, 3 * d)
        self.out = nn.Dense(d, d)

    def construct(self, x):
        return self.out(self.qkv(x)[..., : x.shape[-1]])


class Net(nn.Cell):
    def __init__(self, d=8, blocks=2):
        super().__init__()
        self.blk = nn.CellList([Block(d) for _ in range(blocks)])
        self.head = nn.Dense(d, 3, has_bias=False)

    def construct(self, x):
        for b in self.blk:
            x = b(x)
        return self.head(x)


@pytest.fixture
def converted(tmp_path, cli):
    sd = torch_like_state()
    # like the real mappings, the yaml names the source manifest and the target inventory (the MindSpore net's
    # own parameters), which every conversion is checked against
    (tmp_path / "pt_manifest.json").write_text(json.dumps(
        {"tensors": [{"key": k, "shape": list(v.shape), "dtype": "F32"} for k, v in sd.items()]}))
    (tmp_path / "net_inventory.json").write_text(json.dumps(
        {"tensors": [{"key": n, "shape": list(p.shape), "dtype": "F32"} for n, p in Net().parameters_and_names()]}))
    mp = tmp_path / "qkv_net.yaml"
    mp.write_text(YAML + "source: {manifest: pt_manifest.json}\ntarget: {inventory: net_inventory.json}\n")
    src = tmp_path / "pt.safetensors"
    save_file(sd, src)
    out = tmp_path / "ms"
    res = cli("convert", src, "--mapping", mp, "--out", out, "--shard-size", "700B")
    assert res.exit_code == 0, res.output
    return sd, out, mp, src


def _expected(sd):
    exp = {"head.weight": sd["head.weight"]}
    for i in range(2):
        for p in ("weight", "bias"):
            exp[f"blk.{i}.qkv.{p}"] = np.concatenate([sd[f"blk.{i}.{n}.{p}"] for n in "qkv"])
            exp[f"blk.{i}.out.{p}"] = sd[f"blk.{i}.proj.{p}"]
    return exp


def test_output_loads_with_mindspore_strictly(converted):
    """The plain MindSpore path: load_checkpoint(format='safetensors') + load_param_into_net(strict_load=True)."""
    sd, out, _, _ = converted
    net = Net()
    params = {}
    for f in sorted(out.glob("model-*.safetensors")):
        params.update(ms.load_checkpoint(str(f), format="safetensors"))
    not_loaded, unused = ms.load_param_into_net(net, params, strict_load=True)
    assert not_loaded == [] and unused == []
    exp = _expected(sd)
    for name, p in net.parameters_and_names():
        assert np.array_equal(p.asnumpy(), exp[name]), name


@pytest.mark.parametrize("form", ["dir", "index", "dict"])
def test_load_strict_forms(converted, form):
    sd, out, _, _ = converted
    src = {"dir": out, "index": out / "model.safetensors.index.json", "dict": _expected(sd)}[form]
    net = Net()
    load_strict(net, src)
    exp = _expected(sd)
    for name, p in net.parameters_and_names():
        assert np.array_equal(p.asnumpy(), exp[name]), name


def test_load_strict_bf16_file_into_fp32_net(tmp_path, cli, converted):
    sd, _, mp, _ = converted
    bf = {k: RawTensor.from_storage(encode(v, "BF16"), "BF16") for k, v in sd.items()}
    src = tmp_path / "bf16.safetensors"
    save_file(bf, src)
    out = tmp_path / "ms_bf16"
    assert cli("convert", src, "--mapping", mp, "--out", out).exit_code == 0
    net = Net()
    load_strict(net, out / "model.safetensors")
    exp = _expected({k: v.to_float32() for k, v in bf.items()})
    for name, p in net.parameters_and_names():
        assert p.dtype == ms.float32
        assert np.array_equal(p.asnumpy(), exp[name]), name


def test_load_strict_reports_missing_unexpected_and_shapes(converted):
    sd, _, _, _ = converted
    exp = _expected(sd)
    bad = dict(exp)
    del bad["blk.1.out.bias"]
    bad["blk.0.extra.weight"] = np.zeros(3, np.float32)
    bad["head.weight"] = np.zeros((3, 8, 1), np.float32)  # MindSpore would silently accept this one
    with pytest.raises(LoadError) as e:
        load_strict(Net(), bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing: blk.1.out.bias" in msg and "1 unexpected: blk.0.extra.weight" in msg
    assert "head.weight: file [3, 8, 1] vs net [3, 8]" in msg


def test_load_strict_names_the_file(converted, tmp_path):
    sd, out, _, _ = converted
    net = Net(blocks=3)
    with pytest.raises(LoadError, match=rf"{out}: weights do not fit Net: 4 missing: blk.2.out.bias"):
        load_strict(net, out)


def test_load_strict_is_a_user_error():
    from converter.errors import UserError

    assert issubclass(LoadError, UserError)


def test_format_ckpt_also_writes_a_mindspore_ckpt(converted, cli, tmp_path):
    sd, _, mp, src = converted
    out = tmp_path / "ck"
    res = cli("convert", src, "--mapping", mp, "--out", out, "--format", "ckpt")
    assert res.exit_code == 0, res.output
    params = ms.load_checkpoint(str(out / "model.ckpt"))
    net = Net()
    assert ms.load_param_into_net(net, params, strict_load=True) == ([], [])
    exp = _expected(sd)
    for name, p in net.parameters_and_names():
        assert np.array_equal(p.asnumpy(), exp[name]), name
    assert Source(out).inventory().keys() == exp.keys()


def test_load_strict_refuses_fp8_and_kind_mismatches(converted):
    sd, _, _, _ = converted
    exp = _expected(sd)
    fp8 = dict(exp)
    fp8["head.weight"] = RawTensor("F8_E4M3", (3, 8), bytes(24))
    with pytest.raises(LoadError, match="head.weight: F8_E4M3 values cannot be loaded"):
        load_strict(Net(), fp8)
    ints = dict(exp)
    ints["blk.0.out.bias"] = np.arange(8, dtype=np.int64)
    with pytest.raises(LoadError, match=r"dtype kind mismatch\(es\): blk.0.out.bias: file I64 \(int\)"):
        load_strict(Net(), ints)
    params = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in exp.items()}
    params["head.weight"] = ms.Parameter(ms.Tensor(np.zeros((3, 8), np.int32)), name="head.weight")
    with pytest.raises(LoadError, match="head.weight: file Int32 \\(int\\) vs net Float32"):
        load_strict(Net(), params)
