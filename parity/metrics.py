"""Per-tensor error metrics (msprobe-compatible names) and verdicts.

All metrics are computed in float64, in chunks of `CHUNK` elements, so a single huge activation never needs a
float64 copy of itself in RAM. Definitions (`x` = tensor under test, `r` = reference):

| metric | definition |
|---|---|
| `max_abs` | max |x − r| |
| `max_rel` | max |x − r| / max |r| (DESIGN.md; near-zero values don't explode). 0 when both are 0, inf when r ≡ 0 ≠ x |
| `mean_abs` | mean |x − r| |
| `rmse` | sqrt(mean (x − r)²) |
| `cosine` | x·r / (‖x‖‖r‖); 1 when both are all-zero, 0 when exactly one is |
| `ratio_1e-3`, `ratio_5e-3` | msprobe One-/Five-Thousandths Err Ratio: fraction of elements with |x − r| / (|r| + eps) < 1e-3 / 5e-3 (eps = 1e-12, msprobe adds eps to zeros) |
| `nan`, `inf` | NaN / Inf counts in x (the reference's are `ref_nan`, `ref_inf`) |
| `nonfinite_mismatch` | positions where x and r disagree on being NaN, +Inf or −Inf (compared by position, not count) |
| `elem_bad` | (with `elem_limit`) fraction of finite elements with |x − r| > elem_limit · (|r| + ELEM_FLOOR · rms(r)) |

Non-finite elements (NaN/Inf in either tensor) are excluded from the error sums; a non-finite reference or any
position mismatch fails the verdict. `elem_bad` is the elementwise criterion beside max_rel: max_rel is one global
maximum, so an error confined to the small-magnitude part of a tensor hides behind the large values; judged
element by element against its own magnitude (floored at half the tensor's RMS so that values near zero,
where fp32 cancellation makes relative error meaningless, do not count) it does not (docs/parity.md "Verdicts").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

CHUNK = 1 << 22
EPS_RATIO = 1e-12
ELEM_FLOOR = 0.5        # elementwise criterion: magnitude floor, as a fraction of rms(ref)
THRESHOLDS_FILE = Path(__file__).with_name("thresholds.yaml")

# unit roundoff (2^-p) per dtype, used for the oracle ratio's floor
_EPS = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
ORACLE_DTYPES = ("bfloat16", "float16")


def _chunks(x: np.ndarray, r: np.ndarray):
    xf, rf = x.reshape(-1), r.reshape(-1)
    for s in range(0, max(xf.size, 1), CHUNK):
        yield xf[s:s + CHUNK].astype(np.float64), rf[s:s + CHUNK].astype(np.float64)


def compare_arrays(x: np.ndarray, r: np.ndarray, elem_limit: float | None = None) -> dict:
    """Metrics of `x` against reference `r`. Shapes must match (callers check and report mismatches).
    With `elem_limit`, also `elem_bad` (the elementwise criterion, a second pass over the chunks)."""
    x, r = np.asarray(x), np.asarray(r)
    out = {"shape": list(x.shape), "ref_shape": list(r.shape), "dtype": str(x.dtype), "ref_dtype": str(r.dtype)}
    if x.shape != r.shape:
        out["shape_mismatch"] = True
        return out
    n = x.size
    max_abs = 0.0
    ref_max = 0.0
    sum_abs = sum_sq = dot = xx = rr = 0.0
    cnt1 = cnt5 = 0
    nan = inf = ref_nan = ref_inf = mismatch = 0
    finite_n = 0
    for xc, rc in _chunks(x, r):
        nan += int(np.isnan(xc).sum()); inf += int(np.isinf(xc).sum())
        ref_nan += int(np.isnan(rc).sum()); ref_inf += int(np.isinf(rc).sum())
        fx, fr = np.isfinite(xc), np.isfinite(rc)
        if not (fx.all() and fr.all()):   # same kind of non-finite at the same positions, or a mismatch
            mismatch += int(((np.isnan(xc) != np.isnan(rc)) | (np.isposinf(xc) != np.isposinf(rc))
                             | (np.isneginf(xc) != np.isneginf(rc))).sum())
        ok = fx & fr
        if not ok.all():
            xc, rc = xc[ok], rc[ok]
        if xc.size == 0:
            continue
        finite_n += xc.size
        d = np.abs(xc - rc)
        ar = np.abs(rc)
        max_abs = max(max_abs, float(d.max()))
        ref_max = max(ref_max, float(ar.max()))
        sum_abs += float(d.sum()); sum_sq += float((d * d).sum())
        dot += float((xc * rc).sum()); xx += float((xc * xc).sum()); rr += float((rc * rc).sum())
        rel = d / (ar + EPS_RATIO)
        cnt1 += int((rel < 1e-3).sum()); cnt5 += int((rel < 5e-3).sum())
    if ref_max > 0:
        max_rel = max_abs / ref_max
    else:
        max_rel = 0.0 if max_abs == 0 else math.inf
    if xx == 0 and rr == 0:
        cosine = 1.0
    elif xx == 0 or rr == 0:
        cosine = 0.0
    else:
        cosine = dot / math.sqrt(xx * rr)
    fn = max(finite_n, 1)
    out.update({
        "numel": int(n), "max_abs": max_abs, "max_rel": max_rel, "mean_abs": sum_abs / fn,
        "rmse": math.sqrt(sum_sq / fn), "cosine": cosine,
        "ratio_1e-3": cnt1 / fn if finite_n else 1.0, "ratio_5e-3": cnt5 / fn if finite_n else 1.0,
        "nan": nan, "inf": inf, "ref_nan": ref_nan, "ref_inf": ref_inf, "nonfinite_mismatch": mismatch,
        "ref_max_abs": ref_max, "ref_rms": math.sqrt(rr / fn),
    })
    if elem_limit is not None:
        out["elem_bad"] = _elem_bad(x, r, elem_limit, out["ref_rms"], finite_n)
        out["elem_limit"] = elem_limit
    return out


def _elem_bad(x: np.ndarray, r: np.ndarray, limit: float, ref_rms: float, finite_n: int) -> float:
    """Fraction of finite elements with |x − r| > limit · (|r| + ELEM_FLOOR · rms(r))."""
    if not finite_n:
        return 0.0
    floor = ELEM_FLOOR * ref_rms
    bad = 0
    for xc, rc in _chunks(x, r):
        ok = np.isfinite(xc) & np.isfinite(rc)
        d, ar = np.abs(xc - rc)[ok], np.abs(rc)[ok]
        bad += int((d > limit * (ar + floor)).sum())
    return bad / finite_n


def oracle_ratio(err_test: float, err_ref: float, ref_rms: float, dtype: str) -> float:
    """(err_test + floor) / (err_ref + floor), floor = 0.01 · eps(dtype) · rms(oracle).

    The floor keeps 0/0 at 1 (both exact) and stops a near-exact torch result from turning a negligible
    MindSpore error into a huge ratio.
    """
    floor = 0.01 * _EPS.get(dtype, _EPS["float32"]) * ref_rms
    if floor == 0:
        floor = 1e-300
    return (err_test + floor) / (err_ref + floor)


def bf16_ulps(x: np.ndarray, r: np.ndarray) -> float:
    """max |x − r| in units of the bf16 spacing at max(|x|, |r|) (0 when equal; spacing 2^(e−7) for a magnitude
    in [2^e, 2^(e+1)), floored at the smallest normal so values near zero are not counted in subnormal ulps)."""
    x, r = np.asarray(x, dtype=np.float64), np.asarray(r, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(r)
    if not ok.any():
        return 0.0
    x, r = x[ok], r[ok]
    mag = np.maximum(np.maximum(np.abs(x), np.abs(r)), 2.0 ** -126)
    spacing = np.exp2(np.floor(np.log2(mag)) - 7)
    return float((np.abs(x - r) / spacing).max())


# ---------------------------------------------------------------------------------------------- thresholds
@dataclass
class Thresholds:
    raw: dict

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Thresholds":
        p = Path(path) if path else THRESHOLDS_FILE
        return cls(yaml.safe_load(p.read_text()))

    def for_dtype(self, dtype: str) -> dict:
        d = self.raw.get("dtypes", {})
        if dtype not in d:
            raise KeyError(f"no thresholds for dtype {dtype} in {THRESHOLDS_FILE.name}")
        return d[dtype]

    def limit(self, name: str, kind: str, dtype: str) -> float:
        """max_rel limit for one tensor: per-name override (glob), else output/layer limit of the dtype."""
        import fnmatch

        for o in self.raw.get("overrides", []) or []:
            if fnmatch.fnmatchcase(name, o["pattern"]) and (o.get("dtype") in (None, dtype)):
                return float(o["max_rel"])
        t = self.for_dtype(dtype)
        return float(t["output"] if kind == "output" else t["layer"])

    def as_dict(self) -> dict:
        return self.raw


def verdict(m: dict, limit: float, warn_fraction: float, *, oracle: dict | None = None,
            oracle_limit: float | None = None, oracle_warn: float | None = None,
            elem_max_fraction: float | None = None) -> tuple[str, str]:
    """(pass|warn|fail, reason). `oracle` (when given and `oracle_limit` set) decides instead of max_rel."""
    if m.get("shape_mismatch"):
        return "fail", f"shape {m['shape']} != reference {m['ref_shape']}"
    if m["ref_nan"] or m["ref_inf"]:
        return "fail", (f"the reference holds non-finite values (nan={m['ref_nan']} inf={m['ref_inf']}): "
                        "nothing trustworthy to compare against")
    if m["nan"] or m["inf"] or m.get("nonfinite_mismatch"):
        return "fail", f"non-finite values: nan={m['nan']} inf={m['inf']} where the reference is finite"
    if oracle is not None and oracle_limit is not None:
        ratio = oracle["ratio"]
        if not ratio <= oracle_limit:
            return "fail", f"oracle ratio {ratio:.3g} > {oracle_limit:g}"
        if oracle_warn is not None and ratio > oracle_warn:
            return "warn", f"oracle ratio {ratio:.3g} > {oracle_warn:g} (limit {oracle_limit:g})"
        return "pass", ""
    mr = m["max_rel"]
    if not mr <= limit:
        return "fail", f"max_rel {mr:.3g} > {limit:g}"
    if elem_max_fraction is not None and "elem_bad" in m and not m["elem_bad"] <= elem_max_fraction:
        return "fail", (f"elementwise: {m['elem_bad']:.3g} of the elements exceed {limit:g} x (|ref| + "
                        f"{ELEM_FLOOR:g} rms(ref)) (allowed {elem_max_fraction:g})")
    if mr > warn_fraction * limit:
        return "warn", f"max_rel {mr:.3g} > {warn_fraction:g} x limit {limit:g}"
    return "pass", ""
