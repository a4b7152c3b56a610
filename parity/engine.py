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
import fnmatch
import json
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
from parity.metrics import ORACLE_DTYPES, Thresholds, compare_arrays, oracle_ratio, verdict
from parity.report import environment, write_reports
from parity.tensorio import SafetensorsReader, SafetensorsWriter, atomic_write_text, save_dict

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
    dtype: str = "float32"
    oracle: bool = False
    report_dir: Path | None = None
    save_outputs: Path | None = None
    thresholds: Path | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    max_depth: int | None = None
    hooks: bool = True
    perturb: dict[str, float] = field(default_factory=dict)
    jit: bool = False
    workdir: Path | None = None


# ---------------------------------------------------------------------------------------------- frameworks
def setup_mindspore(device: str = "CPU", pynative: bool = True) -> None:
    """Select device and mode before `opensora_ms` is imported (its op layer folds the device at import)."""
    import mindspore as ms

    if "opensora_ms.ops.device" in sys.modules:
        from opensora_ms.ops import device as D

        if D.DEVICE != device:
            raise ReplayError(f"opensora_ms was already imported for {D.DEVICE}; cannot switch to {device} in-process")
    try:
        ms.set_device(device)
    except (AttributeError, RuntimeError):
        ms.set_context(device_target=device)
    ms.set_context(mode=ms.PYNATIVE_MODE if pynative else ms.GRAPH_MODE)


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


def run_config(case: Case, **extra) -> dict:
    """The case config as the adapters' `run_*` get it: plus the names of the outputs the case holds
    (`parity.adapters.base.WANT`), so an adapter skips calls nobody compares."""
    from parity.adapters.base import WANT

    return dict(case.config, **{WANT: list(case.outputs_reader().keys())}, **extra)


def _run_torch(adapter, case: Case, weights, inputs, dtype: str, work: Path, tag: str, filt: ModuleFilter,
               hooks: bool, teacher=None, teacher_dtype: str | None = None) -> RunResult:
    model = build_torch_loaded(adapter, case.model_cfg, weights, dtype, where=str(case.file("weights")))
    return _run(model, lambda: adapter.run_torch(model, inputs, run_config(case)), work, tag, filt, hooks, teacher,
                teacher_dtype=teacher_dtype)


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
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    paths = None
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        paths = {p or ROOT for p, _ in model.named_modules()}
    return RunResult(reader, sink.records if sink else [], outputs,
                     forcer.forced if forcer else [], forcer.missing if forcer else [], paths)


