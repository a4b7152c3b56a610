"""A tiny Hugging Face Hub on 127.0.0.1 for tests and `msconv demo`: the endpoints huggingface_hub's
`model_info`, `list_repo_tree`, `snapshot_download` and `hf_hub_download` call, with the headers they rely on.

* `GET /api/models/{repo}[/revision/{rev}][?blobs=true]`: id, sha, siblings (size, blobId, lfs {sha256, size});
* `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..`: files and folders (oid, size, lfs);
* `HEAD|GET /{repo}/resolve/{rev}/{path}`: regular files answer with `ETag` (git blob id), `X-Repo-Commit`,
  `Content-Length`; LFS files (weights, `*.model`) answer 302 to `/cdn-lfs/{sha256}` on a second port (the
  Hub's CDN is another origin; huggingface_hub does not follow such a redirect on HEAD) with `X-Linked-Etag`
  (sha256), `X-Linked-Size`, `X-Repo-Commit`, as the Hub does; `Range: bytes=N-` gives 206 + `Content-Range`;
* errors as the Hub sends them: 401 + `X-Error-Code: RepoNotFound` (unknown repo), 404 + `RevisionNotFound`,
  404 + `EntryNotFound`, 401 + `GatedRepo` (gated repo without the right bearer token).

Faults for tests (attributes of `HubServer`): `missing` (paths answered 404), `corrupt` (paths served with one
byte flipped, same size), `cut_once` ({path: n}: the first full GET sends n bytes and drops the connection),
`stall` ({path: n}: every full GET sends n bytes, then waits until `release()`), `gated` ({repo: token}).
`log` lists (method, path, Range header) of every request.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".h5", ".msgpack", ".pt", ".pth", ".ckpt")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """A repo's files at one commit: bytes in memory, hashes as the Hub computes them."""

    def __init__(self, repo_id: str, files: dict[str, bytes], branch: str = "main"):
        self.id = repo_id
        self.files = dict(sorted(files.items()))
        self.meta = {}
        for p, data in self.files.items():
            m = {"size": len(data), "oid": _git_oid(data)}
            if p.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                ptr = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
                m = {"size": len(data), "oid": _git_oid(ptr),
                     "lfs": {"oid": sha, "size": len(data), "pointerSize": len(ptr)}}
            self.meta[p] = m
        self.sha = hashlib.sha1(json.dumps([[p, m["oid"]] for p, m in self.meta.items()]).encode()).hexdigest()
        self.refs = {branch: self.sha}

    @classmethod
    def from_folder(cls, repo_id: str, folder) -> "Repo":
        root = Path(folder)
        return cls(repo_id, {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                             if p.is_file()})

    def resolve(self, rev: str) -> str | None:
        return self.sha if rev == self.sha else self.refs.get(rev)

    def by_sha256(self, sha: str) -> str | None:
        return next((p for p, m in self.meta.items() if m.get("lfs", {}).get("oid") == sha), None)


class HubServer:
    """`with HubServer({repo_id: Repo}) as hub: hub.url` — a threaded server on a free port of 127.0.0.1."""

    def __init__(self, repos: dict[str, Repo] | list[Repo]):
        self.repos = {r.id: r for r in repos} if isinstance(repos, list) else dict(repos)
        self.missing: set[str] = set()
        self.corrupt: set[str] = set()
        self.cut_once: dict[str, int] = {}
        self.stall: dict[str, int] = {}
        self.gated: dict[str, str] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.bytes_sent = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        # the Hub redirects LFS files to a CDN on another origin; a second port is another origin
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self)) for _ in range(2)]
        self._httpd, self._cdn = self._servers
        for s in self._servers:
            s.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                         for s in self._servers]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> "HubServer":
        for t in self._threads:
            t.start()
        return self

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def gets(self, path_suffix: str) -> int:
        """How many GETs fetched bytes of the file `path_suffix` (resolve or CDN)."""
        return sum(1 for m, p, _ in self.log if m == "GET" and p == path_suffix)


