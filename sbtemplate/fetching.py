"""One place for fetching: Hub endpoint, verified downloads, clear errors, DDP.

SpeechBrain fetches from three kinds of source (a local folder, a Hugging Face
Hub repo, a base URL) through ``speechbrain.utils.fetching.fetch``, which
``Pretrainer.collect_files``, ``Pretrained.from_hparams`` and
``Pretrained.load_audio`` all call. :func:`install` routes those calls
through :func:`fetch` here, which keeps SpeechBrain's and huggingface_hub's
real clients doing the transfers and adds:

* **integrity**: every file is checked against the sha256 and size in the
  source's ``manifest.json``; a truncated or corrupted download is removed
  from every cache it reached (Hub blob and snapshot link, URL download,
  the link in ``savedir``) so the next fetch downloads it again;
* **fast, clear errors**: one :class:`FetchError` that names the kind of
  source, the repo or URL, and the file, raised within a second or two (an
  unreachable server is detected with one short TCP probe instead of
  huggingface_hub's ~20-second retry loop); offline with a warm cache works;
* **DDP**: one process downloads, the others wait and then load from the
  cache without touching the network; an error reaches every rank;
* **the Hub endpoint**: huggingface_hub reads ``HF_ENDPOINT`` once, at
  import. :func:`use_hub_endpoint` sets it before the import, or re-points
  every endpoint-derived value if the import already happened, and every Hub
  fetch checks the two still agree.

Nothing in this module imports huggingface_hub or SpeechBrain at import time,
so ``import sbtemplate.fetching`` is safe before the endpoint is set.

Typical use (see single_node_pretrained.py)::

    from sbtemplate import fetching
    fetching.setup(hub_endpoint=served.hub_endpoint, cache_dir=cache)
    from speechbrain.inference.ASR import EncoderDecoderASR  # after setup
"""

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
import urllib.parse
import urllib.request
from urllib.parse import urlsplit

from sbtemplate.manifest import MANIFEST_NAME, sha256_file

logger = logging.getLogger(__name__)

KIND_LOCAL = "local"
KIND_HUB = "huggingface"
KIND_URL = "url"
_KIND_LABEL = {
    KIND_LOCAL: "local folder",
    KIND_HUB: "Hugging Face Hub repo",
    KIND_URL: "URL",
}
PUBLIC_HUB_ENDPOINT = "https://huggingface.co"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class FetchError(RuntimeError):
    """A file could not be fetched. Names the source kind, the source and the file.

    Attributes: ``kind`` (``local``, ``huggingface`` or ``url``), ``source``
    (folder, repo id or base URL), ``filename``, ``reason``, and for Hub
    sources ``revision`` and ``endpoint``.
    """

    def __init__(self, kind, source, filename, reason, revision=None, endpoint=None):
        self.kind = kind
        self.source = str(source)
        self.filename = filename
        self.reason = reason
        self.revision = revision
        self.endpoint = endpoint
        super().__init__(self._message())

    def _message(self):
        label = _KIND_LABEL.get(self.kind, self.kind)
        if self.kind == KIND_URL:
            where = f"{label} {self.source.rstrip('/')}/{self.filename}"
        else:
            where = f"{label} {self.source!r}"
        details = []
        if self.kind == KIND_HUB:
            details.append(f"revision {self.revision or 'main'}")
            if self.endpoint:
                details.append(f"endpoint {self.endpoint}")
        suffix = f" ({', '.join(details)})" if details else ""
        return f"Cannot fetch {self.filename!r} from {where}{suffix}: {self.reason}"

    def as_dict(self):
        return {
            "kind": self.kind,
            "source": self.source,
            "filename": self.filename,
            "reason": self.reason,
            "revision": self.revision,
            "endpoint": self.endpoint,
        }

    def __reduce__(self):
        return (_rebuild_fetch_error, (self.as_dict(),))


def _rebuild_fetch_error(fields):
    return FetchError(**fields)


class HubEndpointError(RuntimeError):
    """huggingface_hub would talk to another endpoint than the configured one."""


# ---------------------------------------------------------------------------
# Hub endpoint (HF_ENDPOINT)
# ---------------------------------------------------------------------------

_state = {"endpoint": None}


def _hub_imported():
    return "huggingface_hub.constants" in sys.modules