def record_teacher_inputs(adapter, case: Case, weights, inputs, dtype: str, work: Path):
    model = build_torch_loaded(adapter, case.model_cfg, weights, dtype, where=str(case.file("weights")))
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
def replay(case_path, opts: ReplayOptions | None = None, **kw) -> dict:
    opts = opts or ReplayOptions(**kw)
    if opts.framework not in FRAMEWORKS:
        raise ReplayError(f"--framework must be one of {FRAMEWORKS}")
    if opts.mode not in MODES:
        raise ReplayError(f"--mode must be one of {MODES}")
    if opts.dtype not in DTYPES:
        raise ReplayError(f"--dtype must be one of {DTYPES}")
    if opts.framework == "mindspore" and opts.device == "CPU" and opts.dtype != "float32":
        raise ReplayError("MindSpore CPU computes float32 only (notes/mindspore-cpu.md §0); "
                          "judge bf16/fp16 on Ascend, or run --framework torch to exercise the oracle path")
    if opts.jit and opts.framework == "mindspore" and opts.hooks:
        raise ReplayError("--jit ignores hooks (MindSpore runs hooks only in PyNative); add --no-hooks to compare outputs only")
    case = Case.open(case_path)
    th = Thresholds.load(opts.thresholds)
    if opts.framework == "mindspore":
        setup_mindspore(opts.device, pynative=True)
    try:
        adapter = _adapters.for_config(case.config_name)
    except _adapters.NotCovered as e:
        raise NotCoveredError(f"{case.name}: not covered: {e}") from e
    cfg = case.model_cfg
    inputs = case.inputs()
    weights = case.weights_numpy()
    filt = ModuleFilter(opts.include, opts.exclude, opts.max_depth)
    use_oracle = opts.oracle or opts.dtype in ORACLE_DTYPES
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="msconv-parity-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        # -- teacher inputs from the torch reference (same weights, same inputs)
        teacher = None
        teacher_dtype_rec = opts.dtype if opts.framework == "torch" else "float32"
        if opts.mode == "teacher":
            teacher = record_teacher_inputs(adapter, case, weights, inputs, teacher_dtype_rec, work)
            if not teacher.calls:
                raise ReplayError(f"teacher mode: no module matches TEACHER_BLOCKS {adapter.TEACHER_BLOCKS}")
        # -- candidate
        cand_weights = perturb_weights(weights, opts.perturb)
        if opts.perturb:
            notes.append("candidate weights perturbed: " + ", ".join(f"{k} x (1 {v:+g})" for k, v in opts.perturb.items()))
        if opts.framework == "torch":
            cand = _run_torch(adapter, case, cand_weights, inputs, opts.dtype, work, "candidate", filt, opts.hooks,
                              teacher)
            aligner = Aligner()
        else:
            try:
                net, mapping = build_ms_loaded(adapter, cfg, cand_weights)
            except ImportError as e:
                raise NotCoveredError(f"{case.name}: the MindSpore port is not available: {e}") from e
            # the mapping's vars (its own and its includes', as planning reads them) off the case's weight shapes;
            # one that cannot be read is a MappingError naming it
            aligner = Aligner(getattr(mapping, "align", None) or [], mapping.resolve_vars(case.weight_shapes()))
            case_cfg = run_config(case, jit=True) if opts.jit else run_config(case)
            adapt = getattr(adapter, "teacher_adapt", None)
            cand = _run(net, lambda: adapter.run_ms(net, inputs, case_cfg), work, "candidate", filt, opts.hooks,
                        teacher, adapt=adapt, path_map=aligner.ms_path)
        if opts.mode == "teacher":
            notes.append(f"teacher forcing: {len(cand.forced)} block calls got the torch reference's recorded inputs")
            if cand.not_forced:
                notes.append("teacher forcing could not force: " + ", ".join(cand.not_forced))
        if opts.save_outputs:
            save_dict(opts.save_outputs, cand.outputs, {"case": case.name, "framework": opts.framework})

        # -- references
        if use_oracle:
            oracle = _run_torch(adapter, case, weights, inputs, "float64", work, "oracle", ModuleFilter(), True,
                                teacher, teacher_dtype="float64")
            same = _run_torch(adapter, case, weights, inputs, opts.dtype, work, "same", ModuleFilter(), True,
                              teacher)
            ref = HookStore(oracle.hooks)
            same_store = HookStore(same.hooks)
            ref_outputs, same_outputs = oracle.outputs, same.outputs
            ref_hook_names = [r.name for r in oracle.records]
            notes.append(f"reference: project torch reference in float64 (oracle); ratio vs torch {opts.dtype}")
        else:
            ref = HookStore(case.hooks_reader(), case.aliases)
            same_store, same_outputs = None, None
            ref_outputs = case.outputs_reader()      # lazy: one tensor at a time
            ref_hook_names = case.hook_names()
            notes.append("reference: the case's stored outputs and hooks (upstream)")

        rep = _compare(case, opts, th, aligner, cand, ref, ref_outputs, ref_hook_names, same_store, same_outputs,
                       use_oracle, filt, adapter)
    rep["notes"] = notes + rep.get("notes", [])
    if opts.mode == "teacher" and not cand.forced:
        rep["verdict"] = "fail"
        rep["notes"].append("teacher mode forced no block: nothing was teacher-forced")
    if opts.report_dir:
        write_reports(rep, opts.report_dir)
    return rep


def optional_outputs(adapter, framework: str) -> list[str]:
    """The adapter's `OPTIONAL_OUTPUTS` for this framework: a list of globs, or a {framework: globs} dict."""
    spec = getattr(adapter, "OPTIONAL_OUTPUTS", ()) or ()
    if isinstance(spec, dict):
        spec = spec.get(framework, ())
    if isinstance(spec, str):
        spec = [spec]
    return list(spec)


