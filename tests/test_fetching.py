"""Mixed fetching against the loopback Hub and URL servers, with the real
huggingface_hub and SpeechBrain clients.

Network access other than loopback is forbidden in this module (network_guard).
"""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import network_guard
import pytest
from fetch_helpers import (
    EXAMPLE_WAV,
    fake_repo,  # noqa: F401 - fixture
    file_bytes,
    hub_blobs,
    leftovers,
    make_fake_repo,
    misbehaving_hub,
    served,  # noqa: F401 - fixture
)
from network_guard import _forbid_network  # noqa: F401 - autouse fixture

from sbtemplate import fetching, servers
from sbtemplate.paths import REPO_ID

network_guard.install()

ERROR_DEADLINE_S = 5.0
SILENT_HUB_DEADLINE_S = 15.0


def sb():
    from speechbrain.utils import fetching as sb_fetching

    return sb_fetching


def hub(repo=REPO_ID):
    return sb().FetchSource(sb().FetchFrom.HUGGING_FACE, repo)


def url(base):
    return sb().FetchSource(sb().FetchFrom.URI, base)


def local(folder):
    return sb().FetchSource(sb().FetchFrom.LOCAL, str(folder))


# ---------------------------------------------------------------------------
# The three kinds of source, and the cache
# ---------------------------------------------------------------------------


def test_each_source_kind_is_fetched(served, fake_repo, tmp_path):
    fetch = sb().fetch  # the installed, verified fetch
    save = tmp_path / "save"
    from_local = fetch("asr.ckpt", local(fake_repo), savedir=save)
    from_hub = fetch("lm.ckpt", hub(), savedir=save)
    from_url = fetch("tokenizer.ckpt", url(served.url_base), savedir=save)

    for path, name in (
        (from_local, "asr.ckpt"),
        (from_hub, "lm.ckpt"),
        (from_url, "tokenizer.ckpt"),
    ):
        assert file_bytes(path) == (fake_repo / name).read_bytes()
    kinds = {r.filename: (r.kind, r.status) for r in fetching.fetch_log}
    assert kinds == {
        "asr.ckpt": ("local", "local"),
        "lm.ckpt": ("huggingface", "downloaded"),
        "tokenizer.ckpt": ("url", "downloaded"),
    }
    assert [r.status for r in served.hub.gets("/lm.ckpt")] == [200]
    assert [r.status for r in served.urls.gets("/tokenizer.ckpt")] == [200]
    assert not served.hub.gets("/asr.ckpt") and not served.urls.gets("/asr.ckpt")


def test_second_fetch_is_a_cache_hit_without_download(served, tmp_path):
    fetch = sb().fetch
    save = tmp_path / "save"
    fetch("lm.ckpt", hub(), savedir=save)
    fetch("normalizer.ckpt", hub())  # no savedir: straight from the Hub cache
    fetch("tokenizer.ckpt", url(served.url_base), savedir=save)
    served.hub.clear_log()
    served.urls.clear_log()

    fetch("lm.ckpt", hub(), savedir=save)
    fetch("normalizer.ckpt", hub())
    fetch("tokenizer.ckpt", url(served.url_base), savedir=save)

    assert served.hub.gets() == []  # at most HEAD checks, no download
    # the URL source's manifest is re-read (a URL has no revision), nothing else
    assert [r.path.rsplit("/", 1)[-1] for r in served.urls.requests] == ["manifest.json"]
    assert [r.status for r in fetching.fetch_log[-3:]] == ["cached"] * 3


def test_url_fetch_without_savedir_lands_in_the_fetch_cache(served, fake_repo, tmp_path):
    path = sb().fetch("tokenizer.ckpt", url(served.url_base))
    assert Path(path).is_relative_to(tmp_path / "fetch-cache")
    assert Path(path).read_bytes() == (fake_repo / "tokenizer.ckpt").read_bytes()
    served.urls.clear_log()
    assert sb().fetch("tokenizer.ckpt", url(served.url_base)) == path
    assert [r.path.rsplit("/", 1)[-1] for r in served.urls.requests] == ["manifest.json"]


