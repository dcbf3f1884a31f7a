"""The Hugging Face Hub endpoint (``HF_ENDPOINT``) that huggingface_hub talks to.

huggingface_hub reads ``HF_ENDPOINT`` once, at import, and copies the value
into several places. :func:`use_hub_endpoint` sets it before the import, or
re-points every endpoint-derived value if the import already happened, and
:func:`check_hub_endpoint` (called by every Hub fetch) checks that the
client, the environment and the configured endpoint still agree, so that the
order of imports can never send a download to another server.

Module state: ``_state["endpoint"]``, the configured endpoint (None until
one is configured).
"""

import os
import sys
from contextlib import contextmanager
from urllib.parse import urlsplit

from sbtemplate.fetching.errors import HubEndpointError

PUBLIC_HUB_ENDPOINT = "https://huggingface.co"

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
