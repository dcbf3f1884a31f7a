"""Loopback servers that publish a model folder: a Hugging Face Hub and a URL server.

Nothing here can reach the real Hub, so the project serves the published
recognizer itself and lets huggingface_hub's and SpeechBrain's real clients
fetch from these servers:

* :class:`HubServer` speaks the part of the Hub protocol that
  ``hf_hub_download`` and ``snapshot_download`` use:
  ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}`` (quoted ``ETag`` =
  the file's sha256, ``X-Repo-Commit``, ``Content-Length``, ``Range``),
  ``GET /api/models/{repo_id}[/revision/{revision}]`` and
  ``GET /api/models/{repo_id}/tree/{revision}``; errors carry the
  ``X-Error-Code`` the client maps to its exceptions (``RepoNotFound`` with
  401, ``RevisionNotFound`` and ``EntryNotFound`` with 404).
* :class:`UrlServer` is a plain file server: ``GET``/``HEAD
  /{prefix}/{path}`` with ``Content-Length`` and ``Range``.

Both bind a free port on 127.0.0.1 and log every request. What a file
request serves goes through two handler hooks, :meth:`_BaseHandler.file_bytes`
and :meth:`_BaseHandler.send_file_response` (no-ops here): the tests override
them to serve a file badly and show that the fetch layer never keeps a bad
download.

This module uses the standard library only and never imports
huggingface_hub: start the servers first, then point the Hub client at them
with :func:`sbtemplate.fetching.use_hub_endpoint`.

By hand::

    python -m sbtemplate.servers --profile tiny
"""

import argparse
import hashlib
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from sbtemplate.manifest import MANIFEST_NAME, sha256_file

LOOPBACK = "127.0.0.1"
DEFAULT_REVISION = "main"


