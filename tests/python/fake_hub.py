"""A local stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub's downloads:

    GET  /api/{models|datasets}/{repo}/revision/{rev}[?blobs=True]   repo info with siblings
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/{path}]           the file listing (one page)
    HEAD/GET /{repo}/resolve/{rev}/{path}, /datasets/{repo}/resolve/{rev}/{path}
         with X-Repo-Commit, ETag, Content-Length (and Range for GET)

Revisions are URL-encoded in API paths (refs%2Fconvert%2Fparquet). Errors are 404s with the Hub's
X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), or 403 GatedRepo. Every request's method
and decoded path is logged in `requests`. Serves on 127.0.0.1 only, on a free port, in a thread.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class Repo:
    def __init__(self, repo_id: str, repo_type: str, gated: bool = False):
        self.repo_id, self.repo_type, self.gated = repo_id, repo_type, gated
        self.revisions: dict[str, str] = {}          # branch/ref name -> commit
        self.commits: dict[str, dict[str, bytes]] = {}  # commit -> {path: content}

    def add_revision(self, name: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(json.dumps([self.repo_id, name, sorted(files)]).encode())
        for path in sorted(files):
            digest.update(files[path])
        commit = digest.hexdigest()
        self.revisions[name] = commit
        self.commits[commit] = dict(files)
        return commit

    def files_at(self, rev: str):
        commit = rev if rev in self.commits else self.revisions.get(rev)
        return (commit, self.commits[commit]) if commit else (None, None)


def _blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = None

    def add(self, repo_type: str, repo_id: str, files: dict[str, bytes], revision: str = "main",
            gated: bool = False) -> str:
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_id, repo_type, gated))
        return repo.add_revision(revision, files)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def paths_requested(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [p for m, p in self.requests if method is None or m == method]

    def __enter__(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    # --------------------------------------------------------------------------------------------

    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head=False):
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, message: str, head=False):
        body = json.dumps({"error": message}).encode()
        self._send(h, status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                     "Content-Type": "application/json"}, head)

    def _repo(self, h, repo_type: str, repo_id: str, head=False):
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.gated:
            self._error(h, 403, "GatedRepo", "Access to this repo is restricted", head)
            return None
        return repo

    def _handle(self, h, head: bool):
        url = urlsplit(h.path)
        raw = url.path
        with self._lock:
            self.requests.append((h.command, unquote(raw)))
        parts = raw.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 6 and parts[1] in ("models", "datasets"):
            repo_type = parts[1][:-1]
            repo_id = unquote(parts[2]) + "/" + unquote(parts[3])
            repo = self._repo(h, repo_type, repo_id, head)
            if repo is None:
                return
            rev = unquote(parts[5])
            commit, files = repo.files_at(rev)
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if parts[4] == "revision":
                info = {"id": repo_id, "sha": commit, "private": False, "disabled": False, "gated": False,
                        "siblings": [{"rfilename": p, "size": len(c), "blobId": _blob_id(c)}
                                     for p, c in sorted(files.items())]}
                return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            if parts[4] == "tree":
                sub = unquote("/".join(parts[6:]))
                entries = [{"type": "file", "oid": _blob_id(c), "size": len(c), "path": p}
                           for p, c in sorted(files.items()) if not sub or p.startswith(sub + "/")]
                return self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
            return self._error(h, 404, "EntryNotFound", "unknown API route", head)
        # /[datasets/]{org}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "EntryNotFound", "not found", head)
        repo = self._repo(h, repo_type, unquote(parts[0]) + "/" + unquote(parts[1]), head)
        if repo is None:
            return
        rev = unquote(parts[3])
        commit, files = repo.files_at(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        path = unquote("/".join(parts[4:]))
        if path not in files:
            return self._error(h, 404, "EntryNotFound", f"{path} does not exist at {rev}", head)
        content = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        status = 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            content, status = content[start:], 206
        headers["Content-Length"] = str(len(content))
        self._send(h, status, content, headers, head)
