"""The one error type of fetching, and the one-line reasons it carries.

Every failed fetch, whatever the source (a local folder, a Hugging Face Hub
repo, a base URL) and whatever client failed underneath (SpeechBrain,
huggingface_hub, urllib), ends as a :class:`FetchError` that names the kind
of source, the source and the file, so that a recipe can catch one type and
print one clear line. :func:`_describe` turns the exception chain of a
failed transfer into that line. :class:`HubEndpointError` is the separate
error for a Hub client pointed at another endpoint than the configured one.
"""

import socket

KIND_LOCAL = "local"
KIND_HUB = "huggingface"
KIND_URL = "url"
_KIND_LABEL = {
    KIND_LOCAL: "local folder",
    KIND_HUB: "Hugging Face Hub repo",
    KIND_URL: "URL",
}


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
        """The constructor's arguments: for pickling and for sending the error to other ranks."""
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
            if isinstance(
                error, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)
            ):
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
