"""The CPU-bf16 mode of the op layer (docs/bf16.md): Ascend's bf16 numerics emulated on MindSpore's CPU kernels.

The op layer fixes its mode at import, and this pytest process imports it in CPU (fp32) mode for the other tests,
so every MindSpore computation here runs in one worker process (this file run as a script with MSCONV_DEVICE=
CPU-bf16); the worker writes its results to an .npz and the tests judge them here against numpy/torch.

* op level: an emulated op equals the float64 op on the bf16-rounded inputs rounded to bf16 (within one bf16 ulp,
  almost always exactly: MindSpore accumulates in fp32, the expectation in fp64); fp32 islands stay fp32;
* model level (mmdit_tiny): per layer and output, err(MindSpore CPU-bf16, torch fp64) <= oracle_ratio (2, from
  parity/thresholds.yaml) x err(torch bf16 reference, torch fp64); with the RoPE island flipped to bf16 the first
  layer over the limit is the RoPE table (`pe_embedder`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT.parent / "shared" / "upstream" / "tiny" / "mmdit_tiny"
# MMDiT layers compared per framework (same module path in torch and MindSpore), plus the output
LAYERS = ["pe_embedder", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj", "double_blocks.0",
          "double_blocks.1", "single_blocks.0", "single_blocks.1", "final_layer"]


# ------------------------------------------------------------------------------------------------ shared helpers
def _op_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = rng.standard_normal
    f = np.float32
    return {
        "lin_x": n((3, 5, 40)).astype(f), "lin_w": (n((24, 40)) / 6).astype(f), "lin_b": n(24).astype(f),
        "mm_a": n((2, 3, 7, 16)).astype(f), "mm_b": n((2, 3, 16, 9)).astype(f),
        "conv_x": n((1, 4, 5, 6, 7)).astype(f), "conv_w": (n((6, 4, 3, 3, 3)) / 10).astype(f), "conv_b": n(6).astype(f),
        "ln_x": (3 + 2 * n((2, 9, 32))).astype(f),
        "gn_x": n((1, 8, 3, 4, 5)).astype(f), "gn_w": (1 + 0.1 * n(8)).astype(f), "gn_b": (0.1 * n(8)).astype(f),
        "att_q": n((2, 2, 10, 16)).astype(f), "att_k": n((2, 2, 10, 16)).astype(f),
        "att_v": n((2, 2, 10, 16)).astype(f),
        "act_x": (3 * n((4, 50))).astype(f),
        "rms_x": n((2, 6, 32)).astype(f), "rms_w": (1 + 0.1 * n(32)).astype(f),
        "rope_x": n((1, 2, 6, 16)).astype(f),
        "rope_ids": np.stack(np.meshgrid(np.arange(1), np.arange(2), np.arange(3), indexing="ij"), -1)
        .reshape(1, 6, 3).astype(f) + np.array([30, 13, 25], f),
    }


def _bf16(a) -> np.ndarray:
    """float64 -> values rounded to bf16 (round-to-nearest-even, torch's cast), as float64."""
    import torch

    return torch.from_numpy(np.asarray(a, np.float64)).to(torch.bfloat16).to(torch.float64).numpy()


def _ulp(a: np.ndarray) -> np.ndarray:
    """The bf16 spacing at |a| (8 significand bits)."""
    e = np.floor(np.log2(np.maximum(np.abs(a), 2.0 ** -126)))
    return 2.0 ** (e - 7)


# ------------------------------------------------------------------------------------------------ worker (MindSpore)
def _worker(out_path: str, inputs_path: str) -> None:
    """Runs in a process started with MSCONV_DEVICE=CPU-bf16: every MindSpore result the tests judge."""
    import mindspore as ms
    from mindspore import Tensor

    from opensora_ms.ops import device as D

    assert D.DEVICE == "CPU-bf16" and D.BF16_EMU, D.DEVICE
    from converter.mapping import load_mapping
    from opensora_ms.loading import load_strict
    from opensora_ms.models import mmdit as M
    from opensora_ms.ops import conv as oc
    from opensora_ms.ops import nn as onn
    from parity.adapters import mmdit as A
    from parity.case import Case

    res: dict[str, np.ndarray] = {}
    inp = dict(np.load(inputs_path))

    def b(name):  # an input as a bf16 tensor (the cast rounds, as torch's does)
        return Tensor(inp[name]).astype(ms.bfloat16)

    def put(name, t):
        res[name] = t.astype(ms.float32).asnumpy()
        res[name + ".dtype"] = np.array(str(t.dtype))

    def ops_pass(tag):
        put(f"{tag}linear", onn.linear(b("lin_x"), b("lin_w"), b("lin_b")))
        put(f"{tag}matmul", onn.matmul(b("mm_a"), b("mm_b")))
        put(f"{tag}conv3d", oc.conv3d(b("conv_x"), b("conv_w"), b("conv_b"), pad=(1, 1, 1, 1, 2, 0),
                                      pad_mode="replicate"))
        put(f"{tag}layer_norm", onn.layer_norm(b("ln_x"), None, None, 1e-6))
        put(f"{tag}group_norm", oc.group_norm(b("gn_x"), 4, b("gn_w"), b("gn_b"), 1e-6))
        put(f"{tag}attention", onn.attention(b("att_q"), b("att_k"), b("att_v")))
        put(f"{tag}gelu_tanh", onn.gelu(b("act_x"), "tanh"))
        put(f"{tag}silu", onn.silu(b("act_x")))
        put(f"{tag}rms_norm", onn.rms_norm(b("rms_x"), b("rms_w"), 1e-6))
        cos, sin = onn.rope_tables(Tensor(inp["rope_ids"]).astype(ms.bfloat16), (4, 6, 6), 10000)
        put(f"{tag}rope_cos", cos)
        put(f"{tag}rope_sin", sin)
        # the rotation alone, with the same fp32 tables in both passes
        put(f"{tag}rope_apply", onn.apply_rope(b("rope_x"), Tensor(res["rope_cos32"]), Tensor(res["rope_sin32"])))

    c32, s32 = onn.rope_tables(Tensor(inp["rope_ids"]), (4, 6, 6), 10000)
    res["rope_cos32"], res["rope_sin32"] = c32.asnumpy(), s32.asnumpy()
    ops_pass("")
    D.configure("CPU-bf16", islands=D.FP32Islands(rope=False, rms_norm=False, norm_stats=False, softmax=False))
    ops_pass("flipped.")
    D.configure("CPU-bf16", islands=D.FP32Islands())
    from opensora_ms.ops.bf16 import cast_parameters

    cell = cast_parameters(oc.Conv3d(4, 6, 3, padding=1))   # a cell built in fp32, cast to bf16
    res["cast_cell_dtypes"] = np.array(sorted({str(p.dtype) for p in cell.get_parameters()}))
    res["cast_cell_out_dtype"] = np.array(str(cell(b("conv_x")).dtype))
    try:
        D.configure("CPU")
        res["configure_after_import_raised"] = np.array(False)
    except RuntimeError:
        res["configure_after_import_raised"] = np.array(True)

    # model level: mmdit_tiny in bf16, hooks on LAYERS
    case = Case.open(CASE)
    cfg = case.model_cfg
    net = M.build(cfg, dtype=D.model_dtype())
    load_strict(net, load_mapping(A.mapping_name(cfg)).convert(case.weights_numpy()))
    res["model_param_dtype"] = np.array(str(net.img_in.weight.dtype))
    for tag, islands in (("model.", D.FP32Islands()), ("model_rope_bf16.", D.FP32Islands(rope=False))):
        D.configure("CPU-bf16", islands=islands)
        order: list[str] = []

        def hook(name):
            def fn(cell, args, out):
                order.append(name)
                outs = out if isinstance(out, tuple) else (out,)
                for i, o in enumerate(outs):
                    res[f"{tag}{name}.{i}"] = o.astype(ms.float32).asnumpy()
            return fn

        handles = []
        for p in LAYERS:
            cell = net
            for part in p.split("."):
                cell = cell[int(part)] if part.isdigit() else getattr(cell, part)
            handles.append(cell.register_forward_hook(hook(p)))
        out = M.run(net, case.inputs())
        for h in handles:
            h.remove()
        res[f"{tag}output"] = np.asarray(out, np.float32)
        res[f"{tag}order"] = np.array(order)
    D.configure("CPU-bf16", islands=D.FP32Islands())
    np.savez(out_path, **res)


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16emu")
    np.savez(d / "inputs.npz", **_op_inputs())
    env = dict(os.environ, MSCONV_DEVICE="CPU-bf16",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, __file__, "--worker", str(d / "out.npz"), str(d / "inputs.npz")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return dict(np.load(d / "out.npz"))


def _expected_ops() -> dict[str, np.ndarray]:
    """float64 results of each op on the bf16-rounded inputs (before the output rounding)."""
    import torch
    import torch.nn.functional as F

    x = {k: _bf16(v) for k, v in _op_inputs().items()}
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    conv_in = F.pad(t["conv_x"], (1, 1, 1, 1, 2, 0), mode="replicate")
    a = x["act_x"]
    return {
        "linear": x["lin_x"] @ x["lin_w"].T + x["lin_b"],
        "matmul": x["mm_a"] @ x["mm_b"],
        "conv3d": F.conv3d(conv_in, t["conv_w"], t["conv_b"]).numpy(),
        "layer_norm": F.layer_norm(t["ln_x"], (32,), eps=1e-6).numpy(),
        "group_norm": F.group_norm(t["gn_x"], 4, t["gn_w"], t["gn_b"], 1e-6).numpy(),
        "attention": F.scaled_dot_product_attention(t["att_q"], t["att_k"], t["att_v"]).numpy(),
        "gelu_tanh": F.gelu(t["act_x"], approximate="tanh").numpy(),
        "silu": a / (1 + np.exp(-a)),
    }


EMULATED = ["linear", "matmul", "conv3d", "layer_norm", "group_norm", "attention", "gelu_tanh", "silu"]


@pytest.mark.parametrize("op", EMULATED)
def test_emulated_op_is_fp32_compute_on_bf16_inputs_rounded_once(emu, op):
    """bf16 out; every value the bf16 rounding of the exact result on bf16 inputs: fp32 vs fp64 compute may tip a
    value lying at a rounding boundary by one ulp (at most 2% of them), and near zero the fp32 kernel's own absolute
    error (2^-20 of the largest value) exceeds a bf16 ulp."""
    got = emu[op]
    assert str(emu[op + ".dtype"]) == "BFloat16"
    exact = _expected_ops()[op]
    want = _bf16(exact)
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.float64) - want)
    tol = _ulp(exact) * 1.0001 + 2.0 ** -20 * np.max(np.abs(exact))
    assert np.all(diff <= tol), f"{op}: {np.max(diff / tol):.2f} x the tolerance"
    assert np.mean(diff > 0) <= 0.02, f"{op}: {np.mean(diff > 0):.3%} of the values differ by one ulp"