def test_loopback_runs_on_new_ports_share_one_url_cache(served, fake_repo, tmp_path):
    """Every loopback run serves on a new port: they must not each leave a
    cache folder behind, and a second server's files are verified as its own."""
    first = Path(sb().fetch("tokenizer.ckpt", url(served.url_base)))
    with servers.serve(fake_repo, REPO_ID) as other:
        assert other.url_base != served.url_base
        second = Path(sb().fetch("tokenizer.ckpt", url(other.url_base)))
    assert second == first
    assert len(list((tmp_path / "fetch-cache" / "url").iterdir())) == 1


def test_a_copied_artifacts_tree_links_to_its_own_files(tmp_path, monkeypatch):
    """Links that fetching leaves inside the artefacts tree are relative:
    a copy of the tree uses the copy's files, not the original's."""
    import shutil

    root = tmp_path / "artifacts"
    monkeypatch.setenv("SBTEMPLATE_ARTIFACTS", str(root))
    repo = make_fake_repo(root / "tiny" / "model")
    fetching.install()
    try:
        sb().fetch("lm.ckpt", local(repo), savedir=root / "tiny" / "pretrained")
    finally:
        fetching.uninstall()
    link = root / "tiny" / "pretrained" / "lm.ckpt"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    shutil.copytree(root, tmp_path / "copy", symlinks=True)
    shutil.rmtree(root)
    copied = tmp_path / "copy" / "tiny" / "pretrained" / "lm.ckpt"
    assert copied.resolve() == (tmp_path / "copy" / "tiny" / "model" / "lm.ckpt").resolve()
    assert copied.read_bytes() == (tmp_path / "copy" / "tiny" / "model" / "lm.ckpt").read_bytes()


def test_guard_refuses_other_hosts():
    import socket

    with pytest.raises(network_guard.NetworkAccessForbidden):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    del network_guard.violations[-1]  # expected here; not a failure of this test


def test_local_folder_named_like_the_repo_wins_and_fetchsource_forces_the_hub(
    served, fake_repo, tmp_path, monkeypatch
):
    workdir = tmp_path / "work"
    link = workdir / REPO_ID
    link.parent.mkdir(parents=True)
    link.symlink_to(fake_repo, target_is_directory=True)
    monkeypatch.chdir(workdir)
    fetch = sb().fetch

    path = fetch("lm.ckpt", REPO_ID, savedir=tmp_path / "guessed")
    assert fetching.fetch_log[-1].kind == "local"
    assert served.hub.requests == []
    assert os.path.realpath(path) == str((fake_repo / "lm.ckpt").resolve())

    path = fetch("lm.ckpt", hub(), savedir=tmp_path / "forced")
    assert fetching.fetch_log[-1].kind == "huggingface"
    assert [r.status for r in served.hub.gets("/lm.ckpt")] == [200]
    assert file_bytes(path) == (fake_repo / "lm.ckpt").read_bytes()


def test_example_wav_round_trips_through_load_audio(served, fake_repo, tmp_path):
    import soundfile
    import torch
    from speechbrain.inference.interfaces import Pretrained

    reference, rate = soundfile.read(fake_repo / EXAMPLE_WAV, dtype="float32")
    model = Pretrained(modules=torch.nn.ModuleDict(), hparams={"sample_rate": rate})

    from_hub = model.load_audio(hub(f"{REPO_ID}/{EXAMPLE_WAV}"))
    from_url = model.load_audio(url(f"{served.url_base}/{EXAMPLE_WAV}"), savedir=tmp_path / "wav")
    for signal in (from_hub, from_url):
        assert signal.shape == (reference.shape[0],)
        assert torch.allclose(signal, torch.from_numpy(reference), atol=1e-6)
    assert {r.kind for r in fetching.fetch_log} == {"huggingface", "url"}


# ---------------------------------------------------------------------------
# Integrity
# ---------------------------------------------------------------------------


def _assert_nothing_kept(tmp_path, savedir, name, fake_repo):
    assert not os.path.lexists(savedir / name), "bad download left in savedir"
    assert leftovers(tmp_path / "fetch-cache", savedir) == []
    published = {(fake_repo / n).read_bytes() for n in os.listdir(fake_repo)}
    for blob in hub_blobs(tmp_path / "fetch-cache"):
        assert blob.read_bytes() in published, f"bad blob kept in the Hub cache: {blob}"


