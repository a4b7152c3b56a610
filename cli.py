"""`msconv`: inspect checkpoints, convert PyTorch -> MindSpore, run parity (`msconv parity ...`).

Thin by design: parse, call converter / parity, print. Exit codes: 0 ok, 2 user error (one line on stderr
naming the file/key/shape), 1 anything else (a bug), 130 interrupted.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from converter.errors import UserError, literal, one_line


_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _interruptible(fn):
    """A command body whose Ctrl-C ends in one `error: interrupted` line and exit 130 (commands that can say more
    about what they left behind catch KeyboardInterrupt themselves)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None
    return run


class _App(typer.Typer):
    """`msconv` as a program: the documented exit codes (0 ok, 1 a bug of ours, 2 the user's input, 130
    interrupted, each with one `error:` line) and one `error:` line for a usage error too (click would print a
    boxed usage text)."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda fn: register(_interruptible(fn))

    def __call__(self, *args, **kwargs):
        try:
            rv = typer.main.get_command(self).main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:  # EOF at a prompt
            rv = 130
        except _ClickException as e:
            ctx, msg = getattr(e, "ctx", None), e.format_message()
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            if msg:  # (empty after `msconv` alone printed the help)
                sys.stderr.write(f"error: {one_line(msg)}{hint}\n")
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = _App(help="Open-Sora 2.0 on MindSpore: checkpoint conversion and PyTorch/MindSpore parity.",
           no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from converter import __version__

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"msconv {__version__}, MindSpore {v('mindspore')}, torch {v('torch')}"


def _version_option(value: bool):
    if value:
        typer.echo(_versions())
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_option, is_eager=True,
                                       help="print the msconv, MindSpore and torch versions and exit")):
    """Open-Sora 2.0 on MindSpore: checkpoint conversion and PyTorch/MindSpore parity."""

try:
    from parity.cli import app as parity_app
except Exception as _e:  # keep inspect/convert usable while the parity package is broken
    _parity_error = f"{_e.__class__.__name__}: {_e}"
    parity_app = typer.Typer(help="Layer-by-layer parity (unavailable: the parity package failed to import).")

    @parity_app.callback(invoke_without_command=True)
    def _parity_unavailable():
        typer.echo(f"error: parity is unavailable: {_parity_error}", err=True)
        raise typer.Exit(1)

for _c in parity_app.registered_commands:  # Ctrl-C in `msconv parity ...`: one line, exit 130
    _c.callback = _interruptible(_c.callback)
app.add_typer(parity_app, name="parity")


def _fail(e: UserError):
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(e.exit_code)


def _human(n: float) -> str:
    from converter.hub import _human as human   # one formatter for sizes (B/KB/MB/GB/TB, decimal)

    return human(n)


def _table(title: str, tensors: dict, limit: int | None) -> str:
    """The inspect table as plain text (no markup: names are printed literally), built in one linear pass."""
    items = list(tensors.items()) if limit is None else list(itertools.islice(tensors.items(), limit))
    cols = [[k if k.isprintable() else literal(k) for k, _ in items], [t.dtype for _, t in items],
            [str(list(t.shape)) for _, t in items], [str(t.nbytes) for _, t in items]]
    heads = ("name", "dtype", "shape", "bytes")
    w = [max([len(h)] + [len(x) for x in c]) for h, c in zip(heads, cols)]
    fmt = f"{{:<{w[0]}}}  {{:<{w[1]}}}  {{:<{w[2]}}}  {{:>{w[3]}}}".format
    lines = [title, fmt(*heads)]
    lines += [fmt(*row) for row in zip(*cols)]
    if len(items) < len(tensors):
        lines.append(f"... {len(tensors) - len(items)} more not shown (--limit {limit})")
    return "\n".join(lines)


def _json_rows(head: dict, tensors: dict, tail: dict) -> str:
    """`{head..., "tensors": [{key, dtype, shape, bytes}, ...], tail...}`, one tensor per line, in linear time (json's
    indented encoder is pure Python and slow on 200k rows; keys go through the C string encoder)."""
    from json.encoder import encode_basestring_ascii as enc

    rows = ",\n".join([f'  {{"key": {enc(k)}, "dtype": "{t.dtype}", "shape": {list(t.shape)}, "bytes": {t.nbytes}}}'
                        for k, t in tensors.items()])
    return (json.dumps(head, indent=1)[:-2] + ',\n "tensors": [' + ("\n" + rows if rows else "") + "\n ],"
            + json.dumps(tail, indent=1)[1:])


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a .safetensors file, a *.safetensors.index.json, a folder, or a .bin/.pt"),
    against: Optional[Path] = typer.Option(None, "--against", help="manifest JSON ({tensors: [{key, shape, dtype}]}) to compare with"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="show at most N rows of the table (default: all)"),
):
    """List every tensor (name, dtype, shape, bytes) from the headers only; with --against, the exact differences."""
    from converter.inventory import diff_inventories, load_inventory
    from converter.sources import Source

    try:
        src = Source(path)
        inv = src.inventory() if against is not None else None
        total = sum(t.nbytes for t in src.tensors.values())
        diff = None
        if against is not None:
            diff = diff_inventories(inv, load_inventory(against))
    except UserError as e:
        _fail(e)
    ndiff = sum(len(v) for v in diff.values()) if diff else 0
    if as_json:
        tail = {"count": len(src.tensors), "total_bytes": total}
        if diff is not None:
            tail["against"] = str(against)
            tail["differences"] = diff
        typer.echo(_json_rows({"path": str(path), "files": src.files, "metadata": src.metadata}, src.tensors, tail))
    else:
        typer.echo(_table(f"{literal(path)} — {len(src.tensors)} tensors, {_human(total)}", src.tensors, limit))
        if diff is not None:
            out = [f"against {literal(against)}: {ndiff} difference(s)"]
            out += [f"  missing  {literal(k)}" for k in diff["missing"]]
            out += [f"  extra    {literal(k)}" for k in diff["extra"]]
            out += [f"  shape    {literal(d['key'])}: {d['actual']} vs expected {d['expected']}" for d in diff["shape"]]
            out += [f"  dtype    {literal(d['key'])}: {d['actual']} vs expected {d['expected']}" for d in diff["dtype"]]
            typer.echo("\n".join(out))
    if ndiff:
        first = (diff["missing"] and f"missing {diff['missing'][0]!r}") or (diff["extra"] and f"extra {diff['extra'][0]!r}") \
            or (diff["shape"] and f"shape of {diff['shape'][0]['key']!r} {diff['shape'][0]['actual']} vs {diff['shape'][0]['expected']}") \
            or f"dtype of {diff['dtype'][0]['key']!r} {diff['dtype'][0]['actual']} vs {diff['dtype'][0]['expected']}"
        typer.echo(f"error: {one_line(f'{path}: {ndiff} difference(s) against {against} (first: {first})')}", err=True)
        raise typer.Exit(2)


def _print_partial(partial: list) -> None:
    if partial:
        typer.echo(one_line(f"warning: --allow-partial: {len(partial)} problem(s) against the target inventory, recorded "
                            f"in msconv-manifest.json; first: {partial[0]}"), err=True)


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
    typer.echo("\n".join(literal(line) for line in info["plan"]))
    typer.echo(f"# {len(plan.source_inventory)} source tensors -> {len(plan.targets)} targets, {_human(total)}; "
               f"dropped {len(plan.dropped)}; target inventory: {literal(tdesc)}; dtype {dtype}")
    for r in plan.unused_rules:
        typer.echo(f"# note: {literal(r)} matched nothing")


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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing but warnings and errors"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print the mapping, source and every file written"),
):
    """Convert a PyTorch checkpoint to MindSpore safetensors with a mapping (validated before writing)."""
    from converter.engine import Interrupted, convert_checkpoint

    res = None
    try:
        if quiet and verbose:
            raise UserError("--quiet and --verbose exclude each other")
        if dry_run:
            return _dry_run(src, mapping, target_inventory, config, allow_partial, dtype, as_json)
        if out is None:
            raise UserError("convert needs --out DIR (or --dry-run)")
        progress = None
        bar = None
        if not (as_json or quiet) and sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
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
        _print_converted(res, as_json, quiet, verbose)
    except UserError as e:
        _fail(e)
    except KeyboardInterrupt as e:  # the message says what is under OUT now (engine.Interrupted knows)
        if isinstance(e, Interrupted):
            msg = e.message
        elif res is not None:
            msg = f"interrupted after publishing: {res.out} holds the complete new output"
        else:
            msg = "interrupted before the conversion started; nothing was written"
        typer.echo(f"error: {one_line(msg)}", err=True)
        raise typer.Exit(130)


def _print_converted(res, as_json: bool, quiet: bool, verbose: bool) -> None:
    man = res.manifest
    _print_partial(man.get("partial_problems"))
    if as_json:
        typer.echo(json.dumps({"out": res.out, "files": res.files, "tensors": res.tensors, "bytes": res.bytes,
                               "seconds": round(res.seconds, 3), "bytes_per_s": round(res.bytes_per_s),
                               "target_inventory": man["target_inventory"], "allow_partial": man["allow_partial"],
                               "partial_problems": man["partial_problems"]}, indent=1))
        return
    if quiet:
        return
    if verbose:
        m = man["mapping"]
        typer.echo(f"mapping: {m['name']} ({literal(m['path'])})")
        for f in man["source"]["files"]:
            typer.echo(f"source:  {literal(f['path'])} ({_human(f['size'])}, sha256 {f['sha256'] or 'not computed'})")
        for f in man["shards"]:
            typer.echo(f"wrote:   {f['file']} ({f['tensors']} tensors, {_human(f['size'])})")
        if man.get("dropped"):
            typer.echo(f"dropped: {len(man['dropped'])} source tensor(s) (listed in the manifest)")
    typer.echo(f"wrote {res.tensors} tensors, {_human(res.bytes)} in {res.seconds:.1f} s "
               f"({_human(res.bytes_per_s)}/s) -> {literal(res.out)}; checked against {literal(man['target_inventory'])}")


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
    typer.echo(json.dumps(res, indent=1) if as_json else literal(
               f"{m.name}: ok — {len(inv)} source keys -> {len(plan.targets)} targets, {len(plan.dropped)} dropped; "
               f"target inventory: {tdesc}" + (f"; PARTIAL: {len(partial)} problem(s), first: {partial[0]}" if partial else "")))


@app.command()
def verify(
    out_dir: Path = typer.Argument(..., help="a folder written by msconv convert"),
    as_json: bool = typer.Option(False, "--json"),
    parity: bool = typer.Option(False, "--parity", help="also run torch and MindSpore block by block at the real "
                                                        "config on the converted weights (parity/blockwise.py)"),
    source: Optional[Path] = typer.Option(None, "--source", help="with --parity: the PyTorch checkpoint converted "
                                                                 "(default: the path in msconv-manifest.json)"),
    components: Optional[str] = typer.Option(None, "--components", help="with --parity: comma-separated, of "
                                             "mmdit,vae,dc_ae,t5,clip,flux_ae (default: all in the folder)"),
    tokens: int = typer.Option(256, "--tokens", help="with --parity: MMDiT image tokens per block input (text: "
                                                     "1/4), T5/CLIP sequence length"),
    only: Optional[str] = typer.Option(None, "--only", help="with --parity: comma-separated globs of block names "
                                                            "(embedders, double_blocks.3, single_blocks.*, ...)"),
    report: Optional[Path] = typer.Option(None, "--report", help="with --parity: report folder (default: "
                                                                 "OUT_DIR's sibling <name>-parity-report)"),
    parity_config: Optional[Path] = typer.Option(None, "--config", help="with --parity: the model's config JSON "
                                                 "instead of the recorded one (what shapes cannot tell: heads, groups)"),
):
    """Re-hash every written file/tensor against msconv-manifest.json and check the headers against the model's
    parameter inventory; with --parity, prove the weights numerically, one block at a time."""
    from converter.verify import verify_output

    try:
        v = verify_output(out_dir)
    except UserError as e:
        _fail(e)
    info = {"out": v.out, "files": v.files, "tensors": v.tensors, "bytes": v.bytes, "inventory": v.inventory}
    line = (f"{v.out}: ok — {v.tensors} tensors in {v.files} file(s), {_human(v.bytes)} re-hashed; "
            f"inventory {v.inventory}")
    if not parity:
        typer.echo(json.dumps(info, indent=1) if as_json else line)
        return
    if not as_json:
        typer.echo(line)
    from parity.blockwise import verify_parity

    rdir = report or out_dir.resolve().parent / f"{out_dir.resolve().name}-parity-report"
    try:
        r = verify_parity(out_dir, source=source, components=(components or "").split(",") if components else None,
                          tokens=tokens, only=only.split(",") if only else None, report_dir=rdir,
                          progress=lambda s: typer.echo(s, err=True), config=parity_config)
    except UserError as e:
        _fail(e)
    c = r.report["counts"]
    info["parity"] = {"verdict": r.verdict, "blocks": c["blocks"], "weights_checked": c["weights_checked"],
                      "weights_differ": c["weights_differ"], "first_failure": r.first_failure,
                      "seconds": round(r.seconds, 1), "peak_rss": r.peak_rss, "report": str(r.paths.get("md"))}
    if as_json:
        typer.echo(json.dumps(info, indent=1))
    else:
        typer.echo(f"parity {r.verdict.upper()}: {c['blocks']} block(s), {c['weights_checked']} tensors "
                   f"(= mapped source: {c['weights_checked'] - c['weights_differ']}), {r.seconds / 60:.1f} min, "
                   f"peak RSS {_human(r.peak_rss)}; report {r.paths.get('md')}")
    if r.verdict != "pass":
        typer.echo(f"error: parity FAIL: {r.first_failure}; report {r.paths.get('md')}", err=True)
        raise typer.Exit(2 if r.files_wrong else 1)


@app.command("download-and-convert")
def download_and_convert(
    repo: str = typer.Argument(..., help="Hub repo id (hpcai-tech/Open-Sora-v2, hpcai-tech/Open-Sora-v2-Video-DC-AE) "
                                         "or a local folder laid out like it"),
    revision: str = typer.Option("main", "--revision", help="branch, tag or commit (recorded as the commit sha)"),
    out: Path = typer.Option(Path("msconv-weights"), "--out", "-o", help="output folder (layout: docs/download.md)"),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub endpoint or mirror (default: HF_ENDPOINT "
                                                                    "or https://huggingface.co)"),
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated components (mmdit,vae,t5,clip,...)"),
    with_t2i: bool = typer.Option(False, "--with-t2i", help="also FLUX.1-dev and its AE (text-to-image-to-video)"),
    dtype: str = typer.Option("keep", "--dtype", help="keep | bf16 | fp32 (floating tensors of the output)"),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors | ckpt (ckpt also writes model.ckpt)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list files, sizes and the conversion plan; download nothing"),
    offline: bool = typer.Option(False, "--offline", help="no network: use the Hub cache only"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Hub cache (default: HF_HUB_CACHE)"),
    model_config: Optional[List[str]] = typer.Option(None, "--model-config", help="COMPONENT=FILE.json: the model "
                                                     "config of a checkpoint of another size (repeat)"),
    mapping: Optional[List[str]] = typer.Option(None, "--mapping", help="FILE=MAPPING[:NAME] for a repo without a "
                                                "preset (repeat)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable summary"),
):
    """Download a Hub repo's checkpoints, convert each with its mapping, verify, and write one layout."""
    from converter import hub

    try:
        cfgs = {}
        for spec in model_config or []:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--model-config wants COMPONENT=FILE.json, got {spec!r}")
            cfgs[name] = path
        opts = hub.Options(repo=repo, out=out, revision=revision, endpoint=endpoint, cache_dir=cache_dir,
                           token=None, only=[s for s in only.split(",") if s] if only else None, with_t2i=with_t2i,
                           dtype=dtype, fmt=fmt, offline=offline, dry_run=dry_run, model_configs=cfgs,
                           mappings=mapping or None)
        res = hub.run(opts)
    except UserError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo(f"error: interrupted; finished components stay under {out}, the rest was removed; run again to "
                   "resume", err=True)
        raise typer.Exit(130)
    if dry_run:
        typer.echo(json.dumps({"plan": res.plan}, indent=1) if as_json else "\n".join(res.plan))
        return
    if as_json:
        typer.echo(json.dumps({"out": str(res.out), "repo": res.listing.repo, "sha": res.listing.sha,
                               "made": res.made, "skipped": res.skipped,
                               "manifest": str(res.out / hub.MANIFEST_NAME)}, indent=1))
        return
    for p in res.parts:
        typer.echo(f"{p.comp.name:9s} {'converted' if p.comp.name in res.made else 'up to date':10s} "
                   f"{res.out / p.comp.name}")
    typer.echo(f"weights: {res.out} ({res.listing.where}); manifest {res.out / hub.MANIFEST_NAME}")


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="the text prompt (or --prompt-file)"),
    weights: Path = typer.Option(..., "--weights", "-w", help="folder written by msconv download-and-convert"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="read the prompt from a text file"),
    resolution: str = typer.Option("256px", "--resolution", help="256px | 768px"),
    aspect_ratio: str = typer.Option("16:9", "--aspect-ratio", help="16:9, 9:16, 1:1, 2.39:1, 4:3, ..."),
    num_frames: int = typer.Option(129, "--num-frames", help="4k+1 (a multiple of 4 with --high-compression)"),
    steps: int = typer.Option(50, "--steps"),
    seed: int = typer.Option(42, "--seed", help="noise seed (numpy PCG64; docs/pipeline.md)"),
    cond_type: Optional[str] = typer.Option(None, "--cond-type", help="t2v, i2v_head, i2v_tail, i2v_loop, v2v_head, "
                                                                     "v2v_tail, v2v_head_easy, v2v_tail_easy"),
    ref: Optional[str] = typer.Option(None, "--ref", help="reference IMAGE or VIDEO (i2v_loop: HEAD;TAIL)"),
    motion_score: str = typer.Option("4", "--motion-score"),
    guidance: float = typer.Option(7.5, "--guidance", help="text guidance"),
    guidance_img: float = typer.Option(3.0, "--guidance-img", help="image / condition guidance"),
    negative_prompt: str = typer.Option("", "--negative-prompt"),
    t2i2v: bool = typer.Option(False, "--t2i2v", help="first frame from FLUX.1-dev, then image-to-video"),
    t2i_resolution: str = typer.Option("768px", "--t2i-resolution", help="the T2I stage's bucket (upstream 768px)"),
    high_compression: bool = typer.Option(False, "--high-compression", help="the Video DC-AE model pair"),
    out: Path = typer.Option(Path("sample.mp4"), "--out", "-o", help="output .mp4 (PNG when one frame)"),
    device: str = typer.Option("CPU", "--device", help="CPU | Ascend"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16; default fp32 on CPU, bf16 on Ascend "
                                                              "(bf16 on CPU emulates Ascend's rounding, PyNative)"),
    offload: bool = typer.Option(False, "--offload", help="free the MMDiT before the VAE decode"),
    vae_tile_size: Optional[int] = typer.Option(None, "--vae-tile-size",
                                                help="spatial AE tile in pixels, a multiple of 32 (upstream 256)"),
    noise: Optional[Path] = typer.Option(None, "--noise", help="initial noise from a .safetensors/.npy file"),
    text_embeddings: Optional[Path] = typer.Option(None, "--text-embeddings",
                                                   help="safetensors with txt / y_vec (skips T5 and CLIP)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (sizes, latent, steps, memory); run nothing"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Generate a video (or an image) with the converted Open-Sora 2.0 weights on MindSpore."""
    from opensora_ms.pipeline import api

    try:
        if prompt_file is not None:
            if prompt is not None:
                raise UserError("give the prompt as an argument or --prompt-file, not both")
            if not prompt_file.is_file():
                raise UserError(f"--prompt-file {prompt_file}: no such file")
            prompt = prompt_file.read_text(encoding="utf-8").strip()
        if prompt is None:
            raise UserError("a prompt is required (argument or --prompt-file)")
        req = api.Request(prompt=prompt, weights=str(weights), resolution=resolution, aspect_ratio=aspect_ratio,
                          num_frames=num_frames, steps=steps, seed=seed, cond_type=cond_type, ref=ref,
                          motion_score=motion_score, guidance=guidance, guidance_img=guidance_img,
                          negative_prompt=negative_prompt, t2i2v=t2i2v, t2i_resolution=t2i_resolution,
                          high_compression=high_compression,
                          out=str(out), device=device, dtype=dtype, offload=offload, vae_tile_size=vae_tile_size,
                          noise=str(noise) if noise else None,
                          text_embeddings=str(text_embeddings) if text_embeddings else None)
        if dry_run:
            info = api.make_plan(req)
            if as_json:
                typer.echo(json.dumps(info, indent=1))
            else:
                mem = info["memory"]
                typer.echo(f"prompt: {info['prompt']!r} (negative {info['negative_prompt']!r}); cond {info['cond_type']}"
                           f"{'; t2i2v' if info['t2i2v'] else ''}")
                typer.echo(f"video: {info['num_frames']} frames {info['width']}x{info['height']} @ {info['fps']} fps; "
                           f"latent {info['latent_shape']} ({info['image_tokens']} tokens); {info['steps']} steps, "
                           f"shift alpha {info['shift_alpha']:.4f}; guidance {info['guidance']}/{info['guidance_img']}; "
                           f"seed {info['seed']}")
                if "t2i" in info:
                    t = info["t2i"]
                    typer.echo(f"t2i: FLUX.1-dev {t['width']}x{t['height']}, latent {t['latent_shape']}, "
                               f"guidance {t['guidance']}")
                typer.echo(f"memory estimate: text stage {_human(mem['text_stage'])}, denoise stage "
                           f"{_human(mem['denoise_stage'])}; peak {_human(mem['peak_estimate'])} "
                           f"({device}, {info['dtype']}{', offload' if offload else ''})")
                typer.echo(f"weights: {', '.join(f'{k}={v}' for k, v in info['components'].items())}")
                typer.echo(f"would write {info['out']}")
            return
        bar = None
        if not as_json:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
            tasks = {}

            def progress(stage, done, total):
                if stage not in tasks:
                    tasks[stage] = bar.add_task("denoising" if stage == "video" else "text-to-image", total=total)
                bar.update(tasks[stage], completed=done)
        try:
            if bar is not None:
                bar.start()
            res = api.generate(req, progress=progress if bar is not None else None)
        finally:
            if bar is not None:
                bar.stop()
    except UserError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; no output was written", err=True)
        raise typer.Exit(130)
    per_step = sum(res.step_seconds) / max(len(res.step_seconds), 1)
    if as_json:
        typer.echo(json.dumps({"out": str(res.path), "image": str(res.image_path) if res.image_path else None,
                               "seconds": round(res.seconds, 3), "seconds_per_step": round(per_step, 4),
                               "peak_rss_bytes": res.peak_rss_bytes, "plan": res.plan}, indent=1))
    else:
        t, h, w, _ = res.video.shape
        extra = f"; first frame {res.image_path}" if res.image_path else ""
        typer.echo(f"wrote {res.path} ({t} frame{'s' if t > 1 else ''}, {w}x{h}{f', {req.fps} fps' if t > 1 else ''}) "
                   f"in {res.seconds:.1f} s; {per_step:.3f} s per step; peak RSS {_human(res.peak_rss_bytes)}{extra}")


def _demo_parity(snapshot: Path, weights: Path, out: Path, step) -> list:
    """Each converted component against the torch reference: a case dumped from the downloaded upstream files,
    replayed on MindSpore layer by layer (report.html), and the converted files compared with the mapping
    applied to those weights (so the verdict is about the files on disk)."""
    import html

    import numpy as np
    import transformers
    from safetensors.torch import save_file

    from converter.mapping import load_mapping
    from converter.sources import load_file
    from parity import engine
    from parity.report import summary_line
    from parity import synthetic_repo as S

    transformers.logging.set_verbosity_error()

    def encoder(cls, folder, dst):  # upstream's HFEmbedder loads the encoder out of the Hub folder
        sd = {k: v.detach().clone().contiguous() for k, v in cls.from_pretrained(str(folder)).state_dict().items()}
        save_file(sd, str(dst))
        return dst

    cases = out / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    jobs = [("mmdit", "mmdit", S.MMDIT, lambda: snapshot / "Open_Sora_v2.safetensors"),
            ("vae", "hunyuan_vae", S.VAE, lambda: snapshot / "hunyuan_vae.safetensors"),
            ("t5", "t5", S.T5, lambda: encoder(transformers.T5EncoderModel, snapshot / "google/t5-v1_1-xxl",
                                               cases / "t5.upstream.safetensors")),
            ("clip", "clip", S.CLIP_TEXT, lambda: encoder(transformers.CLIPTextModel,
                                                          snapshot / "openai/clip-vit-large-patch14",
                                                          cases / "clip.upstream.safetensors")),
            ("flux", "mmdit", S.FLUX, lambda: snapshot / "flux1-dev.safetensors"),
            ("flux_ae", "flux_ae", S.FLUX_AE, lambda: snapshot / "flux1-dev-ae.safetensors")]
    rows = []
    for comp, adapter, cfg, src in jobs:
        step(f"parity {comp}: torch reference dump, MindSpore replay ...")
        prefix = engine.dump(adapter, cfg, cases / comp, weights=src())
        rep = engine.replay(prefix, engine.ReplayOptions(framework="mindspore", mode="free", report_dir=out / comp))
        rec = json.loads((weights / comp / "msconv-manifest.json").read_text())
        want = load_mapping(rec["mapping"]["name"]).convert(load_file(f"{prefix}.weights.safetensors"))
        got = load_file(weights / comp)
        f32 = lambda v: v.to_float32() if hasattr(v, "to_float32") else v  # noqa: E731
        same = sorted(got) == sorted(want) and all(np.array_equal(f32(got[k]), f32(want[k])) for k in want)
        verdict = "= mapped Hub weights" if same else "DIFFER from the mapped Hub weights"
        line = f"{summary_line(rep)} | converted files {verdict}"
        rows.append((comp, rep["verdict"] == "pass" and same, line, out / comp / "report.html"))
        step(line)
    items = "".join(f'<li><a href="{c}/report.html">{c}</a>: <code>{html.escape(l)}</code></li>' for c, _, l, _ in rows)
    (out / "index.html").write_text(f"<!doctype html><meta charset=utf-8><title>msconv demo parity</title>"
                                    f"<h1>msconv demo: converted weights vs the torch reference</h1><ul>{items}</ul>\n")
    return rows


@app.command()
def demo(
    out: Path = typer.Option(Path("msconv-demo"), "--out", "-o", help="where the synthetic hub, the converted "
                                                                      "weights, the parity reports and the video go"),
):
    """No network: build a tiny synthetic hpcai-tech/Open-Sora-v2, serve it on 127.0.0.1, run download-and-convert,
    check every converted model against the torch reference, and generate a short video with the weights."""
    import shutil
    import time

    from converter import hub
    from converter.hub_server import HubServer, Repo
    from parity import synthetic_repo

    t0 = time.perf_counter()

    def step(msg: str) -> None:
        typer.echo(f"[{time.perf_counter() - t0:6.1f} s] {msg}", err=True)

    out = out.resolve()
    try:
        step(f"building the tiny synthetic {synthetic_repo.REPO_ID} (same files and key names, tiny shapes) ...")
        repo_dir = out / "hub" / synthetic_repo.REPO_ID
        shutil.rmtree(out / "hub", ignore_errors=True)
        synthetic_repo.build(repo_dir)
        cfgs = synthetic_repo.write_model_configs(out / "model-configs")
        with HubServer([Repo.from_folder(synthetic_repo.REPO_ID, repo_dir)]) as server:
            step(f"serving it at {server.url}; msconv download-and-convert {synthetic_repo.REPO_ID} --with-t2i ...")
            res = hub.run(hub.Options(repo=synthetic_repo.REPO_ID, out=out / "weights", endpoint=server.url,
                                      cache_dir=out / "hf-cache", with_t2i=True, model_configs=cfgs))
        snapshot = hub._storage(out / "hf-cache", synthetic_repo.REPO_ID) / "snapshots" / res.listing.sha
        rows = _demo_parity(snapshot, res.out, out / "parity", step)
        from opensora_ms.pipeline import api

        step("msconv generate 'a red fox running in snow' --weights weights/ (MindSpore, 9 frames 256x256, "
             "6 steps) ...")
        video = api.generate(api.Request(prompt="a red fox running in snow", weights=str(res.out), aspect_ratio="1:1",
                                         num_frames=9, steps=6, seed=42, out=str(out / "video.mp4")),
                             progress=lambda stage, i, n: step(f"denoising step {i}/{n}"))
    except UserError as e:
        _fail(e)
    ok = all(r[1] for r in rows)
    t, h, w, _ = video.video.shape
    typer.echo(f"weights: {res.out} (manifest {res.out / hub.MANIFEST_NAME})")
    typer.echo(f"parity:  {out / 'parity' / 'index.html'} ({sum(r[1] for r in rows)}/{len(rows)} components pass)")
    typer.echo(f"video:   {video.path} ({t} frames, {w}x{h}, generated in {video.seconds:.0f} s)")
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f} s")
    if not ok:
        typer.echo(f"error: parity FAIL for {', '.join(r[0] for r in rows if not r[1])}; see {out / 'parity'}",
                   err=True)
        raise typer.Exit(1)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