def test_rms_norm_island_is_fp32_until_the_llama_cast(emu):
    """rms_norm: statistics and normalisation in fp32, one rounding before the (bf16) scale multiply, one after;
    the flipped island (squares, mean, rstd each rounded: a per-row scale error) lands further from the exact
    result."""
    x, w = _bf16(_op_inputs()["rms_x"]), _bf16(_op_inputs()["rms_w"])
    exact_norm = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    want = _bf16(_bf16(exact_norm) * w)
    diff = np.abs(emu["rms_norm"] - want)
    assert str(emu["rms_norm.dtype"]) == "BFloat16"
    assert np.all(diff <= _ulp(want) * 1.0001) and np.mean(diff > 0) <= 0.02
    exact = exact_norm * w
    err_island = np.sqrt(np.mean((emu["rms_norm"] - exact) ** 2))
    err_flipped = np.sqrt(np.mean((emu["flipped.rms_norm"] - exact) ** 2))
    assert np.mean(emu["flipped.rms_norm"] != emu["rms_norm"]) > 0.05
    assert err_flipped > err_island, (err_island, err_flipped)


def test_rope_island_tables_and_rotation_stay_fp32(emu):
    """RoPE tables from bf16 ids are fp32 and exact to fp32 at far positions (30, 13, 25); the rotation runs in fp32
    and rounds once. With the island flipped the tables are bf16 and the rotation several times less accurate."""
    ids = _op_inputs()["rope_ids"].astype(np.float64)
    om = [1.0 / 10000 ** (np.arange(0, d, 2) / d) for d in (4, 6, 6)]
    ang = np.concatenate([ids[..., i:i + 1] * om[i] for i in range(3)], -1)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    h = ang.shape[-1]
    sin = np.concatenate([-np.sin(ang), np.sin(ang)], -1)[:, None]
    assert str(emu["rope_cos.dtype"]) == "Float32" and str(emu["rope_sin.dtype"]) == "Float32"
    assert np.max(np.abs(emu["rope_cos"] - cos)) < 1e-5 and np.max(np.abs(emu["rope_sin"] - sin)) < 1e-5
    assert str(emu["flipped.rope_cos.dtype"]) == "BFloat16"
    assert np.max(np.abs(emu["flipped.rope_cos"] - cos)) > 1e-3   # bf16 angles: far positions lose ~1e-2 rad

    x = _bf16(_op_inputs()["rope_x"])
    c, s = emu["rope_cos32"].astype(np.float64), emu["rope_sin32"].astype(np.float64)
    swapped = np.concatenate([x[..., h:], x[..., :h]], -1)
    exact = x * c + swapped * s
    got = emu["rope_apply"]
    assert str(emu["rope_apply.dtype"]) == "BFloat16"
    assert np.all(np.abs(got - _bf16(exact)) <= _ulp(exact) * 1.0001)
    err_island = np.sqrt(np.mean((got - exact) ** 2))
    err_flipped = np.sqrt(np.mean((emu["flipped.rope_apply"] - exact) ** 2))
    assert err_flipped > 1.5 * err_island, (err_island, err_flipped)