@pytest.mark.parametrize("kind", ["hub", "url"])
@pytest.mark.parametrize("fault", ["short", "corrupt"])
def test_bad_download_is_never_kept_and_is_fetched_again(served, fake_repo, tmp_path, kind, fault):
    """``short``: the server sends a consistently truncated file; ``corrupt``:
    one byte flipped. The checksum catches both; nothing stays in any cache."""
    fetch = sb().fetch
    good = (fake_repo / "lm.ckpt").read_bytes()
    server = served.hub if kind == "hub" else served.urls
    source = hub() if kind == "hub" else url(served.url_base)
    savedir = tmp_path / "save"
    server.inject("lm.ckpt", fault)

    with pytest.raises(fetching.FetchError) as caught:
        fetch("lm.ckpt", source, savedir=savedir)
    message = str(caught.value)
    assert "integrity check failed" in message and "lm.ckpt" in message
    assert ("truncated" if fault == "short" else "corrupted") in message
    assert caught.value.kind == ("huggingface" if kind == "hub" else "url")
    _assert_nothing_kept(tmp_path, savedir, "lm.ckpt", fake_repo)

    downloads = len(server.gets("/lm.ckpt"))
    path = fetch("lm.ckpt", source, savedir=savedir)  # fault gone: downloads again
    assert len(server.gets("/lm.ckpt")) == downloads + 1
    assert file_bytes(path) == good


@pytest.mark.parametrize("kind", ["hub", "url"])
def test_republished_file_replaces_the_savedir_copy(served, fake_repo, tmp_path, kind):
    """A rebuild republishes lm.ckpt with the same size and new bytes: the copy
    already in the savedir is stale, and the next fetch replaces it, not fails."""
    from sbtemplate.manifest import write_manifest

    fetch = sb().fetch
    source = hub() if kind == "hub" else url(served.url_base)
    savedir = tmp_path / "save"
    old = file_bytes(fetch("lm.ckpt", source, savedir=savedir))
    new = bytes(255 - b for b in old)  # same size, other content
    (fake_repo / "lm.ckpt").write_bytes(new)
    write_manifest(fake_repo)

    path = fetch("lm.ckpt", source, savedir=savedir)
    assert file_bytes(path) == new
    assert file_bytes(savedir / "lm.ckpt") == new


def test_cut_off_url_download_leaves_no_partial_file(served, fake_repo, tmp_path):
    """SpeechBrain's urllib download keeps a partial file on its own; here it
    is removed and the next fetch downloads the whole file."""
    fetch = sb().fetch
    savedir = tmp_path / "save"
    served.urls.inject("lm.ckpt", "truncate")
    with pytest.raises(fetching.FetchError, match="truncated"):
        fetch("lm.ckpt", url(served.url_base), savedir=savedir)
    assert not os.path.lexists(savedir / "lm.ckpt")
    path = fetch("lm.ckpt", url(served.url_base), savedir=savedir)
    assert file_bytes(path) == (fake_repo / "lm.ckpt").read_bytes()


def test_cut_off_hub_download_is_retried_and_verified(served, fake_repo, tmp_path):
    """huggingface_hub retries a transfer the server cut off; what ends up in
    the cache passes the checksum and no temporary file is left."""
    fetch = sb().fetch
    served.hub.inject("lm.ckpt", "truncate")
    path = fetch("lm.ckpt", hub(), savedir=tmp_path / "save")
    assert file_bytes(path) == (fake_repo / "lm.ckpt").read_bytes()
    assert len(served.hub.gets("/lm.ckpt")) == 2
    assert leftovers(tmp_path / "fetch-cache") == []