def unused_loopback_port():
    """A loopback port nothing listens on (to show a server refusing connections)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------
# What is published
# ---------------------------------------------------------------------------


class PublishedFolder:
    """The regular files of one folder (symlinks followed), with their digests.

    Digests come from the folder's ``manifest.json`` when it lists the file;
    anything else (the manifest itself, an unlisted file) is hashed on demand
    and remembered per (size, mtime).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self._hashes = {}
        self._lock = threading.Lock()

    def exists(self):
        """Whether the folder is there (the Hub answers "repo not found" when it is not)."""
        return self.folder.is_dir()

    def files(self):
        """``{name: path}`` of the folder's regular files, by name (empty if the folder is gone)."""
        if not self.folder.is_dir():
            return {}
        return {p.name: p for p in sorted(self.folder.iterdir()) if p.is_file()}

    def path(self, name):
        """Path of published file ``name``, or None (no name leads out of the folder)."""
        if "/" in name or name in ("", ".", ".."):
            return None
        candidate = self.folder / name
        return candidate if candidate.is_file() else None

    def manifest(self):
        """The folder's ``manifest.json`` as a dict (empty when missing or unreadable)."""
        try:
            return json.loads((self.folder / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def sha256(self, name):
        """Hex sha256 of file ``name``: the manifest's, else hashed once per (size, mtime)."""
        entry = self.manifest().get(name)
        if entry and name != MANIFEST_NAME:
            return entry["sha256"]
        path = self.folder / name
        stat = path.stat()
        key = (name, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._hashes:
                self._hashes[key] = sha256_file(path)
            return self._hashes[key]

    def commit(self):
        """A 40-hex commit id that changes whenever the published content does."""
        digest = hashlib.sha1()
        for name in self.files():
            digest.update(f"{name}\0{self.sha256(name)}\n".encode())
        return digest.hexdigest()


@dataclass
class Request:
    """One logged request: method, path, status, body bytes sent and the ``Range`` asked for."""

    method: str
    path: str
    status: int
    sent: int
    range: str = None


# ---------------------------------------------------------------------------
# Shared server machinery
# ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sbtemplate-loopback/1"

    def log_message(self, format, *args):  # quiet: requests are in .requests
        pass

    # -- helpers ------------------------------------------------------------
    @property
    def owner(self):
        return self.server.owner

    def _send(self, status, headers=None, body=b""):
        sent = len(body) if self.command != "HEAD" else 0
        # Logged before the response goes out, so a client never sees a
        # response that is not in the log yet.
        self.owner._log(self.command, self.path, status, sent, self.headers.get("Range"))
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if sent:
            self.wfile.write(body)

    def _send_json(self, status, payload, headers=None):
        body = json.dumps(payload).encode()
        headers = dict(headers or {})
        headers["Content-Type"] = "application/json"
        self._send(status, headers, body)

    def _send_file(self, path, key, headers):
        """Serve a file (GET/HEAD), honouring Range; ``key`` names the file
        for the hooks (``repo_id/filename`` or ``prefix/filename``)."""
        data = self.file_bytes(key, path.read_bytes())
        total = len(data)
        headers = dict(headers)
        headers.setdefault("Content-Type", "application/octet-stream")
        headers["Accept-Ranges"] = "bytes"
        status, start, end = 200, 0, total - 1
        wanted = self.headers.get("Range")
        if wanted:
            parsed = _parse_range(wanted, total)
            if parsed is None:
                self._send(416, {"Content-Range": f"bytes */{total}"})
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = data[start : end + 1]
        self.send_file_response(status, headers, body)

    # -- hooks: a subclass may serve files differently ----------------------
    def file_bytes(self, key, data):
        """The bytes served as file ``key`` for this request, before any Range
        is applied; ``data`` is the published content, served as is here."""
        return data

    def send_file_response(self, status, headers, body):
        """Send a file's response (200, or 206 for a Range): all of ``body`` here."""
        self._send(status, headers, body)

    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        raise NotImplementedError


def _parse_range(value, total):
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> (start, end) inclusive, or None."""
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[len("bytes=") :].strip().partition("-")
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                return None
            return max(0, total - length), total - 1
        start = int(first)
        end = int(last) if last else total - 1
    except ValueError:
        return None
    if start >= total or end < start:
        return None
    return start, min(end, total - 1)


class _LoopbackServer:
    """Runs a ThreadingHTTPServer on a free 127.0.0.1 port in a daemon thread."""

    handler = None

    def __init__(self, host=LOOPBACK, port=0):
        self._host = host
        self._port = port
        self._httpd = None
        self._thread = None
        self._lock = threading.Lock()
        self.requests = []

    # -- lifecycle ---------------------------------------------------------
    def start(self):
        if self._httpd is not None:
            return self
        self._httpd = _Server((self._host, self._port), self.handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._httpd.server_address[1]

    @property
    def url(self):
        return f"http://{LOOPBACK}:{self.port}"

    # -- bookkeeping -------------------------------------------------------
    def _log(self, method, path, status, sent, wanted_range=None):
        with self._lock:
            self.requests.append(Request(method, path, status, sent, wanted_range))

    def clear_log(self):
        with self._lock:
            self.requests.clear()

    def gets(self, suffix=""):
        """GET requests (downloads and API calls) whose path ends with ``suffix``."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "GET" and urlsplit(r.path).path.endswith(suffix)
            ]


# ---------------------------------------------------------------------------
# Hub server
# ---------------------------------------------------------------------------


def _iso_mtime(path):
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.000Z"
    )


class _HubHandler(_BaseHandler):
    def _route(self):
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            return self._api(parts[2:])
        if self.command not in ("GET", "HEAD"):
            return self._send(405)
        # /{org}/{name}/resolve/{revision}/{path...}
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{parts[0]}/{parts[1]}"
            return self._resolve(repo_id, parts[3], "/".join(parts[4:]))
        if parts and parts[0] in ("datasets", "spaces"):
            return self._repo_not_found("/".join(parts[1:3]))
        return self._send_json(404, {"error": "Not Found"})

    # -- errors, as the Hub sends them ---------------------------------------
    def _repo_not_found(self, repo_id):
        msg = "Repository not found"
        self._send_json(
            401,
            {"error": msg},
            {"X-Error-Code": "RepoNotFound", "X-Error-Message": msg},
        )

    def _revision_not_found(self, revision):
        msg = f"Invalid rev id: {revision}"
        self._send_json(
            404,
            {"error": msg},
            {"X-Error-Code": "RevisionNotFound", "X-Error-Message": msg},
        )

    def _entry_not_found(self, commit):
        msg = "Entry not found"
        self._send_json(
            404,
            {"error": msg},
            {
                "X-Error-Code": "EntryNotFound",
                "X-Error-Message": msg,
                "X-Repo-Commit": commit,
            },
        )

    def _lookup(self, repo_id, revision):
        """(repo, commit) or None after sending the error."""
        repo = self.owner.repos.get(repo_id)
        if repo is None or not repo.exists():
            self._repo_not_found(repo_id)
            return None
        commit = repo.commit()
        if revision not in (DEFAULT_REVISION, commit):
            self._revision_not_found(revision)
            return None
        return repo, commit

    # -- endpoints -----------------------------------------------------------
    def _resolve(self, repo_id, revision, filename):
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        path = repo.path(filename)
        if path is None:
            return self._entry_not_found(commit)
        sha = repo.sha256(filename)
        headers = {
            "ETag": f'"{sha}"',
            "X-Repo-Commit": commit,
            "Last-Modified": _iso_mtime(path),
        }
        self._send_file(path, f"{repo_id}/{filename}", headers)

    def _api(self, rest):
        if self.command not in ("GET", "HEAD"):
            return self._send(405)
        # rest = [org, name, ...]
        repo_id = f"{rest[0]}/{rest[1]}"
        tail = rest[2:]
        if not tail:
            return self._model_info(repo_id, DEFAULT_REVISION)
        if tail[0] == "revision" and len(tail) == 2:
            return self._model_info(repo_id, tail[1])
        if tail[0] == "tree" and len(tail) >= 2:
            return self._tree(repo_id, tail[1], "/".join(tail[2:]))
        return self._send_json(404, {"error": "Not Found"})

    def _model_info(self, repo_id, revision):
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        files = repo.files()
        self._send_json(
            200,
            {
                "_id": commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["speechbrain"],
                "library_name": "speechbrain",
                "lastModified": max(
                    (_iso_mtime(p) for p in files.values()),
                    default="1970-01-01T00:00:00.000Z",
                ),
                "siblings": [{"rfilename": name} for name in files],
            },
            {"X-Repo-Commit": commit},
        )

    def _tree(self, repo_id, revision, subpath):
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        if subpath:
            return self._entry_not_found(commit)
        entries = []
        for name, path in repo.files().items():
            size = path.stat().st_size
            sha = repo.sha256(name)
            entries.append(
                {
                    "type": "file",
                    "path": name,
                    "size": size,
                    "oid": hashlib.sha1(f"blob {size}\0".encode() + path.read_bytes()).hexdigest(),
                    "lfs": {"oid": sha, "size": size, "pointerSize": 134},
                }
            )
        self._send_json(200, entries, {"X-Repo-Commit": commit})


class HubServer(_LoopbackServer):
    """A Hugging Face Hub (model repos only) over folders, on loopback.

    ``HF_ENDPOINT`` for the clients is :attr:`url`.
    """

    handler = _HubHandler

    def __init__(self, repos=None, **kwargs):
        super().__init__(**kwargs)
        self.repos = {}
        for repo_id, folder in (repos or {}).items():
            self.publish(repo_id, folder)

    def publish(self, repo_id, folder):
        """Serve ``folder`` as model repo ``repo_id`` (``org/name``); the server, for chaining."""
        if repo_id.count("/") != 1:
            raise ValueError(f"Repo ids look like 'org/name', got {repo_id!r}")
        self.repos[repo_id] = PublishedFolder(folder)
        return self

    def commit(self, repo_id):
        """The commit id of ``repo_id`` (``X-Repo-Commit``): it changes with the content."""
        return self.repos[repo_id].commit()


# ---------------------------------------------------------------------------
# URL server
# ---------------------------------------------------------------------------


class _UrlHandler(_BaseHandler):
    def _route(self):
        if self.command not in ("GET", "HEAD"):
            return self._send(405)
        path = unquote(urlsplit(self.path).path).strip("/")
        prefix, _, filename = path.rpartition("/")
        folder = self.owner.folders.get(prefix)
        file_path = folder.path(filename) if folder is not None else None
        if file_path is None:
            return self._send(404, {"Content-Type": "text/plain"}, b"Not Found\n")
        headers = {
            "ETag": f'"{folder.sha256(filename)}"',
            "Last-Modified": _iso_mtime(file_path),
        }
        self._send_file(file_path, f"{prefix}/{filename}", headers)


class UrlServer(_LoopbackServer):
    """Plain HTTP file server: ``{url}/{prefix}/{file}`` for each published folder."""

    handler = _UrlHandler

    def __init__(self, folders=None, **kwargs):
        super().__init__(**kwargs)
        self.folders = {}
        for prefix, folder in (folders or {}).items():
            self.publish(prefix, folder)

    def publish(self, prefix, folder):
        """Serve ``folder`` under ``/{prefix}/``; returns the server, for chaining."""
        self.folders[prefix.strip("/")] = PublishedFolder(folder)
        return self

    def base_url(self, prefix):
        """The URL of the ``prefix`` folder: ``{base_url}/{file}`` downloads one of its files."""
        return f"{self.url}/{quote(prefix.strip('/'))}"


# ---------------------------------------------------------------------------
# Both at once
# ---------------------------------------------------------------------------


@dataclass
class Served:
    """The running servers for one published folder."""

    repo_id: str
    folder: Path
    hub: HubServer
    urls: UrlServer
    extra: dict = field(default_factory=dict)

    @property
    def hub_endpoint(self):
        """What ``HF_ENDPOINT`` must be for the Hub client."""
        return self.hub.url

    @property
    def url_base(self):
        """``{url_base}/{file}`` downloads a published file from the URL server."""
        return self.urls.base_url(self.repo_id)

    def file_url(self, name):
        """The URL server's download address of published file ``name``."""
        return f"{self.url_base}/{quote(name)}"


@contextmanager
def serve(folder, repo_id, hub_server=HubServer, url_server=UrlServer):
    """Publish ``folder`` as Hub repo ``repo_id`` and as URLs under ``/{repo_id}/``.

    Yields a :class:`Served`; both servers stop on exit. ``hub_server`` and
    ``url_server`` are the classes run (subclasses of :class:`HubServer` and
    :class:`UrlServer`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Nothing to publish: {folder} is not a folder")
    with hub_server({repo_id: folder}) as hub, url_server({repo_id: folder}) as urls:
        yield Served(repo_id, folder, hub, urls)


def main(argv=None):
    """Serve a profile's recognizer (or ``--folder``) as a Hub repo and as URLs until Ctrl-C."""
    from sbtemplate.paths import REPO_ID, ProfilePaths

    parser = argparse.ArgumentParser(
        description="Serve the published recognizer as a Hub repo and as URLs on loopback."
    )
    parser.add_argument("--profile", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--folder", help="folder to publish (default: the profile's model_dir)")
    parser.add_argument("--repo-id", default=REPO_ID)
    args = parser.parse_args(argv)
    folder = Path(args.folder) if args.folder else ProfilePaths.for_profile(args.profile).model_dir
    with serve(folder, args.repo_id) as served:
        print(f"Publishing {folder}")
        print(f"  Hub : HF_ENDPOINT={served.hub_endpoint}  repo {args.repo_id}")
        print(f"  URLs: {served.url_base}/<file>")
        print("Ctrl-C stops.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