def test_flipped_softmax_and_norm_stats_round_more(emu):
    """The flipped softmax / LayerNorm / GroupNorm islands are bf16 chains: further from the exact result."""
    ex = _expected_ops()
    for op in ("attention", "layer_norm", "group_norm"):
        e1 = np.sqrt(np.mean((emu[op] - ex[op]) ** 2))
        e2 = np.sqrt(np.mean((emu["flipped." + op] - ex[op]) ** 2))
        assert e2 > 1.2 * e1, (op, e1, e2)


def test_mode_is_fixed_once_ops_are_imported(emu):
    assert bool(emu["configure_after_import_raised"])


def test_cast_parameters_makes_a_bf16_cell(emu):
    assert list(emu["cast_cell_dtypes"]) == ["BFloat16"]
    assert str(emu["cast_cell_out_dtype"]) == "BFloat16"


# ------------------------------------------------------------------------------------------------ model level
@pytest.fixture(scope="module")
def torch_runs():
    """mmdit_tiny through the torch reference in float64 (the oracle) and bfloat16, outputs of LAYERS captured."""
    import torch

    from parity.adapters import mmdit as A
    from parity.case import Case

    case = Case.open(CASE)
    weights = case.weights_numpy()
    runs = {}
    for dt in ("float64", "bfloat16"):
        model = A.build_torch(case.model_cfg, dtype=getattr(torch, dt))
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).to(getattr(torch, dt))
                               for k, v in weights.items()}, strict=True)
        got, order = {}, []

        def hook(name):
            def fn(mod, args, out):
                order.append(name)
                outs = out if isinstance(out, tuple) else (out,)
                for i, o in enumerate(outs):
                    got[f"{name}.{i}"] = o.detach().to(torch.float64).numpy()
            return fn

        hs = [model.get_submodule(p).register_forward_hook(hook(p)) for p in LAYERS]
        from parity.reference import mmdit as R

        got["output"] = R.run(model, {k: torch.from_numpy(v) for k, v in case.inputs().items()}) \
            .to(torch.float64).numpy()
        for h in hs:
            h.remove()
        runs[dt] = got
        runs[dt + ".order"] = order
    return runs