@pytest.mark.parametrize("kind", ["hub", "url"])
def test_servers_honour_range_requests(served, fake_repo, kind):
    import urllib.request

    data = (fake_repo / "lm.ckpt").read_bytes()
    if kind == "hub":
        address = f"{served.hub_endpoint}/{REPO_ID}/resolve/main/lm.ckpt"
    else:
        address = served.file_url("lm.ckpt")
    request = urllib.request.Request(address, headers={"Range": "bytes=1000-"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert response.read() == data[1000:]


# ---------------------------------------------------------------------------
# Errors: one clear message each, fast, nothing half-written
# ---------------------------------------------------------------------------


def _error_cases(served, tmp_path):
    refused = f"http://127.0.0.1:{servers.unused_loopback_port()}"
    cfg = sb().FetchConfig
    return {
        "missing repo": ("lm.ckpt", hub("synthspeech/no-such-repo"), {}, "repository not found"),
        "missing file": ("no-such.ckpt", hub(), {}, "file not found in the repo"),
        "missing revision": (
            "lm.ckpt",
            hub(),
            {"fetch_config": cfg(revision="v0.9")},
            "revision 'v0.9' not found",
        ),
        "missing url file": ("no-such.ckpt", url(served.url_base), {}, "HTTP 404"),
        "url server refusing": ("lm.ckpt", url(f"{refused}/{REPO_ID}"), {}, "connection refused"),
        "hub offline, empty cache": (
            "lm.ckpt",
            hub(),
            {"fetch_config": cfg(allow_network=False)},
            "network access is disabled",
        ),
        "url offline, empty cache": (
            "lm.ckpt",
            url(served.url_base),
            {"fetch_config": cfg(allow_network=False)},
            "network access is disabled",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing repo",
        "missing file",
        "missing revision",
        "missing url file",
        "url server refusing",
        "hub server refusing",
        "hub server silent",
        "hub server failing",
        "hub server not a hub",
        "hub offline, empty cache",
        "url offline, empty cache",
    ],
)
def test_errors_are_clear_fast_and_clean(served, tmp_path, case):
    fetch = sb().fetch
    savedir = tmp_path / "save"
    if case == "hub server refusing":
        refused = f"http://127.0.0.1:{servers.unused_loopback_port()}"
        filename, source, kwargs, expected = "lm.ckpt", hub(), {}, "connection refused"
        context = fetching.hub_endpoint(refused)
    elif case.startswith("hub server "):
        behaviour, expected = {
            "hub server silent": (
                "silent",
                "it accepted the connection but sent no answer within 5 s",
            ),
            "hub server failing": ("error", "it answered HTTP 500 to HEAD http://127.0.0.1:"),
            "hub server not a hub": (
                "not a hub",
                "without the Hub's headers (X-Repo-Commit, X-Error-Code)",
            ),
        }[case]
        filename, source, kwargs = "lm.ckpt", hub(), {}
        context = _misbehaving_endpoint(behaviour)
    else:
        filename, source, kwargs, expected = _error_cases(served, tmp_path)[case]
        context = _nullcontext()

    with context:
        started = time.monotonic()
        with pytest.raises(fetching.FetchError) as caught:
            fetch(filename, source, savedir=savedir, **kwargs)
        elapsed = time.monotonic() - started

    error = caught.value
    message = str(error)
    print(f"{case}: {elapsed:.3f} s: {message}")
    # A silent server has the probe's whole answer timeout (5 s by default).
    assert elapsed < (SILENT_HUB_DEADLINE_S if case == "hub server silent" else ERROR_DEADLINE_S)
    assert expected in message
    assert filename in message
    assert error.filename == filename
    if error.kind == "huggingface":
        assert "Hugging Face Hub repo" in message and source.path in message
    else:
        assert message.count("URL ") >= 1 and source.path.rstrip("/") in message
    assert not os.path.lexists(savedir / filename)
    assert leftovers(tmp_path / "fetch-cache", savedir) == []


@contextmanager
def _misbehaving_endpoint(behaviour):
    with misbehaving_hub(behaviour) as url, fetching.hub_endpoint(url):
        yield


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_missing_local_file_is_a_clear_error_and_links_nothing(fake_repo, tmp_path):
    fetching.install()
    try:
        with pytest.raises(fetching.FetchError, match="local folder .*no such file"):
            sb().fetch("no-such.ckpt", local(fake_repo), savedir=tmp_path / "save")
    finally:
        fetching.uninstall()
    assert not os.path.lexists(tmp_path / "save" / "no-such.ckpt")


def test_offline_with_a_warm_cache_works(served, fake_repo, tmp_path):
    fetch = sb().fetch
    fetch("lm.ckpt", hub())
    fetch("lm.ckpt", hub(), savedir=tmp_path / "save")
    url_base = served.url_base
    fetch("tokenizer.ckpt", url(url_base), savedir=tmp_path / "save")
    served.hub.stop()
    served.urls.stop()
    with fetching.policy(allow_network=False):
        assert file_bytes(fetch("lm.ckpt", hub())) == (fake_repo / "lm.ckpt").read_bytes()
        fetch("lm.ckpt", hub(), savedir=tmp_path / "other")  # new savedir, Hub cache
        fetch("tokenizer.ckpt", url(url_base), savedir=tmp_path / "save")
    # Network allowed but the servers are gone: still served from the cache.
    fetch("lm.ckpt", hub(), savedir=tmp_path / "third")
    assert all(r.status == "cached" for r in fetching.fetch_log[-4:])


def test_fetch_error_survives_pickling():
    import pickle

    error = fetching.FetchError("url", "http://127.0.0.1:1/x", "a.ckpt", "connection refused")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.as_dict() == error.as_dict()


# ---------------------------------------------------------------------------
# The Hub protocol as huggingface_hub sees it
# ---------------------------------------------------------------------------


def test_hub_server_speaks_the_protocol_the_client_needs(served, fake_repo, tmp_path):
    import huggingface_hub
    from huggingface_hub import errors

    api = huggingface_hub.HfApi()
    info = api.model_info(REPO_ID)
    assert info.sha == served.hub.commit(REPO_ID)
    assert {s.rfilename for s in info.siblings} == set(os.listdir(fake_repo))

    snapshot = huggingface_hub.snapshot_download(REPO_ID, cache_dir=tmp_path / "snap")
    assert sorted(os.listdir(snapshot)) == sorted(os.listdir(fake_repo))
    for name in os.listdir(fake_repo):
        assert Path(snapshot, name).read_bytes() == (fake_repo / name).read_bytes()

    pinned = huggingface_hub.hf_hub_download(
        REPO_ID, "lm.ckpt", revision=info.sha, cache_dir=tmp_path / "pinned"
    )
    assert Path(pinned).read_bytes() == (fake_repo / "lm.ckpt").read_bytes()

    with pytest.raises(errors.RepositoryNotFoundError):
        api.model_info("synthspeech/no-such-repo")
    with pytest.raises(errors.RevisionNotFoundError):
        api.model_info(REPO_ID, revision="v0.9")
    with pytest.raises(errors.RemoteEntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO_ID, "nope.bin", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------
# HF_ENDPOINT
# ---------------------------------------------------------------------------


def test_endpoint_is_repointed_consistently_after_import(fake_repo, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants, hf_api

    with servers.serve(fake_repo, REPO_ID) as first, servers.serve(fake_repo, REPO_ID) as second:
        for running in (first, second):
            with fetching.hub_endpoint(running.hub_endpoint):
                assert constants.ENDPOINT == running.hub_endpoint
                assert huggingface_hub.hf_hub_url(REPO_ID, "x").startswith(
                    running.hub_endpoint + "/"
                )
                assert huggingface_hub.HfApi().endpoint == running.hub_endpoint
                assert hf_api.api.endpoint == running.hub_endpoint
                assert "127.0.0.1" in constants.HF_URL_HOSTS
                huggingface_hub.hf_hub_download(
                    REPO_ID, "lm.ckpt", cache_dir=tmp_path / f"cache-{running.hub.port}"
                )
                huggingface_hub.HfApi().model_info(REPO_ID)
        assert first.hub.gets("/lm.ckpt") and second.hub.gets("/lm.ckpt")
        assert first.hub.gets(f"/api/models/{REPO_ID}") and second.hub.gets(
            f"/api/models/{REPO_ID}"
        )


def test_endpoint_changed_behind_our_back_is_refused(served, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(fetching.HubEndpointError, match="HF_ENDPOINT"):
        sb().fetch("lm.ckpt", hub())
    assert time.monotonic() - started < 1
    assert served.hub.requests == []


def test_endpoint_set_before_import_in_a_fresh_process(tmp_path):
    """In a fresh interpreter: our modules do not import huggingface_hub, the
    endpoint set first is what huggingface_hub reads at import, and setting
    HF_ENDPOINT by hand later is caught."""
    code = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import network_guard; network_guard.install()
from sbtemplate import fetching, servers, manifest, paths
assert "huggingface_hub" not in sys.modules, "imported too early"
fetching.use_hub_endpoint("http://127.0.0.1:4567/")
assert "huggingface_hub" not in sys.modules
import huggingface_hub
from huggingface_hub import constants
assert constants.ENDPOINT == "http://127.0.0.1:4567", constants.ENDPOINT
assert huggingface_hub.hf_hub_url("a/b", "f") == "http://127.0.0.1:4567/a/b/resolve/main/f"
fetching.check_hub_endpoint()
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
try:
    fetching.check_hub_endpoint()
except fetching.HubEndpointError as e:
    print("caught:", e)
else:
    raise SystemExit("tampering not detected")
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "caught: Hub endpoint mismatch" in result.stdout
