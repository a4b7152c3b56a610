"""Replay a case on a framework and compare every output and aligned hook; dump a case from the torch reference.

Replay (`replay()`):
1. open the case, pick the adapter from the config name (`parity.adapters.for_config`);
2. teacher mode: run the project's torch reference on the case weights/inputs with forward pre-hooks on the
   adapter's `TEACHER_BLOCKS`, streaming every block call's inputs to disk (cases store only outputs);
3. build the candidate: `--framework torch` = the torch reference (weights loaded strictly by upstream names);
   `--framework mindspore` = the port (weights converted in memory by the adapter's mapping, then `load_strict`);
   optional `perturb` scales named weights of the candidate only (fault injection);
4. run it once with forward hooks on every module/cell (PyNative for MindSpore), streaming outputs to disk; in
   teacher mode forward pre-hooks replace each teacher block's inputs by the recorded torch ones;
5. reference: the case's stored hooks/outputs; with the float64 oracle (`oracle=True`, or dtype bf16/fp16) the
   torch reference is run again in float64 (the oracle) and in the candidate's dtype (same-dtype torch), and each
   tensor gets err(candidate, fp64), err(torch same dtype, fp64) and their ratio;
6. compare tensor by tensor in capture (= execution) order through the mapping's alignment, judge each tensor,
   name the first divergence and list everything that aligned with nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converter.errors import UserError
from parity import adapters as _adapters
from parity.align import Aligner, split_hook_name
from parity.capture import ROOT, Capture, ModuleFilter, Sink, TeacherForcer, TeacherRecorder
from parity.case import Case, HookStore
from parity.metrics import ORACLE_DTYPES, Thresholds, bf16_ulps, compare_arrays, oracle_ratio, verdict
from parity.report import environment, write_reports
from parity.tensorio import SafetensorsReader, SafetensorsWriter, atomic_write_text, read_header, save_dict

FRAMEWORKS = ("torch", "mindspore")
MODES = ("free", "teacher")
DTYPES = ("float32", "bfloat16", "float16", "float64")


class ReplayError(UserError):
    """The replay could not run (user-facing: missing adapter/port, bad option; CLI exit 2)."""


class NotCoveredError(ReplayError):
    """No adapter covers the case's config, or the MindSpore port cannot be imported (the suite's "not covered")."""


@dataclass
class ReplayOptions:
    framework: str = "mindspore"
    device: str = "CPU"
    mode: str = "free"
    dtype: str | None = None        # None: the dtype the case was made in (its weights file)
    oracle: bool = False
    report_dir: Path | None = None
    save_outputs: Path | None = None
    thresholds: Path | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    max_depth: int | None = None
    hooks: bool = True
    perturb: dict[str, float] = field(default_factory=dict)
    outputs: list[str] | None = None     # globs: only these case outputs are computed and compared
    jit: bool = False
    workdir: Path | None = None


# ---------------------------------------------------------------------------------------------- frameworks
DEVICES = ("CPU", "CPU-bf16", "Ascend")


def setup_mindspore(device: str = "CPU", pynative: bool = True) -> None:
    """Select device and mode before `opensora_ms` is imported (its op layer folds the device at import).
    "CPU-bf16" = MindSpore's CPU target with the op layer emulating Ascend's bf16 numerics (docs/bf16.md)."""
    import mindspore as ms

    if device not in DEVICES:
        raise ReplayError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    target = "CPU" if device == "CPU-bf16" else device
    op_modules = [m for m in ("opensora_ms.ops.nn", "opensora_ms.ops.conv") if m in sys.modules]
    if op_modules:
        from opensora_ms.ops import device as D

        if D.DEVICE != device:
            raise ReplayError(f"opensora_ms was already imported for {D.DEVICE}; cannot switch to {device} in-process "
                              "(run it in its own process)")
    try:
        ms.set_device(target)
    except (AttributeError, RuntimeError):
        ms.set_context(device_target=target)
    ms.set_context(mode=ms.PYNATIVE_MODE if pynative else ms.GRAPH_MODE)
    from opensora_ms.ops import device as D

    try:
        D.configure(device)
    except (ValueError, RuntimeError) as e:
        raise ReplayError(f"--device {device}: {e}") from e


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def build_torch_loaded(adapter, cfg: dict, weights: dict[str, np.ndarray], dtype: str = "float32",
                       where: str | None = None):
    """The project's torch reference with the case weights loaded strictly (upstream names)."""
    import torch

    model = adapter.build_torch(cfg, dtype=_torch_dtype(dtype))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    _load_state_strict(model, state, where or "the case weights")
    return model.eval()


