"""Parity reports: report.json (DESIGN.md schema), report.md, junit.xml, report.html (inline SVG plot)."""

from __future__ import annotations

import html
import json
import math
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

NUM_WORST = 3


def environment(device: str | None = None) -> dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": _ver("numpy")}
    try:
        from importlib.metadata import version

        env["msconv"] = version("msconv")
    except Exception:
        env["msconv"] = "0.1.0 (source tree)"
    for mod in ("torch", "mindspore"):
        if mod in sys.modules:
            env[mod] = _ver(mod)
        else:
            env[mod] = "not imported"
    if device:
        env["device"] = device
    return env


def _ver(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "unavailable"


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def worst_rows(tensors: list[dict], n: int = NUM_WORST) -> set[int]:
    """Indices of the n rows that use the largest fraction of their limit."""
    def score(t):
        s = t.get("score")
        return -1.0 if s is None else (1e300 if not math.isfinite(s) else s)
    ranked = sorted(range(len(tensors)), key=lambda i: score(tensors[i]), reverse=True)
    return {i for i in ranked[:n] if score(tensors[i]) > 0}


def summary_line(rep: dict) -> str:
    ts = rep["tensors"]
    n_fail = sum(t["verdict"] == "fail" for t in ts)
    n_warn = sum(t["verdict"] == "warn" for t in ts)
    lowp = set((rep.get("stored_lowp") or {}).get("compared", []))
    outs = [t for t in ts if t["kind"] == "output" and t["name"] not in lowp and not t.get("criterion")]
    out_rel = max((t.get("max_rel") or 0.0 for t in outs), default=None)
    fd = rep.get("first_divergence")
    counts = rep.get("counts", {})
    unexplained = counts.get("unaligned_unexplained", 0) + counts.get("unaligned_candidate_unexplained", 0)
    parts = [f"{rep['case']}", f"{rep['framework']}/{rep['mode']}/{rep['dtype']}", rep["verdict"].upper(),
             f"{len(ts)} tensors ({n_fail} fail, {n_warn} warn)",
             f"{len(rep.get('unaligned', []))} unaligned" + (f" ({unexplained} undeclared)" if unexplained else "")]
    if out_rel is not None:
        parts.append(f"output max_rel {_fmt(out_rel)}")
    if lowp:
        parts.append(f"stored bf16 outputs: max {_fmt(rep['stored_lowp']['max_ulps'])} ulps")
    if rep.get("deferred_outputs"):
        parts.append(f"{len(rep['deferred_outputs'])} bf16 output(s) deferred to a bf16 replay")
    if rep.get("missing_outputs"):
        parts.append("missing outputs: " + ", ".join(rep["missing_outputs"]))
    if rep.get("oracle"):
        ratios = [t["oracle"]["ratio"] for t in ts if t.get("oracle")]
        if ratios:
            parts.append(f"max oracle ratio {_fmt(max(ratios))}")
    parts.append(f"first divergence: {fd['name']} ({_fmt(fd.get('max_rel'))})" if fd else "first divergence: none")
    return " | ".join(parts)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3e}" if v != 0 else "0"
    return str(v)


# ---------------------------------------------------------------------------------------------- writers
def write_reports(rep: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json", "md": out / "report.md", "junit": out / "junit.xml", "html": out / "report.html",
    }
    from parity.tensorio import atomic_write_text

    # rendered first, then each written through <file>.tmp + rename; report.json (the machine-read one) last
    texts = {"md": to_markdown(rep), "junit": to_junit(rep), "html": to_html(rep),
             "json": json.dumps(_jsonable(rep), indent=1)}
    for k in ("md", "junit", "html", "json"):
        atomic_write_text(paths[k], texts[k])
    return paths


def _columns(rep: dict) -> list[tuple[str, str]]:
    cols = [("#", "index"), ("tensor", "name"), ("kind", "kind"), ("shape", "shape"), ("max_abs", "max_abs"),
            ("max_rel", "max_rel"), ("limit", "limit"), ("mean_abs", "mean_abs"), ("rmse", "rmse"),
            ("cosine", "cosine"), ("1e-3", "ratio_1e-3"), ("5e-3", "ratio_5e-3"), ("nan/inf", "naninf")]
    if rep.get("oracle"):
        cols += [("err vs fp64", "o_test"), ("torch err vs fp64", "o_ref"), ("ratio", "o_ratio")]
    cols += [("verdict", "verdict")]
    return cols


def _cell(t: dict, key: str, i: int) -> str:
    if key == "index":
        return str(i)
    if key == "shape":
        return "×".join(map(str, t.get("shape", []))) or "scalar"
    if key == "naninf":
        return f"{t.get('nan', 0)}/{t.get('inf', 0)}"
    if key == "cosine":
        c = t.get("cosine")
        return "-" if c is None else f"{c:.6f}"
    if key in ("ratio_1e-3", "ratio_5e-3"):
        v = t.get(key)
        return "-" if v is None else f"{v:.4f}"
    if key.startswith("o_"):
        o = t.get("oracle")
        if not o:
            return "-"
        return _fmt({"o_test": o["err_test"], "o_ref": o["err_ref"], "o_ratio": o["ratio"]}[key])
    return _fmt(t.get(key))


