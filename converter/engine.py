"""Streaming conversion: plan -> validate -> stream bytes into sharded MindSpore safetensors.

* Nothing is written before `Mapping.plan` has validated every key, shape and dtype.
* Targets whose bytes are a contiguous run of source bytes (renames, concat/split along axis 0, reshape)
  are copied chunk by chunk without decoding; only other ops (row permutation, transpose, cast) materialise
  that one tensor.
* Reading, hashing and writing run in three threads (all release the GIL), so a conversion costs about
  what `cat` costs; the source files are hashed by a fourth thread that follows the reader through the
  page cache, so the source is read from disk once.
* Everything is written into a staging folder `.<out>.msconv-partial` next to the output (each file under a
  temporary name, then `os.replace`d) and the folder is renamed to `<out>` only when complete: the final
  name never holds a half-written result. A failed or interrupted run removes its staging folder; a stale
  one left by a killed run is removed by the next run.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import json
import math
import mmap
import os
import queue
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FormatError, MappingError, OutputError, UserError
from .mapping import Mapping, Node, Plan, evaluate, load_mapping
from .safetensors_io import TensorInfo, build_header
from .sources import MemTensor, Source
from .targets import Target, expected_target
from .tensor import POLICY_DTYPES, cast_storage, nbytes, policy_dtype

CHUNK = 32 << 20
NBUF = 4
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "msconv-manifest.json"
CKPT_NAME = "model.ckpt"


_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}


def _write(fd: int, data) -> None:
    """Write `data` to `fd`: a buffer, or `(src_fd, offset, length, buffer)` meaning "these source bytes",
    copied in the kernel with copy_file_range (what `cat` does) and written from `buffer` where the file
    system cannot. The one place output bytes go through (tests patch it)."""
    if isinstance(data, tuple):
        src_fd, off, n, mv = data
        done = 0
        try:
            while done < n:
                got = os.copy_file_range(src_fd, fd, n - done, off + done)
                if got <= 0:
                    raise OSError(errno.EIO, "copy_file_range returned 0")
                done += got
            return
        except OSError as e:
            if e.errno not in _NO_CFR or done:
                raise
        data = mv
    mv = data
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]


def parse_size(s) -> int:
    """'5GB', '500MB', '1.5G', 1000 -> bytes (decimal units, like huggingface_hub)."""
    if isinstance(s, (int, float)):
        return int(s)
    t = str(s).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                v = float(t[: -len(u)]) * m
            except ValueError:
                break
            if not math.isfinite(v) or v >= 2**63:  # 1e400GB, nan, inf: not a size
                raise UserError(f"invalid size {s!r}: not a finite number of bytes (examples: 5GB, 500MB)")
            return int(v)
    try:
        return int(t)
    except ValueError:
        raise UserError(f"invalid size {s!r} (examples: 5GB, 500MB, 1000000)") from None


# -- byte layout of plan nodes ----------------------------------------------------------------------------
@dataclass
class Piece:
    """A run of bytes of one source tensor: (tensor, start within the tensor, length)."""

    t: object  # TensorInfo | MemTensor
    start: int
    length: int


def byte_pieces(node: Node, src: Source) -> list[Piece] | None:
    """The node's bytes as runs of source bytes, or None if an op really rearranges data."""
    if node.is_leaf:
        t = src.tensors[node.key]
        return [Piece(t, 0, t.nbytes)]
    op, name = node.op, node.op.name
    if name == "reshape":
        return byte_pieces(node.inputs[0], src)
    if name in ("concat", "split"):
        ax = op._axis(len(node.inputs[0].shape), node.ctx)
        lead = int(np.prod(node.inputs[0].shape[:ax])) if ax else 1
        if lead != 1:
            return None
        if name == "concat":
            out = []
            for i in node.inputs:
                p = byte_pieces(i, src)
                if p is None:
                    return None
                out += p
            return out
        whole = byte_pieces(node.inputs[0], src)
        if whole is None:
            return None
        sizes = op.sizes(node.inputs[0].shape, node.ctx)
        row = nbytes(node.inputs[0].shape[ax + 1:], node.dtype)
        begin = sum(sizes[: node.index]) * row
        return _slice_pieces(whole, begin, sizes[node.index] * row)
    return None


def _slice_pieces(pieces: list[Piece], begin: int, length: int) -> list[Piece]:
    out, pos, end = [], 0, begin + length
    for p in pieces:
        a, b = max(begin, pos), min(end, pos + p.length)
        if a < b:
            out.append(Piece(p.t, p.start + a - pos, b - a))
        pos += p.length
    return out


