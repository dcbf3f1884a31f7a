"""single_node_pretrained.py end to end against the tiny build, served by the
loopback Hub: download_only, load with run options, transcribe the example
wav fetched via FetchSource, and the plain-string + savedir case."""

import json
import runpy
from pathlib import Path

import pytest
from fetch_helpers import restored_fetching, tiny_paths  # noqa: F401 - fixtures
from network_guard import _forbid_network  # noqa: F401 - autouse fixture

from sbtemplate import fetching, servers
from sbtemplate.paths import REPO_ID
from sbtemplate.profiles import profile_file

SCRIPT = Path(__file__).resolve().parent.parent / "single_node_pretrained.py"
HPARAMS = SCRIPT.with_suffix(".yaml")


def run_script(*args):
    """The script's main() on its YAML with ``args`` (``--key value`` pairs)."""
    script = runpy.run_path(str(SCRIPT), run_name="single_node_pretrained")
    return script["main"]([str(HPARAMS), *args])


def test_single_node_pretrained(tiny_paths, tmp_path, capsys, restored_fetching):
    common = (
        f"--build_profile=!include:{profile_file(tiny_paths.profile)}",
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
    transcripts = [
        line.split("transcript: ", 1)[1] for line in out.out.splitlines() if "transcript: " in line
    ]
    assert len(transcripts) == 2 and transcripts[0] == transcripts[1] and transcripts[0] != "''"
    assert (tmp_path / "savedir" / "hyperparams.yaml").exists()

    # Offline, servers gone: the warm cache is enough.
    from speechbrain.inference.ASR import EncoderDecoderASR
    from speechbrain.utils.fetching import FetchFrom, FetchSource

    start = len(fetching.fetch_log)
    with fetching.policy(allow_network=False):
        EncoderDecoderASR.from_hparams(
            source=FetchSource(FetchFrom.HUGGING_FACE, REPO_ID), download_only=True
        )
    records = fetching.fetch_log[start:]
    assert records and all(r.status == "cached" for r in records)


def test_single_node_pretrained_offline_with_an_empty_cache_fails_clearly(
    tiny_paths, tmp_path, capsys, restored_fetching
):
    code = run_script(
        f"--build_profile=!include:{profile_file(tiny_paths.profile)}",
        "--artifacts",
        str(tiny_paths.root.parent),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--offline=True",
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "FETCH FAILED" in err and "Hugging Face Hub repo" in err
    assert "network access is disabled" in err


def test_published_example_round_trips_through_load_audio(tiny_paths, tmp_path, restored_fetching):
    import soundfile
    import torch
    from speechbrain.inference.interfaces import Pretrained
    from speechbrain.utils.fetching import FetchFrom, FetchSource

    manifest = json.loads((tiny_paths.model_dir / "manifest.json").read_text())
    example = sorted(n for n in manifest if n.endswith((".wav", ".flac")))[0]
    reference, rate = soundfile.read(tiny_paths.model_dir / example, dtype="float32")
    with servers.serve(tiny_paths.local_repo, REPO_ID) as served:
        fetching.setup(hub_endpoint=served.hub_endpoint, cache_dir=tmp_path / "cache")
        model = Pretrained(modules=torch.nn.ModuleDict(), hparams={"sample_rate": rate})
        signal = model.load_audio(FetchSource(FetchFrom.HUGGING_FACE, f"{REPO_ID}/{example}"))
    assert torch.allclose(signal, torch.from_numpy(reference), atol=1e-6)
    assert fetching.fetch_log[-1].kind == "huggingface"
