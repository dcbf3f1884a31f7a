"""Short probes that tell within seconds whether a server can be used.

huggingface_hub retries a refused connection for about 20 seconds and waits
minutes for a server that never answers; SpeechBrain's URL client (urllib)
has no timeout at all. :func:`_unreachable` opens one TCP connection with the
policy's connect timeout, :func:`_not_a_working_hub` checks that the
endpoint answers a HEAD as a Hub does, and :func:`_socket_timeout` bounds
urllib's downloads, so that a fetch fails fast with a clear reason.
"""

import http.client
import os
import socket
import urllib.parse
import urllib.request
from contextlib import contextmanager
from urllib.parse import urlsplit

from sbtemplate.fetching.endpoint import current_hub_endpoint
from sbtemplate.fetching.fetch_policy import get_policy


@contextmanager
def _socket_timeout(seconds):
    """urllib (SpeechBrain's URL client) has no timeout: bound it."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _unreachable(url):
    """None if a TCP connection to the URL's host opens, else the reason."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=get_policy().connect_timeout):
            return None
    except ConnectionRefusedError:
        return f"connection refused by {parts.hostname}:{port}"
    except TimeoutError:
        return f"no answer from {parts.hostname}:{port} within {get_policy().connect_timeout:g} s"
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
    url = (
        f"{current_hub_endpoint().rstrip('/')}/{request.source}/resolve/"
        f"{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(request.filename)}"
    )
    headers = {}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    probe = urllib.request.Request(url, method="HEAD", headers=headers)
    timeout = get_policy().hub_answer_timeout
    silent = f"it accepted the connection but sent no answer within {timeout:g} s"
    try:
        with urllib.request.build_opener(_NoRedirect).open(probe, timeout=timeout) as response:
            status, answer = response.status, response.headers
    except urllib.error.HTTPError as error:
        status, answer = error.code, error.headers
    except TimeoutError:
        return silent
    except urllib.error.URLError as error:
        return (
            silent
            if isinstance(error.reason, (socket.timeout, TimeoutError))
            else f"cannot connect ({error.reason})"
        )
    except (OSError, http.client.HTTPException) as error:
        return f"it broke off the answer ({type(error).__name__}: {error})"
    if status >= 500:
        return f"it answered HTTP {status} to HEAD {url}"
    if not (answer.get("X-Repo-Commit") or answer.get("X-Error-Code")):
        return (
            f"it answered HTTP {status} to HEAD {url} without the Hub's headers "
            f"(X-Repo-Commit, X-Error-Code): is it a Hugging Face Hub endpoint?"
        )
    return None