# -- the threaded copy pipeline -------------------------------------------------------------------------
class _Aborted(Exception):
    pass


class _Pipeline:
    """Main thread reads; one thread hashes, one writes (both release the GIL). A pool buffer goes back to
    the pool when both are done with it; `drain` waits for every queued chunk."""

    def __init__(self):
        self.pool: queue.Queue = queue.Queue()  # NBUF tokens: at most NBUF source windows in flight
        for i in range(NBUF):
            self.pool.put(i)
        self.hq: queue.Queue = queue.Queue()
        self.wq: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.digests: dict[str, str] = {}
        self.cv = threading.Condition()
        self.outstanding = 0
        self.fds: dict[str, int] = {}
        self.th = [threading.Thread(target=self._hasher, daemon=True), threading.Thread(target=self._writer, daemon=True)]
        for t in self.th:
            t.start()

    def _done(self, item):
        with self.cv:
            item["left"] -= 1
            if item["left"] == 0:
                if item.get("window") is not None:
                    item["window"].close()
                if item["buf"] is not None:
                    self.pool.put(item["buf"])
                self.outstanding -= 1
                self.cv.notify_all()

    def _fail(self, e):
        with self.cv:
            self.error = self.error or e
            self.cv.notify_all()

    def _hasher(self):
        h = None
        while True:
            item = self.hq.get()
            if item is None:
                return
            try:
                if "begin" in item:
                    h = hashlib.sha256()
                elif "end" in item:
                    self.digests[item["end"]] = (h or hashlib.sha256()).hexdigest()
                else:
                    if self.error is None:
                        mv = item["mv"]
                        h.update(mv[3] if isinstance(mv, tuple) else mv)
                    self._done(item)
            except BaseException as e:  # pragma: no cover - hashing does not fail
                self._fail(e)

    def _writer(self):
        while True:
            item = self.wq.get()
            if item is None:
                return
            try:
                if self.error is None:
                    _write(item["fd"], item["mv"])
            except BaseException as e:
                self._fail(e)
            finally:
                self._done(item)

    def check(self):
        if self.error is not None:
            raise self.error

    def begin(self, key):
        self.hq.put({"begin": key})

    def end(self, key):
        self.hq.put({"end": key})

    def push(self, fd: int, mv, buf=None, hash: bool = True, window=None):
        self.check()
        item = {"fd": fd, "mv": mv, "buf": buf, "left": 2 if hash else 1, "window": window}
        with self.cv:
            self.outstanding += 1
        if hash:
            self.hq.put(item)
        self.wq.put(item)

    def get_buffer(self) -> int:
        while True:
            self.check()
            try:
                return self.pool.get(timeout=0.2)
            except queue.Empty:
                continue

    def drain(self):
        with self.cv:
            while self.outstanding and self.error is None:
                self.cv.wait(0.2)
        self.check()
        ev = threading.Event()
        self.hq.put({"end": "__drain__"})  # the hasher is FIFO: once this is recorded, every digest is
        while "__drain__" not in self.digests:
            self.check()
            ev.wait(0.001)
        del self.digests["__drain__"]

    def abort(self):
        """Stop writing (queued chunks are skipped) and wait until the threads hold no chunk, so the output
        fd can be closed safely."""
        with self.cv:
            if self.error is None:
                self.error = _Aborted()
            while self.outstanding:
                self.cv.wait(0.2)

    def source_fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            try:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise FormatError(f"{path}: cannot read source file: {e.strerror or e}") from None
        return fd

    def close(self):
        self.hq.put(None)
        self.wq.put(None)
        for t in self.th:
            t.join(timeout=5)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _SourceHasher(threading.Thread):
    """sha256 of each source file, read sequentially, never ahead of the converter's reads (so the bytes
    come from the page cache instead of a second pass over the disk)."""

    def __init__(self, files: list[str]):
        super().__init__(daemon=True)
        self.files = files
        self.high = {f: 0 for f in files}
        self.unbounded = False
        self.cv = threading.Condition()
        self.result: dict[str, str] = {}
        self.error: BaseException | None = None
        self.stop = False

    def advance(self, path: str, upto: int):
        with self.cv:
            if upto > self.high.get(path, 0):
                self.high[path] = upto
                self.cv.notify()

    def release(self):
        with self.cv:
            self.unbounded = True
            self.cv.notify()

    def run(self):
        f = None
        try:
            for f in self.files:
                h = hashlib.sha256()
                size = os.path.getsize(f)
                fd = os.open(f, os.O_RDONLY)
                try:
                    pos = 0
                    while pos < size:
                        if self.stop:
                            return
                        want = min(CHUNK, size - pos)
                        with self.cv:
                            while not (self.unbounded or self.stop) and pos > 0 and self.high.get(f, 0) < pos + want:
                                self.cv.wait(0.2)
                        win = _Window(fd, pos, want, f)
                        try:
                            h.update(win.mv)
                        finally:
                            win.close()
                        pos += want
                finally:
                    os.close(fd)
                self.result[f] = h.hexdigest()
        except OSError as e:  # a source read error, not an output one
            self.error = FormatError(f"{f}: cannot read source file: {e.strerror or e}")
        except BaseException as e:
            self.error = e


