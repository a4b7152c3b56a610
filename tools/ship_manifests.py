"""Copy the upstream manifests the mappings name into the package (`mappings/manifests/<name>.json`), compact.

The installed converter reads nothing through ../shared: a mapping's `source.manifest` resolves next to its yaml,
then in `mappings/manifests/`. This script writes those copies from ../shared/upstream/manifests (the ground
truth), keeping only what the converter reads (the tensors as {key: [shape, dtype]}) plus the config and the
provenance; `tests/test_converter_trust.py` checks that every shipped copy equals its source.

    python tools/ship_manifests.py [SHARED_MANIFESTS_DIR]
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "upstream" / "manifests"
DEST = ROOT / "mappings" / "manifests"


def referenced_manifests(mappings_dir: Path = ROOT / "mappings") -> list[str]:
    """The `source.manifest` names of every mappings/*.yaml (plain file names, not paths)."""
    import yaml

    names = set()
    for y in sorted(mappings_dir.glob("*.yaml")):
        ref = ((yaml.safe_load(y.read_text(encoding="utf-8")) or {}).get("source") or {}).get("manifest")
        if ref and "/" not in ref:
            names.add(ref)
    return sorted(names)


def compact(src: Path) -> dict:
    raw = src.read_bytes()
    d = json.loads(raw)
    return {"model": d.get("model"), "config": d.get("config"),
            "from": f"../shared/upstream/manifests/{src.name}", "from_sha256": hashlib.sha256(raw).hexdigest(),
            "tensors": {t["key"]: [list(t["shape"]), t["dtype"]] for t in d["tensors"]}}


def main(argv: list[str]) -> int:
    src_dir = Path(argv[0]) if argv else DEFAULT_SRC
    DEST.mkdir(parents=True, exist_ok=True)
    for name in referenced_manifests():
        src = src_dir / name
        if not src.is_file():
            print(f"skip {name}: not in {src_dir}")
            continue
        out = DEST / name
        out.write_text(json.dumps(compact(src), separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
