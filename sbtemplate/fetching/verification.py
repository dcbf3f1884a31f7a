"""Integrity: every fetched file is checked against its source's manifest.

A published source carries a ``manifest.json`` with the sha256 and size of
each file. :func:`_verify` compares a fetched file with its entry and, when
they differ, calls the back-end's ``purge`` (which removes the download from
every cache it reached) and raises a :class:`FetchError` that says whether
the file is truncated or corrupted. Digests are remembered per file version
so that a cache hit is not hashed again.

Module state: ``_verified``, the remembered digests, and its lock.
"""

import json
import os
import threading
from pathlib import Path

from sbtemplate.manifest import MANIFEST_NAME, sha256_file


def _load_manifest_file(path, request, purge=None):
    try:
        manifest = json.loads(Path(path).read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except (OSError, ValueError) as exc:
        if purge is not None:
            purge()
        raise request.error(f"cannot verify it: {MANIFEST_NAME} is unreadable ({exc})") from exc


_verified = {}
_verified_lock = threading.Lock()


def _digest(path):
    """sha256 of a file, remembered per (real path, size, mtime)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    with _verified_lock:
        if key in _verified:
            return stat.st_size, _verified[key]
    digest = sha256_file(real)
    with _verified_lock:
        _verified[key] = digest
    return stat.st_size, digest


def _verify(request, path, manifest, purge, refresh=None, keep_hint=False):
    if request.filename == MANIFEST_NAME:
        return
    entry = manifest.get(request.filename)
    if entry is None and refresh is not None:
        manifest = refresh()
        entry = manifest.get(request.filename)
    if entry is None:
        raise request.error(f"cannot verify it: it is not listed in the source's {MANIFEST_NAME}")
    try:
        size, digest = _digest(path)
    except OSError as exc:
        purge()
        raise request.error(f"the fetched file is unreadable ({exc})") from exc
    if size == entry["size"] and digest == entry["sha256"]:
        return
    if refresh is not None:
        # The cached manifest may be older than the file: check once more.
        entry = refresh().get(request.filename, entry)
        if size == entry["size"] and digest == entry["sha256"]:
            return
    purge()
    what = "truncated" if size < entry["size"] else "corrupted"
    action = (
        "the local file is left as it is"
        if keep_hint
        else "removed from the cache; the next fetch downloads it again"
    )
    raise request.error(
        f"integrity check failed, the file is {what}: expected {entry['size']} bytes with "
        f"sha256 {entry['sha256'][:16]}..., got {size} bytes with sha256 {digest[:16]}... ({action})"
    )
