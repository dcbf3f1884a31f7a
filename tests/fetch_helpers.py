"""Shared pieces of the fetching tests: a small fake published model folder,
the running loopback servers, and a clean fetch configuration per test."""

import os
from contextlib import contextmanager
from pathlib import Path

import faulty_servers
import numpy as np
import pytest

from sbtemplate import fetching
from sbtemplate.manifest import write_manifest
from sbtemplate.paths import REPO_ID

EXAMPLE_WAV = "example.wav"
SAMPLE_RATE = 16000


def make_fake_repo(folder):
    """A folder shaped like the published recognizer: a few ckpt files, a
    hyperparams.yaml, an example wav and manifest.json."""
    import soundfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2602)
    for name, size in (
        ("asr.ckpt", 40_000),
        ("lm.ckpt", 120_000),
        ("tokenizer.ckpt", 9_000),
        ("normalizer.ckpt", 2_000),
    ):
        (folder / name).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    (folder / "hyperparams.yaml").write_text("# fake hyperparameters\nsample_rate: 16000\n")
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) * np.linspace(1, 0.2, t.size)
    soundfile.write(folder / EXAMPLE_WAV, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    write_manifest(folder)
    return folder


@contextmanager
def fetch_environment(tmp_path, folder, repo_id=REPO_ID):
    """Serve ``folder`` and configure fetching against the servers, with a
    fresh cache under ``tmp_path``; everything is restored afterwards."""
    with faulty_servers.serve(folder, repo_id) as served:
        with fetching.hub_endpoint(served.hub_endpoint):
            with fetching.policy(
                cache_dir=str(tmp_path / "fetch-cache"),
                hub_cache_dir=str(tmp_path / "fetch-cache" / "hub"),
                allow_network=True,
            ):
                fetching.install()
                try:
                    yield served
                finally:
                    fetching.uninstall()


@pytest.fixture
def fake_repo(tmp_path):
    return make_fake_repo(tmp_path / "published" / "CKPT+latest")


@pytest.fixture
def served(tmp_path, fake_repo):
    with fetch_environment(tmp_path, fake_repo) as running:
        del fetching.fetch_log[:]
        yield running


def leftovers(*roots):
    """Half-written files anywhere under ``roots``."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if path.name.endswith((".incomplete", ".tmp", ".part", ".lock.tmp")):
                found.append(path)
    return found


def hub_blobs(cache_root):
    blobs = Path(cache_root) / "hub"
    return sorted(p for p in blobs.rglob("blobs/*") if p.is_file())


def file_bytes(path):
    return Path(os.path.realpath(path)).read_bytes()


@pytest.fixture
def tiny_paths(request):
    """The tiny build (ProfilePaths): conftest's ``tiny_build`` when there is one."""
    from sbtemplate.paths import ProfilePaths

    try:
        return request.getfixturevalue("tiny_build")
    except pytest.FixtureLookupError:
        pass
    paths = ProfilePaths.for_profile("tiny")
    if not (paths.local_repo / "hyperparams.yaml").is_file():
        pytest.skip("tiny profile not built (python -m sbtemplate.build --profile tiny)")
    return paths


@pytest.fixture
def restored_fetching():
    """Scripts and recipe files configure the process (Hub endpoint, policy,
    fetch hook, loopback servers); put it all back afterwards."""
    with fetching.hub_endpoint(fetching.current_hub_endpoint()), fetching.policy():
        try:
            yield
        finally:
            fetching.uninstall()
            fetching.stop_serving()


@contextmanager
def misbehaving_hub(behaviour):
    """A loopback server in the Hub's place that misbehaves: ``silent``
    (accepts connections, never answers), ``error`` (HTTP 500 to everything)
    or ``not a hub`` (a plain HTTP 200 without the Hub's headers). Yields its URL."""
    import http.server
    import socket
    import threading

    if behaviour == "silent":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes handshakes; nobody answers
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            listener.close()
        return

    status = {"error": 500, "not a hub": 200}[behaviour]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
