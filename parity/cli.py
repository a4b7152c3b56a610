"""`msconv parity ...` (cli.py mounts `app`; also runnable as `python -m parity.cli`).

Exit codes: 0 = pass, 1 = parity failure, 2 = user error (bad case/option, model not covered): every
`converter.errors.UserError` (ReplayError, CaseError, MappingError, LoadError, FormatError, ...) is printed as one
`error: ...` line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Layer-by-layer parity: dump and replay cases, compare PyTorch and MindSpore.",
                  no_args_is_help=True, add_completion=False)


def _perturb(items: list[str] | None) -> dict[str, float]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise typer.BadParameter(f"--perturb wants NAME=SCALE, got {it!r}")
        k, v = it.rsplit("=", 1)
        if not k:
            raise typer.BadParameter(f"--perturb wants NAME=SCALE, got {it!r} (no weight name)")
        try:
            out[k] = float(v)
        except ValueError:
            raise typer.BadParameter(f"--perturb {it!r}: SCALE must be a number (w <- w * (1 + SCALE)), got {v!r}") from None
    return out


def _fail_user(msg: str) -> None:
    from converter.errors import one_line

    typer.echo(f"error: {one_line(msg)}", err=True)
    raise typer.Exit(2)


DEVICES = ("CPU", "CPU-bf16", "Ascend")  # = parity.engine.DEVICES (CPU-bf16: Ascend's bf16 emulated on CPU)


def _check_device(device: str) -> None:
    if device not in DEVICES:
        _fail_user(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")


def _check_thresholds(path: Path | None, dtype: str | None) -> None:
    """A --thresholds file must exist and hold, for the dtype(s) a replay may judge, positive finite limits
    (parity/thresholds.yaml is the model); checked before anything runs."""
    import math

    import yaml

    if path is None:
        return
    from parity.engine import DTYPES

    try:
        raw = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        _fail_user(f"--thresholds {path}: no such file")
    except OSError as e:
        _fail_user(f"--thresholds {path}: cannot read: {e.strerror or e}")
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        _fail_user(f"--thresholds {path}: not a YAML text file ({e.__class__.__name__})")
    dts = raw.get("dtypes") if isinstance(raw, dict) else None
    if not isinstance(dts, dict):
        _fail_user(f"--thresholds {path}: needs a 'dtypes' mapping (see parity/thresholds.yaml)")
    for dt in ([dtype] if dtype else list(DTYPES)):
        entry = dts.get(dt)
        if not isinstance(entry, dict):
            _fail_user(f"--thresholds {path}: no thresholds for dtype {dt} (dtypes.{dt}.output / .layer)")
        need = ("output", "layer") + (("oracle_ratio",) if dt in ("bfloat16", "float16") else ())
        for k in need:
            v = entry.get(k)
            if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
                _fail_user(f"--thresholds {path}: dtypes.{dt}.{k} must be a positive number, got {v!r}")
    ov = raw.get("overrides") or []
    if not isinstance(ov, list) or not all(isinstance(o, dict) and isinstance(o.get("pattern"), str)
                                           and type(o.get("max_rel")) in (int, float) for o in ov):
        _fail_user(f"--thresholds {path}: overrides must be a list of {{pattern: GLOB, max_rel: NUMBER}}")


def _echo(text: str) -> None:
    """Print a line that may hold names from the user's files literally (no control characters reach the terminal)."""
    from converter.errors import literal

    typer.echo("\n".join(literal(t) for t in str(text).split("\n")))


def _user_errors():
    """The exception types that are the user's to fix (exit 2, one line)."""
    from converter.errors import UserError

    from parity.adapters import NotCovered

    return (UserError, NotCovered)   # UserError covers MappingError, LoadError, FormatError, ReplayError, CaseError


