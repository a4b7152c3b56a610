"""The parity suite CI runs: every case of a directory × framework × mode, reports under
`<report>/<case>/<framework>-<mode>/`, one summary line per case, `<report>/summary.{json,md}`.

A case no adapter covers (or a framework whose port/mapping is not there yet) is listed as "not covered" and does
not fail the suite; an error or a failing verdict in a covered run does (exit 1). "Not covered" is decided only by
`parity.adapters.NotCovered` / `parity.engine.NotCoveredError` (no adapter, the port cannot be imported) or an
absent mapping file; any other error of a covered run (a broken mapping, a malformed case, a crash) is a failure.
A cases folder with no case, or `only` naming a case that is not there, is a user error (SuiteError, exit 2).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from converter.errors import UserError
from parity import adapters as _adapters
from parity.case import Case, CaseError, list_cases
from parity.tensorio import atomic_write_text

# ../shared/upstream/tiny beside the checkout, whatever the current directory
DEFAULT_CASES = Path(__file__).resolve().parents[1].parent / "shared" / "upstream" / "tiny"


class SuiteError(UserError):
    """Nothing to run: the cases folder is missing or empty, or `only` names a case it does not hold (exit 2)."""


def _coverage(case: Case, framework: str) -> str | None:
    """None when covered, else why not."""
    try:
        adapter = _adapters.for_config(case.config_name)
    except _adapters.NotCovered as e:
        return str(e)
    if framework == "mindspore":
        try:
            import importlib

            importlib.import_module("converter.mapping")
            importlib.import_module("opensora_ms.loading")
            from converter.mapping import find_mapping

            from parity.engine import model_config

            find_mapping(adapter.mapping_name(model_config(adapter, case)))
        except ImportError as e:   # port or loader not there yet
            return f"MindSpore port not available ({type(e).__name__}: {e})"
        except UserError as e:     # no mapping file yet (a mapping that is there but broken fails the run instead)
            return f"MindSpore port not available (no mapping: {e})"
    return None


def _cell(rep: dict | None, status: str) -> str:
    if rep is None:
        return status
    lowp = set((rep.get("stored_lowp") or {}).get("compared", []))
    outs = [t.get("max_rel") for t in rep["tensors"]
            if t["kind"] == "output" and t.get("max_rel") is not None and t["name"] not in lowp
            and not t.get("criterion")]
    s = rep["verdict"].upper()
    if outs:
        s += f" (out {max(outs):.1e})"
    ratios = [t["oracle"]["ratio"] for t in rep["tensors"] if t.get("oracle") and t["name"] not in lowp]
    if rep.get("verdict_metric") == "oracle_ratio" and ratios:
        s += f" (max oracle ratio {max(ratios):.2f})"
    levels = [t["max_abs"] for t in rep["tensors"] if t.get("criterion") and t.get("max_abs") is not None]
    if levels:
        s += f" (uint8 ±{max(levels):.0f})"
    if lowp:
        s += f" (stored bf16 {rep['stored_lowp']['max_ulps']:.0f} ulp)"
    if rep.get("deferred_outputs"):
        s += f" ({len(rep['deferred_outputs'])} bf16 deferred)"
    undeclared = (rep.get("counts", {}).get("unaligned_unexplained", 0)
                  + rep.get("counts", {}).get("unaligned_candidate_unexplained", 0))
    if undeclared:
        s += f" {undeclared} undeclared unaligned"
    if rep.get("missing_outputs"):
        s += f" missing {len(rep['missing_outputs'])} output(s)"
    if rep.get("first_divergence"):
        s += f" first divergence {rep['first_divergence']['name']}"
    return s


def run_suite(cases_dir, report_root, frameworks=("torch", "mindspore"), modes=("free", "teacher"),
              only=None, echo=print, device: str = "CPU", dtype: str | None = None, hooks: bool = True,
              outputs: dict[str, list[str]] | None = None) -> int:
    from parity.engine import NotCoveredError, ReplayOptions, replay

    cases_dir = Path(cases_dir)
    if not cases_dir.is_dir():
        raise SuiteError(f"{cases_dir}: no such cases folder (resolved: {cases_dir.resolve()})")
    prefixes = list_cases(cases_dir)
    if not prefixes:
        raise SuiteError(f"{cases_dir}: no case in this folder (a case is <name>.config.json + its safetensors files)")
    if only:
        unknown = sorted(set(only) - {p.name for p in prefixes})
        if unknown:
            raise SuiteError(f"--only {', '.join(unknown)}: no such case in {cases_dir} "
                             f"(cases: {', '.join(p.name for p in prefixes)})")
        prefixes = [p for p in prefixes if p.name in only]
    report_root = Path(report_root)
    report_root.mkdir(parents=True, exist_ok=True)
    summary = []
    rc = 0
    for prefix in prefixes:
        try:
            case = Case.open(prefix)
            case.config_name
        except CaseError as e:   # a malformed case fails the suite; the others still run
            rc = 1
            line = f"{prefix.name:<20} ERROR {e}"
            echo(line)
            summary.append({"case": prefix.name, "runs": [], "status": f"ERROR {e}", "line": line})
            continue
        parts, entry = [], {"case": case.name, "runs": []}
        for fw in frameworks:
            why = _coverage(case, fw)
            if why:
                parts.append(f"{fw}: not covered")
                entry["runs"].append({"framework": fw, "status": "not covered", "why": why})
                continue
            cells = []
            for mode in modes:
                rdir = report_root / case.name / f"{fw}-{mode}"
                t0 = time.time()
                try:
                    rep = replay(prefix, ReplayOptions(framework=fw, mode=mode, report_dir=rdir, device=device,
                                                       dtype=dtype, hooks=hooks,
                                                       outputs=(outputs or {}).get(case.name)))
                    status = rep["verdict"]
                except NotCoveredError as e:   # no adapter / the port cannot be imported: only these
                    rep, status = None, f"not covered ({e})"
                except Exception as e:   # any other error of a covered run is a failure, with its traceback kept
                    rep, status = None, f"ERROR {type(e).__name__}: {e}"
                    rdir.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(rdir / "error.txt", traceback.format_exc())
                if rep is not None and rep["verdict"] != "pass" or status.startswith("ERROR"):
                    rc = 1
                cells.append(f"{mode} {_cell(rep, status)}")
                entry["runs"].append({"framework": fw, "mode": mode, "status": status, "seconds": round(time.time() - t0, 2),
                                      "report": str(rdir) if rep else None,
                                      "first_divergence": rep.get("first_divergence") if rep else None,
                                      "counts": rep.get("counts") if rep else None})
            parts.append(f"{fw}: " + ", ".join(cells))
        whys = {r.get("why") for r in entry["runs"] if r["status"] == "not covered"}
        if len(whys) == 1 and len(parts) == len(entry["runs"]) and all(r["status"] == "not covered" for r in entry["runs"]):
            parts = [f"not covered: {whys.pop()}"]
        line = f"{case.name:<20} " + " | ".join(parts)
        echo(line)
        entry["line"] = line
        summary.append(entry)
        sys.stdout.flush()
    atomic_write_text(report_root / "summary.json", json.dumps(summary, indent=1))
    md = ["# Parity suite", "", "| case | result |", "|---|---|"]
    md += [f"| `{e['case']}` | {e['line'].split(' ', 1)[1].strip().replace(' | ', '; ')} |" for e in summary]
    atomic_write_text(report_root / "summary.md", "\n".join(md) + "\n")
    return rc


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="?", default=str(DEFAULT_CASES))
    ap.add_argument("--report", default="reports/parity")
    a = ap.parse_args()
    try:
        sys.exit(run_suite(a.cases, a.report))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