# -- conversion -----------------------------------------------------------------------------------------
@dataclass
class Result:
    out: str
    files: list[str]
    tensors: int
    bytes: int
    seconds: float
    manifest: dict = field(default_factory=dict)

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"msconv": __version__}
    for p in ("mindspore", "torch", "numpy", "safetensors", "pyyaml"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(8 << 20), b""):
            h.update(b)
    return h.hexdigest()


@dataclass
class Checked:
    """A validated conversion: the mapping, the opened source, the plan and the target inventory it was checked
    against; `partial` lists what --allow-partial let through (empty when the inventory matched exactly)."""

    mapping: Mapping
    source: Source
    plan: Plan
    target: Target
    allow_partial: bool = False
    partial: list = field(default_factory=list)

    def __iter__(self):  # m, src, plan, description (the former 4-tuple)
        return iter((self.mapping, self.source, self.plan, self.target.description))


def plan_checkpoint(src_path, mapping, target_inventory="auto", *, config=None, allow_partial: bool = False) -> Checked:
    """Open the source and validate the whole conversion against the expected target inventory
    (converter.targets): a missing, extra, mis-shaped or wrong-kind tensor is a MappingError naming the key,
    unless `allow_partial`, which records those problems instead. Structural problems (a key no rule consumes,
    a rule missing one of its sources) are errors even then."""
    m = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
    src = Source(src_path)
    inv = src.inventory()
    where = os.fspath(src_path)
    try:
        target = expected_target(m, inv, target_inventory, config,
                                 structural=lambda: m.plan(inv, where=where).inventory())
    except MappingError as e:
        msg = str(e) if str(e).startswith(where) else f"{where}: {e}"
        if not allow_partial:
            raise MappingError(msg, e.problems) from None
        target = Target(None, "none", f"none ({e})", reason=str(e))
    if target.inventory is None:
        if not allow_partial:
            raise MappingError(f"{where}: mapping {m.name}: no target inventory to check against ({target.reason}); "
                               "pass --allow-partial to convert without one")
        return Checked(m, src, m.plan(inv, where=where), target, True, [target.reason])
    try:
        return Checked(m, src, m.plan(inv, target.inventory, where=where), target, allow_partial)
    except MappingError as e:
        if not allow_partial:
            raise
        plan = m.plan(inv, where=where)  # structural problems stay errors
        return Checked(m, src, plan, target, True, list(e.problems) or [str(e)])


def _order_and_shard(plan: Plan, src: Source, dtypes: dict, shard_size: int) -> list[list[str]]:
    """Targets in source-file order (so reading is sequential), cut into shards of at most shard_size."""
    file_idx = {f: i for i, f in enumerate(src.files)}

    def pos(k):
        leaves = plan.targets[k].leaves()
        best = None
        for lk in leaves:
            t = src.tensors[lk]
            p = (file_idx.get(getattr(t, "path", ""), 0), getattr(t, "offset", 0))
            best = p if best is None or p < best else best
        return best or (0, 0)

    keys = sorted(plan.targets, key=pos)
    shards, cur, size = [], [], 0
    for k in keys:
        n = nbytes(plan.targets[k].shape, dtypes[k])
        if cur and size + n > shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _staging_for(out: Path) -> Path:
    return out.parent / f".{out.name}.msconv-partial"