def use_hub_endpoint(endpoint):
    """Make huggingface_hub talk to ``endpoint`` (e.g. ``http://127.0.0.1:PORT``).

    Sets ``HF_ENDPOINT``. If huggingface_hub is not imported yet, its import
    will read it. If it is, every value it derived from ``HF_ENDPOINT`` at
    import (``constants.ENDPOINT``, the resolve-URL template, the trusted
    hosts, the module-level ``HfApi``) is re-pointed and then checked, so the
    order of imports cannot send a download elsewhere. Returns the previous
    endpoint.
    """
    endpoint = str(endpoint).rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Hub endpoint must be an http(s) URL, got {endpoint!r}")
    if os.environ.get("HUGGINGFACE_CO_STAGING", "").lower() in ("1", "true", "yes", "on"):
        raise HubEndpointError("HUGGINGFACE_CO_STAGING is set: it overrides HF_ENDPOINT")
    previous = current_hub_endpoint()
    os.environ["HF_ENDPOINT"] = endpoint
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    _state["endpoint"] = endpoint
    if _hub_imported():
        _repoint_imported_hub(endpoint)
    check_hub_endpoint()
    return previous


def current_hub_endpoint():
    """The endpoint huggingface_hub uses (or will use once imported)."""
    if _hub_imported():
        return sys.modules["huggingface_hub.constants"].ENDPOINT
    return os.environ.get("HF_ENDPOINT", PUBLIC_HUB_ENDPOINT).rstrip("/")


def _repoint_imported_hub(endpoint):
    constants = sys.modules["huggingface_hub.constants"]
    old = constants.ENDPOINT
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    host = urlsplit(endpoint).hostname
    hosts = getattr(constants, "HF_URL_HOSTS", None)
    if hosts is not None and host and host.lower() not in hosts:
        constants.HF_URL_HOSTS = frozenset(hosts | {host.lower()})
    # Modules that copied the value with ``from .constants import ENDPOINT``.
    for name in ("huggingface_hub.cli.auth", "huggingface_hub.utils._git_credential"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "ENDPOINT", None) is not None:
            module.ENDPOINT = endpoint
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    api = getattr(hf_api, "api", None) if hf_api is not None else None
    if api is not None and api.endpoint in (old, endpoint):
        api.endpoint = endpoint


def check_hub_endpoint():
    """Raise :class:`HubEndpointError` if huggingface_hub, ``HF_ENDPOINT`` and
    the configured endpoint disagree (no-op before the import)."""
    configured = _state["endpoint"]
    if not _hub_imported():
        return
    constants = sys.modules["huggingface_hub.constants"]
    live = constants.ENDPOINT
    env = os.environ.get("HF_ENDPOINT", PUBLIC_HUB_ENDPOINT).rstrip("/")
    template = constants.HUGGINGFACE_CO_URL_TEMPLATE
    problems = []
    if configured is not None and live != configured:
        problems.append(f"huggingface_hub uses {live} but {configured} was configured")
    if configured is not None and env != configured:
        problems.append(f"HF_ENDPOINT is {env} but {configured} was configured")
    if not template.startswith(live + "/"):
        problems.append(f"the resolve-URL template {template} does not start with {live}")
    if problems:
        raise HubEndpointError(
            "Hub endpoint mismatch: "
            + "; ".join(problems)
            + ". Call sbtemplate.fetching.use_hub_endpoint() instead of setting HF_ENDPOINT by hand."
        )


@contextmanager
def hub_endpoint(endpoint):
    """Temporarily use another Hub endpoint (restores the previous one)."""
    previous_env = os.environ.get("HF_ENDPOINT")
    previous_state = _state["endpoint"]
    previous = use_hub_endpoint(endpoint)
    try:
        yield endpoint
    finally:
        if _hub_imported():
            _repoint_imported_hub(previous)
        if previous_env is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = previous_env
        _state["endpoint"] = previous_state


