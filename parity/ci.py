"""The parity suite CI runs: every case of a directory × framework × mode, reports under
`<report>/<case>/<framework>-<mode>/`, one summary line per case, `<report>/summary.{json,md}`.

A case no adapter covers (or a framework whose port/mapping is not there yet) is listed as "not covered" and does
not fail the suite; an error or a failing verdict in a covered run does (exit 1).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from parity import adapters as _adapters
from parity.case import Case, list_cases


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
            from converter.mapping import load_mapping

            load_mapping(adapter.mapping_name(case.model_cfg))
        except Exception as e:   # port, mapping or loader not there yet
            return f"MindSpore port not available ({type(e).__name__}: {e})"
    return None


def _cell(rep: dict | None, status: str) -> str:
    if rep is None:
        return status
    outs = [t.get("max_rel") for t in rep["tensors"] if t["kind"] == "output" and t.get("max_rel") is not None]
    s = rep["verdict"].upper()
    if outs:
        s += f" (out {max(outs):.1e})"
    if rep.get("first_divergence"):
        s += f" first divergence {rep['first_divergence']['name']}"
    return s


def run_suite(cases_dir, report_root, frameworks=("torch", "mindspore"), modes=("free", "teacher"),
              only=None, echo=print) -> int:
    from parity.engine import ReplayError, ReplayOptions, replay

    report_root = Path(report_root)
    report_root.mkdir(parents=True, exist_ok=True)
    summary = []
    rc = 0
    for prefix in list_cases(cases_dir):
        if only and prefix.name not in only:
            continue
        case = Case.open(prefix)
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
                    rep = replay(prefix, ReplayOptions(framework=fw, mode=mode, report_dir=rdir))
                    status = rep["verdict"]
                except ReplayError as e:
                    rep, status = None, f"not covered ({e})"
                except Exception as e:   # a crash in a covered run is a failure, with its traceback kept
                    rep, status = None, f"ERROR {type(e).__name__}: {e}"
                    rdir.mkdir(parents=True, exist_ok=True)
                    (rdir / "error.txt").write_text(traceback.format_exc())
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
    (report_root / "summary.json").write_text(json.dumps(summary, indent=1))
    md = ["# Parity suite", "", "| case | result |", "|---|---|"]
    md += [f"| `{e['case']}` | {e['line'].split(' ', 1)[1].strip().replace(' | ', '; ')} |" for e in summary]
    (report_root / "summary.md").write_text("\n".join(md) + "\n")
    return rc


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="?", default="../shared/upstream/tiny")
    ap.add_argument("--report", default="reports/parity")
    a = ap.parse_args()
    sys.exit(run_suite(a.cases, a.report))
