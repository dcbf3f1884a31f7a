"""The three back-ends: local folders, Hugging Face Hub repos, base URLs.

:func:`_fetch_here` fetches one file in this process with the back-end for
its kind of source, then records it. Each back-end lets SpeechBrain's and
huggingface_hub's clients do the transfer, and adds around it what they
lack: a short reachability probe before going to the network (a clear error
within seconds instead of long retry loops), work from the cache when the
server is down, a check of every file against its source's manifest, and
the removal of a bad download from every cache it reached, so that the next
fetch downloads it again.
"""

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from sbtemplate import atomic_write
from sbtemplate.fetching import records
from sbtemplate.fetching.endpoint import check_hub_endpoint, current_hub_endpoint
from sbtemplate.fetching.errors import KIND_HUB, KIND_LOCAL, FetchError, _describe
from sbtemplate.fetching.fetch_policy import _cache_root, _network_allowed, get_policy
from sbtemplate.fetching.probes import _not_a_working_hub, _socket_timeout, _unreachable
from sbtemplate.fetching.request import _exists, _kind_of, _remove_link_or_file, _Request
from sbtemplate.fetching.verification import _load_manifest_file, _verify
from sbtemplate.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)


def _relative_link_within_artifacts(link):
    """SpeechBrain links a savedir entry to its absolute source path; inside
    the artefacts tree make it relative, so that a copied or moved tree
    uses its own files rather than the original's."""
    from sbtemplate.paths import artifacts_root

    if link is None or not Path(link).is_symlink():
        return
    link = Path(link)
    target = Path(os.readlink(link))
    root = artifacts_root().resolve()
    if not (
        target.is_absolute()
        and target.is_relative_to(root)
        and link.parent.resolve().is_relative_to(root)
    ):
        return
    relative = os.path.relpath(target, link.parent.resolve())
    tmp = link.with_name(link.name + ".relinking")
    if os.path.lexists(tmp):
        tmp.unlink()
    tmp.symlink_to(relative)
    os.replace(tmp, link)


def _fetch_here(
    filename,
    source,
    savedir,
    save_filename,
    local_strategy,
    fetch_config,
    *,
    network,
    after_main=False,
):
    kind, where = _kind_of(source)
    if save_filename is None:
        save_filename = filename
    allowed = network and _network_allowed(fetch_config)
    changes = {}
    if fetch_config.allow_network != allowed:
        changes["allow_network"] = allowed
    if (
        kind == KIND_HUB
        and fetch_config.huggingface_cache_dir is None
        and get_policy().hub_cache_dir
    ):
        changes["huggingface_cache_dir"] = get_policy().hub_cache_dir
    if changes:
        fetch_config = dataclasses.replace(fetch_config, **changes)
    request = _Request(kind, where, filename, savedir, save_filename, local_strategy, fetch_config)
    started = time.monotonic()
    if kind == KIND_LOCAL:
        path, status = _fetch_local(request)
    elif kind == KIND_HUB:
        path, status = _fetch_hub(request)
    else:
        path, status = _fetch_url(request)
    if after_main and status == "downloaded":
        status = "cached"
    _relative_link_within_artifacts(request.destination)
    records.fetch_log.append(
        records.FetchRecord(kind, where, filename, str(path), status, time.monotonic() - started)
    )
    return path


# -- local folders -------------------------------------------------------------


def _fetch_local(request):
    folder = Path(request.source)
    source_file = folder / request.filename
    if not folder.is_dir():
        raise request.error(f"no such folder ({folder})")
    if not source_file.is_file():
        raise request.error(f"no such file in the folder ({source_file})")
    try:
        path = request.sb_fetch()
    except Exception as exc:  # noqa: BLE001
        raise request.error(_describe(exc, request)) from exc
    if get_policy().verify and (folder / MANIFEST_NAME).is_file():
        manifest = _load_manifest_file(folder / MANIFEST_NAME, request)
        # Never delete a source folder's file; only our link to it.
        _verify(request, source_file, manifest, purge=lambda: None, keep_hint=True)
    return Path(path), "local"


# -- Hugging Face Hub ------------------------------------------------------------


def _hub_cached(request, filename=None):
    """Path of the file in the Hub cache for the requested revision, or None."""
    import huggingface_hub

    found = huggingface_hub.try_to_load_from_cache(
        request.source,
        filename or request.filename,
        cache_dir=request.config.huggingface_cache_dir,
        revision=request.config.revision,
    )
    return found if isinstance(found, str) else None


def _fetch_hub(request):
    check_hub_endpoint()
    destination = request.destination
    was_there = _exists(destination) and not request.config.overwrite
    cached = was_there or _hub_cached(request) is not None
    if request.config.allow_network:
        # One short probe instead of huggingface_hub's retry loops (~20 s for a
        # refused connection, minutes for a server that never answers).
        problem = _unreachable(current_hub_endpoint()) or _not_a_working_hub(request)
        if problem is not None:
            if not cached:
                raise request.error(
                    f"the Hub at {current_hub_endpoint()} cannot be used ({problem})"
                )
            # Server down but the file is cached: work from the cache.
            request.config = dataclasses.replace(request.config, allow_network=False)
    try:
        path = request.sb_fetch()
    except Exception as exc:  # noqa: BLE001
        if not was_there and destination is not None and not _exists(destination):
            _remove_link_or_file(destination)  # a dangling link, if any
        raise request.error(_describe(exc, request)) from exc
    if get_policy().verify:
        manifest = _hub_manifest(request)

        def verify(path):
            _verify(request, path, manifest, purge=lambda: _purge_hub(request, path))

        path, still_cached = _verified_or_fetched_again(
            request, path, was_there, verify, request.sb_fetch
        )
        cached = cached and still_cached
    return Path(path), ("cached" if cached else "downloaded")


