"""`msconv parity ...` (cli.py mounts `app`; also runnable as `python -m parity.cli`).

Exit codes: 0 = pass, 1 = parity failure, 2 = user error (bad case/option, model not covered): every
`converter.errors.UserError` (ReplayError, CaseError, MappingError, LoadError, FormatError, ...) is printed as one
`error: ...` line.
"""

from __future__ import annotations

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
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _user_errors():
    """The exception types that are the user's to fix (exit 2, one line)."""
    from converter.errors import UserError

    from parity.adapters import NotCovered

    return (UserError, NotCovered)   # UserError covers MappingError, LoadError, FormatError, ReplayError, CaseError


@app.command()
def replay(
    case: Path = typer.Argument(..., help="case prefix <dir>/<name> (or any of its files)"),
    framework: str = typer.Option("mindspore", help="mindspore (the port) or torch (the project's reference)"),
    device: str = typer.Option("CPU", help="MindSpore device: CPU or Ascend"),
    mode: str = typer.Option("free", help="free (end to end) or teacher (each block gets the torch block's inputs)"),
    report: Optional[Path] = typer.Option(None, help="write report.json/.md/.html and junit.xml here"),
    save_outputs: Optional[Path] = typer.Option(None, help="write the produced outputs (safetensors, by name)"),
    dtype: str = typer.Option("float32", help="candidate dtype: float32, bfloat16, float16 (oracle-judged), float64"),
    oracle: bool = typer.Option(False, help="also run the torch reference in float64 and report error ratios"),
    thresholds: Optional[Path] = typer.Option(None, help="thresholds YAML (default parity/thresholds.yaml)"),
    include: Optional[List[str]] = typer.Option(None, help="capture only module paths matching this glob (repeat)"),
    exclude: Optional[List[str]] = typer.Option(None, help="skip module paths matching this glob (repeat)"),
    max_depth: Optional[int] = typer.Option(None, help="capture modules at most this deep (root = 0)"),
    hooks: bool = typer.Option(True, help="capture per-layer outputs (--no-hooks: outputs only)"),
    jit: bool = typer.Option(False, help="MindSpore: run under ms.jit (outputs only; needs --no-hooks)"),
    perturb: Optional[List[str]] = typer.Option(None, help="fault injection: NAME=SCALE multiplies a candidate weight by 1+SCALE"),
):
    """Replay a case on a framework and compare every output and aligned layer with the case."""
    from parity.engine import ReplayOptions
    from parity.engine import replay as do_replay
    from parity.report import summary_line

    opts = ReplayOptions(framework=framework, device=device, mode=mode, dtype=dtype, oracle=oracle, report_dir=report,
                         save_outputs=save_outputs, thresholds=thresholds, include=include or None,
                         exclude=exclude or None, max_depth=max_depth, hooks=hooks, jit=jit,
                         perturb=_perturb(perturb))
    try:
        rep = do_replay(case, opts)
    except _user_errors() as e:
        _fail_user(str(e))
    typer.echo(summary_line(rep))
    if report:
        typer.echo(f"report: {report}/report.md (also report.json, report.html, junit.xml)")
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
):
    """Write a case from the project's torch reference (the torch side of split mode)."""
    from parity.engine import dump as do_dump

    try:
        prefix = do_dump(model, config, out, weights=weights, seed=seed, inputs=inputs, hooks=hooks)
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
):
    """Dump (torch process) + replay (this process) in one command."""
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
        typer.echo(f"dumped (torch process): {prefix}.*")
        worst = 0
        for m in modes:
            rdir = report / m if len(modes) > 1 else report
            rep = do_replay(prefix, ReplayOptions(framework=framework, device=device, mode=m, report_dir=rdir))
            typer.echo(summary_line(rep))
            typer.echo(f"report: {rdir}/report.md")
            worst = max(worst, 0 if rep["verdict"] == "pass" else 1)
    except _user_errors() as e:
        _fail_user(str(e))
    finally:
        if tmp:
            tmp.cleanup()
    raise typer.Exit(worst)


@app.command()
def suite(
    cases: Optional[Path] = typer.Argument(None, help="directory of cases (default: ../shared/upstream/tiny beside "
                                                     "the checkout, whatever the current directory)"),
    report: Path = typer.Option(Path("reports/parity"), help="reports go to REPORT/<case>/<framework>-<mode>/"),
    frameworks: str = typer.Option("torch,mindspore", help="comma-separated"),
    modes: str = typer.Option("free,teacher", help="comma-separated"),
    only: Optional[List[str]] = typer.Option(None, help="only these case names (repeat)"),
):
    """Replay every covered case; one summary line per case; exit 1 if any covered run fails."""
    from parity.ci import DEFAULT_CASES, run_suite

    try:
        rc = run_suite(cases or DEFAULT_CASES, report, [f for f in frameworks.split(",") if f],
                       [m for m in modes.split(",") if m], only=only or None)
    except _user_errors() as e:
        _fail_user(str(e))
    raise typer.Exit(rc)


if __name__ == "__main__":
    app()