def to_markdown(rep: dict) -> str:
    ts = rep["tensors"]
    worst = worst_rows(ts)
    lines = [f"# Parity report: `{rep['case']}`", "",
             f"**Verdict: {rep['verdict'].upper()}** — framework `{rep['framework']}` on `{rep['device']}`, "
             f"mode `{rep['mode']}`, dtype `{rep['dtype']}`" + (", float64 oracle" if rep.get("oracle") else ""), "",
             f"- {summary_line(rep)}"]
    fd = rep.get("first_divergence")
    lines.append("- First divergence (first tensor over its limit, execution order): "
                 + (f"`{fd['name']}` ({fd.get('reason') or _fmt(fd.get('max_rel'))})" if fd else "none"))
    lines.append(f"- Rows marked ⚠ are the {NUM_WORST} tensors closest to (or furthest over) their limit.")
    if rep.get("notes"):
        lines += [f"- {n}" for n in rep["notes"]]
    lines.append("")
    cols = _columns(rep)
    lines.append("| " + " | ".join(c for c, _ in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for i, t in enumerate(ts):
        row = [_cell(t, k, i) for _, k in cols]
        row[1] = f"`{t['name']}`"
        if i in worst:
            row[1] = "⚠ " + row[1]
        if t["verdict"] == "fail":
            row[-1] = "**FAIL**"
        lines.append("| " + " | ".join(row) + " |")
    un = rep.get("unaligned", [])
    lines += ["", f"## Unaligned torch tensors ({len(un)})", ""]
    reasons = rep.get("unaligned_reasons", {})
    lines += [f"- `{u}`" + (f": {reasons[u]}" if u in reasons else "") for u in un] or ["none"]
    extra = rep.get("unaligned_candidate", [])
    lines += ["", f"## Candidate tensors with no torch counterpart ({len(extra)})", ""]
    lines += [f"- `{u}`" for u in extra] or ["none"]
    missing = rep.get("missing_outputs", [])
    if missing:
        lines += ["", f"## Case outputs the candidate does not produce ({len(missing)})", ""]
        lines += [f"- `{u}`" for u in missing]
    lines += ["", "## Thresholds", "", "```json", json.dumps(rep.get("thresholds", {}), indent=1), "```",
              "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in rep.get("environment", {}).items()]
    return "\n".join(lines) + "\n"


def to_junit(rep: dict) -> str:
    ts = rep["tensors"]
    missing = rep.get("missing_outputs", [])
    suite = ET.Element("testsuite", {
        "name": f"parity.{rep['case']}.{rep['framework']}.{rep['mode']}",
        "tests": str(len(ts) + len(missing)),
        "failures": str(sum(t["verdict"] == "fail" for t in ts) + len(missing)),
        "errors": "0", "skipped": "0"})
    props = ET.SubElement(suite, "properties")
    for k in ("case", "framework", "device", "mode", "dtype", "verdict"):
        ET.SubElement(props, "property", {"name": k, "value": str(rep.get(k))})
    cls = f"parity.{rep['case']}.{rep['framework']}.{rep['mode']}"
    for t in ts:
        tc = ET.SubElement(suite, "testcase", {"classname": cls, "name": t["name"], "time": "0"})
        msg = (f"max_rel={_fmt(t.get('max_rel'))} limit={_fmt(t.get('limit'))} max_abs={_fmt(t.get('max_abs'))} "
               f"cosine={_fmt(t.get('cosine'))}")
        if t.get("oracle"):
            msg += f" oracle_ratio={_fmt(t['oracle']['ratio'])}"
        if t["verdict"] == "fail":
            f = ET.SubElement(tc, "failure", {"message": t.get("reason") or "over threshold", "type": "ParityError"})
            f.text = msg
        else:
            so = ET.SubElement(tc, "system-out")
            so.text = f"{t['verdict']}: {msg}"
    for name in missing:
        tc = ET.SubElement(suite, "testcase", {"classname": cls, "name": name, "time": "0"})
        ET.SubElement(tc, "failure", {"message": "case output not produced by the candidate", "type": "ParityError"})
    so = ET.SubElement(suite, "system-out")
    so.text = "unaligned: " + ", ".join(rep.get("unaligned", []))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def svg_plot(rep: dict, width: int = 900, height: int = 320) -> str:
    """log10(max_rel) (or log10 oracle ratio) against execution index, limits as dashed lines."""
    ts = rep["tensors"]
    use_ratio = bool(rep.get("oracle")) and rep.get("verdict_metric") == "oracle_ratio"
    pts = []
    for i, t in enumerate(ts):
        v = t["oracle"]["ratio"] if use_ratio and t.get("oracle") else t.get("max_rel")
        if v is None:
            continue
        v = 1e-17 if v <= 0 else (1e17 if not math.isfinite(v) else v)
        pts.append((i, math.log10(v), t))
    ml, mr, mt, mb = 60, 20, 20, 40
    pw, ph = width - ml - mr, height - mt - mb
    ys = [p[1] for p in pts] + [math.log10(t["limit"]) for t in ts if t.get("limit")]
    ymin = math.floor(min(ys + [-8.0])) if ys else -8
    ymax = math.ceil(max(ys + [0.0])) if ys else 0
    n = max(len(ts) - 1, 1)

    def X(i):
        return ml + pw * i / n

    def Y(v):
        return mt + ph * (ymax - v) / max(ymax - ymin, 1e-9)

    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
          f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    for y in range(int(ymin), int(ymax) + 1):
        el.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="#e4e4e4"/>')
        el.append(f'<text x="{ml - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">1e{y}</text>')
    limits = sorted({t["limit"] for t in ts if t.get("limit")}) if not use_ratio else []
    if use_ratio:
        limits = [rep.get("thresholds", {}).get("oracle_ratio", 2.0)]
    for lim in limits:
        el.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(math.log10(lim)):.1f}" y2="{Y(math.log10(lim)):.1f}" '
                  f'stroke="#c00" stroke-dasharray="5,4"/>')
        el.append(f'<text x="{ml + pw - 4}" y="{Y(math.log10(lim)) - 4:.1f}" text-anchor="end" fill="#c00">limit {lim:g}</text>')
    if len(pts) > 1:
        path = " ".join(f"{'M' if k == 0 else 'L'}{X(i):.1f},{Y(v):.1f}" for k, (i, v, _) in enumerate(pts))
        el.append(f'<path d="{path}" fill="none" stroke="#89a" stroke-width="1"/>')
    color = {"pass": "#2a7", "warn": "#e90", "fail": "#d22"}
    for i, v, t in pts:
        el.append(f'<circle cx="{X(i):.1f}" cy="{Y(v):.1f}" r="3" fill="{color.get(t["verdict"], "#555")}">'
                  f'<title>{html.escape(t["name"])}: {_fmt(10 ** v)}</title></circle>')
    el.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle">layer depth (execution order)</text>')
    label = "log10 oracle ratio" if use_ratio else "log10 max relative error"
    el.append(f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {mt + ph / 2})">{label}</text>')
    el.append("</svg>")
    return "\n".join(el)


def to_html(rep: dict) -> str:
    ts = rep["tensors"]
    worst = worst_rows(ts)
    cols = _columns(rep)
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    rows = []
    for i, t in enumerate(ts):
        cls = t["verdict"] + (" worst" if i in worst else "")
        cells = "".join(f"<td>{html.escape(_cell(t, k, i))}</td>" for _, k in cols)
        rows.append(f'<tr class="{cls}" title="{html.escape(t.get("reason") or "")}">{cells}</tr>')
    fd = rep.get("first_divergence")
    un = rep.get("unaligned", [])
    reasons = rep.get("unaligned_reasons", {})
    unl = "".join(f"<li><code>{html.escape(u)}</code>{(': ' + html.escape(reasons[u])) if u in reasons else ''}</li>"
                  for u in un) or "<li>none</li>"
    extra = "".join(f"<li><code>{html.escape(u)}</code></li>" for u in rep.get("unaligned_candidate", [])) or "<li>none</li>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>parity {html.escape(rep['case'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td:nth-child(2) {{ text-align: left; font-family: monospace; }}
tr.fail td {{ background: #fdd; }} tr.warn td {{ background: #ffe9c2; }}
tr.worst td:nth-child(2) {{ font-weight: bold; }}
.verdict-pass {{ color: #1a6; }} .verdict-fail {{ color: #c11; }}
</style></head><body>
<h1>Parity report: <code>{html.escape(rep['case'])}</code></h1>
<p class="verdict-{rep['verdict']}"><b>Verdict: {rep['verdict'].upper()}</b> — framework <code>{html.escape(rep['framework'])}</code>
on <code>{html.escape(str(rep['device']))}</code>, mode <code>{rep['mode']}</code>, dtype <code>{rep['dtype']}</code></p>
<p>{html.escape(summary_line(rep))}</p>
<p>First divergence: {('<code>' + html.escape(fd['name']) + '</code> ' + html.escape(fd.get('reason', ''))) if fd else 'none'}</p>
<h2>Error against layer depth</h2>
{svg_plot(rep)}
<h2>Tensors (execution order; bold = worst {NUM_WORST})</h2>
<table><tr>{head}</tr>
{chr(10).join(rows)}
</table>
<h2>Unaligned torch tensors ({len(un)})</h2><ul>{unl}</ul>
<h2>Candidate tensors with no torch counterpart</h2><ul>{extra}</ul>
<h2>Environment</h2><pre>{html.escape(json.dumps(rep.get('environment', {}), indent=1))}</pre>
<h2>Thresholds</h2><pre>{html.escape(json.dumps(rep.get('thresholds', {}), indent=1))}</pre>
</body></html>
"""
