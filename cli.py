"""`msconv`: inspect checkpoints, convert PyTorch -> MindSpore, run parity (`msconv parity ...`).

Thin by design: parse, call converter / parity, print. Exit codes: 0 ok, 2 user error (one line on stderr
naming the file/key/shape), 1 anything else (a bug), 130 interrupted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from converter.errors import UserError

app = typer.Typer(help="Open-Sora 2.0 on MindSpore: checkpoint conversion and PyTorch/MindSpore parity.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

try:
    from parity.cli import app as parity_app
except Exception as _e:  # keep inspect/convert usable while the parity package is broken
    _parity_error = f"{_e.__class__.__name__}: {_e}"
    parity_app = typer.Typer(help="Layer-by-layer parity (unavailable: the parity package failed to import).")

    @parity_app.callback(invoke_without_command=True)
    def _parity_unavailable():
        typer.echo(f"error: parity is unavailable: {_parity_error}", err=True)
        raise typer.Exit(1)

app.add_typer(parity_app, name="parity")


def _fail(e: UserError):
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(e.exit_code)


def _human(n: float) -> str:
    for u in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or u == "TB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
        n /= 1000
    return str(n)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a .safetensors file, a *.safetensors.index.json, a folder, or a .bin/.pt"),
    against: Optional[Path] = typer.Option(None, "--against", help="manifest JSON ({tensors: [{key, shape, dtype}]}) to compare with"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """List every tensor (name, dtype, shape, bytes) from the headers only; with --against, the exact differences."""
    from converter.inventory import diff_inventories, load_inventory
    from converter.sources import Source
    from converter.tensor import nbytes

    try:
        src = Source(path)
        inv = src.inventory()
        rows = [{"key": k, "dtype": d, "shape": list(s), "bytes": nbytes(s, d)} for k, (s, d) in inv.items()]
        total = sum(r["bytes"] for r in rows)
        diff = None
        if against is not None:
            diff = diff_inventories(inv, load_inventory(against))
    except UserError as e:
        _fail(e)
    ndiff = sum(len(v) for v in diff.values()) if diff else 0
    if as_json:
        out = {"path": str(path), "files": src.files, "metadata": src.metadata, "tensors": rows, "count": len(rows), "total_bytes": total}
        if diff is not None:
            out["against"] = str(against)
            out["differences"] = diff
        typer.echo(json.dumps(out, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        con = Console(soft_wrap=True)
        t = Table(title=f"{path} — {len(rows)} tensors, {_human(total)}", show_lines=False)
        for c, j in (("name", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right")):
            t.add_column(c, justify=j, overflow="fold")
        for r in rows:
            t.add_row(r["key"], r["dtype"], str(r["shape"]), str(r["bytes"]))
        con.print(t)
        if diff is not None:
            con.print(f"against {against}: {ndiff} difference(s)")
            for k in diff["missing"]:
                con.print(f"  missing  {k}", markup=False)
            for k in diff["extra"]:
                con.print(f"  extra    {k}", markup=False)
            for d in diff["shape"]:
                con.print(f"  shape    {d['key']}: {d['actual']} vs expected {d['expected']}", markup=False)
            for d in diff["dtype"]:
                con.print(f"  dtype    {d['key']}: {d['actual']} vs expected {d['expected']}", markup=False)
    if ndiff:
        first = (diff["missing"] and f"missing {diff['missing'][0]}") or (diff["extra"] and f"extra {diff['extra'][0]}") \
            or (diff["shape"] and f"shape of {diff['shape'][0]['key']} {diff['shape'][0]['actual']} vs {diff['shape'][0]['expected']}") \
            or f"dtype of {diff['dtype'][0]['key']} {diff['dtype'][0]['actual']} vs {diff['dtype'][0]['expected']}"
        typer.echo(f"error: {path}: {ndiff} difference(s) against {against} (first: {first})", err=True)
        raise typer.Exit(2)


def _print_partial(partial: list) -> None:
    if partial:
        typer.echo(f"warning: --allow-partial: {len(partial)} problem(s) against the target inventory, recorded in "
                   f"msconv-manifest.json; first: {partial[0]}", err=True)


def _dry_run(src, mapping, target_inventory, config, allow_partial, dtype, as_json) -> None:
    """`convert --dry-run`: validate exactly as a conversion would and print the plan; write nothing."""
    from converter.engine import plan_checkpoint
    from converter.tensor import POLICY_DTYPES, nbytes, policy_dtype

    c = plan_checkpoint(src, mapping, target_inventory, config=config, allow_partial=allow_partial)
    m, plan, tdesc = c.mapping, c.plan, c.target.description
    want = POLICY_DTYPES.get(dtype, "?")
    if want == "?":
        raise UserError(f"--dtype must be one of {', '.join(POLICY_DTYPES)}, got {dtype!r}")
    total = sum(nbytes(n.shape, policy_dtype(n.dtype, want, k)) for k, n in plan.targets.items())
    info = {"mapping": m.name, "source": str(src), "targets": len(plan.targets), "bytes": total,
            "dropped": plan.dropped, "unused_rules": plan.unused_rules, "target_inventory": tdesc,
            "target": c.target.record(), "partial_problems": c.partial, "dtype_policy": dtype, "plan": plan.describe()}
    _print_partial(c.partial)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for line in info["plan"]:
        typer.echo(line)
    typer.echo(f"# {len(plan.source_inventory)} source tensors -> {len(plan.targets)} targets, {_human(total)}; "
               f"dropped {len(plan.dropped)}; target inventory: {tdesc}; dtype {dtype}")
    for r in plan.unused_rules:
        typer.echo(f"# note: {r} matched nothing")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="PyTorch checkpoint: .safetensors file, index, folder, or .bin/.pt"),
    mapping: str = typer.Option(..., "--mapping", "-m", help="mapping name (mappings/<name>.yaml) or path"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (must not exist unless --overwrite)"),
    dtype: str = typer.Option("keep", "--dtype", help="keep | bf16 | fp16 | fp32 (floating tensors only)"),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors | ckpt (ckpt also writes model.ckpt)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan; write nothing"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="maximum shard size, e.g. 5GB, 500MB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    target_inventory: str = typer.Option("auto", "--target-inventory",
                                         help="auto (shipped for the real checkpoint, else the model at the inferred "
                                              "or --config config) | PATH"),
    config: Optional[Path] = typer.Option(None, "--config", help="model config JSON to build the expected inventory "
                                                                  "from, instead of inferring it from the shapes"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="convert even if the result differs from the "
                                                                      "model's inventory (recorded in the manifest)"),
    source_hash: bool = typer.Option(True, "--source-hash/--no-source-hash", help="sha256 the source files into the manifest"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Convert a PyTorch checkpoint to MindSpore safetensors with a mapping (validated before writing)."""
    from converter.engine import convert_checkpoint

    try:
        if dry_run:
            return _dry_run(src, mapping, target_inventory, config, allow_partial, dtype, as_json)
        if out is None:
            raise UserError("convert needs --out DIR (or --dry-run)")
        progress = None
        bar = None
        if not as_json and sys.stderr.isatty():
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), transient=True)
            bar.start()
            task = bar.add_task("converting", total=None)

            def progress(done, total):
                bar.update(task, completed=done, total=total)
        try:
            res = convert_checkpoint(src, mapping, out, dtype=dtype, fmt=fmt, shard_size=shard_size, overwrite=overwrite,
                                     target_inventory=target_inventory, hash_source=source_hash, progress=progress,
                                     config=config, allow_partial=allow_partial)
        finally:
            if bar is not None:
                bar.stop()
    except UserError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo(f"error: interrupted; nothing was left under {out}", err=True)
        raise typer.Exit(130)
    man = res.manifest
    _print_partial(man.get("partial_problems"))
    if as_json:
        typer.echo(json.dumps({"out": res.out, "files": res.files, "tensors": res.tensors, "bytes": res.bytes,
                               "seconds": round(res.seconds, 3), "bytes_per_s": round(res.bytes_per_s),
                               "target_inventory": man["target_inventory"], "allow_partial": man["allow_partial"],
                               "partial_problems": man["partial_problems"]}, indent=1))
    else:
        typer.echo(f"wrote {res.tensors} tensors, {_human(res.bytes)} in {res.seconds:.1f} s "
                   f"({_human(res.bytes_per_s)}/s) -> {res.out}; checked against {man['target_inventory']}")