@app.command()
def replay(
    case: Path = typer.Argument(..., help="case prefix <dir>/<name> (or any of its files)"),
    framework: str = typer.Option("mindspore", help="mindspore (the port) or torch (the project's reference)"),
    device: str = typer.Option("CPU", help="MindSpore device: CPU, CPU-bf16 (Ascend's bf16 numerics emulated on the "
                               "CPU, docs/bf16.md) or Ascend"),
    mode: str = typer.Option("free", help="free (end to end) or teacher (each block gets the torch block's inputs)"),
    report: Optional[Path] = typer.Option(None, help="write report.json/.md/.html and junit.xml here"),
    save_outputs: Optional[Path] = typer.Option(None, help="write the produced outputs (safetensors, by name)"),
    dtype: Optional[str] = typer.Option(None, help="candidate dtype: float32, bfloat16, float16 (oracle-judged), "
                                        "float64; default: the dtype the case was made in (its weights file)"),
    oracle: bool = typer.Option(False, help="also run the torch reference in float64 and report error ratios"),
    thresholds: Optional[Path] = typer.Option(None, help="thresholds YAML (default parity/thresholds.yaml)"),
    include: Optional[List[str]] = typer.Option(None, help="capture only module paths matching this glob (repeat)"),
    exclude: Optional[List[str]] = typer.Option(None, help="skip module paths matching this glob (repeat)"),
    max_depth: Optional[int] = typer.Option(None, help="capture modules at most this deep (root = 0)"),
    hooks: bool = typer.Option(True, help="capture per-layer outputs (--no-hooks: outputs only)"),
    jit: bool = typer.Option(False, help="MindSpore: run under ms.jit (outputs only; needs --no-hooks)"),
    perturb: Optional[List[str]] = typer.Option(None, help="fault injection: NAME=SCALE multiplies a candidate weight by 1+SCALE"),
    outputs: Optional[List[str]] = typer.Option(None, help="compute and compare only the case outputs matching this "
                                                           "glob (repeat)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing but errors (the exit code tells the verdict)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print the report's notes and first divergence"),
):
    """Replay a case on a framework and compare every output and aligned layer with the case."""
    from parity.engine import ReplayOptions
    from parity.engine import replay as do_replay
    from parity.report import summary_line

    _check_device(device)
    _check_thresholds(thresholds, dtype)

    opts = ReplayOptions(framework=framework, device=device, mode=mode, dtype=dtype, oracle=oracle, report_dir=report,
                         save_outputs=save_outputs, thresholds=thresholds, include=include or None,
                         exclude=exclude or None, max_depth=max_depth, hooks=hooks, jit=jit,
                         perturb=_perturb(perturb), outputs=outputs or None)
    try:
        rep = do_replay(case, opts)
    except _user_errors() as e:
        _fail_user(str(e))
    if not quiet:
        _echo(summary_line(rep))
        if verbose:
            for n in rep.get("notes") or []:
                _echo(f"note: {n}")
            if rep.get("first_divergence"):
                _echo(f"first divergence: {json.dumps(rep['first_divergence'])}")
        if report:
            _echo(f"report: {report}/report.md (also report.json, report.html, junit.xml)")
    raise typer.Exit(0 if rep["verdict"] == "pass" else 1)


@app.command()
def dump(
    model: str = typer.Argument(..., help="adapter name: mmdit, hunyuan_vae, ..."),
    config: str = typer.Option("tiny", help="preset name of the adapter, or a JSON config file"),
    out: Path = typer.Option(..., help="case prefix to write: <dir>/<name>"),
    weights: Optional[Path] = typer.Option(None, help="upstream-named safetensors file or directory (default: seeded)"),
    inputs: Optional[Path] = typer.Option(None, help="inputs safetensors by argument name (default: seeded)"),
    seed: int = typer.Option(0, help="seed for make_inputs"),
    hooks: bool = typer.Option(True, help="also write <name>.hooks.safetensors (+ aliases)"),
    dtype: str = typer.Option("float32", help="float32, or bfloat16: also store bf16/<name> outputs from the same "
                                              "call by the reference in bf16 (upstream's dtype policy)"),
):
    """Write a case from the project's torch reference (the torch side of split mode)."""
    from parity.engine import dump as do_dump

    try:
        prefix = do_dump(model, config, out, weights=weights, seed=seed, inputs=inputs, hooks=hooks, dtype=dtype)
    except _user_errors() as e:
        _fail_user(str(e))
    typer.echo(f"case written: {prefix}.*")


