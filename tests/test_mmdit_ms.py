"""The MindSpore MMDiT (opensora_ms/models/mmdit.py) on the three upstream cases: weights converted by the mapping
(converter.mapping.load_mapping(...).convert) and loaded with opensora_ms.loading.load_strict; output in PyNative and
under ms.jit, every aligned layer through the mapping's `align:` section, teacher-forced blocks."""

from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms

from converter.mapping import load_mapping
from opensora_ms.loading import load_strict
from opensora_ms.models import mmdit as M
from parity.adapters import mmdit as A
from parity.align import Aligner
from test_mmdit_common import CASES, capture, case_hook, case_hook_names, load_case, rel


@pytest.fixture(scope="module", params=CASES)
def loaded(request):
    case = load_case(request.param)
    case["name"] = request.param
    cfg = case["config"]["MMDiTConfig"]
    mapping = load_mapping(A.mapping_name(cfg))
    net = A.build_ms(cfg)
    load_strict(net, mapping.convert(case["weights"]))
    return case, net, mapping


@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "jit"])
def test_output(loaded, jit):
    case, net, _ = loaded
    out = A.run_ms(net, case["inputs"], {"jit": jit})
    assert rel(out["output"], case["outputs"]["output"]) <= 1e-4
    for k in ("pe.0", "pe.1"):
        if k in case["outputs"]:
            assert rel(out[k], case["outputs"][k]) <= 1e-6


def test_every_layer_aligned(loaded):
    """PyNative capture of every cell; each capture's reference is built from the case hooks through `align:`;
    every torch hook of the case is compared or explicitly declared unaligned."""
    case, net, mapping = loaded
    aligner = Aligner(mapping.align, mapping.resolve_vars({k: v.shape for k, v in case["weights"].items()}))
    names = case_hook_names(case)
    acc = capture(net, lambda: M.run(net, case["inputs"]))
    used, worst, compared = set(), (0.0, ""), 0
    for cap, arr in acc.items():
        # MindSpore capture names: module path + tuple suffix; find the module part by trying prefixes
        parts = cap.split(".")
        exp = None
        for i in range(len(parts), 0, -1):
            module, suffix = ".".join(parts[:i]), "".join("." + p for p in parts[i:])
            e = aligner.expected(module, suffix, lambda n: n in names, lambda n: case_hook(case, n))
            if e.array is not None:
                exp = e
                break
        if exp is None:
            continue
        r = rel(arr, exp.array)
        compared += 1
        used.update(exp.torch_names)
        worst = max(worst, (r, cap))
    assert worst[0] <= 1e-4, worst
    unaligned = sorted(n for n in names - used if aligner.explicit_reason(n) is None)
    assert not unaligned, unaligned
    print(case["name"], "compared", compared, "worst", worst, "declared", sorted(names - used))
    assert compared >= 60


def _torch_block_inputs(case, paths):
    """Record the positional inputs of the given torch reference modules on the case (the reference reproduces the
    case hooks to 1e-6, tests/test_mmdit_reference.py)."""
    import torch

    from parity.reference import mmdit as R

    model = R.build(case["config"]["MMDiTConfig"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in case["weights"].items()}, strict=True)
    rec, handles = {}, []
    for p in paths:
        def pre(mod, args, p=p):
            rec[p] = args
        handles.append(model.get_submodule(p).register_forward_pre_hook(pre))
    R.run(model, case["inputs"])
    for h in handles:
        h.remove()

    def to_ms(x):
        if isinstance(x, tuple):
            return tuple(to_ms(v) for v in x)
        return ms.Tensor(x.detach().numpy())

    return {p: to_ms(a) for p, a in rec.items()}


def test_teacher_forced_blocks(loaded):
    """Each block fed upstream's recorded inputs (through `teacher_adapt`) reproduces upstream's block output."""
    case, net, _ = loaded
    paths = ["double_blocks.1", "single_blocks.0", "single_blocks.1", "final_layer"]
    inputs = _torch_block_inputs(case, paths)
    cells = dict(net.cells_and_names())
    for p in paths:
        args, kwargs = A.teacher_adapt(p, inputs[p], {})
        out = cells[p](*args, **kwargs)
        if isinstance(out, tuple):
            for i, o in enumerate(out):
                assert rel(o.asnumpy(), case_hook(case, f"{p}.{i}")) <= 1e-5, (p, i)
        else:
            assert rel(out.asnumpy(), case_hook(case, p)) <= 1e-5, p


def test_timestep_embedding_bf16_rounding():
    """SPEC §g in the port: 1000*t in the model dtype (bf16) then fp32 cos/sin (PyNative bf16 mul/cast run on CPU)."""
    t = ms.Tensor(np.array([0.996453, 0.861310], np.float32))
    emb = M.timestep_embedding(t, ms.bfloat16)
    assert emb.dtype == ms.bfloat16
    args = np.array([996.0, 860.0], np.float32)[:, None] * M._timestep_freqs(256)[None]
    want = np.concatenate([np.cos(args), np.sin(args)], -1)
    assert np.abs(emb.astype(ms.float32).asnumpy() - want).max() <= 4e-3   # bf16 rounding of the result only
    emb32 = M.timestep_embedding(t, ms.float32).asnumpy()
    assert np.abs(emb32[0, :4] - want[0, :4]).max() > 0.1                   # fp32 keeps 996.453


def test_jit_forward_lives_on_the_net():
    """One compiled forward per net, kept by the net itself: a second call returns the same function, another
    net gets its own, and dropping the net frees it (no module-level cache keeps nets alive)."""
    import gc
    import weakref

    cfg = A.PRESETS["tiny"]
    net, other = A.build_ms(cfg), A.build_ms(cfg)
    fn = M.jit_forward(net)
    assert M.jit_forward(net) is fn and net._jit_forward is fn
    assert M.jit_forward(other) is not fn
    ref = weakref.ref(net)
    del net, fn
    gc.collect()
    assert ref() is None
