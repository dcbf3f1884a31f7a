"""single_node_pretrained.py end to end against the tiny build, served by the
loopback Hub: download_only, load with run options, transcribe the example
wav fetched via FetchSource, and the plain-string + savedir case."""

import runpy
from pathlib import Path

import pytest

from network_guard import _forbid_network  # noqa: F401 - autouse fixture
from sbtemplate import fetching
from sbtemplate.paths import ProfilePaths

SCRIPT = Path(__file__).resolve().parent.parent / "single_node_pretrained.py"


@pytest.fixture
def tiny_paths(request):
    """The tiny build: conftest's ``tiny_build`` fixture when there is one."""
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
    with fetching.hub_endpoint(fetching.current_hub_endpoint()), fetching.policy():
        try:
            yield
        finally:
            fetching.uninstall()


def run_script(*args):
    script = runpy.run_path(str(SCRIPT), run_name="single_node_pretrained")
    return script["main"](list(args))


def test_single_node_pretrained(tiny_paths, tmp_path, capsys, restored_fetching):
    common = (
        "--profile",
        tiny_paths.profile,
        "--artifacts",
        str(tiny_paths.root.parent),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--savedir",
        str(tmp_path / "savedir"),
    )
    code = run_script(*common)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "== Case 1" in out.out and "== Case 2" in out.out
    assert "downloaded from Hugging Face Hub repo" in out.out
    assert "taken as HUGGING_FACE" in out.out
    transcripts = [line.split("transcript: ", 1)[1] for line in out.out.splitlines() if "transcript: " in line]
    assert len(transcripts) == 2 and transcripts[0] == transcripts[1] and transcripts[0] != "''"
    assert (tmp_path / "savedir" / "hyperparams.yaml").exists()

    # Offline with the warm cache: same result, nothing downloaded.
    fetching.configure(allow_network=True)
    code = run_script(*common, "--offline")
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "downloaded from" not in out.out
    assert [line.split("transcript: ", 1)[1] for line in out.out.splitlines() if "transcript: " in line] == transcripts


def test_single_node_pretrained_offline_with_an_empty_cache_fails_clearly(
    tiny_paths, tmp_path, capsys, restored_fetching
):
    code = run_script(
        "--profile",
        tiny_paths.profile,
        "--artifacts",
        str(tiny_paths.root.parent),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--offline",
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "FETCH FAILED" in err and "Hugging Face Hub repo" in err
    assert "network access is disabled" in err