@app.command()
def validate(
    mapping: str = typer.Argument(..., help="mapping name or path"),
    src: Optional[Path] = typer.Option(None, "--source", help="check against this checkpoint instead of the mapping's source manifest"),
    config: Optional[Path] = typer.Option(None, "--config", help="with --source: model config JSON for the expected inventory"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="pass even without a (matching) target inventory"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Validate a mapping against its source manifest and target inventory (or a checkpoint, as convert would)."""
    from converter.engine import plan_checkpoint
    from converter.mapping import load_mapping

    try:
        m = load_mapping(mapping)
        if src is not None:
            c = plan_checkpoint(src, m, config=config, allow_partial=allow_partial)
            inv, where, plan, tdesc, partial = c.plan.source_inventory, str(src), c.plan, c.target.description, c.partial
        else:
            inv, where = m.source_manifest(), f"manifest {m.source.get('manifest')}"
            if inv is None:
                raise UserError(f"mapping {m.name}: source manifest {m.source.get('manifest')!r} not found; pass --source")
            tinv, partial = m.target_inventory(), []
            if tinv is None and not allow_partial:
                from converter.targets import no_inventory_message

                raise UserError(f"mapping {m.name}: no target inventory file ({m.target.get('inventory')!r}); "
                                + no_inventory_message(m.target.get("model")))
            plan = m.plan(inv, tinv, where=where)
            tdesc = f"{m.name} target inventory" if tinv is not None else "none (--allow-partial)"
            if tinv is None:
                partial = ["no target inventory"]
    except UserError as e:
        _fail(e)
    res = {"mapping": m.name, "source": where, "targets": len(plan.targets), "dropped": len(plan.dropped),
           "target_inventory": tdesc, "partial_problems": partial, "unused_rules": plan.unused_rules}
    typer.echo(json.dumps(res, indent=1) if as_json else
               f"{m.name}: ok — {len(inv)} source keys -> {len(plan.targets)} targets, {len(plan.dropped)} dropped; "
               f"target inventory: {tdesc}" + (f"; PARTIAL: {len(partial)} problem(s), first: {partial[0]}" if partial else ""))


@app.command()
def verify(
    out_dir: Path = typer.Argument(..., help="a folder written by msconv convert"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Re-hash every written file/tensor against msconv-manifest.json and check the headers against the model's
    parameter inventory."""
    from converter.verify import verify_output

    try:
        v = verify_output(out_dir)
    except UserError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"out": v.out, "files": v.files, "tensors": v.tensors, "bytes": v.bytes,
                               "inventory": v.inventory}, indent=1))
    else:
        typer.echo(f"{v.out}: ok — {v.tensors} tensors in {v.files} file(s), {_human(v.bytes)} re-hashed; "
                   f"inventory {v.inventory}")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
