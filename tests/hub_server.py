"""A minimal Hugging Face Hub on 127.0.0.1 for tests.

It speaks the HTTP protocol the real `huggingface_hub` client uses, for model repos:
- check a model card's YAML header (`POST /api/validate-yaml`);
- create a repo (`POST /api/repos/create`) and a branch (`POST /api/models/{id}/branch/{name}`);
- upload: `preupload` (every file is a regular git blob: no LFS or Xet storage here) and the NDJSON `commit`;
- read: revision info (`/api/models/{id}[/revision/{rev}]`), `tree`, `paths-info`, `refs`, and
  `HEAD`/`GET /{id}/resolve/{rev}/{path}` with `X-Repo-Commit` and `ETag` headers;
- errors as the Hub reports them (`X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`, 401 without a token).

Every commit is kept, so old revisions stay downloadable. Write calls need `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.body = status, message, code, commit, body


class MiniHub:
    """`with MiniHub(token="hf_test") as hub:` serves on `hub.url` until the block ends (or `hub.stop()`)."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: requests are recorded in hub.requests
                pass

            def do_GET(self):
                self.handle_request("GET")

            def do_HEAD(self):
                self.handle_request("HEAD")

            def do_POST(self):
                self.handle_request("POST")

            def handle_request(self, method: str):
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append((method, url.path))
                try:
                    status, payload, headers = hub.route(method, url.path, parse_qs(url.query), body, self.headers)
                except HubError as error:
                    status, payload = error.status, json.dumps({"error": error.message, **error.body}).encode()
                    headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
                    headers.update({"X-Error-Code": error.code} if error.code else {})
                    headers.update({"X-Repo-Commit": error.commit} if error.commit else {})
                if not isinstance(payload, bytes):
                    payload, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "MiniHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()

    # ----- routing -----

    def route(self, method: str, path: str, query: dict, body: bytes, headers) -> tuple[int, object, dict]:
        authorized = headers.get("Authorization") == f"Bearer {self.token}"
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", rf"/api/models/{REPO}/preupload/{REV}", self.preupload),
            ("POST", rf"/api/models/{REPO}/commit/{REV}", self.commit),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", self.create_branch),
            ("GET", rf"/api/models/{REPO}/refs", self.refs),
            ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<subpath>.*))?", self.tree),
            ("POST", rf"/api/models/{REPO}/paths-info/{REV}", self.paths_info),
            ("GET", rf"/api/models/{REPO}/revision/{REV}", self.revision_info),
            ("GET", rf"/api/models/{REPO}", self.revision_info),
            ("GET|HEAD", rf"/{REPO}/resolve/{REV}/(?P<file>.+)", self.resolve),
        ]
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method in methods.split("|"):
                arguments = {key: unquote(value) if value else value for key, value in match.groupdict().items()}
                return handler(authorized=authorized, query=query, body=body, **arguments)
        raise HubError(404, f"{method} {path} is not implemented by the test Hub")

    def get_repo(self, repo: str, authorized: bool) -> Repo:
        found = self.repos.get(repo)
        if found is None or (found.private and not authorized):
            raise HubError(401 if not authorized else 404, f"Repository Not Found for {repo}.", "RepoNotFound")
        return found

    def get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    @staticmethod
    def require_token(authorized: bool) -> None:
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    # ----- endpoints -----

    def whoami(self, authorized, **_):
        self.require_token(authorized)
        return 200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}}, {}

    def validate_yaml(self, body, **_):
        """The model card's YAML header must parse to a mapping."""
        content = json.loads(body)["content"]
        header = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        try:
            if header and not isinstance(yaml.safe_load(header.group(1)) or {}, dict):
                raise yaml.YAMLError("the header is not a mapping")
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"Invalid YAML in README.md: {error}"}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def create_repo(self, authorized, body, **_):
        self.require_token(authorized)
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            self._add_commit(
                repo,
                "main",
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                "initial commit",
            )
            self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def create_branch(self, authorized, repo, branch, body, **_):
        self.require_token(authorized)
        found = self.get_repo(repo, authorized)
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with self.lock:
            if branch in found.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            found.branches[branch] = self.get_commit(found, start).oid
        return 200, {}, {}

    def preupload(self, authorized, repo, rev, body, **_):
        self.require_token(authorized)
        self.get_repo(repo, authorized)
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}, {}

    def commit(self, authorized, repo, rev, body, **_):
        self.require_token(authorized)
        found = self.get_repo(repo, authorized)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        with self.lock:
            parent = self.get_commit(found, rev)
            if rev not in found.branches:
                raise HubError(400, f"Can only commit to a branch, not {rev}")
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    raise HubError(400, f"The test Hub takes regular files only, not {key}")
            commit = self._add_commit(found, rev, files, header.get("summary", ""))
        return (
            200,
            {"commitUrl": f"{self.url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid, "pullRequestUrl": None},
            {},
        )

    def _add_commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> Commit:
        parent = repo.branches.get(branch, "")
        digest = hashlib.sha1(parent.encode() + message.encode() + str(time.time_ns()).encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_id(files[path]).encode())
        commit = Commit(digest.hexdigest(), files, message)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def refs(self, authorized, repo, **_):
        found = self.get_repo(repo, authorized)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in found.branches.items()
        ]
        return 200, {"branches": branches, "converts": [], "tags": []}, {}

    def revision_info(self, authorized, repo, rev="main", **_):
        found = self.get_repo(repo, authorized)
        commit = self.get_commit(found, rev)
        when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date))
        return (
            200,
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": when,
                "createdAt": when,
                "private": found.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            },
            {},
        )

    @staticmethod
    def _entry(path: str, content: bytes) -> dict:
        return {"type": "file", "oid": git_blob_id(content), "size": len(content), "path": path}

    def tree(self, authorized, repo, rev, query, subpath=None, **_):
        commit = self.get_commit(self.get_repo(repo, authorized), rev)
        prefix = f"{subpath.rstrip('/')}/" if subpath else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest:
                parts = rest.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add(prefix + "/".join(parts[:depth]))
                if not recursive:
                    continue
            entries.append(self._entry(path, commit.files[path]))
        if subpath and not entries and not folders:
            raise HubError(404, f"{subpath} does not exist at {rev}", "EntryNotFound", commit.oid)
        folder_entries = [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ]
        return 200, folder_entries + entries, {}

    def paths_info(self, authorized, repo, rev, body, **_):
        commit = self.get_commit(self.get_repo(repo, authorized), rev)
        form = parse_qs(body.decode())
        paths = form.get("paths", []) or json.loads(body or b"{}").get("paths", [])
        found = [self._entry(p, commit.files[p]) for p in paths if p in commit.files]
        found += [
            {"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
            for p in paths
            if p not in commit.files and any(f.startswith(p.rstrip("/") + "/") for f in commit.files)
        ]
        return 200, found, {}

    def resolve(self, authorized, repo, rev, file, **_):
        found = self.get_repo(repo, authorized)
        commit = self.get_commit(found, rev)
        if file not in commit.files:
            raise HubError(404, f"Entry not found: {file}", "EntryNotFound", commit.oid)
        content = commit.files[file]
        return (
            200,
            content,
            {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": commit.oid,
                "ETag": f'"{git_blob_id(content)}"',
            },
        )