def _verified_or_fetched_again(request, path, was_there, verify, fetch_again):
    """Verify ``path``; a copy that was already in the savedir and fails is
    stale (the source was republished since): ``verify`` has removed it, so
    fetch once more and verify that. Returns (path, whether it was a cache hit)."""
    try:
        verify(path)
        return path, True
    except FetchError:
        if not (was_there and request.config.allow_network):
            raise
    logger.info(
        "%s in %s does not match its source's manifest: fetching it again",
        request.filename,
        request.savedir,
    )
    try:
        path = fetch_again()
    except Exception as exc:  # noqa: BLE001
        _remove_link_or_file(request.destination)
        raise request.error(_describe(exc, request)) from exc
    verify(path)
    return path, False


def _hub_manifest(request):
    import huggingface_hub

    config = request.config
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id=request.source,
            filename=MANIFEST_NAME,
            revision=config.revision,
            cache_dir=config.huggingface_cache_dir,
            token=config.token,
            local_files_only=not config.allow_network,
        )
    except Exception as exc:  # noqa: BLE001
        raise request.error(
            f"cannot verify it: {MANIFEST_NAME} of the repo is unavailable ({_describe(exc, request)})"
        ) from exc
    return _load_manifest_file(path, request, purge=lambda: _purge_hub_file(request, MANIFEST_NAME))


def _purge_hub_file(request, filename):
    pointer = _hub_cached(request, filename)
    if pointer is not None:
        blob = os.path.realpath(pointer)
        _remove_link_or_file(pointer)
        if blob != pointer:
            _remove_link_or_file(blob)


def _purge_hub(request, path):
    """Remove a bad download: the blob, the snapshot link, the savedir link."""
    real = os.path.realpath(path)
    _purge_hub_file(request, request.filename)
    _remove_link_or_file(real)
    if request.destination is not None:
        _remove_link_or_file(request.destination)
    if str(path) != str(request.destination):
        _remove_link_or_file(path)


# -- URLs --------------------------------------------------------------------------


def _url_cache(base_url):
    """The cache folder of one URL base. Loopback servers get a new port on
    every run: their port is left out, so that runs share one folder (what
    is in it is verified against the server's manifest on every use)."""
    parts = urlsplit(base_url.rstrip("/"))
    if parts.hostname in ("localhost", "::1") or (parts.hostname or "").startswith("127."):
        parts = parts._replace(
            netloc=parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        )
    key = hashlib.sha1(parts.geturl().encode()).hexdigest()[:16]
    return _cache_root() / "url" / key


def _fetch_url(request):
    base = request.source.rstrip("/")
    if request.savedir is None:
        # SpeechBrain needs a savedir for URLs; give it a per-base-URL cache.
        request.savedir = _url_cache(base) / "files"
    destination = request.destination
    was_there = _exists(destination) and not request.config.overwrite
    if request.config.allow_network and not was_there:
        problem = _unreachable(base)
        if problem is not None:
            raise request.error(f"the server is unreachable ({problem})")
    try:
        with _socket_timeout(get_policy().io_timeout):
            path = request.sb_fetch()
    except Exception as exc:  # noqa: BLE001
        if not was_there:
            _remove_link_or_file(destination)  # SpeechBrain leaves partial files
        raise request.error(_describe(exc, request)) from exc
    if get_policy().verify:
        # A plain URL has no revision: with the network allowed, re-read the
        # manifest each time, so a republished file is noticed.
        manifest = _url_manifest(request, refresh=request.config.allow_network)

        def refresh():
            return _url_manifest(request, refresh=True)

        def verify(path):
            _verify(
                request,
                path,
                manifest,
                purge=lambda: _remove_link_or_file(destination),
                refresh=refresh if request.config.allow_network else None,
            )

        def fetch_again():
            with _socket_timeout(get_policy().io_timeout):
                return request.sb_fetch()

        path, still_cached = _verified_or_fetched_again(
            request, path, was_there, verify, fetch_again
        )
        was_there = was_there and still_cached
    return Path(path), ("cached" if was_there else "downloaded")


def _url_manifest(request, refresh=False):
    """The base URL's manifest.json, cached under the fetch cache."""
    import urllib.error
    import urllib.request

    base = request.source.rstrip("/")
    folder = _url_cache(base)
    target = folder / MANIFEST_NAME
    if target.is_file() and not refresh:
        return _load_manifest_file(target, request, purge=lambda: _remove_link_or_file(target))
    if not request.config.allow_network:
        raise request.error(
            f"cannot verify it: {MANIFEST_NAME} is not cached and network access is disabled"
        )
    folder.mkdir(parents=True, exist_ok=True)
    url = f"{base}/{MANIFEST_NAME}"
    try:
        with urllib.request.urlopen(url, timeout=get_policy().io_timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise request.error(
            f"cannot verify it: {url} is unavailable ({_describe(exc, request)})"
        ) from exc
    atomic_write.write_bytes(target, data)
    return _load_manifest_file(target, request, purge=lambda: _remove_link_or_file(target))