def _compare(case, opts, th, aligner, cand: RunResult, ref: HookStore, ref_outputs, ref_hook_names, same_store,
             same_outputs, use_oracle, filt, adapter) -> dict:
    dtype = opts.dtype
    by_ratio = use_oracle and dtype in ORACLE_DTYPES
    tcfg = th.for_dtype(dtype)
    warn_fraction = float(tcfg.get("warn_fraction", 0.5))
    o_limit = float(tcfg["oracle_ratio"]) if by_ratio else None
    o_warn = float(tcfg["oracle_warn"]) if by_ratio and "oracle_warn" in tcfg else None
    tensors: list[dict] = []
    consumed: set[str] = set()
    unaligned_candidate: list[str] = []

    def judge(name, kind, x, expected, torch_names, same_expected):
        m = compare_arrays(x, expected)
        row = {"name": name, "kind": kind, **m}
        if torch_names and torch_names != [name]:
            row["torch"] = torch_names
        limit = th.limit(torch_names[0] if torch_names else name, kind, dtype)
        row["limit"] = limit
        if use_oracle and same_expected is not None and not m.get("shape_mismatch"):
            ms_ = compare_arrays(same_expected, expected)
            if not ms_.get("shape_mismatch"):
                row["oracle"] = {"err_test": m["rmse"], "err_ref": ms_["rmse"], "metric": "rmse",
                                 "max_rel_ref": ms_["max_rel"],
                                 "ratio": oracle_ratio(m["rmse"], ms_["rmse"], m["ref_rms"], dtype)}
        v, reason = verdict(m, limit, warn_fraction, oracle=row.get("oracle"), oracle_limit=o_limit,
                            oracle_warn=o_warn)
        if by_ratio and "oracle" not in row:
            v, reason = "fail", "no same-dtype torch tensor to form the oracle ratio"
        row["verdict"], row["reason"] = v, reason
        if by_ratio and "oracle" in row:
            row["score"] = row["oracle"]["ratio"] / o_limit
        elif not m.get("shape_mismatch"):
            row["score"] = m["max_rel"] / limit if limit else None
        else:
            row["score"] = float("inf")
        tensors.append(row)

    # hooks, in capture order
    if cand.hooks is not None:
        for rec in cand.records:
            exp = aligner.expected(rec.module, rec.suffix, ref.__contains__, ref.get)
            if exp.array is None:
                label = rec.name if exp.entry is None else f"{rec.name} (align entry needs missing {exp.missing})"
                unaligned_candidate.append(label)
                continue
            consumed.update(exp.torch_names)
            same_exp = None
            if same_store is not None:
                s = aligner.expected(rec.module, rec.suffix, same_store.__contains__, same_store.get)
                same_exp = s.array
            judge(rec.name, "hook", cand.hooks.get(rec.name), exp.array, exp.torch_names, same_exp)
    # outputs: every case output the candidate does not produce fails the verdict, unless the adapter declares it
    # optional (`OPTIONAL_OUTPUTS`: globs, or {framework: globs}, for outputs a framework cannot produce)
    optional = optional_outputs(adapter, opts.framework)
    absent = [k for k in ref_outputs.keys() if k not in cand.outputs]
    missing_outputs = [k for k in absent if not any(fnmatch.fnmatchcase(k, g) for g in optional)]
    missing_optional = [k for k in absent if k not in missing_outputs]
    for name, x in cand.outputs.items():
        if name not in ref_outputs:
            unaligned_candidate.append(f"output:{name}")
            continue
        judge(name, "output", x, ref_outputs[name], [name], same_outputs.get(name) if same_outputs else None)

    # torch tensors that aligned with nothing
    leftover = [n for n in ref_hook_names if n not in consumed]
    module_paths = cand.module_paths or (_torch_module_paths(adapter, case.model_cfg) if leftover else None)
    unaligned, reasons = [], {}
    captured_any = cand.hooks is not None
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

    fails = [t for t in tensors if t["verdict"] == "fail"]
    first = None
    if fails:
        f = fails[0]
        first = {"name": f["name"], "kind": f["kind"], "index": tensors.index(f), "max_rel": f.get("max_rel"),
                 "reason": f.get("reason")}
        if "torch" in f:
            first["torch"] = f["torch"]
        if "oracle" in f:
            first["oracle_ratio"] = f["oracle"]["ratio"]
    notes = []
    verdict_all = "fail" if fails else "pass"
    if not tensors:
        verdict_all = "fail"
        notes.append("nothing was compared")
    if missing_outputs:
        verdict_all = "fail"
        notes.append("the candidate does not produce case output(s): " + ", ".join(missing_outputs))
    if missing_optional:
        notes.append("optional output(s) the adapter declares it cannot produce (not compared): "
                     + ", ".join(missing_optional))
    thresholds = {"dtype": dtype, **{k: v for k, v in tcfg.items()}, "metric": "oracle_ratio" if by_ratio else "max_rel",
                  "overrides": th.raw.get("overrides") or []}
    return {
        "verdict": verdict_all, "case": case.name, "framework": opts.framework, "device": opts.device,
        "mode": opts.mode, "dtype": dtype, "oracle": bool(use_oracle),
        "verdict_metric": "oracle_ratio" if by_ratio else "max_rel",
        "thresholds": thresholds, "first_divergence": first, "tensors": tensors,
        "counts": {"compared": len(tensors), "fail": len(fails),
                   "warn": sum(t["verdict"] == "warn" for t in tensors),
                   "unaligned": len(unaligned), "unaligned_candidate": len(unaligned_candidate)},
        "unaligned": unaligned, "unaligned_reasons": reasons, "unaligned_candidate": unaligned_candidate,
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


def dump(model: str, config: str | dict, out: str | Path, weights: str | Path | None = None, seed: int = 0,
         inputs: str | Path | None = None, hooks: bool = True) -> Path:
    """Write a case (six files) from the project's torch reference; returns the case prefix."""
    import torch

    adapter = _adapters.by_name(model)
    if isinstance(config, dict):
        cfg, fields = dict(config.get(adapter.CONFIG_NAME, config)), {
            k: v for k, v in config.items() if adapter.CONFIG_NAME in config and k != adapter.CONFIG_NAME
            and k not in PROSE_KEYS}
    else:
        cfg, fields = load_case_config_arg(adapter, config)
    prefix = Path(out)
    for suf in (".config.json",):
        if prefix.name.endswith(suf):
            prefix = prefix.with_name(prefix.name[: -len(suf)])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmodel = adapter.build_torch(cfg, dtype=torch.float32)
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
        inp = adapter.make_inputs(cfg, seed, case_fields=fields) if fields else adapter.make_inputs(cfg, seed)
    case_cfg = {adapter.CONFIG_NAME: cfg, **fields,
                "call": f"msconv parity dump {model}: adapter.run_torch(model, inputs)",
                "notes": [f"written by msconv parity dump from parity/reference ({model}); weights: {wsrc}; "
                          f"inputs: {'from ' + str(inputs) if inputs else f'make_inputs(seed={seed})'}"]}
    meta = {"case": prefix.name}
    hook_path = prefix.with_name(prefix.name + ".hooks.safetensors")
    sink = Sink(hook_path, dedupe=True, metadata=meta) if hooks else None
    # every file goes through <file>.tmp + rename; <name>.config.json (what makes it a case) is written last
    try:
        if sink:
            with Capture(tmodel, sink):
                outputs = adapter.run_torch(tmodel, inp, case_cfg)
            sink.close()
            atomic_write_text(prefix.with_name(prefix.name + ".hooks_aliases.json"), json.dumps(sink.aliases, indent=0))
        else:
            outputs = adapter.run_torch(tmodel, inp, case_cfg)
    except BaseException:
        if sink:
            sink.abort()
        raise
    with SafetensorsWriter(prefix.with_name(prefix.name + ".weights.safetensors"), meta) as w:
        for k, v in tmodel.state_dict().items():
            w.add(k, (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy())
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