def _check_options(dtype: str, fmt: str, shard_size) -> int:
    """Validate the output options before anything is opened; returns the shard size in bytes."""
    if dtype not in POLICY_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(POLICY_DTYPES)}, got {dtype!r}")
    if fmt not in ("safetensors", "ckpt"):
        raise UserError(f"--format must be safetensors or ckpt, got {fmt!r}")
    if fmt == "ckpt" and importlib.util.find_spec("mindspore") is None:
        raise UserError("--format ckpt needs MindSpore (it writes model.ckpt with mindspore.save_checkpoint), which is "
                        "not installed; install it or use --format safetensors")
    shard_bytes = parse_size(shard_size)
    if shard_bytes <= 0:
        raise UserError(f"--shard-size must be positive, got {shard_size!r}")
    return shard_bytes


def _check_output_folder(out: Path, overwrite: bool) -> None:
    try:
        exists = out.exists() or out.is_symlink()
        if exists and not overwrite:
            raise OutputError(f"{out}: output folder exists; pass --overwrite to replace it")
        if exists and (out.is_symlink() or not out.is_dir()):
            raise OutputError(f"{out}: exists and is not a folder")
        if exists and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise OutputError(f"{out}: refusing to replace a folder that is not an msconv output (no {MANIFEST_NAME}); "
                              "remove it or choose another --out")
    except OSError as e:
        raise OutputError(f"{out}: cannot inspect the output folder: {e.strerror or e}") from None


def _os_error(where, e: OSError, doing: str) -> OutputError:
    return OutputError(f"{where}: cannot {doing}: {e.strerror or e}; nothing was written")


@contextmanager
def _locked_staging(out: Path, need: int, what: str):
    """The staging folder beside `out`, created under an exclusive lock after the free-space check; a stale
    one (left by a killed run) is removed first. The lock file goes when the block ends."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only file system, /proc, /sys, a file in the way, no permission
        raise _os_error(out.parent, e, "create the output's parent folder") from None
    staging = _staging_for(out)
    lockf = out.parent / f".{out.name}.msconv-lock"
    try:
        lock_fd = os.open(lockf, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise _os_error(lockf, e, "create the lock file beside the output (remove whatever is in the way)") from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"{out}: another msconv convert is writing this output folder") from None
        try:
            if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
                raise OutputError(f"{staging}: is in the way of msconv's staging folder and is not one; remove it")
            if staging.exists():  # left by a killed run: we hold the lock, so nobody is using it
                shutil.rmtree(staging)
            free = shutil.disk_usage(out.parent).free
            if free < need:
                raise OutputError(f"{out.parent}: not enough disk space: the output needs {need / 1e9:.2f} GB"
                                  f"{what}, {free / 1e9:.2f} GB free")
            staging.mkdir()
        except OSError as e:
            raise _os_error(staging, e, "create the staging folder") from None
        yield staging
    finally:
        os.close(lock_fd)
        try:
            os.unlink(lockf)
        except OSError:
            pass


def _manifest(c: Checked, src_path, written: dict, dtype: str, fmt: str, total: int) -> dict:
    m, plan = c.mapping, c.plan
    return {
        "msconv_manifest": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mapping": {"name": m.name, "version": m.version, "path": m.path,
                    "sha256": _file_sha256(m.path) if m.path and os.path.isfile(m.path) else None},
        "source": {"path": os.fspath(src_path), "files": written["sources"]},
        "target_inventory": c.target.description,
        "target": c.target.record(),
        "allow_partial": c.allow_partial,
        "partial_problems": c.partial,
        "dtype_policy": dtype,
        "format": fmt,
        "versions": _versions(),
        "shards": written["shards"],
        "total_size": total,
        "dropped": plan.dropped,
        "tensors": written["tensors"],
    }


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGINT during a conversion, saying truthfully what is under the output name now."""

    def __init__(self, out, published: bool, previous: bool):
        self.out, self.published, self.previous = str(out), published, previous
        if published:
            msg = f"interrupted after publishing: {out} holds the complete new output"
        elif previous:
            msg = f"interrupted; {out} still holds the previous output, unchanged (nothing new was written)"
        else:
            msg = f"interrupted; nothing was written under {out}"
        super().__init__(msg)
        self.message = msg


@contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM that arrive inside the block are held until it ends, so publishing (two renames and the
    removal of the replaced output) is never left half done; a held SIGINT is then raised as KeyboardInterrupt,
    a held SIGTERM re-delivered."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if signal.SIGTERM in got:
        os.kill(os.getpid(), signal.SIGTERM)
    if got:
        raise KeyboardInterrupt


