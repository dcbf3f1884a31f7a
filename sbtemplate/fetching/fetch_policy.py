"""The fetch policy: caches, network access, timeouts and verification.

One process-wide :class:`FetchPolicy` says how :func:`sbtemplate.fetching.fetch`
behaves; :func:`configure` and :func:`policy` change it (for good, or for a
``with`` block). It exists so that scripts and tests set these once instead
of threading them through every SpeechBrain call.

Module state: ``_policy`` (the current policy, replaced as a whole, never
mutated) and its lock. Other modules read it with :func:`get_policy`, never
with a copy of ``_policy`` (which would go stale after :func:`configure`).
"""

import dataclasses
import os
import threading
from contextlib import contextmanager
from pathlib import Path


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
    """The current fetch policy."""
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