@app.command()
def run(
    model: str = typer.Argument(..., help="adapter name: mmdit, hunyuan_vae, ..."),
    config: str = typer.Option("tiny", help="preset name or JSON config file"),
    weights: Optional[Path] = typer.Option(None, help="upstream-named safetensors file or directory (default: seeded)"),
    framework: str = typer.Option("mindspore", help="replay side: mindspore or torch"),
    device: str = typer.Option("CPU", help="MindSpore device"),
    mode: str = typer.Option("both", help="free, teacher or both"),
    report: Optional[Path] = typer.Option(None, help="report directory (default reports/parity/run_<model>_<config>)"),
    case_dir: Optional[Path] = typer.Option(None, help="keep the dumped case here (default: a temporary directory)"),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing but errors (the exit code tells the verdict)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print each replay's notes"),
):
    """Dump (torch process) + replay (this process) in one command."""
    _check_device(device)
    from parity.engine import ReplayOptions, dump_subprocess
    from parity.engine import replay as do_replay
    from parity.report import summary_line

    modes = ["free", "teacher"] if mode == "both" else [mode]
    report = report or Path("reports/parity") / f"run_{model}_{Path(config).stem}"
    tmp = None
    if case_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="msconv-case-")
        case_dir = Path(tmp.name)
    name = f"{model}_{Path(config).stem}"
    try:
        prefix = dump_subprocess(model, config, case_dir / name, weights=str(weights) if weights else None, seed=seed)
        if not quiet:
            _echo(f"dumped (torch process): {prefix}.*")
        worst = 0
        for m in modes:
            rdir = report / m if len(modes) > 1 else report
            rep = do_replay(prefix, ReplayOptions(framework=framework, device=device, mode=m, report_dir=rdir))
            if not quiet:
                _echo(summary_line(rep))
                for n in (rep.get("notes") or []) if verbose else []:
                    _echo(f"note: {n}")
                _echo(f"report: {rdir}/report.md")
            worst = max(worst, 0 if rep["verdict"] == "pass" else 1)
    except _user_errors() as e:
        _fail_user(str(e))
    finally:
        if tmp:
            tmp.cleanup()
    raise typer.Exit(worst)


def _case_globs(items: list[str] | None) -> dict[str, list[str]] | None:
    out = {}
    for it in items or []:
        name, sep, globs = it.partition("=")
        if not sep or not name or not globs:
            _fail_user(f"--outputs {it!r}: expected CASE=GLOB[,GLOB]")
        out.setdefault(name, []).extend(g for g in globs.split(",") if g)
    return out or None


@app.command()
def suite(
    cases: Optional[Path] = typer.Argument(None, help="directory of cases (default: ../shared/upstream/tiny beside "
                                                     "the checkout, whatever the current directory)"),
    report: Path = typer.Option(Path("reports/parity"), help="reports go to REPORT/<case>/<framework>-<mode>/"),
    frameworks: str = typer.Option("torch,mindspore", help="comma-separated"),
    modes: str = typer.Option("free,teacher", help="comma-separated"),
    only: Optional[List[str]] = typer.Option(None, help="only these case names (repeat)"),
    device: str = typer.Option("CPU", help="MindSpore device: CPU, CPU-bf16 (emulated bf16) or Ascend"),
    dtype: Optional[str] = typer.Option(None, help="replay dtype (default: each case's own); bfloat16 judges "
                                                   "every run against the float64 oracle"),
    hooks: bool = typer.Option(True, help="--no-hooks: outputs only"),
    outputs: Optional[List[str]] = typer.Option(None, help="CASE=GLOB[,GLOB]: compare only these outputs of that "
                                                           "case (repeat)"),
):
    """Replay every covered case; one summary line per case; exit 1 if any covered run fails."""
    _check_device(device)
    from parity.ci import DEFAULT_CASES, run_suite

    try:
        rc = run_suite(cases or DEFAULT_CASES, report, [f for f in frameworks.split(",") if f],
                       [m for m in modes.split(",") if m], only=only or None, device=device, dtype=dtype,
                       hooks=hooks, outputs=_case_globs(outputs))
    except _user_errors() as e:
        _fail_user(str(e))
    raise typer.Exit(rc)


if __name__ == "__main__":
    app()
