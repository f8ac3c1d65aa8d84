"""A small in-memory server for the subset of the Hugging Face Hub protocol that the real
huggingface_hub client uses to push and pull a model (test fixture, not product code).

Speaks what huggingface_hub 2.4 sends, read from its source: whoami-v2, repos/create,
validate-yaml, preupload, the LFS batch API with basic PUT transfers, the NDJSON commit
(to a branch or as a pull request), repo info by revision, tree, refs, branch creation and
resolve (HEAD/GET) with ETag, X-Repo-Commit and X-Linked-* headers. Errors carry X-Error-Code
and X-Error-Message like the Hub's. Xet is not spoken: point clients at it with
HF_HUB_DISABLE_XET=1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_THRESHOLD = 10 * 1024 * 1024  # like the Hub: big or binary files go to LFS
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    content: bytes | None  # None for LFS files (content in the LFS store)
    sha256: str | None = None
    size: int = 0

    @property
    def oid(self) -> str:  # what the tree and preupload call the file's oid
        if self.content is not None:
            return git_blob_sha1(self.content)
        return git_blob_sha1(lfs_pointer(self.sha256, self.size))


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main" / "refs/pr/1" -> commit oid
    prs: int = 0


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class FakeHub:
    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None,
                 gated: dict[str, set[str]] | None = None):
        self.tokens = tokens  # token -> user name
        self.orgs = orgs or {}  # user -> organizations they can write to
        self.gated = gated or {}  # gated model repo -> users whose access request was accepted
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers) of every request
        self.lock = threading.Lock()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # --- lifecycle
    def start(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- state helpers
    def _new_commit(self, parent: str | None, title: str, files: dict[str, Blob]) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f"{parent}{title}{self._counter}".encode()).hexdigest()
        commit = Commit(oid, parent, title, files)
        self.commits[oid] = commit
        return commit

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(user, repo_id)):
            raise HubError(404, "RepoNotFound", f"Repository Not Found for url: {repo_id}.")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        revision = unquote(revision)
        if revision in repo.refs:
            return self.commits[repo.refs[revision]]
        if revision in self.commits and revision in self._history(repo):
            return self.commits[revision]
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _history(self, repo: Repo) -> set[str]:
        seen = set()
        for head in repo.refs.values():
            while head and head not in seen:
                seen.add(head)
                head = self.commits[head].parent
        return seen

    def _can_write(self, user: str | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def commit_count(self, repo_id: str, ref: str = "main") -> int:
        repo, head, n = self.repos[repo_id], None, 0
        head = repo.refs[ref]
        while head:
            n += 1
            head = self.commits[head].parent
        return n

    # --- HTTP
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _user(self, required: bool = False) -> str | None:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
                if token is None:
                    if required:
                        raise HubError(401, None, "Invalid credentials in Authorization header")
                    return None
                if token not in hub.tokens:
                    raise HubError(401, None, "Invalid credentials in Authorization header")
                return hub.tokens[token]

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj, status: int = 200, headers: dict | None = None):
                self._send(status, json.dumps(obj).encode(), headers)

            def _dispatch(self):
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                hub.requests.append((self.command, self.path, dict(self.headers)))
                try:
                    with hub.lock:
                        routes(self, self.command, unquote(url.path), query)
                except HubError as err:
                    headers = {"X-Error-Message": err.message}
                    if err.code:
                        headers["X-Error-Code"] = err.code
                    self._json({"error": err.message, **err.extra}, err.status, headers)

            do_GET = do_POST = do_PUT = do_HEAD = _dispatch

        def routes(h: Handler, method: str, path: str, query: dict) -> None:
            repo_path = r"(?P<repo>[\w.-]+/[\w.-]+)"
            if method == "GET" and path == "/api/whoami-v2":
                user = h._user(required=True)
                return h._json({"type": "user", "name": user, "fullname": user,
                                "orgs": [{"name": org} for org in hub.orgs.get(user, [])],
                                "auth": {"accessToken": {"displayName": "test", "role": "write"}}})
            if method == "POST" and path == "/api/repos/create":
                user = h._user(required=True)
                body = json.loads(h._body())
                repo_id = f"{body.get('organization') or user}/{body['name']}"
                if not hub._can_write(user, repo_id):
                    raise HubError(403, None, "You don't have the rights to create a model under the namespace "
                                              f"\"{repo_id.split('/')[0]}\"")
                if repo_id in hub.repos:
                    raise HubError(409, None, "You already created this model repo", url=f"{hub.url}/{repo_id}")
                initial = hub._new_commit(None, "initial commit",
                                          {".gitattributes": Blob(GITATTRIBUTES)})
                private = body.get("visibility") == "private" or body.get("private") is True  # 2.x sends visibility
                hub.repos[repo_id] = Repo(repo_id, private, {"main": initial.oid})
                return h._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if method == "GET" and (m := re.fullmatch(rf"/api/models/{repo_path}/auth-check", path)):
                user = h._user()
                if m["repo"] in hub.gated:  # the Hub's answer to a gated repo without access: 403 GatedRepo
                    if user not in hub.gated[m["repo"]]:
                        raise HubError(403, "GatedRepo", f"Access to model {m['repo']} is restricted. You must have "
                                                         "access to it and be authenticated to access it.")
                    return h._json({})
                hub._repo(m["repo"], user)  # 404 RepoNotFound unless the user can see it
                return h._json({})
            if method == "POST" and path == "/api/validate-yaml":
                h._user()
                content = json.loads(h._body())["content"]
                match = re.match(r"^---\n(.*?)\n---", content, re.S)
                if not match:
                    return h._json({"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
                import yaml

                try:
                    meta = yaml.safe_load(match.group(1))
                except yaml.YAMLError as exc:
                    raise HubError(400, None, f"Invalid YAML in README.md: {exc}") from None
                if not isinstance(meta, dict):
                    raise HubError(400, None, "README.md metadata must be a mapping")
                return h._json({"errors": [], "warnings": []})
            if m := re.fullmatch(rf"/api/models/{repo_path}/preupload/(?P<rev>.+)", path):
                user = h._user(required=True)
                repo = hub._repo(m["repo"], user)
                files = hub._resolve(repo, m["rev"]).files
                out = []
                for item in json.loads(h._body())["files"]:
                    sample = base64.b64decode(item["sample"])
                    lfs = item["size"] >= LFS_THRESHOLD or b"\0" in sample
                    existing = files.get(item["path"])
                    remote_oid = None
                    if existing is not None:
                        remote_oid = existing.sha256 if existing.content is None else git_blob_sha1(existing.content)
                    out.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                                "shouldIgnore": False, "oid": remote_oid})
                return h._json({"files": out, "commitOid": hub._resolve(repo, m["rev"]).oid})
            if method == "POST" and (m := re.fullmatch(rf"/{repo_path}\.git/info/lfs/objects/batch", path)):
                user = h._user(required=True)
                if not hub._can_write(user, m["repo"]):
                    raise HubError(403, None, "You don't have the rights to write to this repository")
                objects = []
                for obj in json.loads(h._body())["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in hub.lfs:
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}}}
                    objects.append(entry)
                return h._json({"transfer": "basic", "objects": objects})
            if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)):
                content = h._body()
                if hashlib.sha256(content).hexdigest() != m["oid"]:
                    raise HubError(400, None, "LFS content does not match its oid")
                hub.lfs[m["oid"]] = content
                return h._send(200)
            if method == "POST" and (m := re.fullmatch(rf"/api/models/{repo_path}/commit/(?P<rev>.+)", path)):
                user = h._user(required=True)
                repo = hub._repo(m["repo"], user)
                if not hub._can_write(user, repo.repo_id):
                    raise HubError(403, None, "You don't have the rights to write to this repository")
                base = hub._resolve(repo, m["rev"])
                lines = [json.loads(line) for line in h._body().splitlines() if line.strip()]
                header = lines[0]["value"]
                if header.get("parentCommit") and header["parentCommit"] != base.oid:
                    raise HubError(412, None, "A commit has happened since the parent commit")
                files = dict(base.files)
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        files[value["path"]] = Blob(base64.b64decode(value["content"]))
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            raise HubError(422, None, f"LFS file {value['path']} was not uploaded")
                        files[value["path"]] = Blob(None, value["oid"], value["size"])
                    elif line["key"] == "deletedFile":
                        files.pop(value["path"], None)
                commit = hub._new_commit(base.oid, header["summary"], files)
                pr_url = None
                if query.get("create_pr") == "1":
                    repo.prs += 1
                    repo.refs[f"refs/pr/{repo.prs}"] = commit.oid
                    pr_url = f"{hub.url}/{repo.repo_id}/discussions/{repo.prs}"
                else:
                    if unquote(m["rev"]) not in repo.refs:
                        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {m['rev']}")
                    repo.refs[unquote(m["rev"])] = commit.oid
                return h._json({"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{commit.oid}",
                                "commitOid": commit.oid, "pullRequestUrl": pr_url, "success": True})
            if method == "GET" and (m := re.fullmatch(rf"/api/models/{repo_path}(?:/revision/(?P<rev>.+))?", path)):
                repo = hub._repo(m["repo"], h._user())
                commit = hub._resolve(repo, m["rev"] or "main")
                return h._json({"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                                "sha": commit.oid, "private": repo.private, "disabled": False, "gated": False,
                                "lastModified": commit.date, "tags": [], "downloads": 0, "likes": 0,
                                "siblings": [{"rfilename": p} for p in sorted(commit.files)]})
            tree = rf"/api/models/{repo_path}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?"
            if method == "GET" and (m := re.fullmatch(tree, path)):
                repo = hub._repo(m["repo"], h._user())
                commit = hub._resolve(repo, m["rev"])
                prefix = (m["sub"] or "").strip("/")
                entries = []
                for p, blob in sorted(commit.files.items()):
                    if prefix and not p.startswith(prefix + "/"):
                        continue
                    entry = {"type": "file", "path": p, "oid": blob.oid,
                             "size": blob.size if blob.content is None else len(blob.content)}
                    if blob.content is None:
                        entry["lfs"] = {"oid": blob.sha256, "size": blob.size,
                                        "pointerSize": len(lfs_pointer(blob.sha256, blob.size))}
                    entries.append(entry)
                return h._json(entries)
            if method == "GET" and (m := re.fullmatch(rf"/api/models/{repo_path}/refs", path)):
                repo = hub._repo(m["repo"], h._user())
                branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                            for n, c in repo.refs.items() if not n.startswith("refs/pr/")]
                prs = [{"name": n, "ref": n, "targetCommit": c}
                       for n, c in repo.refs.items() if n.startswith("refs/pr/")]
                body = {"branches": branches, "tags": [], "converts": []}
                if query.get("include_prs") == "1":
                    body["pullRequests"] = prs
                return h._json(body)
            if method == "POST" and (m := re.fullmatch(rf"/api/models/{repo_path}/branch/(?P<branch>.+)", path)):
                user = h._user(required=True)
                repo = hub._repo(m["repo"], user)
                body = json.loads(h._body() or b"{}")
                if m["branch"] in repo.refs:
                    raise HubError(409, None, f"Reference already exists: refs/heads/{m['branch']}")
                repo.refs[m["branch"]] = hub._resolve(repo, body.get("startingPoint") or "main").oid
                return h._json({})
            resolve = rf"/{repo_path}/resolve/(?P<rev>[^/]+)/(?P<file>.+)"
            if method in ("GET", "HEAD") and (m := re.fullmatch(resolve, path)):
                repo = hub._repo(m["repo"], h._user())
                commit = hub._resolve(repo, m["rev"])
                blob = commit.files.get(m["file"])
                if blob is None:
                    raise HubError(404, "EntryNotFound", f"{m['file']} does not exist on \"{m['rev']}\"")
                headers = {"X-Repo-Commit": commit.oid}
                if blob.content is None:
                    content = hub.lfs[blob.sha256]
                    headers.update({"ETag": f'"{blob.oid}"', "X-Linked-Etag": f'"{blob.sha256}"',
                                    "X-Linked-Size": str(blob.size)})
                else:
                    content = blob.content
                    headers["ETag"] = f'"{blob.oid}"'
                return h._send(200, content, headers, ctype="application/octet-stream")
            raise HubError(404, None, f"no route for {method} {path}")

        return Handler