def _load_state_strict(model, state: dict, where: str) -> None:
    """`load_state_dict(strict=True)`; a mismatch is the user's (wrong weights for the config): ReplayError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ReplayError(f"{where}: weights do not fit the {type(model).__name__} config: "
                          f"{msg[:600]}{' ...' if len(msg) > 600 else ''}") from e


def build_ms_loaded(adapter, cfg: dict, weights: dict[str, np.ndarray]):
    from converter.mapping import load_mapping
    from opensora_ms.loading import load_strict

    mapping = load_mapping(adapter.mapping_name(cfg))
    net = adapter.build_ms(cfg)
    load_strict(net, mapping.convert(weights))
    return net, mapping


def perturb_weights(weights: dict[str, np.ndarray], perturb: dict[str, float]) -> dict[str, np.ndarray]:
    """w <- w * (1 + s) for each named weight (fault injection on the candidate only)."""
    if not perturb:
        return weights
    out = dict(weights)
    for name, s in perturb.items():
        if name not in out:
            raise ReplayError(f"--perturb: no weight {name!r} in the case")
        out[name] = (out[name] * (1 + s)).astype(out[name].dtype)
    return out


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    hooks: SafetensorsReader | None
    records: list
    outputs: dict[str, np.ndarray]
    forced: list[str] = field(default_factory=list)
    not_forced: list[str] = field(default_factory=list)
    module_paths: set[str] | None = None     # torch module paths (torch runs only)


def model_config(adapter, case: Case) -> dict:
    """What the adapter's builders get: the model config (`{ConfigName: {...}}`'s value), or the whole case config
    for an adapter that builds several models from it (`WHOLE_CASE_CONFIG = True`: the pipeline)."""
    return case.config if getattr(adapter, "WHOLE_CASE_CONFIG", False) else case.model_cfg


def run_config(case: Case, **extra) -> dict:
    """The case config as the adapters' `run_*` get it: plus the names of the outputs the case holds
    (`parity.adapters.base.WANT`), so an adapter skips calls nobody compares."""
    from parity.adapters.base import WANT

    return dict(case.config, **{WANT: case.output_names()}, **extra)


def _run_torch(adapter, case: Case, weights, inputs, dtype: str, work: Path, tag: str, filt: ModuleFilter,
               hooks: bool, teacher=None, teacher_dtype: str | None = None) -> RunResult:
    return run_torch_reference(adapter, model_config(adapter, case), run_config(case), weights, inputs, dtype, work,
                               tag, filt, hooks, teacher, teacher_dtype, where=str(case.file("weights")))


def run_torch_reference(adapter, cfg: dict, run_cfg: dict, weights, inputs, dtype: str, work: Path, tag: str,
                        filt: ModuleFilter, hooks: bool, teacher=None, teacher_dtype: str | None = None,
                        where: str | None = None) -> RunResult:
    """The torch reference in `dtype` under upstream's dtype policy (SPEC §g: `build_torch(dtype)` puts every
    parameter in that dtype, the adapters cast floating inputs to it, the fp32 islands are the reference's own),
    with ATen's kernels for low precision (`torch_numerics`). The oracle and same-dtype runs of a replay and the
    bf16 run of `dump --dtype bfloat16` all go through here."""
    model = build_torch_loaded(adapter, cfg, weights, dtype, where=where)
    with torch_numerics(dtype):
        return _run(model, lambda: adapter.run_torch(model, inputs, run_cfg), work, tag, filt, hooks,
                    teacher, teacher_dtype=teacher_dtype)


@contextlib.contextmanager
def torch_numerics(dtype: str):
    """Low-precision torch runs use ATen's own kernels, not oneDNN's: oneDNN picks its bf16 GEMM by CPU ISA
    (avx512_bf16/AMX accumulate differently), so the same call gives different bits on different CPUs, while
    ATen's path reproduces the shared cases' stored bf16 outputs bit for bit (t5_tiny differs in 2259 of 23040
    elements with oneDNN on an avx512_bf16 CPU, in none without)."""
    if dtype not in ORACLE_DTYPES:
        yield
        return
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "TF32 acceleration on top of oneDNN ..." (irrelevant here)
        flags = torch.backends.mkldnn.flags(enabled=False)
        flags.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flags.__exit__(None, None, None)


def _run(model, call, work: Path, tag: str, filt: ModuleFilter, hooks: bool, teacher=None, adapt=None,
         path_map=None, teacher_dtype: str | None = None) -> RunResult:
    sink = Sink(work / f"{tag}.hooks.safetensors") if hooks else None
    forcer = TeacherForcer(model, teacher, path_map=path_map, adapt=adapt, dtype=teacher_dtype) if teacher else None
    try:
        with contextlib.ExitStack() as stack:
            if forcer:
                stack.enter_context(forcer)
            if sink:
                stack.enter_context(Capture(model, sink, filt))
            outputs = call()
    except BaseException:
        if sink:
            sink.abort()
        raise
    reader = sink.reader() if sink else None
    outputs = {k: _as_numpy(v) for k, v in outputs.items()}
    paths = None
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        paths = {p or ROOT for p, _ in model.named_modules()}
    return RunResult(reader, sink.records if sink else [], outputs,
                     forcer.forced if forcer else [], forcer.missing if forcer else [], paths)


def _as_numpy(v) -> np.ndarray:
    """An output as numpy; low-precision floats numpy has no native type for (MindSpore's bfloat16) widened to
    float32 exactly."""
    a = np.asarray(v)
    if a.dtype.kind == "V" or a.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return a.astype(np.float32)
    return a


def record_teacher_inputs(adapter, case: Case, weights, inputs, dtype: str, work: Path):
    model = build_torch_loaded(adapter, model_config(adapter, case), weights, dtype, where=str(case.file("weights")))
    rec = TeacherRecorder(model, adapter.TEACHER_BLOCKS, work / "teacher_inputs.safetensors")
    with rec:
        adapter.run_torch(model, inputs, run_config(case))
    del model
    return rec.inputs()


def _torch_module_paths(adapter, cfg) -> set[str] | None:
    try:
        import torch

        with torch.device("meta"):
            model = adapter.build_torch(cfg)
    except Exception:
        try:
            model = adapter.build_torch(cfg)
        except Exception:
            return None
    return {p or ROOT for p, _ in model.named_modules()}


# ---------------------------------------------------------------------------------------------- replay
# Case outputs named `bf16/<name>` hold `<name>` from the same call with every weight in bfloat16
# (../shared/upstream/tiny/README.md "Cases"); a bf16 replay judges them, a float32 replay of a port defers them.
LOWP_PREFIX = "bf16/"


def case_dtype(case: Case) -> str:
    """The dtype a case was made in, read off its weights file (not only from --dtype): bfloat16 when any
    floating weight is BF16, float16 when F16, float64 when all are F64, else float32."""
    index, _ = read_header(case.file("weights"))
    kinds = {v["dtype"] for v in index.values()}
    if "BF16" in kinds:
        return "bfloat16"
    if "F16" in kinds:
        return "float16"
    if kinds and kinds <= {"F64", "I64", "I32", "BOOL", "U8"} and "F64" in kinds:
        return "float64"
    return "float32"


def _check_options(opts: ReplayOptions) -> None:
    if opts.framework not in FRAMEWORKS:
        raise ReplayError(f"--framework must be one of {FRAMEWORKS}")
    if opts.mode not in MODES:
        raise ReplayError(f"--mode must be one of {MODES}")
    if opts.dtype not in DTYPES:
        raise ReplayError(f"--dtype must be one of {DTYPES}")
    if opts.framework == "mindspore" and opts.device == "CPU" and opts.dtype != "float32":
        raise ReplayError(f"MindSpore CPU computes float32 only (notes/mindspore-cpu.md §0) and this replay is "
                          f"{opts.dtype}; judge bf16 with --device CPU-bf16 (emulated) or on Ascend")
    if opts.framework == "mindspore" and opts.device == "CPU-bf16" and opts.dtype != "bfloat16":
        raise ReplayError(f"--device CPU-bf16 emulates bfloat16; --dtype {opts.dtype} does not apply")
    if opts.jit and opts.framework == "mindspore" and opts.hooks:
        raise ReplayError("--jit ignores hooks (MindSpore runs hooks only in PyNative); add --no-hooks to compare outputs only")


def _build_candidate_ms(adapter, case: Case, weights, opts: ReplayOptions):
    """The port with the (possibly perturbed) case weights. Only a port that is not there at all is "not
    covered"; an ImportError raised inside a port that exists is a bug of the suite (re-raised)."""
    try:
        return build_ms_loaded(adapter, model_config(adapter, case), weights)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing.startswith("opensora_ms.models") and _spec_absent(missing):   # the port module itself
            raise NotCoveredError(f"{case.name}: the MindSpore port is not available: {e}") from e
        raise


def _spec_absent(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def replay(case_path, opts: ReplayOptions | None = None, **kw) -> dict:
    opts = opts or ReplayOptions(**kw)
    case = Case.open(case_path)
    if opts.outputs:
        case.outputs_only = list(opts.outputs)
        if not case.output_names():
            raise ReplayError(f"--outputs {' '.join(opts.outputs)}: matches none of the case's outputs "
                              f"({', '.join(case.outputs_reader().keys())})")
    made_in = case_dtype(case)
    emulated = opts.framework == "mindspore" and opts.device == "CPU-bf16"
    opts = dataclasses.replace(opts, dtype=opts.dtype or ("bfloat16" if emulated else made_in))
    _check_options(opts)
    th = Thresholds.load(opts.thresholds)
    if opts.framework == "mindspore":
        setup_mindspore(opts.device, pynative=True)
    try:
        adapter = _adapters.for_config(case.config_name)
    except _adapters.NotCovered as e:
        raise NotCoveredError(f"{case.name}: not covered: {e}") from e
    from parity.adapters.base import check_case

    check_case(adapter, case)  # config types, size vs memory, the inputs the model needs: before anything is built
    if opts.mode == "teacher" and not getattr(adapter, "TEACHER_BLOCKS", None):
        raise NotCoveredError(f"{case.name}: teacher mode: its adapter declares no blocks to teacher-force "
                              "(free mode covers it)")
    inputs = case.inputs()
    weights = case.weights_numpy()
    filt = ModuleFilter(opts.include, opts.exclude, opts.max_depth)
    use_oracle = opts.oracle or opts.dtype in ORACLE_DTYPES
    notes, problems = [], _case_problems(case)
    case_hooks = case.hooks_reader()
    # without stored hooks (and no oracle run to stand in) only outputs can be compared: capture none
    capture = opts.hooks and (use_oracle or case_hooks is not None)
    if opts.hooks and not capture:
        notes.append("the case stores no hooks: outputs only")
    if made_in != "float32":
        notes.append(f"the case was made in {made_in} (its weights file)")

    with tempfile.TemporaryDirectory(prefix="msconv-parity-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        teacher = None
        if opts.mode == "teacher":
            rec_dtype = opts.dtype if opts.framework == "torch" else "float32"
            teacher = record_teacher_inputs(adapter, case, weights, inputs, rec_dtype, work)
            if not teacher.calls:
                raise ReplayError(f"teacher mode: no module matches TEACHER_BLOCKS {adapter.TEACHER_BLOCKS}")
        cand_weights = perturb_weights(weights, opts.perturb)
        if opts.perturb:
            notes.append("candidate weights perturbed: " + ", ".join(f"{k} x (1 {v:+g})" for k, v in opts.perturb.items()))
        if opts.framework == "torch":
            cand = _run_torch(adapter, case, cand_weights, inputs, opts.dtype, work, "candidate", filt, capture,
                              teacher)
            aligner = Aligner(_declarations(adapter, case))
        else:
            net, mapping = _build_candidate_ms(adapter, case, cand_weights, opts)
            # the mapping's vars (its own and its includes') off the case's weight shapes
            aligner = Aligner(getattr(mapping, "align", None) or [], mapping.resolve_vars(case.weight_shapes()))
            case_cfg = run_config(case, jit=True) if opts.jit else run_config(case)
            cand = _run(net, lambda: adapter.run_ms(net, inputs, case_cfg), work, "candidate", filt, capture,
                        teacher, adapt=getattr(adapter, "teacher_adapt", None), path_map=aligner.ms_path)
        if opts.mode == "teacher":
            notes.append(f"teacher forcing: {len(cand.forced)} block calls got the torch reference's recorded inputs")
            if cand.not_forced:
                notes.append("teacher forcing could not force: " + ", ".join(cand.not_forced))
        if opts.save_outputs:
            save_dict(opts.save_outputs, cand.outputs, {"case": case.name, "framework": opts.framework})

        stored = case.outputs_reader()
        selected = case.output_names()
        if opts.outputs:
            notes.append(f"outputs selected by --outputs {' '.join(opts.outputs)}: {len(selected)} of "
                         f"{len(stored.keys())} (the others are not computed)")
        lowp_names = [k for k in selected if k.startswith(LOWP_PREFIX)]
        main_outputs = _Only(stored, [k for k in selected if k not in lowp_names])
        oracle_outputs = None
        if use_oracle:
            oracle = _run_torch(adapter, case, weights, inputs, "float64", work, "oracle", ModuleFilter(), capture,
                                teacher, teacher_dtype="float64")
            same = _run_torch(adapter, case, weights, inputs, opts.dtype, work, "same", ModuleFilter(), capture,
                              teacher)
            ref, same_store = HookStore(oracle.hooks), HookStore(same.hooks)
            ref_outputs, same_outputs, oracle_outputs = oracle.outputs, same.outputs, oracle.outputs
            ref_hook_names = [r.name for r in oracle.records] if capture else case.hook_names()
            notes.append(f"reference: project torch reference in float64 (oracle); ratio vs torch {opts.dtype}")
        else:
            ref = HookStore(case_hooks, case.aliases)
            same_store, same_outputs = None, None
            ref_outputs = main_outputs      # lazy: one tensor at a time
            ref_hook_names = case.hook_names() if capture else []
            notes.append("reference: the case's stored outputs and hooks (upstream)")

        rep = _compare(case, opts, th, aligner, cand, ref, ref_outputs, ref_hook_names, same_store, same_outputs,
                       use_oracle, filt, adapter, case_outputs=main_outputs)
        # stored low-precision outputs: the bf16/ outputs of any case, or every output of a bf16 case
        pairs = {k: k[len(LOWP_PREFIX):] for k in lowp_names}
        if made_in in ORACLE_DTYPES:
            pairs.update({k: k for k in main_outputs.keys()})
        if pairs:
            _judge_stored_lowp(rep, adapter, case, opts, th, weights, inputs, pairs, stored, cand, oracle_outputs, work)
    rep["notes"] = notes + rep.get("notes", [])
    if problems:
        rep["verdict"] = "fail"
        rep["notes"] += problems
    if opts.mode == "teacher" and not cand.forced:
        rep["verdict"] = "fail"
        rep["notes"].append("teacher mode forced no block: nothing was teacher-forced")
    if opts.report_dir:
        write_reports(rep, opts.report_dir)
    return rep


def _declarations(adapter, case: Case) -> list[dict]:
    """For a torch replay: the mapping's declarations of captures the case does not store (`{ms: ..., torch:
    null, reason}`; module names are the same in the reference and the port). No mapping: none."""
    try:
        from converter.mapping import load_mapping

        align = load_mapping(adapter.mapping_name(model_config(adapter, case))).align or []
    except (ImportError, UserError):
        return []
    return [e for e in align if isinstance(e, dict) and not e.get("torch") and e.get("ms")]


class _Only:
    """A view of a lazy reader restricted to some names (keys/in/[])."""

    def __init__(self, reader, names):
        self.reader, self.names = reader, list(names)

    def keys(self):
        return list(self.names)

    def __contains__(self, k):
        return k in self.names

    def __getitem__(self, k):
        if k not in self.names:
            raise KeyError(k)
        return self.reader[k]


def _case_problems(case: Case) -> list[str]:
    """What makes a case compare nothing useful (each fails the verdict)."""
    out = []
    if not case.outputs_reader().keys():
        out.append(f"{case.file('outputs')}: holds no tensor: the case has nothing to compare")
    hooks = case.hooks_reader()
    if hooks is None and case.file("hooks_aliases").is_file():
        out.append(f"{case.file('hooks')}: missing, but the case claims hooks ({case.file('hooks_aliases').name})")
    elif hooks is not None and not hooks.keys():
        out.append(f"{case.file('hooks')}: holds no tensor")
    return out


def _judge_stored_lowp(rep, adapter, case, opts, th, weights, inputs, pairs: dict[str, str], stored, cand,
                       oracle_outputs, work) -> None:
    """Compare low-precision outputs with the case's stored ones (`pairs`: stored name -> output name).

    torch: the reference's own low-precision run must reproduce upstream's stored values (same ops on a CPU:
    bit-exact expected, `stored_ulps` allowed); the float64 oracle error of both is reported beside it (their ratio
    is ~1 by construction for torch and proves nothing alone). A float32 MindSpore run defers them to an
    emulated-bf16 replay (docs/parity.md "Low precision")."""
    lowp = "bfloat16"
    if opts.framework == "mindspore" and opts.dtype == "float32":
        rep["deferred_outputs"] = sorted(pairs)
        rep.setdefault("notes", []).append(
            "not judged in this float32 run (stored bfloat16 outputs; judged by a bf16 replay): " + ", ".join(sorted(pairs)))
        return
    if opts.dtype == lowp:
        produced = cand.outputs
    elif opts.framework == "torch":
        produced = _run_torch(adapter, case, weights, inputs, lowp, work, "lowp", ModuleFilter(), False).outputs
    else:
        rep["deferred_outputs"] = sorted(pairs)
        return
    if oracle_outputs is None:
        oracle_outputs = _run_torch(adapter, case, weights, inputs, "float64", work, "lowp-oracle", ModuleFilter(),
                                    False).outputs
    max_ulps = float(th.for_dtype(lowp).get("stored_ulps", 1))
    rows = []
    for sname, oname in pairs.items():
        ref = stored[sname]
        if oname not in produced:   # `bf16/pe` is as optional as `pe` (the adapter's OPTIONAL_OUTPUTS)
            optional = any(fnmatch.fnmatchcase(oname, g) for g in optional_outputs(adapter, opts.framework))
            rep.setdefault("missing_optional_outputs" if optional else "missing_outputs", []).append(sname)
            continue
        x = np.asarray(produced[oname], dtype=np.float32)
        m = compare_arrays(x, ref)
        row = {"name": sname, "kind": "output", **m, "limit": None}
        if m.get("shape_mismatch"):
            v, reason = "fail", f"shape {m['shape']} != stored {m['ref_shape']}"
        else:
            row["ulps"] = bf16_ulps(x, ref)
            if oname in oracle_outputs:
                e_test = compare_arrays(x, oracle_outputs[oname])
                e_ref = compare_arrays(ref, oracle_outputs[oname])
                row["oracle"] = {"err_test": e_test["rmse"], "err_ref": e_ref["rmse"], "metric": "rmse",
                                 "ratio": oracle_ratio(e_test["rmse"], e_ref["rmse"], e_ref["ref_rms"], lowp),
                                 "vs": "stored"}
            if opts.framework == "torch":
                v, reason = verdict(m, math.inf, 1.0)
                if v != "fail" and not row["ulps"] <= max_ulps:
                    v, reason = "fail", f"{row['ulps']:.3g} bf16 ulps from the stored output (allowed {max_ulps:g})"
                elif v != "fail":
                    v, reason = "pass", f"{row['ulps']:.3g} bf16 ulps from the stored output"
            else:   # a port in (emulated) bf16 is judged by the oracle above; its distance to upstream is reported
                v, reason = "pass", f"reported: {row['ulps']:.3g} bf16 ulps from the stored output (judged by the oracle)"
        row["verdict"], row["reason"], row["score"] = v, reason, None
        rows.append(row)
    rep["tensors"] += rows
    rep["counts"]["compared"] += len(rows)
    fails = [r for r in rows if r["verdict"] == "fail"]
    rep["counts"]["fail"] += len(fails)
    rep["stored_lowp"] = {"compared": [r["name"] for r in rows], "max_ulps": max((r.get("ulps", 0) for r in rows), default=0)}
    if fails or rep.get("missing_outputs"):
        rep["verdict"] = "fail"
        if rep.get("first_divergence") is None and fails:
            f = fails[0]
            rep["first_divergence"] = {"name": f["name"], "kind": "output", "index": rep["tensors"].index(f),
                                       "max_rel": f.get("max_rel"), "reason": f["reason"]}


def optional_outputs(adapter, framework: str) -> list[str]:
    """The adapter's `OPTIONAL_OUTPUTS` for this framework: a list of globs, or a {framework: globs} dict."""
    spec = getattr(adapter, "OPTIONAL_OUTPUTS", ()) or ()
    if isinstance(spec, dict):
        spec = spec.get(framework, ())
    if isinstance(spec, str):
        spec = [spec]
    return list(spec)


def _judge_tensor(name, kind, x, expected, torch_names, same_expected, *, th, dtype, use_oracle) -> dict:
    """One row of the report: metrics, limit, oracle ratio (low precision) and the verdict."""
    tcfg = th.for_dtype(dtype)
    by_ratio = use_oracle and dtype in ORACLE_DTYPES
    o_limit = float(tcfg["oracle_ratio"]) if by_ratio else None
    o_warn = float(tcfg["oracle_warn"]) if by_ratio and "oracle_warn" in tcfg else None
    if not by_ratio and np.issubdtype(np.asarray(expected).dtype, np.integer):
        return _judge_integer(name, kind, x, expected, tcfg)
    limit = th.limit(torch_names[0] if torch_names else name, kind, dtype)
    m = compare_arrays(x, expected, elem_limit=None if by_ratio else limit)
    row = {"name": name, "kind": kind, **m, "limit": limit}
    if torch_names and torch_names != [name]:
        row["torch"] = torch_names
    if use_oracle and same_expected is not None and not m.get("shape_mismatch"):
        ms_ = compare_arrays(same_expected, expected)
        if not ms_.get("shape_mismatch"):
            row["oracle"] = {"err_test": m["rmse"], "err_ref": ms_["rmse"], "metric": "rmse",
                             "max_rel_ref": ms_["max_rel"],
                             "ratio": oracle_ratio(m["rmse"], ms_["rmse"], m["ref_rms"], dtype)}
    v, reason = verdict(m, limit, float(tcfg.get("warn_fraction", 0.5)), oracle=row.get("oracle"),
                        oracle_limit=o_limit, oracle_warn=o_warn,
                        elem_max_fraction=None if by_ratio else tcfg.get("elem_max_fraction"))
    if by_ratio and "oracle" not in row:
        v, reason = "fail", "no same-dtype torch tensor to form the oracle ratio"
    row["verdict"], row["reason"] = v, reason
    if by_ratio and "oracle" in row:
        row["score"] = row["oracle"]["ratio"] / o_limit
    elif not m.get("shape_mismatch"):
        row["score"] = m["max_rel"] / limit if limit else None
    else:
        row["score"] = float("inf")
    return row


def _judge_integer(name, kind, x, expected, tcfg) -> dict:
    """Integer tensors (uint8 video frames) are quantised: judged by levels, |x − r| ≤ `integer_max_abs` (a relative
    limit would call one level of 255 a 4e-3 error)."""
    m = compare_arrays(np.asarray(x).astype(np.int64), np.asarray(expected).astype(np.int64))
    limit = float(tcfg.get("integer_max_abs", 0))
    row = {"name": name, "kind": kind, **m, "limit": limit, "criterion": "max_abs (integer levels)"}
    if m.get("shape_mismatch"):
        row.update(verdict="fail", reason=f"shape {m['shape']} != reference {m['ref_shape']}", score=float("inf"))
    elif not m["max_abs"] <= limit:
        row.update(verdict="fail", reason=f"max_abs {m['max_abs']:g} levels > {limit:g}", score=m["max_abs"] / max(limit, 1))
    else:
        row.update(verdict="pass", reason="", score=m["max_abs"] / max(limit, 1))
    return row


def _unaligned_torch(leftover, module_paths, captured_any, filt, aligner) -> tuple[list[str], dict[str, str]]:
    """Torch tensors that aligned with nothing, each with the mapping's declared reason where there is one."""
    unaligned, reasons = [], {}
    for name in leftover:
        module, _ = split_hook_name(name, module_paths)
        if not captured_any:
            reasons[name] = "hooks not captured (--no-hooks or --jit)"
        elif not filt(module if module != ROOT else ""):
            continue   # excluded by --include/--exclude/--max-depth on purpose
        else:
            r = aligner.explicit_reason(module)
            if r:
                reasons[name] = r
        unaligned.append(name)
    return unaligned, reasons


def _first_divergence(tensors: list[dict]) -> dict | None:
    fails = [t for t in tensors if t["verdict"] == "fail"]
    if not fails:
        return None
    f = fails[0]
    first = {"name": f["name"], "kind": f["kind"], "index": tensors.index(f), "max_rel": f.get("max_rel"),
             "reason": f.get("reason")}
    if "torch" in f:
        first["torch"] = f["torch"]
    if "oracle" in f:
        first["oracle_ratio"] = f["oracle"]["ratio"]
    return first


def _compare(case, opts, th, aligner, cand: RunResult, ref: HookStore, ref_outputs, ref_hook_names, same_store,
             same_outputs, use_oracle, filt, adapter, case_outputs=None) -> dict:
    """Judge every candidate capture and output; the verdict fails on any failing tensor, on any tensor that
    aligned with nothing without a reason declared in the mapping's `align:`, on a case output the candidate does
    not produce, and when nothing was compared."""
    dtype = opts.dtype
    judge = lambda *a: tensors.append(_judge_tensor(*a, th=th, dtype=dtype, use_oracle=use_oracle))  # noqa: E731
    tensors: list[dict] = []
    consumed: set[str] = set()
    unaligned_candidate, candidate_reasons = [], {}
    if cand.hooks is not None:   # hooks, in capture order
        for rec in cand.records:
            exp = aligner.expected(rec.module, rec.suffix, ref.__contains__, ref.get)
            if exp.array is None:
                label = rec.name if exp.entry is None else f"{rec.name} (align entry needs missing {exp.missing})"
                unaligned_candidate.append(label)
                r = aligner.explicit_ms_reason(rec.module)
                if r:
                    candidate_reasons[label] = r
                continue
            consumed.update(exp.torch_names)
            same_exp = None
            if same_store is not None:
                same_exp = aligner.expected(rec.module, rec.suffix, same_store.__contains__, same_store.get).array
            judge(rec.name, "hook", cand.hooks.get(rec.name), exp.array, exp.torch_names, same_exp)
    # outputs: every case output the candidate does not produce fails, unless the adapter declares it optional
    # (`OPTIONAL_OUTPUTS`: globs, or {framework: globs}, for outputs a framework cannot produce)
    case_outputs = ref_outputs if case_outputs is None else case_outputs
    optional = optional_outputs(adapter, opts.framework)
    absent = [k for k in case_outputs.keys() if k not in cand.outputs]
    missing_outputs = [k for k in absent if not any(fnmatch.fnmatchcase(k, g) for g in optional)]
    missing_optional = [k for k in absent if k not in missing_outputs]
    for name, x in cand.outputs.items():
        if name not in ref_outputs:
            if name not in case_outputs:
                unaligned_candidate.append(f"output:{name}")
                candidate_reasons[f"output:{name}"] = "not among the case's outputs"
            continue
        judge(name, "output", x, ref_outputs[name], [name], same_outputs.get(name) if same_outputs else None)

    leftover = [n for n in ref_hook_names if n not in consumed]
    module_paths = cand.module_paths or (_torch_module_paths(adapter, model_config(adapter, case)) if leftover else None)
    unaligned, reasons = _unaligned_torch(leftover, module_paths, cand.hooks is not None, filt, aligner)
    unexplained = [n for n in unaligned if n not in reasons]
    unexplained_candidate = [n for n in unaligned_candidate if n not in candidate_reasons]

    fails = [t for t in tensors if t["verdict"] == "fail"]
    notes = []
    verdict_all = "fail" if fails else "pass"
    if not tensors:
        verdict_all = "fail"
        notes.append("nothing was compared")
    if missing_outputs:
        verdict_all = "fail"
        notes.append("the candidate does not produce case output(s): " + ", ".join(missing_outputs))
    if unexplained:
        verdict_all = "fail"
        notes.append(f"{len(unexplained)} torch tensor(s) aligned with nothing and the mapping's align: declares no "
                     f"reason: {', '.join(unexplained[:8])}{' ...' if len(unexplained) > 8 else ''}")
    if unexplained_candidate:
        verdict_all = "fail"
        notes.append(f"{len(unexplained_candidate)} candidate capture(s) matched nothing and the mapping's align: "
                     f"declares no reason: {', '.join(unexplained_candidate[:8])}"
                     f"{' ...' if len(unexplained_candidate) > 8 else ''}")
    if missing_optional:
        notes.append("optional output(s) the adapter declares it cannot produce (not compared): "
                     + ", ".join(missing_optional))
    by_ratio = use_oracle and dtype in ORACLE_DTYPES
    tcfg = th.for_dtype(dtype)
    thresholds = {"dtype": dtype, **{k: v for k, v in tcfg.items()}, "metric": "oracle_ratio" if by_ratio else "max_rel",
                  "overrides": th.raw.get("overrides") or []}
    return {
        "verdict": verdict_all, "case": case.name, "framework": opts.framework, "device": opts.device,
        "mode": opts.mode, "dtype": dtype, "oracle": bool(use_oracle),
        "verdict_metric": "oracle_ratio" if by_ratio else "max_rel",
        "thresholds": thresholds, "first_divergence": _first_divergence(tensors), "tensors": tensors,
        "counts": {"compared": len(tensors), "fail": len(fails),
                   "warn": sum(t["verdict"] == "warn" for t in tensors),
                   "unaligned": len(unaligned), "unaligned_unexplained": len(unexplained),
                   "unaligned_candidate": len(unaligned_candidate),
                   "unaligned_candidate_unexplained": len(unexplained_candidate)},
        "unaligned": unaligned, "unaligned_reasons": reasons, "unaligned_candidate": unaligned_candidate,
        "unaligned_candidate_reasons": candidate_reasons,
        "missing_outputs": missing_outputs, "missing_optional_outputs": missing_optional,
        "filter": {"include": opts.include, "exclude": opts.exclude, "max_depth": opts.max_depth},
        "environment": environment(opts.device), "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- dump
# case-config keys that are prose for people (never read by a runner, never carried into a dump)
PROSE_KEYS = ("call", "calls", "notes", "note")


def load_config_arg(adapter, config: str) -> dict:
    """A preset name of the adapter, or a JSON file (a bare config or a case config holding CONFIG_NAME)."""
    return load_case_config_arg(adapter, config)[0]


def load_case_config_arg(adapter, config: str) -> tuple[dict, dict]:
    """(model config, structured case-level fields such as `tiling`) from a preset name (its
    `PRESET_CASE_FIELDS`) or a JSON file (a bare config, or a case config holding CONFIG_NAME and its fields)."""
    if config in getattr(adapter, "PRESETS", {}):
        fields = getattr(adapter, "PRESET_CASE_FIELDS", {}).get(config, {})
        return dict(adapter.PRESETS[config]), json.loads(json.dumps(fields))
    p = Path(config)
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReplayError(f"--config {p}: not valid JSON ({e})") from e
        fields = {}
        if isinstance(d, dict) and adapter.CONFIG_NAME in d:
            fields = {k: v for k, v in d.items() if k != adapter.CONFIG_NAME and k not in PROSE_KEYS}
            d = d[adapter.CONFIG_NAME]
        if not isinstance(d, dict):
            raise ReplayError(f"--config {p}: expected a JSON object (the {adapter.CONFIG_NAME} fields)")
        return dict(d), fields
    raise ReplayError(f"--config {config!r}: not a preset ({', '.join(getattr(adapter, 'PRESETS', {}))}) nor a JSON file")


def load_weights_arg(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file, or a directory of them (sharded checkpoints), as float numpy by upstream names."""
    import torch
    from safetensors.torch import load_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ReplayError(f"--weights {path}: no safetensors file")
    out = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            out[k] = (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).numpy()
    return out


# what `dump --dtype` can write: the fp32 case, or the fp32 case plus `bf16/<name>` outputs (the case format has no
# other low-precision prefix)
DUMP_DTYPES = ("float32", "bfloat16")
BF16_OUTPUT_NOTE = ("msconv parity dump --dtype bfloat16: the same call by the torch reference with every parameter "
                    "in bfloat16 (upstream's dtype policy, SPEC §g; ATen kernels)")


def _lowp_stored(a):
    """A bf16 run's output as the case stores it: BF16 where its values are bf16 (the round trip is exact, as in
    t5_tiny's `bf16/last_hidden_state`), else unchanged (an fp32 island's output, e.g. the MMDiT's RoPE tables,
    stays F32: nothing is rounded on the way to disk)."""
    from converter.tensor import RawTensor, decode, encode

    a = np.asarray(a)
    if a.dtype != np.float32:
        return a
    bits = encode(a, "BF16")
    if not np.array_equal(decode(bits, "BF16"), a, equal_nan=True):
        return a
    return RawTensor.from_storage(bits, "BF16")


def dump(model: str, config: str | dict, out: str | Path, weights: str | Path | None = None, seed: int = 0,
         inputs: str | Path | None = None, hooks: bool = True, dtype: str = "float32") -> Path:
    """Write a case (six files) from the project's torch reference; returns the case prefix. `dtype="bfloat16"`
    adds, for every floating output, `bf16/<name>` from the same call by the reference in bf16
    (`run_torch_reference`, the replay's same-dtype run) and a config field per such output saying so, as the
    shared text-encoder cases do (../shared/upstream/tiny/README.md "Cases")."""
    if dtype not in DUMP_DTYPES:
        raise ReplayError(f"--dtype must be one of {', '.join(DUMP_DTYPES)} (bfloat16 adds bf16/<name> outputs), "
                          f"got {dtype!r}")
    import torch

    adapter = _adapters.by_name(model)
    if isinstance(config, dict):
        cfg, fields = dict(config.get(adapter.CONFIG_NAME, config)), {
            k: v for k, v in config.items() if adapter.CONFIG_NAME in config and k != adapter.CONFIG_NAME
            and k not in PROSE_KEYS}
    else:
        cfg, fields = load_case_config_arg(adapter, config)
    # a source case's `bf16/<name>` fields describe its outputs, not this dump's
    fields = {k: v for k, v in fields.items() if not k.startswith(LOWP_PREFIX)}
    # the structured case config; an adapter building several models from it (the pipeline) gets it whole
    whole = getattr(adapter, "WHOLE_CASE_CONFIG", False)
    structured = {**cfg, **fields} if whole and adapter.CONFIG_NAME in cfg else {adapter.CONFIG_NAME: cfg, **fields}
    build_cfg = structured if whole else cfg
    prefix = Path(out)
    for suf in (".config.json",):
        if prefix.name.endswith(suf):
            prefix = prefix.with_name(prefix.name[: -len(suf)])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmodel = adapter.build_torch(build_cfg, dtype=torch.float32)
    if weights:
        w = load_weights_arg(weights)
        _load_state_strict(tmodel, {k: torch.from_numpy(v) for k, v in w.items()}, f"--weights {weights}")
        wsrc = str(weights)
    else:
        wsrc = "seeded by the adapter's build_torch (seed 0): matrices N(0, 1/fan_in), scales 1+0.1N, biases 0.05N"
    tmodel.eval()
    if inputs:
        rd = SafetensorsReader(inputs)
        inp = {k: rd.get(k) for k in rd.keys()}
    else:
        import inspect

        # case-level fields (tiling) shape the inputs of the adapters whose make_inputs reads them; the others
        # (t5, clip) get none, whatever prose-free fields a case config carries
        takes = "case_fields" in inspect.signature(adapter.make_inputs).parameters
        inp = adapter.make_inputs(cfg, seed, **({"case_fields": fields} if fields and takes else {}))
    case_cfg = {**structured,
                "call": f"msconv parity dump {model}: adapter.run_torch(model, inputs)",
                "notes": [f"written by msconv parity dump from parity/reference ({model}); weights: {wsrc}; "
                          f"inputs: {'from ' + str(inputs) if inputs else f'make_inputs(seed={seed})'}"]}
    state = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
             for k, v in tmodel.state_dict().items()}
    lowp = {}
    if dtype == "bfloat16":   # before the fp32 run: a failure here leaves no file behind
        lowp = run_torch_reference(adapter, build_cfg, case_cfg, state, inp, dtype, prefix.parent, "bf16",
                                   ModuleFilter(), False, where="the dumped weights").outputs
    meta = {"case": prefix.name}
    hook_path = prefix.with_name(prefix.name + ".hooks.safetensors")
    sink = Sink(hook_path, dedupe=True, metadata=meta) if hooks else None
    # every file goes through <file>.tmp + rename; <name>.config.json (what makes it a case) is written last
    try:
        if sink:
            with Capture(tmodel, sink):
                outputs = adapter.run_torch(tmodel, inp, case_cfg)
            if sink.records:
                sink.close()
                atomic_write_text(prefix.with_name(prefix.name + ".hooks_aliases.json"),
                                  json.dumps(sink.aliases, indent=0))
            else:   # an adapter that runs with its hooks paused (the pipeline) stores none: no empty hooks file
                sink.abort()
        else:
            outputs = adapter.run_torch(tmodel, inp, case_cfg)
    except BaseException:
        if sink:
            sink.abort()
        raise
    outputs = dict(outputs)
    for k, v in lowp.items():   # integer outputs (the uint8 video) are the quantised `bf16/video`: not repeated
        if np.asarray(v).dtype.kind == "f":
            outputs[LOWP_PREFIX + k] = _lowp_stored(v)
            case_cfg[LOWP_PREFIX + k] = BF16_OUTPUT_NOTE
    with SafetensorsWriter(prefix.with_name(prefix.name + ".weights.safetensors"), meta) as w:
        for k, v in state.items():
            w.add(k, v)
    save_dict(prefix.with_name(prefix.name + ".inputs.safetensors"), inp, meta)
    save_dict(prefix.with_name(prefix.name + ".outputs.safetensors"), outputs, meta)
    atomic_write_text(prefix.with_name(prefix.name + ".config.json"), json.dumps(case_cfg, indent=1))
    return prefix


def dump_subprocess(model: str, config: str, out: Path, weights: str | None = None, seed: int = 0,
                    hooks: bool = True) -> Path:
    """`dump` in a separate (torch-only) process: the torch side of a `parity run` process pair."""
    cmd = [sys.executable, "-m", "parity.cli", "dump", model, "--config", config, "--out", str(out),
           "--seed", str(seed)]
    if weights:
        cmd += ["--weights", str(weights)]
    if not hooks:
        cmd += ["--no-hooks"]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, cwd=str(root), env=env, capture_output=True, text=True)
    if r.returncode == 2:   # a user error in the dump process: its one `error: ...` line
        last = [l for l in r.stderr.splitlines() if l.strip()][-1:] or ["(no message)"]
        raise ReplayError(f"dump process: {last[0].removeprefix('error: ')}")
    if r.returncode != 0:   # a crash there is a bug (exit 1), with its traceback
        raise RuntimeError(f"dump process failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return Path(out)


__all__ = ["ReplayOptions", "ReplayError", "NotCoveredError", "replay", "dump", "dump_subprocess"]
