"""A small, local, Hugging Face Hub-compatible HTTP server for offline tests.

`LocalHub` serves the subset of the Hub's HTTP API that the unmodified `huggingface_hub` client (v1.x/2.x) uses to
create model repos, upload folders (regular files inline in the commit, large files through the Git LFS batch API)
and download them again (`hf_hub_download`, `snapshot_download`, `DiffusionPipeline.from_pretrained`). Point the client
at it with `HF_ENDPOINT=hub.endpoint` set before `huggingface_hub` is imported, plus:

- `HF_HUB_DISABLE_XET=1` on the uploading side: whenever `hf_xet` is installed the client uploads through Xet storage
  without asking the server first, so only this variable makes it take the HTTP/LFS path. The server never sends the
  `X-Xet-*` headers or `xetHash` fields that would route downloads through Xet.
- `HF_TOKEN=hub.token` (or `token=`) for writes and for private repos.

Only the standard library is used; the server binds 127.0.0.1 on a free port. Repos, branches and commits are kept in
`<storage_dir>/repos.json`, file contents (regular and LFS alike) in `<storage_dir>/objects/<sha256>`, so a new
`LocalHub` on the same directory serves the same repos.
"""

import base64
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["DEFAULT_LFS_EXTENSIONS", "DEFAULT_LFS_THRESHOLD", "HubError", "LocalHub", "parse_front_matter"]

DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's limit for regular (non-LFS) files
DEFAULT_LFS_EXTENSIONS = (
    ".bin", ".ckpt", ".gif", ".gz", ".h5", ".jpeg", ".jpg", ".msgpack", ".npy", ".npz", ".onnx", ".png", ".pt",
    ".pth", ".safetensors", ".tar", ".webp", ".zip",
)  # fmt: skip
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(Exception):
    """An HTTP error answered the way the Hub does: the `X-Error-Code` header selects the client's exception class."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.body = status, {"error": message, **(body or {})}
        self.headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}


def _now() -> str:
    """Timestamp in the only format `huggingface_hub.utils.parse_datetime` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    """Git blob id: what the Hub reports as `oid`/`blobId` and as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _scalar(value: str) -> Any:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        return [_scalar(item) for item in value[1:-1].split(",") if item.strip()]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~", ""):
        return None
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    return value


def parse_front_matter(text: str) -> dict[str, Any] | None:
    """The YAML metadata block of a model card (`cardData`), or None without one, parsed as the Hub parses it."""
    match = re.match(r"^\ufeff?---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to `LocalHub.handle`; one connection per request (HTTP/1.0), so no thread outlives it."""

    server: "_Server"

    def do_GET(self):
        self.server.hub.handle(self)

    do_HEAD = do_POST = do_PUT = do_GET

    def log_message(self, format, *args):
        """Silent: the hub records requests in `LocalHub.requests` instead."""


class _Server(ThreadingHTTPServer):
    hub: "LocalHub"
    request_queue_size = 64  # snapshot_download opens 8 connections at once, one per request