# ---------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """How :func:`fetch` behaves (see :func:`configure`).

    hub_cache_dir: huggingface_hub cache used when the caller's FetchConfig
        names none (default: huggingface_hub's own, ``HF_HUB_CACHE``).
    cache_dir: this module's cache: URL manifests, and URL downloads made
        without a ``savedir`` (default: ``$SBTEMPLATE_FETCH_CACHE`` or
        ``~/.cache/sbtemplate``).
    allow_network: False makes every fetch offline (cache only), like
        ``FetchConfig(allow_network=False)``; so does ``HF_HUB_OFFLINE=1``.
    connect_timeout: seconds for the reachability probe of a server.
    hub_answer_timeout: seconds the Hub has to answer the probe request (a
        server that accepts connections and never answers, answers HTTP 5xx or
        answers without the Hub's headers fails within this bound).
    io_timeout: socket timeout for URL downloads.
    verify: check sha256 and size against the source's manifest.json.
    """

    hub_cache_dir: str = None
    cache_dir: str = None
    allow_network: bool = True
    connect_timeout: float = 2.0
    hub_answer_timeout: float = 5.0
    io_timeout: float = 10.0
    verify: bool = True


_policy = FetchPolicy()
_policy_lock = threading.Lock()


def get_policy():
    return _policy


def configure(**changes):
    """Change the fetch policy; returns the previous one."""
    global _policy
    with _policy_lock:
        previous = _policy
        _policy = dataclasses.replace(_policy, **changes)
        return previous


@contextmanager
def policy(**changes):
    """Temporarily change the fetch policy."""
    global _policy
    previous = configure(**changes)
    try:
        yield _policy
    finally:
        with _policy_lock:
            _policy = previous


def _cache_root():
    root = _policy.cache_dir or os.environ.get("SBTEMPLATE_FETCH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sbtemplate"


def _network_allowed(fetch_config):
    if not _policy.allow_network or not fetch_config.allow_network:
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    return True


# ---------------------------------------------------------------------------
# What was fetched (for reports)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class FetchRecord:
    kind: str
    source: str
    filename: str
    path: str
    status: str  # "downloaded", "cached" or "local"
    seconds: float

    def describe(self):
        label = _KIND_LABEL[self.kind]
        return f"{self.filename:<22} {self.status:<10} from {label} {self.source} -> {self.path}"


fetch_log = []


# ---------------------------------------------------------------------------
# Installing into SpeechBrain
# ---------------------------------------------------------------------------

_sb = {"fetch": None}


def _speechbrain_fetch():
    if _sb["fetch"] is None:
        import speechbrain.utils.fetching as sb_fetching

        if sb_fetching.fetch is fetch:  # pragma: no cover - cannot happen in-process
            raise RuntimeError("speechbrain's fetch was replaced before it was saved")
        _sb["fetch"] = sb_fetching.fetch
    return _sb["fetch"]


def _speechbrain_modules():
    """Loaded SpeechBrain modules (lazy placeholders are skipped: once loaded,
    they import ``fetch`` from speechbrain.utils.fetching, already replaced)."""
    import types

    for name, module in list(sys.modules.items()):
        if (name == "speechbrain" or name.startswith("speechbrain.")) and type(
            module
        ) is types.ModuleType:
            yield module


def install():
    """Route SpeechBrain's fetching (Pretrainer, from_hparams, load_audio, ...)
    through :func:`fetch`. Idempotent; :func:`uninstall` undoes it."""
    original = _speechbrain_fetch()
    for module in _speechbrain_modules():
        if vars(module).get("fetch") is original:
            module.fetch = fetch


def uninstall():
    original = _sb["fetch"]
    if original is None:
        return
    for module in _speechbrain_modules():
        if vars(module).get("fetch") is fetch:
            module.fetch = original


def installed():
    module = sys.modules.get("speechbrain.utils.fetching")
    return module is not None and module.fetch is fetch


def setup(hub_endpoint=None, *, cache_dir=None, hub_cache_dir=None, allow_network=None):
    """Configure everything, in the right order, then install the fetch hook.

    ``hub_endpoint``: where the Hub client goes (default: keep ``HF_ENDPOINT``
    or the public Hub). ``cache_dir``: this project's fetch cache; the Hub
    cache defaults to ``<cache_dir>/hub`` when it is given.
    """
    if hub_endpoint is not None:
        use_hub_endpoint(hub_endpoint)
    elif _state["endpoint"] is None:
        _state["endpoint"] = current_hub_endpoint()
    changes = {}
    if cache_dir is not None:
        changes["cache_dir"] = str(cache_dir)
        changes["hub_cache_dir"] = str(hub_cache_dir or Path(cache_dir) / "hub")
    elif hub_cache_dir is not None:
        changes["hub_cache_dir"] = str(hub_cache_dir)
    if allow_network is not None:
        changes["allow_network"] = allow_network
    configure(**changes)
    install()
    check_hub_endpoint()


# ---------------------------------------------------------------------------
# The fetch itself
# ---------------------------------------------------------------------------


def fetch(
    filename,
    source,
    savedir=None,
    save_filename=None,
    local_strategy=None,
    fetch_config=None,
):
    """Drop-in for ``speechbrain.utils.fetching.fetch``: verified, with clear
    errors, one downloader under DDP. Returns the local path."""
    from speechbrain.utils.fetching import FetchConfig, LocalStrategy

    if local_strategy is None:
        local_strategy = LocalStrategy.SYMLINK
    if fetch_config is None:
        fetch_config = FetchConfig()
    args = (filename, source, savedir, save_filename, local_strategy, fetch_config)
    world = _ddp_world()
    if world is None:
        return _fetch_here(*args, network=True)
    return _fetch_coordinated(world, args)


def _ddp_world():
    """torch.distributed when several processes take part in this call, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from speechbrain.utils.distributed import ddp_prevent_block

    if ddp_prevent_block():  # inside run_on_main / main_process_only: only we run
        return None
    return dist


def _fetch_coordinated(dist, args):
    """Rank 0 fetches (and downloads); the others wait, then load from the cache."""
    from speechbrain.utils.distributed import MainProcessContext, if_main_process

    if dist.get_rank() == 0:
        error = None
        try:
            if not if_main_process():
                # SpeechBrain picks its main process from the RANK variable;
                # without it, its helpers would download nowhere.
                raise RuntimeError(
                    f"torch.distributed rank 0 has RANK={os.environ.get('RANK')!r}: "
                    "launch with torchrun (or set RANK and LOCAL_RANK)"
                )
            # MainProcessContext: SpeechBrain's own main_process_only helpers
            # inside fetch must not broadcast, only this function does.
            with MainProcessContext():
                path = _fetch_here(*args, network=True)
            outcome = ("ok", str(path))
        except FetchError as exc:
            error, outcome = exc, ("fetch_error", exc.as_dict())
        except BaseException as exc:  # noqa: BLE001 - must reach the other ranks
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        return path
    box = [None]
    dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if status == "fetch_error":
        raise FetchError(**payload)
    if status == "error":
        kind, source = _kind_of(args[1])
        raise FetchError(kind, source, args[0], f"the main process failed: {payload}")
    with MainProcessContext():
        return _fetch_here(*args, network=False, after_main=True)


def _kind_of(source):
    from speechbrain.utils.fetching import FetchFrom, guess_source

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    fetch_from, where = guess_source(source)
    if fetch_from == FetchFrom.HUGGING_FACE and _looks_like_a_path(str(where)):
        # SpeechBrain takes any source that is not an existing folder for a
        # Hub repo id; a missing folder then fails as an invalid repo id.
        fetch_from = FetchFrom.LOCAL
    kind = {
        FetchFrom.LOCAL: KIND_LOCAL,
        FetchFrom.HUGGING_FACE: KIND_HUB,
        FetchFrom.URI: KIND_URL,
    }[fetch_from]
    return kind, str(where)


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
    if not (target.is_absolute() and target.is_relative_to(root) and link.parent.resolve().is_relative_to(root)):
        return
    relative = os.path.relpath(target, link.parent.resolve())
    tmp = link.with_name(link.name + ".relinking")
    if os.path.lexists(tmp):
        tmp.unlink()
    tmp.symlink_to(relative)
    os.replace(tmp, link)


def _looks_like_a_path(source):
    """A filesystem path, never a Hub repo id (``owner/name`` or ``name``)."""
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


def _fetch_here(
    filename, source, savedir, save_filename, local_strategy, fetch_config, *, network, after_main=False
):
    kind, where = _kind_of(source)
    if save_filename is None:
        save_filename = filename
    allowed = network and _network_allowed(fetch_config)
    changes = {}
    if fetch_config.allow_network != allowed:
        changes["allow_network"] = allowed
    if kind == KIND_HUB and fetch_config.huggingface_cache_dir is None and _policy.hub_cache_dir:
        changes["huggingface_cache_dir"] = _policy.hub_cache_dir
    if changes:
        fetch_config = dataclasses.replace(fetch_config, **changes)
    request = _Request(
        kind, where, filename, savedir, save_filename, local_strategy, fetch_config
    )
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
    fetch_log.append(
        FetchRecord(kind, where, filename, str(path), status, time.monotonic() - started)
    )
    return path


@dataclasses.dataclass
class _Request:
    kind: str
    source: str
    filename: str
    savedir: object
    save_filename: str
    local_strategy: object
    config: object

    @property
    def destination(self):
        if self.savedir is None:
            return None
        return (Path(self.savedir) / self.save_filename).absolute()

    def error(self, reason):
        revision = endpoint = None
        if self.kind == KIND_HUB:
            revision = self.config.revision or "main"
            endpoint = current_hub_endpoint()
        return FetchError(self.kind, self.source, self.filename, reason, revision, endpoint)

    def sb_fetch(self, filename=None, savedir=None, save_filename=None, use_savedir=True):
        from speechbrain.utils.fetching import FetchFrom, FetchSource

        fetch_from = {
            KIND_LOCAL: FetchFrom.LOCAL,
            KIND_HUB: FetchFrom.HUGGING_FACE,
            KIND_URL: FetchFrom.URI,
        }[self.kind]
        return _speechbrain_fetch()(
            filename=filename or self.filename,
            source=FetchSource(fetch_from, self.source),
            savedir=self.savedir if use_savedir else savedir,
            save_filename=self.save_filename if use_savedir else save_filename,
            local_strategy=self.local_strategy,
            fetch_config=self.config,
        )


def _exists(path):
    return path is not None and os.path.exists(path)


def _remove_link_or_file(path):
    if path is not None and (os.path.islink(path) or os.path.exists(path)):
        try:
            os.unlink(path)
        except OSError:
            pass


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
    if _policy.verify and (folder / MANIFEST_NAME).is_file():
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
                raise request.error(f"the Hub at {current_hub_endpoint()} cannot be used ({problem})")
            # Server down but the file is cached: work from the cache.
            request.config = dataclasses.replace(request.config, allow_network=False)
    try:
        path = request.sb_fetch()
    except Exception as exc:  # noqa: BLE001
        if not was_there and destination is not None and not _exists(destination):
            _remove_link_or_file(destination)  # a dangling link, if any
        raise request.error(_describe(exc, request)) from exc
    if _policy.verify:
        manifest = _hub_manifest(request)

        def verify(path):
            _verify(request, path, manifest, purge=lambda: _purge_hub(request, path))

        path, still_cached = _verified_or_fetched_again(request, path, was_there, verify,
                                                         request.sb_fetch)
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
    logger.info("%s in %s does not match its source's manifest: fetching it again",
                request.filename, request.savedir)
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
        parts = parts._replace(netloc=parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]")
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
        with _socket_timeout(_policy.io_timeout):
            path = request.sb_fetch()
    except Exception as exc:  # noqa: BLE001
        if not was_there:
            _remove_link_or_file(destination)  # SpeechBrain leaves partial files
        raise request.error(_describe(exc, request)) from exc
    if _policy.verify:
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
            with _socket_timeout(_policy.io_timeout):
                return request.sb_fetch()

        path, still_cached = _verified_or_fetched_again(request, path, was_there, verify,
                                                         fetch_again)
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
        with urllib.request.urlopen(url, timeout=_policy.io_timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise request.error(f"cannot verify it: {url} is unavailable ({_describe(exc, request)})") from exc
    tmp = folder / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.replace(target)
    return _load_manifest_file(target, request, purge=lambda: _remove_link_or_file(target))


@contextmanager
def _socket_timeout(seconds):
    """urllib (SpeechBrain's URL client) has no timeout: bound it."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# -- shared helpers --------------------------------------------------------------


def _unreachable(url):
    """None if a TCP connection to the URL's host opens, else the reason."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=_policy.connect_timeout):
            return None
    except ConnectionRefusedError:
        return f"connection refused by {parts.hostname}:{port}"
    except socket.timeout:
        return f"no answer from {parts.hostname}:{port} within {_policy.connect_timeout:g} s"
    except OSError as exc:
        return f"{parts.hostname}:{port}: {exc.strerror or exc}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Keep a redirect's own headers: the Hub's are on the redirect itself."""

    def redirect_request(self, *args, **kwargs):
        return None


def _not_a_working_hub(request):
    """None if the Hub answers a HEAD of the requested file as a Hub does
    (any status below 500 that carries ``X-Repo-Commit`` or ``X-Error-Code``),
    else what the server did instead."""
    import urllib.error

    revision = request.config.revision or "main"
    url = (f"{current_hub_endpoint().rstrip('/')}/{request.source}/resolve/"
           f"{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(request.filename)}")
    headers = {}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    probe = urllib.request.Request(url, method="HEAD", headers=headers)
    timeout = _policy.hub_answer_timeout
    silent = f"it accepted the connection but sent no answer within {timeout:g} s"
    try:
        with urllib.request.build_opener(_NoRedirect).open(probe, timeout=timeout) as response:
            status, answer = response.status, response.headers
    except urllib.error.HTTPError as error:
        status, answer = error.code, error.headers
    except (socket.timeout, TimeoutError):
        return silent
    except urllib.error.URLError as error:
        return silent if isinstance(error.reason, (socket.timeout, TimeoutError)) else f"cannot connect ({error.reason})"
    except (OSError, http.client.HTTPException) as error:
        return f"it broke off the answer ({type(error).__name__}: {error})"
    if status >= 500:
        return f"it answered HTTP {status} to HEAD {url}"
    if not (answer.get("X-Repo-Commit") or answer.get("X-Error-Code")):
        return (f"it answered HTTP {status} to HEAD {url} without the Hub's headers "
                f"(X-Repo-Commit, X-Error-Code): is it a Hugging Face Hub endpoint?")
    return None


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
        "the local file is left as it is" if keep_hint else
        "removed from the cache; the next fetch downloads it again"
    )
    raise request.error(
        f"integrity check failed, the file is {what}: expected {entry['size']} bytes with "
        f"sha256 {entry['sha256'][:16]}..., got {size} bytes with sha256 {digest[:16]}... ({action})"
    )


def _describe(exc, request):
    """One line for the cause of a failed fetch, from the most telling exception in the chain."""
    import urllib.error

    chain = []
    seen = set()
    current = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__

    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        hf_errors = None

    for error in chain:
        if isinstance(error, FetchError):
            return error.reason
        if hf_errors is not None:
            if isinstance(error, hf_errors.RevisionNotFoundError):
                return f"revision {request.config.revision or 'main'!r} not found in the repo"
            if isinstance(error, hf_errors.GatedRepoError):
                return "the repo is gated (authentication required)"
            if isinstance(error, hf_errors.RepositoryNotFoundError):
                return "repository not found (or private)"
            if isinstance(error, hf_errors.RemoteEntryNotFoundError):
                return "file not found in the repo"
            if isinstance(error, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)):
                if not request.config.allow_network:
                    return "not in the local cache, and network access is disabled"
                return "not in the local cache, and the Hub could not be reached"
            if isinstance(error, hf_errors.HfHubHTTPError):
                status = getattr(getattr(error, "response", None), "status_code", "?")
                return f"the Hub answered HTTP {status}"
        if isinstance(error, urllib.error.ContentTooShortError):
            return f"download truncated ({error.reason})"
        if isinstance(error, urllib.error.HTTPError):
            if error.code == 404:
                return "file not found on the server (HTTP 404)"
            return f"the server answered HTTP {error.code} {error.reason}"
        if isinstance(error, urllib.error.URLError):
            reason = error.reason
            if isinstance(reason, ConnectionRefusedError):
                return "connection refused"
            if isinstance(reason, socket.timeout):
                return "timed out"
            return f"cannot connect ({reason})"
        if isinstance(error, socket.timeout):
            return "timed out"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if type(error).__name__ == "ConnectError":
            return f"cannot connect ({error})"
        if isinstance(error, TimeoutError) or type(error).__name__.endswith("TimeoutException"):
            return "timed out"
    if "allow_network" in str(exc):
        return "not in the local cache, and network access is disabled"
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# Configurations that declare sources (finetune.yaml)
# ---------------------------------------------------------------------------

ENDPOINT_MODES = ("loopback", "public")


@dataclasses.dataclass
class Endpoints:
    """Where a configuration's Hub and URL sources point, once resolved."""

    mode: str
    hub_endpoint: str
    url_base: str
    overrides: dict
    served: object = None  # sbtemplate.servers.Served in loopback mode

    def describe(self):
        where = "loopback servers" if self.mode == "loopback" else "public endpoints"
        return f"{where}: Hub {self.hub_endpoint}, URLs {self.url_base}/<file>"


def _plain_overrides(overrides):
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    import ruamel.yaml

    loaded = ruamel.yaml.YAML(typ="safe", pure=True).load(overrides)
    return dict(loaded or {})


def read_plain_keys(hparams_file, keys, overrides=None):
    """Read top-level keys of a HyperPyYAML file without building anything.

    Plain scalars are returned as they are; ``!ref <key>`` (with text around
    it) is resolved against the other top-level keys and the overrides.
    Nothing is imported or instantiated, so this can run before the Hub
    endpoint is configured.
    """
    import re

    import ruamel.yaml

    text = Path(hparams_file).read_text()
    document = ruamel.yaml.YAML(typ="rt").load(text) or {}
    given = _plain_overrides(overrides)

    def value_of(key, depth=0):
        if key in given:
            return given[key]
        if key not in document or depth > 20:
            raise KeyError(f"{key!r} is not a top-level key of {hparams_file}")
        node = document[key]
        tag = getattr(getattr(node, "tag", None), "value", None) or getattr(node, "tag", None)
        if isinstance(tag, str) and tag.startswith("!"):
            if tag != "!ref":
                raise ValueError(f"{key!r} in {hparams_file} must be a plain value or a !ref")
            return re.sub(
                r"<([^<>]+)>", lambda m: str(value_of(m.group(1), depth + 1)), str(node.value)
            )
        return node

    return {key: value_of(key) for key in keys}


@contextmanager
def fetch_endpoints(hparams_file, overrides=None, *, cache_dir=None):
    """Resolve the endpoints of a configuration with ``fetch_endpoints``.

    ``loopback`` starts the Hub and URL servers over the profile's folder
    named like the repo id; ``public`` uses ``public_hub_endpoint``. In both
    cases the Hub client is pointed at the endpoint, the fetch hook is
    installed, and the yielded :class:`Endpoints` carries the overrides
    (``hub_endpoint``, ``url_base``, ``artifacts``) to load the file with.
    The servers stop on exit.
    """
    from sbtemplate import servers
    from sbtemplate.paths import ProfilePaths, artifacts_root

    given = _plain_overrides(overrides)
    given.setdefault("artifacts", str(artifacts_root()))
    keys = read_plain_keys(
        hparams_file,
        ("fetch_endpoints", "profile", "artifacts", "repo_id", "hub_repo_id", "public_hub_endpoint"),
        given,
    )
    mode = str(keys["fetch_endpoints"])
    if mode not in ENDPOINT_MODES:
        raise ValueError(f"fetch_endpoints must be one of {ENDPOINT_MODES}, got {mode!r}")
    hub_repo_id = str(keys["hub_repo_id"])
    if mode == "public":
        hub = str(keys["public_hub_endpoint"]).rstrip("/")
        given.update(hub_endpoint=hub, url_base=f"{hub}/{hub_repo_id}/resolve/main")
        setup(hub_endpoint=hub, cache_dir=cache_dir)
        yield Endpoints(mode, hub, given["url_base"], given)
        return
    paths = ProfilePaths.for_profile(str(keys["profile"]), root=keys["artifacts"])
    folder = paths.local_repo
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Nothing to serve: {folder} does not exist (build the '{paths.profile}' profile "
            f"with python -m sbtemplate.build --profile {paths.profile})"
        )
    with servers.serve(folder, hub_repo_id) as served:
        given.update(hub_endpoint=served.hub_endpoint, url_base=served.url_base)
        setup(hub_endpoint=served.hub_endpoint, cache_dir=cache_dir)
        yield Endpoints(mode, served.hub_endpoint, served.url_base, given, served)


PRETRAINER_KEYS = ("pretrainer_asr", "pretrainer_lm", "pretrainer_tokenizer")


def collect_pretrained(hparams, keys=PRETRAINER_KEYS, load=True):
    """Collect (and load) the Pretrainers named ``keys`` of loaded hparams.

    Every rank calls this: fetching is coordinated inside (one download,
    errors everywhere). Returns {pretrainer key: {loadable: local path}}.
    """
    if not installed():
        raise RuntimeError("call sbtemplate.fetching.setup() (or fetch_endpoints()) first")
    collected = {}
    for key in keys:
        pretrainer = hparams[key]
        if pretrainer.collect_in is not None:  # Pretrainer creates only the last level
            pretrainer.collect_in.mkdir(parents=True, exist_ok=True)
        collected[key] = {name: str(path) for name, path in pretrainer.collect_files().items()}
        if load:
            pretrainer.load_collected()
    return collected
