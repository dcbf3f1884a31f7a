"""Loopback servers that serve a file badly on request, for the fetching tests.

:class:`FaultyHubServer` and :class:`FaultyUrlServer` are the runtime servers
(``sbtemplate.servers``) plus :meth:`FaultInjection.inject`: a cut-off
transfer, a consistently short file or corrupted bytes, so the tests can show
that the fetch layer never keeps a bad download. With no fault pending they
serve exactly what the runtime servers serve. :func:`serve` runs both.
"""

from contextlib import contextmanager
from dataclasses import dataclass

from sbtemplate import servers

FAULT_MODES = ("truncate", "short", "corrupt")


@dataclass
class Fault:
    mode: str
    times: int = 1


class FaultyHandler:
    """Handler mixin: serves a file badly while its server has a fault pending for it."""

    fault = None

    def file_bytes(self, key, data):
        data = super().file_bytes(key, data)
        self.fault = self.owner._take_fault(key, consume=self.command == "GET")
        if self.fault == "short":
            data = data[: max(1, len(data) // 2)]
        elif self.fault == "corrupt" and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        return data

    def send_file_response(self, status, headers, body):
        if self.fault != "truncate" or self.command != "GET":
            return super().send_file_response(status, headers, body)
        # Announce the full length, send part of it, hang up.
        cut = body[: len(body) // 2]
        self.owner._log(self.command, self.path, status, len(cut), self.headers.get("Range"))
        self.send_response(status)
        headers["Content-Length"] = str(len(body))
        headers["Connection"] = "close"
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(cut)
        self.wfile.flush()
        self.close_connection = True


class FaultInjection:
    """Server mixin: the pending faults, by ``key`` (what the handler serves)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._faults = {}

    def inject(self, name, mode, times=1):
        """Serve file ``name`` badly for the next ``times`` downloads.

        ``truncate``: announce the full length, send half, hang up.
        ``short``: serve (and announce) only the first half, consistently.
        ``corrupt``: same length, one byte flipped.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"Unknown fault {mode!r}: choose one of {FAULT_MODES}")
        with self._lock:
            self._faults[name] = Fault(mode, times)

    def _take_fault(self, key, consume):
        with self._lock:
            fault = self._faults.get(key)
            if fault is None:
                return None
            if consume:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[key]
            return fault.mode


class FaultyHubServer(FaultInjection, servers.HubServer):
    handler = type("FaultyHubHandler", (FaultyHandler, servers.HubServer.handler), {})

    def inject(self, name, mode, times=1, repo_id=None):
        """See :meth:`FaultInjection.inject`; ``name`` is ``repo_id/filename``
        or a bare file name when only one repo is published."""
        if "/" not in name:
            if repo_id is None:
                if len(self.repos) != 1:
                    raise ValueError("Several repos published: pass repo_id")
                repo_id = next(iter(self.repos))
            name = f"{repo_id}/{name}"
        super().inject(name, mode, times)


class FaultyUrlServer(FaultInjection, servers.UrlServer):
    handler = type("FaultyUrlHandler", (FaultyHandler, servers.UrlServer.handler), {})

    def inject(self, name, mode, times=1, prefix=None):
        if prefix is None and "/" not in name:
            if len(self.folders) != 1:
                raise ValueError("Several folders published: pass prefix")
            prefix = next(iter(self.folders))
        if prefix is not None:
            name = f"{prefix}/{name}"
        super().inject(name, mode, times)


@contextmanager
def serve(folder, repo_id):
    """:func:`sbtemplate.servers.serve` with servers that accept ``inject``."""
    with servers.serve(folder, repo_id, FaultyHubServer, FaultyUrlServer) as served:
        yield served
