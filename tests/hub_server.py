"""A tiny in-memory Hugging Face Hub for tests, on 127.0.0.1 (stdlib only).

It implements just what huggingface_hub's push_to_hub / model_info / hf_hub_download call
(see huggingface_hub hf_api.py, _commit_api.py, file_download.py):

    POST /api/repos/create                              create_repo (409 + url when it exists)
    POST /api/validate-yaml                             README.md front matter check (real YAML parse)
    POST /api/models/{repo}/preupload/{rev}             every file is "regular" (no LFS, no Xet)
    POST /api/models/{repo}/commit/{rev}                NDJSON: header, file (base64), deletedFile, deletedFolder
    GET  /api/models/{repo}[/revision/{rev}]            model_info: id, sha, siblings
    HEAD|GET /{repo}/resolve/{rev}/{path}               file + X-Repo-Commit, ETag, Content-Length

Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which huggingface_hub maps to
its exception classes. Every commit is kept, so any earlier commit sha can be resolved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "model_info"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file, which the Hub sends as ETag for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> sha

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


class HubState:
    """All repos, guarded by one lock (the server is threaded)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "METHOD path" log, handy when a test fails


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply sends Content-Length
    state: HubState
    base_url: str

    def log_message(self, format: str, *args) -> None:  # quiet test output
        pass

    # ---- plumbing ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        self.state.requests.append(f"{method} {path}")
        body = self._read_body()
        for route_method, pattern, handler in _ROUTES:
            match = pattern.fullmatch(path)
            if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.state.lock:
                    return getattr(self, handler)(body=body, head=method == "HEAD", **args)
        self._json(404, {"error": f"no route for {method} {path}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, data: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _json(self, status: int, obj: object, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str, message: str, head: bool = False, **headers: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **headers}, head)

    def _repo(self, repo: str, head: bool = False) -> Repo | None:
        if repo not in self.state.repos:
            self._error(404, "RepoNotFound", f"Repository {repo} not found", head)
            return None
        return self.state.repos[repo]

    # ---- endpoints --------------------------------------------------------------------------

    def create_repo(self, body: bytes, head: bool) -> None:
        payload = json.loads(body)
        if not payload.get("organization"):
            return self._json(400, {"error": "this test hub needs namespace/name repo ids"})
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.base_url}/{repo_id}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self.state.repos[repo_id] = Repo(commits={sha: initial}, branches={"main": sha})
        self._json(200, {"url": url, "name": repo_id})

    def validate_yaml(self, body: bytes, head: bool) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, body: bytes, head: bool, repo: str, rev: str) -> None:
        if self._repo(repo) is None:
            return
        files = json.loads(body)["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]})

    def commit(self, body: bytes, head: bool, repo: str, rev: str) -> None:
        if (r := self._repo(repo)) is None:
            return
        parent = r.branches.get(rev)
        if parent is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = dict(r.commits[parent])
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                if value.get("parentCommit") not in (None, parent):
                    return self._json(412, {"error": "parent commit is not the branch head"})
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile: preupload never asks for LFS
                return self._json(400, {"error": f"unsupported commit operation {key}"})
        sha = hashlib.sha1(parent.encode() + body).hexdigest()
        r.commits[sha] = files
        r.branches[rev] = sha
        self._json(200, {"commitUrl": f"{self.base_url}/{repo}/commit/{sha}", "commitOid": sha, "success": True})

    def model_info(self, body: bytes, head: bool, repo: str, rev: str = "main") -> None:
        if (r := self._repo(repo, head)) is None:
            return
        if (sha := r.resolve(rev)) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        siblings = [{"rfilename": p} for p in sorted(r.commits[sha])]
        self._json(200, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings,
                         "tags": []}, head=head)

    def resolve(self, body: bytes, head: bool, repo: str, rev: str, path: str) -> None:
        if (r := self._repo(repo, head)) is None:
            return
        if (sha := r.resolve(rev)) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if path not in r.commits[sha]:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {sha}", head, **{"X-Repo-Commit": sha})
        data = r.commits[sha][path]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"'}
        self._send(200, data, headers, head)


class HubServer:
    """``with HubServer() as hub:`` serves on ``hub.url`` (a free port) from a daemon thread."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        handler.base_url = self.url
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
