"""finetune.yaml's sources: ASR from the local folder named like the repo id,
LM from the (loopback) Hub, tokenizer from a URL, through real Pretrainers."""

import io
import os
import re
from pathlib import Path

import pytest
from fetch_helpers import fake_repo, file_bytes, restored_fetching, tiny_paths  # noqa: F401
from network_guard import _forbid_network  # noqa: F401 - autouse fixture

from sbtemplate import fetching
from sbtemplate.paths import REPO_ID, ProfilePaths
from sbtemplate.profiles import include_override

FINETUNE = Path(__file__).resolve().parent.parent / "finetune.yaml"

# Stand-ins for the model section: collecting only needs the loadable keys.
STUB_MODEL = """
asr_model: !new:torch.nn.Linear [1, 1]
normalizer: !new:torch.nn.Linear [1, 1]
lm_model: !new:torch.nn.Linear [1, 1]
tokenizer: !new:torch.nn.Linear [1, 1]
"""


def section(name, text=None):
    text = text if text is not None else FINETUNE.read_text()
    match = re.search(rf"# >>> {name} >>>.*?\n(.*?)# <<< {name} <<<", text, re.S)
    assert match, f"section {name!r} missing from finetune.yaml"
    return match.group(1)


# The fetch-everything-once variant: the same three sources in one Pretrainer.
PRETRAINER_ALL = """
pretrainer_all: !new:speechbrain.utils.parameter_transfer.Pretrainer
    collect_in: !ref <pretrained_folder>
    loadables:
        asr: !ref <asr_model>
        normalizer: !ref <normalizer>
        lm: !ref <lm_model>
        tokenizer: !ref <tokenizer>
    paths:
        asr: !ref <asr_source>
        normalizer: !ref <normalizer_source>
        lm: !ref <lm_source>
        tokenizer: !ref <tokenizer_source>
"""


def sources_and_pretrainers():
    text = section("fetch sources") + STUB_MODEL + section("pretrainers") + PRETRAINER_ALL
    return as_finetune_yaml(text)


def as_finetune_yaml(text):
    """``text`` as a stream named like finetune.yaml: its ``!include:`` paths
    resolve from the repository root, wherever the tests run from."""
    stream = io.StringIO(text)
    stream.name = str(FINETUNE)
    return stream


def tiny(**overrides):
    """Overrides selecting the tiny profile, as ``--build_profile=...`` does."""
    import ruamel.yaml

    return {**ruamel.yaml.YAML(typ="rt").load(include_override("tiny")), **overrides}


@pytest.fixture
def artifacts(tmp_path, fake_repo):
    """A profile tree like the builder's, with the model folder and its repo-id symlink."""
    paths = ProfilePaths.for_profile("tiny", root=tmp_path / "artifacts")
    paths.model_dir.parent.mkdir(parents=True)
    os.symlink(fake_repo, paths.model_dir, target_is_directory=True)
    paths.local_repo.parent.mkdir(parents=True)
    os.symlink(os.path.relpath(paths.model_dir, paths.local_repo.parent), paths.local_repo)
    return paths


def test_loading_serves_the_folder_once_per_process(artifacts, restored_fetching):
    """The endpoints block starts the loopback servers while the file loads;
    resolving the file again (create_experiment_directory does) reuses them."""
    from hyperpyyaml import load_hyperpyyaml

    overrides = tiny(artifacts=str(artifacts.root.parent))
    first = load_hyperpyyaml(sources_and_pretrainers(), overrides)
    second = load_hyperpyyaml(sources_and_pretrainers(), overrides)
    assert first["endpoints"]["mode"] == "loopback"
    assert first["hub_endpoint"].startswith("http://127.0.0.1:")
    assert (first["hub_endpoint"], first["url_base"]) == (
        second["hub_endpoint"],
        second["url_base"],
    )
    served = fetching.loopback_servers(first["local_repo"], REPO_ID)
    assert (served.hub_endpoint, served.url_base) == (first["hub_endpoint"], first["url_base"])
    fetching.stop_serving()
    third = load_hyperpyyaml(sources_and_pretrainers(), overrides)
    assert third["hub_endpoint"] != first["hub_endpoint"]  # the old servers are gone