def _handler(hub: HubServer):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        # -- replies -------------------------------------------------------------------------------------
        def _reply(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            hdrs.setdefault("Content-Length", str(len(body)))
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _json(self, obj, code=200):
            self._reply(code, json.dumps(obj).encode())

        def _error(self, code: int, error_code: str, msg: str, head=False, extra=None):
            body = json.dumps({"error": msg}).encode()
            self._reply(code, body, {"X-Error-Code": error_code, "X-Error-Message": msg, **(extra or {})}, head)

        # -- routing -------------------------------------------------------------------------------------
        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

        def _route(self, head: bool):
            u = urlsplit(self.path)
            parts = [unquote(p) for p in u.path.split("/")[1:]]
            with hub._lock:
                hub.log.append((self.command, u.path, self.headers.get("Range")))
            try:
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    return self._api(parts[2] + "/" + parts[3], parts[4:], parse_qs(u.query))
                if parts[0] == "cdn-lfs" and len(parts) == 2:
                    return self._cdn(parts[1], head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head)
                self._error(404, "NotFound", f"no route {u.path}", head)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _repo(self, rid: str, head=False):
            r = hub.repos.get(rid)
            if r is None:
                self._error(401, "RepoNotFound", "Repository not found", head)
            return r

        def _api(self, rid, rest, q):
            r = self._repo(rid)
            if r is None:
                return
            if not rest or rest[0] == "revision":
                rev = rest[1] if len(rest) > 1 else "main"
                sha = r.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                blobs = q.get("blobs", ["false"])[0].lower() == "true"
                sib = []
                for p, m in r.meta.items():
                    s = {"rfilename": p}
                    if blobs:
                        s.update({"size": m["size"], "blobId": m["oid"]})
                        if "lfs" in m:
                            s["lfs"] = {"sha256": m["lfs"]["oid"], "size": m["size"],
                                        "pointerSize": m["lfs"]["pointerSize"]}
                    sib.append(s)
                return self._json({"_id": "x" + r.sha[:23], "id": r.id, "modelId": r.id, "sha": sha, "private": False,
                                   "gated": "manual" if r.id in hub.gated else False, "disabled": False,
                                   "downloads": 0, "likes": 0, "tags": [], "siblings": sib,
                                   "lastModified": "2025-03-12T00:00:00.000Z", "createdAt": "2025-03-12T00:00:00.000Z"})
            if rest[0] == "tree" and len(rest) >= 2:
                sha = r.resolve(rest[1])
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
                base = "/".join(rest[2:])
                recursive = q.get("recursive", ["false"])[0].lower() == "true"
                out, dirs = [], set()
                for p, m in r.meta.items():
                    if base and not p.startswith(base + "/"):
                        continue
                    rel = p[len(base) + 1:] if base else p
                    segs = rel.split("/")
                    for i in range(1, len(segs)):
                        d = "/".join(([base] if base else []) + segs[:i])
                        if (recursive or i == 1) and d not in dirs:
                            dirs.add(d)
                            out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                        "path": d})
                    if recursive or len(segs) == 1:
                        e = {"type": "file", "oid": m["oid"], "size": m["size"], "path": p}
                        if "lfs" in m:
                            e["lfs"] = dict(m["lfs"])
                        out.append(e)
                return self._json(out)
            self._error(404, "NotFound", "unknown api route")

        def _gated_denied(self, rid: str) -> bool:
            tok = hub.gated.get(rid)
            return tok is not None and self.headers.get("Authorization") != f"Bearer {tok}"

        def _resolve(self, rid, rev, path, head):
            r = self._repo(rid, head)
            if r is None:
                return
            sha = r.resolve(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if self._gated_denied(rid):
                return self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it "
                                   "and be authenticated to access it.", head)
            if path not in r.meta or path in hub.missing:
                return self._error(404, "EntryNotFound", f"{path} does not exist", head, {"X-Repo-Commit": sha})
            m = r.meta[path]
            common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            if "lfs" in m:
                loc = f"{hub.cdn_url}/cdn-lfs/{m['lfs']['oid']}"
                return self._reply(302, b"", {**common, "Location": loc, "ETag": f'"{m["oid"]}"',
                                              "X-Linked-Etag": f'"{m["lfs"]["oid"]}"',
                                              "X-Linked-Size": str(m["size"])}, head)
            self._send_bytes(path, r.files[path], {**common, "ETag": f'"{m["oid"]}"'}, head)

        def _cdn(self, sha256, head):
            for r in hub.repos.values():
                p = r.by_sha256(sha256)
                if p is not None:
                    if p in hub.missing:
                        return self._error(404, "EntryNotFound", "gone", head)
                    return self._send_bytes(p, r.files[p], {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}, head)
            self._error(404, "EntryNotFound", "no such object", head)

        def _send_bytes(self, path: str, data: bytes, headers: dict, head: bool):
            if path in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start, code = 0, 200
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a = rng[6:].split("-")[0]
                start, code = int(a or 0), 206
            if start > len(data):
                return self._error(416, "RangeNotSatisfiable", "bad range", head)
            body = data[start:]
            hdrs = {**headers, "Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
            if code == 206:
                hdrs["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(code)
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            if self.command == "GET":
                with hub._lock:
                    hub.log.append(("GET", path, rng))
            cut = hub.cut_once.pop(path, None) if start == 0 else None
            stall = hub.stall.get(path) if start == 0 else None
            n = cut if cut is not None else stall
            if n is not None:
                self.wfile.write(body[:n])
                self.wfile.flush()
                hub.bytes_sent += n
                if stall is not None:
                    hub._release.wait(60)
                self.close_connection = True
                return
            self.wfile.write(body)
            hub.bytes_sent += len(body)

    return H