def _ratios(emu, torch_runs, tag):
    from parity.metrics import oracle_ratio

    out = {}
    for name in list(emu[tag + "order"]) + ["output"]:
        keys = [name] if name == "output" else sorted(k[len(tag):] for k in emu if k.startswith(f"{tag}{name}."))
        for k in keys:
            ref, same = torch_runs["float64"][k], torch_runs["bfloat16"][k]
            got = emu[tag + k].astype(np.float64)
            rmse = lambda a: float(np.sqrt(np.mean((a - ref) ** 2)))  # noqa: E731
            out[k] = oracle_ratio(rmse(got), rmse(same), float(np.sqrt(np.mean(ref ** 2))), "bfloat16")
    return out


def _limit() -> float:
    from parity.metrics import Thresholds

    return float(Thresholds.load().for_dtype("bfloat16")["oracle_ratio"])


def test_mmdit_cpu_bf16_within_oracle_ratio_per_layer(emu, torch_runs):
    assert str(emu["model_param_dtype"]) == "BFloat16"
    assert list(emu["model.order"]) == torch_runs["bfloat16.order"]   # same layers, same execution order
    ratios = _ratios(emu, torch_runs, "model.")
    # pe_embedder (cos, sin), 2 projections, 2 double blocks (img, txt), 2 single blocks, final_layer, output
    assert len(ratios) == 2 + 2 + 2 * 2 + 2 + 1 + 1
    limit = _limit()
    bad = {k: round(v, 3) for k, v in ratios.items() if not v <= limit}
    assert not bad, f"over the oracle ratio {limit}: {bad}"
    # the MindSpore output carries bf16-level error (not fp32): the emulation really rounds
    err = np.sqrt(np.mean((emu["model.output"] - torch_runs["float64"]["output"]) ** 2))
    assert err > 0.3 * np.sqrt(np.mean((torch_runs["bfloat16"]["output"] - torch_runs["float64"]["output"]) ** 2))


def test_rope_island_flipped_to_bf16_fails_the_oracle_at_the_rope_table(emu, torch_runs):
    ratios = _ratios(emu, torch_runs, "model_rope_bf16.")
    limit = _limit()
    first = next((k for k, v in ratios.items() if v > limit), None)
    assert first is not None and first.startswith("pe_embedder."), (first, ratios)
    assert ratios["pe_embedder.0"] > 5 * limit and ratios["pe_embedder.1"] > 5 * limit


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(ROOT))
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: MSCONV_DEVICE=CPU-bf16 python tests/test_bf16_emulation.py --worker OUT.npz INPUTS.npz")