def test_three_sources_through_pretrainers(artifacts, fake_repo, tmp_path, restored_fetching):
    from hyperpyyaml import load_hyperpyyaml

    overrides = tiny(artifacts=str(artifacts.root.parent))
    hparams = load_hyperpyyaml(sources_and_pretrainers(), overrides)
    fetching.use_endpoints(hparams, cache_dir=tmp_path / "cache")
    served = fetching.loopback_servers(hparams["local_repo"], REPO_ID)
    from speechbrain.utils.fetching import FetchFrom

    assert hparams["asr_source"].FetchFrom is FetchFrom.LOCAL
    assert hparams["lm_source"].FetchFrom is FetchFrom.HUGGING_FACE
    assert hparams["tokenizer_source"].FetchFrom is FetchFrom.URI
    assert Path(hparams["asr_source"].path).parent == artifacts.local_repo

    del fetching.fetch_log[:]
    collected = fetching.collect_pretrained(hparams, load=False)
    kinds = {r.filename: (r.kind, r.status) for r in fetching.fetch_log}
    assert kinds == {
        "asr.ckpt": ("local", "local"),
        "normalizer.ckpt": ("local", "local"),
        "lm.ckpt": ("huggingface", "downloaded"),
        "tokenizer.ckpt": ("url", "downloaded"),
    }
    assert len(served.hub.gets("/lm.ckpt")) == 1
    assert len(served.urls.gets("/tokenizer.ckpt")) == 1
    folder = Path(hparams["pretrained_folder"])
    for name in ("asr", "normalizer", "lm", "tokenizer"):
        assert file_bytes(folder / f"{name}.ckpt") == (fake_repo / f"{name}.ckpt").read_bytes()
    assert set(collected) == {"pretrainer_asr", "pretrainer_lm", "pretrainer_tokenizer"}

    # The fetch-everything-once variant finds it all in place.
    served.hub.clear_log()
    served.urls.clear_log()
    hparams["pretrainer_all"].collect_files()
    assert served.hub.gets() == []
    # only the URL source's manifest is re-read (a URL has no revision)
    assert [r.path.rsplit("/", 1)[-1] for r in served.urls.requests] == ["manifest.json"]


def test_public_mode_is_one_setting(tmp_path, restored_fetching):
    from hyperpyyaml import load_hyperpyyaml

    hparams = load_hyperpyyaml(sources_and_pretrainers(), tiny(fetch_endpoints="public"))
    fetching.use_endpoints(hparams, cache_dir=tmp_path / "cache")
    assert hparams["hub_endpoint"] == "https://huggingface.co"
    assert hparams["url_base"] == f"https://huggingface.co/{REPO_ID}/resolve/main"
    assert fetching.current_hub_endpoint() == "https://huggingface.co"
    assert not fetching.recipe._serving  # nothing served on loopback


def test_unknown_endpoint_mode_is_refused(restored_fetching):
    from hyperpyyaml import load_hyperpyyaml

    from sbtemplate.config_checks import ConfigError

    with pytest.raises(ConfigError, match="fetch_endpoints must be one of"):
        load_hyperpyyaml(sources_and_pretrainers(), tiny(fetch_endpoints="moon"))


def test_an_unbuilt_profile_is_named_while_loading(tmp_path, restored_fetching):
    from hyperpyyaml import load_hyperpyyaml

    with pytest.raises(FileNotFoundError, match="Nothing to serve: .*tiny"):
        load_hyperpyyaml(sources_and_pretrainers(), tiny(artifacts=str(tmp_path)))


def test_finetune_pretrainers_load_the_tiny_build(tiny_paths, tmp_path, restored_fetching):
    """The real model section, with the profile's sizes, loads what the three
    sources deliver."""
    from hyperpyyaml import load_hyperpyyaml

    from sbtemplate.profiles import get_profile

    profile = get_profile(tiny_paths.profile)
    overrides = tiny(
        artifacts=str(tiny_paths.root.parent), pretrained_folder=str(tmp_path / "pretrained")
    )
    text = (
        section("fetch sources")
        + section("model")
        + section("pretrainers")
        + "padding_invariant: True\nmax_decode_ratio: 1.0\n"
    )
    hparams = load_hyperpyyaml(as_finetune_yaml(text), overrides)
    fetching.use_endpoints(hparams, cache_dir=tmp_path / "cache")
    del fetching.fetch_log[:]
    fetching.collect_pretrained(hparams, load=True)
    kinds = {r.filename: r.kind for r in fetching.fetch_log}
    assert kinds == {
        "asr.ckpt": "local",
        "normalizer.ckpt": "local",
        "lm.ckpt": "huggingface",
        "tokenizer.ckpt": "url",
    }
    assert hparams["tokenizer"].vocab_size() == profile["recognizer"]["output_neurons"]


def test_a_users_own_url_base_and_hub_endpoint_are_used(artifacts, tmp_path, restored_fetching):
    """Set in the YAML or on the command line, they are not replaced."""
    overrides = tiny(
        artifacts=str(artifacts.root.parent),
        url_base="http://files.example/models",
        hub_endpoint="http://hub.example",
    )
    from hyperpyyaml import load_hyperpyyaml

    hparams = load_hyperpyyaml(sources_and_pretrainers(), overrides)
    fetching.use_endpoints(hparams, cache_dir=tmp_path / "cache")
    assert hparams["url_base"] == "http://files.example/models"
    assert hparams["hub_endpoint"] == "http://hub.example"
    assert fetching.current_hub_endpoint() == "http://hub.example"
    assert hparams["tokenizer_source"].path == "http://files.example/models/tokenizer.ckpt"
