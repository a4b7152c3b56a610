"""`msconv download-and-convert`: a Hub repo id (or a local folder laid out like one) -> converted, verified
MindSpore weights in one layout (docs/download.md, the contract with `msconv generate --weights DIR`).

Why it is built this way:
* everything that can fail before writing does fail before writing: the revision, the file list, the disk space,
  every download and its hash, and every component's fit to its model config are settled first, so a 404, a 401,
  a dead server or a corrupt file leaves no output at all;
* each component is converted into `OUT/.msconv-staging/`, verified there, and renamed to `OUT/<component>/`: a
  component folder is complete and verified or absent; `OUT/msconv-manifest.json` is written last;
* `OUT/<component>/msconv-download.json` records which Hub files (by hash), mapping, dtype, format and config made
  the component, so a re-run skips (and does not even download) what is already done and still verifies;
* downloads go through huggingface_hub's own cache (`snapshot_download` with `allow_patterns`), so mirrors
  (`HF_ENDPOINT`), tokens (`HF_TOKEN`), offline mode and resumption behave as users expect from the Hub.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MappingError, OutputError, UserError

MANIFEST_NAME = "msconv-manifest.json"
RECORD_NAME = "msconv-download.json"
STAGING = ".msconv-staging"
DEFAULT_ENDPOINT = "https://huggingface.co"
READ = 8 << 20


class HubError(UserError):
    """The repo, a revision, a file or the network is not what the download needs (exit 2, one line)."""


@dataclass(frozen=True)
class Component:
    """One output folder: a file or an HF folder (path ends with '/') of the repo, converted with `mapping`."""

    name: str
    path: str
    mapping: str
    t2i: bool = False

    @property
    def is_folder(self) -> bool:
        return self.path.endswith("/")


# One row per repo: file -> mapping; the model config is the real one in mappings/targets/<mapping>.json.
PRESETS: dict[str, tuple[Component, ...]] = {
    "hpcai-tech/Open-Sora-v2": (
        Component("mmdit", "Open_Sora_v2.safetensors", "mmdit_opensora_v2"),
        Component("vae", "hunyuan_vae.safetensors", "hunyuan_vae"),
        Component("t5", "google/t5-v1_1-xxl/", "t5_encoder"),
        Component("clip", "openai/clip-vit-large-patch14/", "clip_text"),
        Component("flux", "flux1-dev.safetensors", "mmdit_flux_dev", t2i=True),
        Component("flux_ae", "flux1-dev-ae.safetensors", "flux_ae", t2i=True),
    ),
    "hpcai-tech/Open-Sora-v2-Video-DC-AE": (
        Component("mmdit_hc", "Open_Sora_v2_Video_DC_AE.safetensors", "mmdit_opensora_v2_hc"),
        Component("dc_ae", "F32T4C128_AE.safetensors", "video_dc_ae"),
    ),
}

# mapping target.model -> (config.json key / config class, default component name for --mapping)
MODELS = {"mmdit": ("MMDiTConfig", "mmdit"), "hunyuan_vae": ("AutoEncoder3DConfig", "vae"),
          "flux_ae": ("AutoEncoderConfig", "flux_ae"), "dc_ae": ("DCAEConfig", "dc_ae"),
          "t5": ("T5Config", "t5"), "clip": ("CLIPTextConfig", "clip")}
HF_MODELS = {"t5", "clip"}  # configured by the Hub folder's config.json
EXTRA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "spiece.model", "vocab.json", "merges.txt", "generation_config.json")
PATH_FIELDS = ("from_pretrained", "cache_dir", "pretrained_path")  # where upstream loaded from: not architecture


# -- the repo's files ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None   # LFS files: the content's sha256 (the Hub's ETag)
    blob_id: str | None = None  # the git blob id (sha1 of "blob <size>\0" + content for non-LFS files)

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else f"git:{self.blob_id}"


@dataclass
class Listing:
    repo: str
    revision: str | None
    sha: str | None             # the commit (None for a local folder)
    endpoint: str | None
    files: dict                 # path -> RemoteFile
    local: Path | None = None   # REPO given as a folder

    @property
    def where(self) -> str:
        return str(self.local) if self.local else f"{self.repo}@{(self.sha or '?')[:12]}"


def _sha256_file(path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(READ), b""):
            h.update(b)
            if progress:
                progress(len(b))
    return h.hexdigest()


def git_blob_id(path) -> str:
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(READ), b""):
            h.update(b)
    return h.hexdigest()


def is_local_repo(repo: str) -> bool:
    return os.path.isdir(repo)


def list_local(folder) -> Listing:
    """A folder laid out like the Hub repo; files are hashed later, only those a component uses (hash_local)."""
    root = Path(folder).resolve()
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            files[rel] = RemoteFile(rel, p.stat().st_size)
    return Listing(str(root), None, None, None, files, local=root)


def hash_local(listing: Listing, paths, rep) -> None:
    todo = [p for p in sorted(set(paths)) if listing.files[p].sha256 is None]
    total = sum(listing.files[p].size for p in todo)
    if todo:
        rep.say(f"hashing {len(todo)} file(s) ({_human(total)}) of {listing.local} ...")
    for p in todo:
        f = listing.files[p]
        listing.files[p] = RemoteFile(p, f.size, _sha256_file(listing.local / p))


def list_remote(repo: str, revision: str, endpoint: str, token, offline: bool, cache_dir) -> Listing:
    """Resolve `revision` to a commit and list the repo's files with sizes and hashes (from the cache if offline)."""
    if offline:
        from huggingface_hub import get_cached_repo_tree

        sha = revision if _is_sha(revision) else _cached_ref(cache_dir, repo, revision)
        if sha is None:
            raise HubError(f"{repo}: revision {revision!r} is not in the Hub cache ({cache_dir}) and --offline "
                           "forbids asking the Hub; run once online")
        files = _cached_tree_lfs(cache_dir, repo, sha)
        if files is None:
            try:
                tree = get_cached_repo_tree(repo, revision=sha, cache_dir=cache_dir)
            except Exception as e:
                raise HubError(f"{repo}@{sha[:12]}: no cached file list in {cache_dir} ({e.__class__.__name__}); run "
                               "once online") from None
            files = {f.path: RemoteFile(f.path, f.size, f.lfs.sha256 if f.lfs else None, f.blob_id) for f in tree}
        return Listing(repo, revision, sha, endpoint, files)
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:
        raise hub_error(e, repo, revision, endpoint) from None
    if not info.sha:
        raise HubError(f"{endpoint}: the answer for {repo}@{revision} names no commit sha (not a Hub endpoint?)")
    files = {s.rfilename: RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, s.blob_id)
             for s in info.siblings or []}
    return Listing(repo, revision, info.sha, endpoint, files)