def convert_checkpoint(src_path, mapping, out_dir, *, dtype: str = "keep", fmt: str = "safetensors",
                       shard_size="5GB", overwrite: bool = False, target_inventory="auto", hash_source: bool = True,
                       progress=None, config=None, allow_partial: bool = False) -> Result:
    """Convert `src_path` with `mapping` into `out_dir` (see the module docstring for the guarantees). An interrupt
    raises `Interrupted`, which says whether the new output was published."""
    try:
        out = Path(out_dir).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise OutputError(f"{out_dir}: cannot resolve the output path: {e}") from None
    state = {"published": False, "previous": False}
    try:
        state["previous"] = out.is_dir()
        return _convert(src_path, mapping, out, dtype, fmt, shard_size, overwrite, target_inventory, hash_source,
                        progress, config, allow_partial, state)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(out, state["published"], state["previous"]) from None


def _convert(src_path, mapping, out: Path, dtype, fmt, shard_size, overwrite, target_inventory, hash_source, progress,
             config, allow_partial, state) -> Result:
    t0 = time.perf_counter()
    shard_bytes = _check_options(dtype, fmt, shard_size)
    c = plan_checkpoint(src_path, mapping, target_inventory, config=config, allow_partial=allow_partial)
    m, src, plan = c.mapping, c.source, c.plan
    _check_output_folder(out, overwrite)
    want = POLICY_DTYPES[dtype]
    dtypes = {k: policy_dtype(n.dtype, want, k) for k, n in plan.targets.items()}
    shards = _order_and_shard(plan, src, dtypes, shard_bytes)
    total = sum(nbytes(plan.targets[k].shape, dtypes[k]) for k in plan.targets)
    need = 2 * total if fmt == "ckpt" else total  # ckpt: the safetensors shards and model.ckpt
    with _locked_staging(out, need, " (safetensors + ckpt)" if fmt == "ckpt" else "") as staging:
        try:
            written = _write_all(m, src, plan, dtypes, shards, staging, total, progress, hash_source)
            manifest = _manifest(c, src_path, written, dtype, fmt, total)
            if fmt == "ckpt":
                from .ckpt import write_ckpt

                write_ckpt([staging / s["file"] for s in written["shards"]], staging / CKPT_NAME)
                manifest["ckpt"] = {"file": CKPT_NAME, "size": (staging / CKPT_NAME).stat().st_size,
                                    "sha256": _file_sha256(staging / CKPT_NAME)}
            _atomic_json(staging / MANIFEST_NAME, manifest)
            with _signals_deferred():
                _publish(staging, out, overwrite)
                state["published"] = True
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise OutputError(f"{out}: disk full while writing ({e.filename or 'output'}); nothing was left under the output name") from None
            raise OutputError(f"{out}: cannot write output: {e.strerror or e}; nothing was left under the output name") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    files = sorted(str(p) for p in out.iterdir()) if state["published"] else []
    return Result(str(out), files, len(plan.targets), total, time.perf_counter() - t0, manifest)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if not overwrite:  # appeared meanwhile
            raise OutputError(f"{out}: output folder exists; pass --overwrite to replace it")
        old = out.parent / f".{out.name}.msconv-old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:  # put the previous output back under its name
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_shard(pipe: "_Pipeline", path: Path, header: bytes, keys: list[str], plan: Plan, src: Source, dtypes: dict,
                 done: int, total: int, progress, hasher) -> int:
    """Write one shard (header, then each target's bytes) to `path`; every target's sha256 is taken from exactly
    the bytes handed to the writer. Returns the running byte count."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pipe.push(fd, memoryview(header), hash=False)
        for k in keys:
            node = plan.targets[k]
            pipe.begin(k)
            pieces = byte_pieces(node, src) if dtypes[k] == node.dtype else None
            if pieces is not None:
                for p in pieces:
                    done = _copy_piece(pipe, fd, p, done, total, progress, hasher)
            else:
                arr = _materialize(node, src, dtypes[k], k, hasher)
                flat = memoryview(np.require(arr, requirements="C").reshape(-1).view(np.uint8))
                for i in range(0, len(flat), CHUNK):
                    pipe.push(fd, flat[i:i + CHUNK])
                    done += min(CHUNK, len(flat) - i)
                    if progress:
                        progress(done, total)
                del arr, flat
            pipe.end(k)
        pipe.drain()
    except BaseException:
        pipe.abort()
        raise
    finally:
        os.close(fd)
    return done


def _write_all(m: Mapping, src: Source, plan: Plan, dtypes: dict, shards: list[list[str]], staging: Path,
               total: int, progress, hash_source: bool) -> dict:
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    hasher = _SourceHasher(list(src.files)) if hash_source else None
    if hasher:
        if any(isinstance(t, MemTensor) for t in src.tensors.values()):
            hasher.release()  # torch sources are mmapped by torch: nothing to follow
        hasher.start()
    pipe = _Pipeline()
    done = 0
    shard_info = []
    meta = {"format": "ms", "msconv_mapping": m.name}
    try:
        for name, keys in zip(names, shards):
            header, _ = build_header([(k, dtypes[k], plan.targets[k].shape) for k in keys], meta)
            tmp = staging / (name + ".tmp")
            done = _write_shard(pipe, tmp, header, keys, plan, src, dtypes, done, total, progress, hasher)
            os.replace(tmp, staging / name)
            shard_info.append({"file": name, "size": (staging / name).stat().st_size, "tensors": len(keys),
                               "header_sha256": hashlib.sha256(header).hexdigest()})
        tensors_out = [{"key": k, "shape": list(plan.targets[k].shape), "dtype": dtypes[k], "file": name,
                        "sha256": pipe.digests[k]} for name, keys in zip(names, shards) for k in keys]
        weight_map = {t["key"]: t["file"] for t in tensors_out}
        _atomic_json(staging / INDEX_NAME, {"metadata": {"total_size": total, "format": "ms", "msconv_mapping": m.name},
                                            "weight_map": dict(sorted(weight_map.items()))})
        if hasher:
            hasher.release()
            hasher.join()
            if hasher.error:
                raise hasher.error
        sources = [{"path": f, "size": os.path.getsize(f), "sha256": hasher.result.get(f) if hasher else None}
                   for f in src.files]
        return {"shards": shard_info, "tensors": tensors_out, "sources": sources}
    finally:
        pipe.close()
        if hasher:
            hasher.stop = True
            hasher.release()


def _copy_piece(pipe: _Pipeline, fd: int, p: Piece, done: int, total: int, progress, hasher) -> int:
    t = p.t
    if isinstance(t, MemTensor):
        mv = memoryview(np.require(t.array, requirements="C").reshape(-1).view(np.uint8))[p.start:p.start + p.length]
        for i in range(0, len(mv), CHUNK):
            pipe.push(fd, mv[i:i + CHUNK])
            done += min(CHUNK, len(mv) - i)
            if progress:
                progress(done, total)
        return done
    fdin = pipe.source_fd(t.path)
    pos, end = t.offset + p.start, t.offset + p.start + p.length
    while pos < end:
        token = pipe.get_buffer()
        want = min(CHUNK, end - pos)
        win = _Window(fdin, pos, want, t.path)  # hashed straight from the page cache, copied in the kernel
        if hasher:
            hasher.advance(t.path, pos + want)
        pipe.push(fd, (fdin, pos, want, win.mv), token, window=win)
        pos += want
        done += want
        if progress:
            progress(done, total)
    return done


class _Window:
    """A read-only mmap of file bytes [pos, pos + n), populated at once (MAP_POPULATE) and unmapped as soon as
    it has been hashed and copied: no user-space copy, RSS bounded by the windows in flight."""

    def __init__(self, fd: int, pos: int, n: int, path: str = "source file"):
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        self.delta = pos - base
        if n == 0:
            self.mm, self.mv = None, memoryview(b"")
            return
        try:
            size = os.fstat(fd).st_size
            if size < pos + n:  # mapping past EOF would SIGBUS on access
                raise FormatError(f"{path}: source file shrank during conversion (needs {pos + n} bytes, has {size})")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(fd, self.delta + n, flags=flags, prot=mmap.PROT_READ, offset=base)
        except OSError as e:
            raise FormatError(f"{path}: cannot read source file: {e.strerror or e}") from None
        self.mv = memoryview(self.mm)[self.delta:self.delta + n]

    def close(self):
        if self.mm is not None:
            self.mv.release()
            self.mm.close()
            self.mm = None


def _materialize(node: Node, src: Source, dtype: str, key: str, hasher) -> np.ndarray:
    def leaf(k):
        t = src.tensors[k]
        if isinstance(t, TensorInfo) and hasher:
            hasher.advance(t.path, t.offset + t.nbytes)
        return src.storage(k)

    arr = evaluate(node, leaf, {})
    if dtype != node.dtype:
        arr = cast_storage(arr, node.dtype, dtype, key)
    return arr
