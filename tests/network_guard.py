"""pytest plugin: no network in the test run except loopback.

Register it from ``tests/conftest.py`` with ``pytest_plugins = ["network_guard"]``;
worker subprocesses started by tests call :func:`install` themselves.

Any attempt to resolve a non-loopback host name or to connect a socket to a
non-loopback address raises :class:`NetworkAccessForbidden` (deliberately
*not* an ``OSError``, so no client mistakes it for a flaky network and
retries) and is recorded; the autouse fixture fails the test that made it,
even when a library swallowed the exception.
"""

import ipaddress
import socket

import pytest

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
violations = []
_originals = {}


class NetworkAccessForbidden(RuntimeError):
    """Raised on any non-loopback network access during the tests."""


def is_loopback(host):
    if host is None or host == "":
        return True  # getaddrinfo(None, port): the local host
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    if host == _own_hostname():
        return True  # resolving our own name reaches no other machine
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _own_hostname():
    try:
        return socket.gethostname()
    except OSError:
        return None


def _check(what, host, port):
    if not is_loopback(host):
        message = f"Network access outside loopback is forbidden in tests: {what} {host}:{port}"
        violations.append(message)
        raise NetworkAccessForbidden(message)


def _check_address(what, family, address):
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        _check(what, address[0], address[1] if len(address) > 1 else None)


def install():
    """Patch the socket module (idempotent)."""
    if _originals:
        return
    _originals["connect"] = socket.socket.connect
    _originals["connect_ex"] = socket.socket.connect_ex
    _originals["sendto"] = socket.socket.sendto
    _originals["getaddrinfo"] = socket.getaddrinfo

    def connect(self, address):
        _check_address("connect", self.family, address)
        return _originals["connect"](self, address)

    def connect_ex(self, address):
        _check_address("connect", self.family, address)
        return _originals["connect_ex"](self, address)

    def sendto(self, data, *args):
        address = args[-1]
        _check_address("sendto", self.family, address)
        return _originals["sendto"](self, data, *args)

    def getaddrinfo(host, port, *args, **kwargs):
        _check("resolve", host, port)
        return _originals["getaddrinfo"](host, port, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo


def uninstall():
    if not _originals:
        return
    socket.socket.connect = _originals.pop("connect")
    socket.socket.connect_ex = _originals.pop("connect_ex")
    socket.socket.sendto = _originals.pop("sendto")
    socket.getaddrinfo = _originals.pop("getaddrinfo")


def pytest_configure(config):
    install()
    config.addinivalue_line("markers", "network_guard: the run forbids non-loopback network access")


@pytest.fixture(autouse=True)
def _forbid_network():
    install()
    before = len(violations)
    yield
    new = violations[before:]
    if new:
        pytest.fail("Non-loopback network access: " + "; ".join(new), pytrace=False)