def _cached_tree_lfs(cache_dir, repo: str, sha: str) -> dict | None:
    """The file list snapshot_download cached for `sha` (trees/<sha>.json), with the LFS sha256 that
    `get_cached_repo_tree` leaves out; None if absent or in another format."""
    d = _read_json(_storage(cache_dir, repo) / "trees" / f"{sha}.json")
    if not isinstance(d, dict) or d.get("format_version") != 1 or not isinstance(d.get("files"), dict):
        return None
    try:
        return {p: RemoteFile(p, int(e["size"]), e.get("lfs_sha256"), e.get("blob_id")) for p, e in d["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _is_sha(rev: str) -> bool:
    return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


def _storage(cache_dir, repo: str) -> Path:
    return Path(cache_dir) / ("models--" + repo.replace("/", "--"))


def _cached_ref(cache_dir, repo: str, revision: str) -> str | None:
    p = _storage(cache_dir, repo) / "refs" / revision
    return p.read_text().strip() if p.is_file() else None


def default_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_error(e: BaseException, repo: str, revision: str | None, endpoint: str | None) -> UserError:
    """One line for what huggingface_hub (or the network) raised; the most specific error in the chain wins."""
    from huggingface_hub import errors as E

    chain, x = [], e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    names = {type(x).__name__ for x in chain}
    at = f"{repo}@{revision}" if revision else repo

    def status(x):
        r = getattr(x, "response", None)
        return getattr(r, "status_code", None)

    for x in chain:
        if isinstance(x, E.GatedRepoError):
            return HubError(f"{repo} is gated (HTTP {status(x)}): accept its terms on the Hub, then set HF_TOKEN "
                            "to a token of that account")
        if isinstance(x, E.RevisionNotFoundError):
            return HubError(f"{repo}: revision {revision!r} not found on {endpoint} (HTTP {status(x)})")
        remote_missing = getattr(E, "RemoteEntryNotFoundError", E.EntryNotFoundError)
        if isinstance(x, remote_missing) and not isinstance(x, E.LocalEntryNotFoundError):
            url = str(getattr(getattr(x, "response", None), "url", "") or "")
            f = url.split("/resolve/", 1)[-1].split("/", 1)[-1] if "/resolve/" in url else "?"
            return HubError(f"{at}: file {f!r} not found on {endpoint} (HTTP {status(x)})")
        if isinstance(x, E.RepositoryNotFoundError):
            return HubError(f"{repo}: repository not found on {endpoint} (HTTP {status(x)}); if it is private, set "
                            "HF_TOKEN")
    for x in chain:
        if type(x).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "ConnectionError",
                                "RemoteProtocolError", "ReadError") or isinstance(x, ConnectionError):
            return HubError(f"cannot reach {endpoint} ({type(x).__name__}: {_short(x)}): check the network or "
                            "--endpoint / HF_ENDPOINT, or use --offline with a filled cache")
        if isinstance(x, E.HfHubHTTPError) and status(x):
            return HubError(f"{endpoint}: HTTP {status(x)} for {at} ({_short(x)})")
        if isinstance(x, (E.OfflineModeIsEnabled, E.LocalEntryNotFoundError)) or "IncompleteSnapshotError" in names:
            return HubError(f"{at}: not (completely) in the Hub cache and the Hub cannot be asked ({_short(x)})")
        if isinstance(x, OSError) and "Consistency check failed" in str(x):
            return HubError(f"{at}: a download ended short ({_short(x)}); run the same command again to resume")
    return HubError(f"{at}: download failed ({type(e).__name__}: {_short(e)})")


def _short(e, n: int = 200) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


# -- the plan ------------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One component to make: the repo files it reads, what is copied beside it, its model and config."""

    comp: Component
    model: str
    config_name: str
    weights: list            # repo paths
    extras: list             # repo paths (config/tokenizer files of an HF folder)
    config: dict | None      # None: read from the HF folder's config.json once downloaded
    config_from: str         # where the config comes from (for messages)
    status: str = "todo"     # todo | done
    reason: str = ""

    @property
    def files(self) -> list:
        return self.weights + self.extras

    def key(self, listing: Listing, mapping_sha: str | None, dtype: str, fmt: str) -> dict:
        """What makes a component folder current: same Hub files (by hash), mapping, dtype, format, config."""
        return {"files": {p: listing.files[p].digest for p in self.files}, "mapping": self.comp.mapping,
                "mapping_sha256": mapping_sha, "dtype": dtype, "format": fmt, "config": self.config}


def _folder_files(listing: Listing, comp: Component) -> tuple[list, list]:
    pre = comp.path
    inside = {p[len(pre):]: p for p in listing.files if p.startswith(pre) and "/" not in p[len(pre):]}
    st = sorted(p for n, p in inside.items() if n.endswith(".safetensors"))
    idx = [p for n, p in inside.items() if n.endswith(".safetensors.index.json")]
    if not st:
        st = sorted(p for n, p in inside.items() if n.endswith(".bin"))
        idx = [p for n, p in inside.items() if n.endswith(".bin.index.json")]
    if not st:
        raise HubError(f"{listing.where}: folder {pre!r} (component {comp.name}) holds no *.safetensors or *.bin "
                       f"weights ({len(inside)} file(s): {', '.join(sorted(inside)[:5])})")
    extras = [p for n, p in sorted(inside.items()) if n in EXTRA_FILES]
    return sorted(idx) + st, extras


def _mapping_info(name: str):
    from .mapping import load_mapping

    m = load_mapping(name)
    model = m.target.get("model")
    if model not in MODELS:
        raise MappingError(f"mapping {name}: target model {model!r} is not one download-and-convert can configure "
                           f"({', '.join(sorted(MODELS))})")
    return m, model


def real_config(mapping) -> dict | None:
    """The real checkpoint's model config recorded in the mapping's target inventory file (minus load paths)."""
    inv = mapping.target.get("inventory")
    if not inv or not mapping.path:
        return None
    p = Path(mapping.path).parent / inv
    try:
        d = json.loads(p.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError):
        return None
    return {k: v for k, v in d.items() if k not in PATH_FIELDS} if isinstance(d, dict) else None


def read_model_config(path, config_name: str) -> dict:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HubError(f"--model-config: {p}: no such file") from None
    except (OSError, ValueError) as e:
        raise HubError(f"--model-config: {p}: not valid JSON ({_short(e)})") from None
    if isinstance(d, dict) and isinstance(d.get(config_name), dict):
        d = d[config_name]
    if not isinstance(d, dict):
        raise HubError(f"--model-config: {p}: expected a JSON object (the {config_name} fields)")
    return {k: v for k, v in d.items() if k not in PATH_FIELDS}


def components_for(repo: str, with_t2i: bool, only: list | None, mappings: list | None) -> list[Component]:
    """The preset's components (or the --mapping ones), filtered by --only."""
    if mappings:
        comps = []
        for spec in mappings:
            f, sep, m = spec.partition("=")
            if not sep or not f or not m:
                raise UserError(f"--mapping wants FILE=MAPPING[:NAME], got {spec!r}")
            m, _, name = m.partition(":")
            if not name:
                _, model = _mapping_info(m)
                name = MODELS[model][1]
            if any(c.name == name for c in comps):
                raise UserError(f"--mapping: two files make component {name!r}; name them with FILE=MAPPING:NAME")
            comps.append(Component(name, f, m))
    else:
        key = next((k for k in PRESETS if k.lower() == repo.lower()), None)
        if key is None:
            raise UserError(f"{repo}: no preset for this repo (presets: {', '.join(PRESETS)}); pass --mapping "
                            "FILE=MAPPING for each file to convert")
        comps = [c for c in PRESETS[key] if with_t2i or not c.t2i or (only and c.name in only)]
    if only:
        known = {c.name for c in (comps if mappings else PRESETS.get(_preset_key(repo), comps))}
        bad = [o for o in only if o not in known]
        if bad:
            raise UserError(f"--only: unknown component(s) {', '.join(bad)} "
                            f"(this repo has: {', '.join(sorted(known))})")
        comps = [c for c in comps if c.name in only]
    return comps


def _preset_key(repo: str):
    return next((k for k in PRESETS if k.lower() == repo.lower()), None)


def plan_parts(listing: Listing, comps: list[Component], model_configs: dict) -> list[Part]:
    parts = []
    for c in comps:
        m, model = _mapping_info(c.mapping)
        cname = MODELS[model][0]
        comp = c
        if not c.is_folder and c.path not in listing.files and any(p.startswith(c.path + "/") for p in listing.files):
            comp = Component(c.name, c.path + "/", c.mapping, c.t2i)
        if comp.is_folder:
            weights, extras = _folder_files(listing, comp)
        else:
            if comp.path not in listing.files:
                raise HubError(f"{listing.where}: no file {comp.path!r} (component {comp.name}); the repo has "
                               f"{len(listing.files)} file(s): {', '.join(sorted(listing.files)[:6])}")
            weights, extras = [comp.path], []
        if comp.name in model_configs:
            cfg, src = read_model_config(model_configs[comp.name], cname), str(model_configs[comp.name])
        elif model in HF_MODELS and comp.is_folder:
            if comp.path + "config.json" not in listing.files:
                raise HubError(f"{listing.where}: folder {comp.path!r} (component {comp.name}) has no config.json")
            cfg, src = None, comp.path + "config.json"
        else:
            cfg, src = real_config(m), f"mappings/targets/{Path(m.target.get('inventory') or '?').name}"
            if cfg is None:
                raise HubError(f"component {comp.name}: no model config known for mapping {m.name}; pass "
                               f"--model-config {comp.name}=FILE.json")
        parts.append(Part(comp, model, cname, weights, extras, cfg, src))
    return parts


# -- checks of an existing component ------------------------------------------------------------------------
def _read_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(folder: Path, key: dict, deep: bool = True) -> str | None:
    """None if `folder` was made from exactly `key` and (deep) still verifies; else why not."""
    rec = _read_json(folder / RECORD_NAME)
    if not isinstance(rec, dict):
        return "no record" if folder.exists() else "absent"
    if rec.get("key") != key:
        return "made from other files, mapping, dtype, format or config"
    if not deep:
        return None
    from .verify import verify_output

    try:
        verify_output(folder)
    except UserError as e:
        return f"does not verify ({_short(e, 160)})"
    for f in rec.get("copied", []):
        p = folder / f["name"]
        if not p.is_file() or _sha256_file(p) != f["sha256"]:
            return f"{f['name']} changed"
    return None


# -- reporting -----------------------------------------------------------------------------------------------
class Reporter:
    """Status lines on stderr; byte progress bars (rich) when stderr is a terminal."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)

    @contextmanager
    def bar(self, desc: str, total: int):
        if self.quiet or not self.tty:
            yield lambda done, total=None: None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        p = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                     TimeRemainingColumn(), transient=True)
        p.start()
        t = p.add_task(desc, total=total or None)
        try:
            yield lambda done, total=None: p.update(t, completed=done, **({"total": total} if total else {}))
        finally:
            p.stop()


# -- the run -------------------------------------------------------------------------------------------------
@dataclass
class Options:
    repo: str
    out: Path
    revision: str = "main"
    endpoint: str | None = None
    cache_dir: str | None = None
    token: str | None = None
    only: list | None = None
    with_t2i: bool = False
    dtype: str = "keep"
    fmt: str = "safetensors"
    offline: bool = False
    dry_run: bool = False
    model_configs: dict = field(default_factory=dict)   # component -> path
    mappings: list | None = None                        # ["FILE=MAPPING[:NAME]", ...]


@dataclass
class Outcome:
    out: Path
    listing: Listing
    parts: list
    made: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    plan: list = field(default_factory=list)    # --dry-run lines


def _human(n: float) -> str:
    for u in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or u == "TB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
        n /= 1000
    return str(n)


def _factor(dtype: str, fmt: str, src_bytes_per_elem: float = 2.0) -> float:
    """Output bytes per source byte, before any header is read: an upper bound for --dtype fp32 (bf16 sources,
    the rule for the big checkpoints, double); the converter checks the exact need again before writing."""
    want = {"bf16": 2, "fp16": 2, "fp32": 4}.get(dtype)
    f = 1.0 if want is None else want / src_bytes_per_elem
    return f * (2 if fmt == "ckpt" else 1)


def _check_options(o: Options) -> None:
    from .engine import _check_options as conv_check

    conv_check(o.dtype, o.fmt, "5GB")
    if o.dtype not in ("keep", "bf16", "fp32"):
        raise UserError(f"--dtype must be keep, bf16 or fp32, got {o.dtype!r}")


@contextmanager
def _out_lock(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    lockf = out.parent / f".{out.name}.msconv-download-lock"
    fd = os.open(lockf, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"{out}: another msconv download-and-convert is writing this folder") from None
        yield
    finally:
        os.close(fd)
        try:
            os.unlink(lockf)
        except OSError:
            pass


def _check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir():
        entries = [p for p in out.iterdir() if p.name != STAGING]
        ours = (out / MANIFEST_NAME).is_file() or any((p / RECORD_NAME).is_file() for p in entries if p.is_dir())
        if entries and not ours:
            raise OutputError(f"{out}: refusing to write into a folder that is not an msconv download output "
                              f"(no {MANIFEST_NAME}); choose another --out")


def run(o: Options, rep: Reporter | None = None) -> Outcome:
    """Plan, download, check, convert, verify and publish (see the module docstring)."""
    rep = rep or Reporter()
    _check_options(o)
    out = Path(o.out).resolve()
    endpoint = (o.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    cache_dir = os.fspath(o.cache_dir or default_cache_dir())
    offline = o.offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    local = is_local_repo(o.repo)
    if not local and (o.repo.startswith(("/", "./", "../", "~")) or o.repo.count("/") != 1):
        raise UserError(f"{o.repo}: neither a folder nor a Hub repo id (ORG/NAME)")
    comps = components_for(o.repo if not local else _local_preset(o.repo), o.with_t2i, o.only, o.mappings)
    if local:
        listing = list_local(o.repo)
    else:
        listing = list_remote(o.repo, o.revision, endpoint, o.token, offline, cache_dir)
    rep.say(f"{listing.where}: {len(listing.files)} file(s); making {', '.join(c.name for c in comps)}")
    parts = plan_parts(listing, comps, o.model_configs)
    if local:
        hash_local(listing, [f for p in parts for f in p.files], rep)
    msha = {p.comp.mapping: _mapping_sha(p.comp.mapping) for p in parts}
    for p in parts:
        why = is_current(out / p.comp.name, p.key(listing, msha[p.comp.mapping], o.dtype, o.fmt), deep=not o.dry_run)
        p.status, p.reason = ("done", "") if why is None else ("todo", why)
    todo = [p for p in parts if p.status == "todo"]
    need_files = sorted({f for p in todo for f in p.files})
    dl_bytes = 0 if local else sum(listing.files[f].size for f in need_files if not _in_cache(cache_dir, listing, f))
    out_bytes = int(sum(listing.files[f].size for p in todo for f in p.weights) * _factor(o.dtype, o.fmt))
    outcome = Outcome(out, listing, parts)
    if o.dry_run:
        outcome.plan = _describe(listing, parts, out, dl_bytes, out_bytes, o)
        return outcome
    if not todo:
        rep.say(f"{out}: every component is up to date and verifies")
    else:
        _check_disk(cache_dir, out, dl_bytes if not local else 0, out_bytes)
    _check_out_folder(out)
    root = listing.local
    if todo and not local:
        root = _download(listing, need_files, o, endpoint, cache_dir, offline, rep)
    if local:  # hashed just now by hash_local; nothing to compare with
        sha = {f: listing.files[f].sha256 for f in need_files}
    else:
        sha = _check_files(listing, root, need_files, rep) if todo else {}
    ready = [_prepare(p, listing, root) for p in todo]
    with _out_lock(out):  # from here on OUT is written
        _check_out_folder(out)
        for p in parts:
            if p.status == "done":
                outcome.skipped.append(p.comp.name)
                rep.say(f"{p.comp.name}: up to date ({out / p.comp.name})")
        stage_root = out / STAGING
        if todo:
            shutil.rmtree(stage_root, ignore_errors=True)
            stage_root.mkdir(parents=True)
        try:
            for p, (src, cfg) in zip(todo, ready):
                _make(p, src, cfg, listing, root, sha, stage_root, out, o, msha[p.comp.mapping], rep)
                outcome.made.append(p.comp.name)
        finally:
            shutil.rmtree(stage_root, ignore_errors=True)
        outcome.manifest = _write_manifest(out, listing, parts, o, endpoint)
    return outcome


def _local_preset(folder: str) -> str:
    """A local folder uses the preset whose files it holds (the first that fits)."""
    for repo, comps in PRESETS.items():
        if all(os.path.exists(os.path.join(folder, c.path)) for c in comps if not c.t2i):
            return repo
    return folder


def _mapping_sha(name: str) -> str | None:
    from .mapping import load_mapping

    p = load_mapping(name).path
    return _sha256_file(p) if p and os.path.isfile(p) else None


def _in_cache(cache_dir, listing: Listing, path: str) -> bool:
    f = listing.files[path]
    etag = f.sha256 or f.blob_id
    return bool(etag) and (_storage(cache_dir, listing.repo) / "blobs" / etag).is_file()


def _check_disk(cache_dir, out: Path, dl: int, conv: int) -> None:
    def probe(p: Path) -> Path:
        p = Path(p).resolve()
        while not p.exists():
            p = p.parent
        return p

    c, d = probe(Path(cache_dir)), probe(out)
    same = os.stat(c).st_dev == os.stat(d).st_dev
    needs = [(c, dl + (conv if same else 0)), (d, 0 if same else conv)]
    for where, need in needs:
        free = shutil.disk_usage(where).free
        if need and free < need:
            raise OutputError(f"not enough disk space under {where}: needs {_human(need)} (download {_human(dl)} to "
                              f"{cache_dir}, converted {_human(conv)} to {out}), {_human(free)} free")


def _describe(listing: Listing, parts: list, out: Path, dl: int, conv: int, o: Options) -> list[str]:
    lines = [f"# {listing.where} (revision {o.revision}) -> {out}"]
    for p in parts:
        size = sum(listing.files[f].size for f in p.weights)
        lines.append(f"{p.comp.name:9s} {p.status:5s} {p.comp.path} -> mapping {p.comp.mapping} -> {out / p.comp.name}"
                     f"  ({len(p.weights)} weight file(s), {_human(size)}; config: {p.config_from})"
                     + (f"  [{p.reason}]" if p.status == "todo" and p.reason not in ("absent", "") else ""))
        for f in p.files:
            lines.append(f"    {listing.files[f].size:>14d}  {f}")
    lines.append(f"# to download: {_human(dl)}; converted output: about {_human(conv)} (dtype {o.dtype}, format "
                 f"{o.fmt})")
    return lines


def _download(listing: Listing, files: list, o: Options, endpoint: str, cache_dir, offline: bool, rep) -> Path:
    from huggingface_hub import snapshot_download

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    rep.say(f"downloading {len(files)} file(s) from {endpoint if not offline else 'the Hub cache'} ...")
    if not offline:
        _clean_stale_partials(cache_dir, listing.repo)
    quiet = not rep.tty and not are_progress_bars_disabled()   # tqdm bars are noise in a log
    if quiet:
        disable_progress_bars()
    try:
        folder = snapshot_download(listing.repo, revision=listing.sha, allow_patterns=files, endpoint=endpoint,
                                   cache_dir=cache_dir, token=o.token, local_files_only=offline)
    except Exception as e:
        raise hub_error(e, listing.repo, listing.sha, endpoint) from None
    finally:
        if quiet:
            enable_progress_bars()
    if listing.revision and listing.revision != listing.sha:  # so that --offline --revision <branch> finds it
        ref = _storage(cache_dir, listing.repo) / "refs" / listing.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(ref.name + ".msconv-tmp")
        tmp.write_text(listing.sha)
        os.replace(tmp, ref)
    root = Path(folder)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise HubError(f"{listing.where}: {len(missing)} file(s) missing after the download: {', '.join(missing[:3])}")
    return root


def _clean_stale_partials(cache_dir, repo: str) -> None:
    """Remove the partial files a killed download left in the cache (huggingface_hub names each attempt uniquely
    and restarts a file cut mid-way, so they would only take space): those whose blob lock nobody holds."""
    blobs = _storage(cache_dir, repo) / "blobs"
    locks = Path(cache_dir) / ".locks" / _storage(cache_dir, repo).name
    for part in blobs.glob("*.incomplete") if blobs.is_dir() else []:
        lock = locks / (part.name.split(".", 1)[0] + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            part.unlink()
        except OSError:
            pass  # a live download holds it
        finally:
            if fd is not None:
                os.close(fd)


def _check_files(listing: Listing, root: Path, files: list, rep) -> dict:
    """sha256 of every file used, compared with the Hub's hashes; a bad copy is removed from the cache."""
    total = sum(listing.files[f].size for f in files)
    out, done = {}, 0
    rep.say(f"checking {len(files)} file(s) ({_human(total)}) against the hashes of {listing.where} ...")
    with rep.bar("checking", total) as bar:
        for f in files:
            p = root / f
            rf = listing.files[f]

            seen = [done]

            def adv(n):
                seen[0] += n
                bar(seen[0])

            got = _sha256_file(p, adv)
            done += rf.size
            bad = None
            if p.stat().st_size != rf.size:
                bad = f"{p.stat().st_size} bytes, the Hub lists {rf.size}"
            elif rf.sha256 and got != rf.sha256:
                bad = f"sha256 {got[:16]}... differs from the Hub's {rf.sha256[:16]}..."
            elif not rf.sha256 and rf.blob_id and listing.local is None and git_blob_id(p) != rf.blob_id:
                bad = f"git blob id differs from the Hub's {rf.blob_id[:12]}..."
            if bad:
                if listing.local is None:
                    _evict(p)
                raise HubError(f"{listing.where}: {f}: {bad}; the bad copy was removed from the cache, run again to "
                               "download it anew")
            out[f] = got
    return out


def _evict(p: Path) -> None:
    try:
        blob = p.resolve()
        p.unlink()
        if blob != p and blob.is_file():
            blob.unlink()
    except OSError:
        pass


def _hf_text_config(d: dict, model: str) -> dict:
    """The model config inside an HF config.json: CLIP's text tower lives under text_config."""
    if model == "clip" and isinstance(d.get("text_config"), dict):
        return dict(d["text_config"])
    return d


def _source_path(p: Part, root: Path) -> Path:
    if not p.comp.is_folder:
        return root / p.weights[0]
    idx = [w for w in p.weights if w.endswith(".index.json") and w.endswith("safetensors.index.json")]
    if idx:
        return root / idx[0]
    if len(p.weights) == 1:
        return root / p.weights[0]
    return root / p.comp.path.rstrip("/")


def _prepare(p: Part, listing: Listing, root: Path):
    """Source path and model config of a part, checked against the model's parameter inventory before anything
    is written (a checkpoint of another size needs --model-config)."""
    from .engine import plan_checkpoint

    src = _source_path(p, root)
    cfg = p.config
    if cfg is None:
        d = _read_json(root / (p.comp.path + "config.json"))
        if not isinstance(d, dict):
            raise HubError(f"{listing.where}: {p.comp.path}config.json is not a JSON object")
        cfg = _hf_text_config(d, p.model)
    inv = _inventory(p, cfg)
    with tempfile.TemporaryDirectory(prefix="msconv-inv-") as tmp:
        f = Path(tmp) / "inventory.json"
        f.write_text(json.dumps({"tensors": [{"key": k, "shape": list(s), "dtype": d} for k, (s, d) in inv.items()]}))
        try:
            plan_checkpoint(src, p.comp.mapping, target_inventory=str(f))
        except MappingError as e:
            raise HubError(f"component {p.comp.name}: {p.comp.path} does not fit the {p.model} config of "
                           f"{p.config_from} ({_short(e, 240)}); pass --model-config {p.comp.name}=FILE.json") from None
    return src, cfg


def _inventory(p: Part, cfg: dict) -> dict:
    """The MindSpore model's parameter inventory at `cfg`, computed without allocating anything."""
    import importlib

    try:
        mod = importlib.import_module(f"opensora_ms.models.{p.model}")
        return {k: (tuple(int(x) for x in s), d) for k, (s, d) in mod.param_inventory(cfg).items()}
    except ImportError as e:
        raise HubError(f"component {p.comp.name}: cannot import the MindSpore model opensora_ms.models.{p.model} "
                       f"({e})") from None
    except (ValueError, TypeError, KeyError) as e:
        raise HubError(f"component {p.comp.name}: bad {p.model} config from {p.config_from}: {_short(e)}") from None


def _config_file(p: Part, cfg: dict) -> dict:
    """config.json of an msconv model: the dataclass fields (defaults filled in) under the class name."""
    from opensora_ms import configs as C

    cls = getattr(C, p.config_name, None)
    full = cls.from_dict(cfg).to_dict() if cls is not None and hasattr(cls, "from_dict") else dict(cfg)
    return {p.config_name: {k: v for k, v in full.items() if k not in PATH_FIELDS}}


def _make(p: Part, src: Path, cfg: dict, listing: Listing, root: Path, sha: dict, stage_root: Path, out: Path,
          o: Options, mapping_sha, rep: Reporter) -> None:
    from . import targets
    from .engine import convert_checkpoint
    from .verify import verify_output

    name = p.comp.name
    stage = stage_root / name
    rep.say(f"{name}: converting {p.comp.path} with {p.comp.mapping} ...")
    cfg_file = stage_root / f"{name}.model-config.json"
    cfg_file.write_text(json.dumps({p.config_name: cfg}, indent=1))
    size = sum(listing.files[f].size for f in p.weights)
    with rep.bar(f"converting {name}", size) as bar:
        kw = dict(dtype=o.dtype, fmt=o.fmt, progress=lambda done, total: bar(done, total))
        if p.model in targets.MODELS:
            convert_checkpoint(src, p.comp.mapping, stage, config=cfg_file, **kw)
        else:  # the converter has no inventory entry for this model yet: _prepare checked the exact inventory
            convert_checkpoint(src, p.comp.mapping, stage, allow_partial=True, **kw)
    copied = []
    if p.model in HF_MODELS and p.comp.is_folder:
        for f in p.extras:
            dst = stage / Path(f).name
            shutil.copyfile(root / f, dst)
            copied.append({"name": dst.name, "from": f, "sha256": sha[f]})
    else:
        (stage / "config.json").write_text(json.dumps(_config_file(p, cfg), indent=1) + "\n")
        copied.append({"name": "config.json", "from": p.config_from, "sha256": _sha256_file(stage / "config.json")})
    key = p.key(listing, mapping_sha, o.dtype, o.fmt)
    record = {"msconv_download_record": 1, "component": name, "repo": listing.repo, "revision": listing.revision,
              "sha": listing.sha, "model": p.model, "config_name": p.config_name, "config_from": p.config_from,
              "files": [{"path": f, "size": listing.files[f].size, "sha256": sha[f]} for f in p.files],
              "copied": copied, "key": key}
    (stage / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    v = verify_output(stage)
    _check_inventory(stage, _inventory(p, cfg), name)
    _publish(stage, out / name, stage_root)
    rep.say(f"{name}: {v.tensors} tensors, {_human(v.bytes)} verified -> {out / name}")


def _check_inventory(folder: Path, want: dict, name: str) -> None:
    """Names and shapes of the written files equal the model's parameters (dtype by kind): load_strict would
    accept them. Header-only, nothing allocated."""
    from .sources import Source
    from .tensor import DTYPES

    have = Source(folder).inventory()
    problems = [f"parameter {k!r} is in no file" for k in want if k not in have]
    problems += [f"tensor {k!r} is not a parameter of the model" for k in have if k not in want]
    problems += [f"tensor {k!r} is {list(have[k][0])}, the model expects {list(want[k][0])}"
                 for k in want if k in have and tuple(have[k][0]) != tuple(want[k][0])]
    kind = lambda d: DTYPES.get(d, (0,) * 4)[3]  # noqa: E731
    problems += [f"tensor {k!r} is {have[k][1]}, the model expects {want[k][1]} (another kind)"
                 for k in want if k in have and kind(have[k][1]) != kind(want[k][1])]
    if problems:
        raise MappingError(f"{name}: the converted files do not load strictly: {'; '.join(problems[:3])}"
                           + (f"; ... and {len(problems) - 3} more" if len(problems) > 3 else ""))


def _publish(stage: Path, final: Path, stage_root: Path) -> None:
    old = None
    if final.exists():
        old = stage_root / f"{final.name}.old"
        os.replace(final, old)
    try:
        os.replace(stage, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from .engine import _versions as conv_versions

    v = conv_versions()
    try:
        v["huggingface_hub"] = version("huggingface_hub")
    except PackageNotFoundError:
        v["huggingface_hub"] = None
    return v


def _write_manifest(out: Path, listing: Listing, parts: list, o: Options, endpoint: str) -> dict:
    old = _read_json(out / MANIFEST_NAME) or {}
    comps = {k: v for k, v in (old.get("components") or {}).items()
             if isinstance(v, dict) and (out / v.get("dir", k) / RECORD_NAME).is_file()}
    repos = {k: v for k, v in (old.get("repos") or {}).items() if any(c.get("repo") == k for c in comps.values())}
    for p in parts:
        rec = _read_json(out / p.comp.name / RECORD_NAME) or {}
        cm = _read_json(out / p.comp.name / MANIFEST_NAME) or {}
        comps[p.comp.name] = {"dir": p.comp.name, "repo": listing.repo, "sha": rec.get("sha"), "model": p.model,
                              "config_name": p.config_name, "config_from": p.config_from, "mapping": p.comp.mapping,
                              "dtype": o.dtype, "format": o.fmt, "files": p.files,
                              "tensors": len(cm.get("tensors") or []), "bytes": cm.get("total_size"),
                              "inventory": cm.get("target_inventory")}
    files = {}  # every Hub file behind a component of this repo, this run's or an earlier one's
    for name, c in comps.items():
        if c.get("repo") == listing.repo:
            for f in (_read_json(out / c.get("dir", name) / RECORD_NAME) or {}).get("files", []):
                files[f["path"]] = f
    repos[listing.repo] = {"revision": listing.revision, "sha": listing.sha,
                           "endpoint": None if listing.local else endpoint, "local": bool(listing.local),
                           "files": [files[f] for f in sorted(files)]}
    man = {"msconv_download_manifest": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "versions": _versions(), "repos": repos, "components": dict(sorted(comps.items()))}
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(man, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return man