class LocalHub:
    """An in-process Hub for model repos, served from a background thread.

    Args:
        storage_dir: where repos and file contents are stored (created if missing).
        lfs_threshold: files of at least this many bytes are uploaded through LFS (the Hub: 10 MB); lower it to
            force the LFS path on small files.
        lfs_extensions: files with these suffixes always go through LFS, like the Hub's default `.gitattributes`.
        username: the account `token` belongs to; writes are allowed in this namespace only.
        token: the one valid access token, expected as `Authorization: Bearer <token>`.

    Counters, reset never: `uploaded_bytes` (file content received: LFS PUT bodies and regular files in commits),
    `lfs_uploads` (LFS object PUTs), `regular_uploads` (files sent inline in commits), `commits` (a `Counter` of
    commits made through the commit API, per repo id; repo creation's initial commit is not counted) and
    `requests` (every request as "METHOD /path?query", in arrival order).
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike,
        *,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        lfs_extensions: tuple[str, ...] = DEFAULT_LFS_EXTENSIONS,
        username: str = "user",
        token: str = "hf_localhubtesttokenXXXXXXXXXXXXXXXXX",
    ):
        self.storage_dir = Path(storage_dir)
        self.objects_dir = self.storage_dir / "objects"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self._state_file = self.storage_dir / "repos.json"
        self.repos: dict[str, dict[str, Any]] = (
            json.loads(self._state_file.read_text()) if self._state_file.exists() else {}
        )
        self.lfs_threshold = lfs_threshold
        self.lfs_extensions = tuple(ext.lower() for ext in lfs_extensions)
        self.username, self.token = username, token
        self.uploaded_bytes = self.lfs_uploads = self.regular_uploads = 0
        self.commits: Counter[str] = Counter()
        self.requests: list[str] = []
        self._announced: set[str] = set()  # LFS oids the batch API handed an upload URL for
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("GET", r"/api/agent-harnesses", self._agent_harnesses),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self._model_info),
            ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
            ("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
        ]

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Base URL to use as `HF_ENDPOINT`, e.g. `http://127.0.0.1:40123`."""
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "LocalHub":
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)  # a quick `stop()`
        self._thread = threading.Thread(target=serve, name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join the serving thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- HTTP plumbing ------------------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        """Route one request; handlers return `(status, body, headers)` or raise `HubError`."""
        url = urlsplit(request.path)
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests.append(f"{request.command} {request.path}")
        try:
            for method, pattern, handler in self._routes:
                match = re.fullmatch(pattern, url.path)
                if method == request.command and match:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    query = {key: values[-1] for key, values in parse_qs(url.query).items()}
                    status, payload, headers = handler(request.headers, body, query, **params)
                    break
            else:
                raise HubError(404, f"LocalHub does not implement {request.command} {url.path}")
        except HubError as error:
            status, payload, headers = error.status, error.body, error.headers
        except (KeyError, TypeError, ValueError) as error:  # a 400 rather than a dropped connection the client retries
            status, payload, headers = 400, {"error": f"Malformed request: {error!r}"}, {}
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **headers}
        request.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            request.send_header(name, value)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)

    def _authorized(self, headers) -> bool:
        return headers.get("Authorization") == f"Bearer {self.token}"

    def _require_write(self, headers, repo_id: str) -> None:
        """401 without the token (the client's message for a bad token), 403 outside the user's namespace."""
        if not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")
        if repo_id.split("/")[0] != self.username:
            raise HubError(403, f"You don't have the rights to create or write to {repo_id}")

    def _repo(self, headers, repo_id: str) -> dict[str, Any]:
        """The repo; unknown repos, and private ones without the token, are both 404 RepoNotFound, as on the Hub."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._authorized(headers)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _snapshot(self, headers, repo_id: str, revision: str) -> tuple[str, dict[str, Any]]:
        """The commit sha and files of `revision` (a branch or a full commit sha); else 404 RevisionNotFound."""
        repo = self._repo(headers, repo_id)
        sha = repo["branches"].get(revision) or (revision if revision in repo["commits"] else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, repo["commits"][sha]["files"]

    def _object_path(self, sha256: str) -> Path:
        return self.objects_dir / sha256

    def _store(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self._object_path(sha256).exists():
            tmp = self._object_path(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(self._object_path(sha256))
        return sha256

    def _save(self) -> None:
        self._state_file.write_text(json.dumps(self.repos))

    def _new_commit(self, repo_id: str, branch: str, files: dict[str, dict[str, Any]], title: str) -> str:
        repo = self.repos[repo_id]
        parent = repo["branches"].get(branch)
        date = _now()
        seed = json.dumps([repo_id, parent, files, title, date, len(repo["commits"])])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "title": title, "date": date, "files": files}
        repo["branches"][branch] = sha
        self._save()
        return sha

    @staticmethod
    def _regular_entry(data: bytes, sha256: str) -> dict[str, Any]:
        return {"size": len(data), "sha256": sha256, "oid": _git_oid(data), "lfs": False}

    @staticmethod
    def _lfs_entry(sha256: str, size: int) -> dict[str, Any]:
        """An LFS file: git sees the pointer file (whose blob id is the `oid`), LFS the content (`sha256`)."""
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
        return {"size": size, "sha256": sha256, "oid": _git_oid(pointer), "lfs": True, "pointerSize": len(pointer)}

    @staticmethod
    def _folders(files: dict[str, Any]) -> dict[str, str]:
        """Every folder of a snapshot, with a stable tree id derived from the entries below it."""
        folders: dict[str, list[str]] = {}
        for path, entry in sorted(files.items()):
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folders.setdefault("/".join(parts[:depth]), []).append(f"{path}:{entry['oid']}")
        return {folder: hashlib.sha1("\n".join(items).encode()).hexdigest() for folder, items in folders.items()}

    @staticmethod
    def _path_info(path: str, entry: dict[str, Any] | None = None, tree_id: str | None = None) -> dict[str, Any]:
        """A file or folder as `RepoFile(**info)` / `RepoFolder(**info)` parse it."""
        if entry is None:
            return {"type": "directory", "path": path, "oid": tree_id}
        info = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
        if entry["lfs"]:
            info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": entry["pointerSize"]}
        return info

    # -- account and repos --------------------------------------------------------------------------------------

    def _whoami(self, headers, body, query):
        """`GET /api/whoami-v2`: the token's user, or 401 (`HfApi.whoami`)."""
        if not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")
        auth = {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}}
        user = {"type": "user", "id": self.username, "name": self.username, "fullname": self.username}
        return 200, {**user, "email": None, "emailVerified": False, "isPro": False, "orgs": [], "auth": auth}, {}

    def _agent_harnesses(self, headers, body, query):
        """`GET /api/agent-harnesses`, fetched once a day for the user agent string: an empty registry."""
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}

    def _create_repo(self, headers, body, query):
        """`POST /api/repos/create` (`HfApi.create_repo`): 409 if it exists, which `exist_ok=True` swallows.

        The new repo's `main` holds an initial commit with a `.gitattributes` listing the LFS suffixes, as on the Hub.
        """
        payload = json.loads(body)
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "LocalHub only hosts model repos")
        repo_id = f"{payload.get('organization') or self.username}/{payload['name']}"
        self._require_write(headers, repo_id)
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", body={"url": url})
            self.repos[repo_id] = {"private": private, "createdAt": _now(), "branches": {}, "commits": {}}
            rules = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in self.lfs_extensions).encode()
            files = {".gitattributes": self._regular_entry(rules, self._store(rules))}
            self._new_commit(repo_id, "main", files, "initial commit")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, headers, body, query):
        """`POST /api/validate-yaml`, called before committing a README.md: everything is valid here."""
        return 200, {"errors": [], "warnings": []}, {}

    def _model_info(self, headers, body, query, repo, rev="main"):
        """`GET /api/models/{repo}[/revision/{rev}]` (`model_info`, `repo_info`): `sha` and `siblings` at `rev`,
        `cardData`/`tags`/`library_name`/`pipeline_tag` from the README.md front matter; `?blobs=true` adds sizes
        and LFS info to the siblings."""
        sha, files = self._snapshot(headers, repo, rev)
        readme = files.get("README.md")
        card = parse_front_matter(self._object_path(readme["sha256"]).read_text(errors="replace")) if readme else None
        card = card or {}
        tags = card.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        if card.get("library_name") and card["library_name"] not in tags:
            tags.append(card["library_name"])
        siblings = [{"rfilename": path} for path in sorted(files)]
        if query.get("blobs", "").lower() == "true":
            for sibling in siblings:
                entry = files[sibling["rfilename"]]
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {
                        "size": entry["size"],
                        "sha256": entry["sha256"],
                        "pointerSize": entry["pointerSize"],
                    }
        model = {
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": sha,
            "private": self.repos[repo]["private"],
            "gated": False,
            "disabled": False,
            "lastModified": self.repos[repo]["commits"][sha]["date"],
            "createdAt": self.repos[repo]["createdAt"],
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "siblings": siblings,
        }
        if card:
            model["cardData"] = card
        return 200, model, {}

    # -- listing ------------------------------------------------------------------------------------------------

    def _tree(self, headers, body, query, repo, rev, path=""):
        """`GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=` (`list_repo_tree`, `list_repo_files`,
        `snapshot_download`): one unpaginated page of the folder's files and folders, or everything below it."""
        files = self._snapshot(headers, repo, rev)[1]
        folders = self._folders(files)
        base = path.strip("/")
        if base and base not in folders:
            raise HubError(404, f"{base} does not exist on {rev}", "EntryNotFound")
        prefix = f"{base}/" if base else ""
        recursive = query.get("recursive", "false").lower() == "true"
        listing = [
            self._path_info(name, files.get(name), folders.get(name))
            for name in sorted({*files, *folders})
            if name.startswith(prefix) and (recursive or "/" not in name[len(prefix) :])
        ]
        return 200, listing, {}

    def _paths_info(self, headers, body, query, repo, rev):
        """`POST /api/models/{repo}/paths-info/{rev}` with form fields `paths` (`get_paths_info`): the info of the
        paths that exist, files and folders alike; missing paths are left out."""
        files = self._snapshot(headers, repo, rev)[1]
        folders = self._folders(files)
        listing = [
            self._path_info(path, files.get(path), folders.get(path))
            for path in (path.strip("/") for path in parse_qs(body.decode()).get("paths", []))
            if path in files or path in folders
        ]
        return 200, listing, {}

    # -- upload -------------------------------------------------------------------------------------------------

    def _preupload(self, headers, body, query, repo, rev):
        """`POST /api/models/{repo}/preupload/{rev}` (`create_commit` step 1): per file, `uploadMode` "lfs" (size
        >= `lfs_threshold` or an LFS suffix) or "regular", `shouldIgnore` (always false: no .gitignore support) and
        the `oid` of the file already at that path: its sha256 if it is in LFS, else its git blob id. The client
        compares that oid with its own and leaves unchanged files out of the commit; if none is left, it skips the
        commit altogether."""
        self._require_write(headers, repo)
        sha, files = self._snapshot(headers, repo, rev)
        answers = []
        for item in json.loads(body)["files"]:
            path, existing = item["path"], files.get(item["path"])
            lfs = item["size"] >= self.lfs_threshold or path.lower().endswith(self.lfs_extensions)
            oid = existing and (existing["sha256"] if existing["lfs"] else existing["oid"])
            mode = "lfs" if lfs else "regular"
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": answers, "commitOid": sha}, {}

    def _lfs_batch(self, headers, body, query, repo):
        """`POST /{repo}.git/info/lfs/objects/batch` (Git LFS batch API, basic transfer; `create_commit` step 2): an
        `upload` action pointing at this server for each object it lacks, no `actions` for those it has (the
        client then skips them). No `verify` action: the PUT itself checks size and sha256."""
        self._require_write(headers, repo)
        self._repo(headers, repo)
        request = json.loads(body)
        if request.get("operation") != "upload":
            raise HubError(400, "LocalHub's LFS batch API only supports uploads")
        objects = []
        for obj in request["objects"]:
            oid, size = obj["oid"], obj["size"]
            if not _SHA256.fullmatch(oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid sha256"}})
            elif self._object_path(oid).exists():
                objects.append({"oid": oid, "size": size})
            else:
                with self._lock:
                    self._announced.add(oid)
                upload = {"href": f"{self.endpoint}/lfs-upload/{oid}"}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload}})
        reply = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return 200, reply, {"Content-Type": "application/vnd.git-lfs+json"}

    def _lfs_put(self, headers, body, query, oid):
        """`PUT /lfs-upload/{oid}`: the upload URL the batch API hands out (the Hub's would be a pre-signed S3 URL,
        so the client sends no token). Accepted only for announced oids, and only if the body hashes to `oid`."""
        if oid not in self._announced:
            raise HubError(403, "No LFS upload was requested for this object")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Content does not match its sha256")
        with self._lock:
            self._store(body)
            self.lfs_uploads += 1
            self.uploaded_bytes += len(body)
        return 200, b"", {}

    def _commit(self, headers, body, query, repo, rev):
        """`POST /api/models/{repo}/commit/{branch}` (`create_commit` step 3), an NDJSON body: a `header` line
        (`summary`, `description`, optional `parentCommit`), then `file` (base64 content), `lfsFile` (`oid`, already
        uploaded), `deletedFile` and `deletedFolder` lines. Answers `commitOid` and `commitUrl`."""
        self._require_write(headers, repo)
        info = self._repo(headers, repo)
        if query.get("create_pr"):
            raise HubError(400, "LocalHub does not support pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        with self._lock:
            if rev not in info["branches"]:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = info["branches"][rev]
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(info["commits"][head]["files"])
            regular_files = regular_bytes = 0
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"].strip("/")
                if key == "file":
                    content = value["content"]
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    files[path] = self._regular_entry(data, self._store(data))
                    regular_files, regular_bytes = regular_files + 1, regular_bytes + len(data)
                elif key == "lfsFile":
                    if not self._object_path(value["oid"]).exists():
                        raise HubError(400, f"LFS object {value['oid']} of {path} was never uploaded")
                    files[path] = self._lfs_entry(value["oid"], self._object_path(value["oid"]).stat().st_size)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    inside = [name for name in files if name.startswith(f"{path}/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for name in inside:
                        del files[name]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            sha = self._new_commit(repo, rev, files, header["summary"])
            self.commits[repo] += 1
            self.regular_uploads += regular_files
            self.uploaded_bytes += regular_bytes
        reply = {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo}/commit/{sha}"}
        return 200, {**reply, "commitMessage": header["summary"], "hookOutput": "", "pullRequestUrl": None}, {}

    # -- download -----------------------------------------------------------------------------------------------

    def _resolve(self, headers, body, query, repo, rev, path):
        """`GET`/`HEAD /{repo}/resolve/{rev}/{path}` (`hf_hub_download`). The client reads `X-Repo-Commit`, then
        `X-Linked-Etag` or `ETag` (sha256 for LFS files, git blob id otherwise) and `X-Linked-Size` or
        `Content-Length`. LFS files are served here directly: the Hub redirects them to a CDN, but the client
        follows same-host redirects and then wants those headers on the final response anyway. `Range: bytes=a-[b]`
        (used to resume) gets a 206. A missing file is 404 EntryNotFound with `X-Repo-Commit`, which the client
        caches as `.no_exist`."""
        sha, files = self._snapshot(headers, repo, rev)
        entry = files.get(path)
        if entry is None:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        reply = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        reply["Content-Type"] = "application/octet-stream"
        if entry["lfs"]:
            reply.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry["size"])})
        data = self._object_path(entry["sha256"]).read_bytes()
        ranges = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range", ""))
        if not ranges:
            return 200, data, reply
        start, end = int(ranges[1]), int(ranges[2] or len(data) - 1)
        if start >= len(data) or end < start:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        end = min(end, len(data) - 1)
        return 206, data[start : end + 1], {**reply, "Content-Range": f"bytes {start}-{end}/{len(data)}"}


def run_client(hub: LocalHub, home: Path, code: str, *, token: bool = True, disable_xet: bool = True) -> Any:
    """Run `code` in a fresh Python with the client pointed at `hub` and `home` as HF_HOME; return its `result`.

    Uploads need `HF_HUB_DISABLE_XET=1`: with `hf_xet` installed, the client uploads through Xet without asking the
    server. Downloads take the plain HTTP path either way, as the server never advertises Xet.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if token:
        env["HF_TOKEN"] = hub.token
    if disable_xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    script = f"import json\nresult = None\n{textwrap.dedent(code)}\nprint(json.dumps(result))\n"
    process = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])
