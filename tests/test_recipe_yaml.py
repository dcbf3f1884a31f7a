"""What a recipe's YAML says is what runs: finetune.yaml, loaded as finetune.py
loads it, states the architecture and decoding values of the recognizer it
fine-tunes, and they are those of the published hyperparams.yaml."""

import io
from pathlib import Path

import pytest
from hyperpyyaml import load_hyperpyyaml

from sbtemplate import build
from sbtemplate.profiles import get_profile, include_override, profile_names

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ROOT / "finetune.yaml"
MULTISOURCE = ROOT / "multisource_mini_recipe.yaml"
# What the searchers are built with, as attribute names of S2SRNNBeamSearcher.
SEARCH_SETTINGS = (
    "beam_size",
    "eos_threshold",
    "bos_index",
    "eos_index",
    "min_decode_ratio",
    "max_decode_ratio",
    "temperature",
    "using_max_attn_shift",
    "max_attn_shift",
)


def load_recipe(path, profile, tmp_path):
    """The recipe file with the profile selected as a user selects it (the
    default: nothing), its generated paths under ``tmp_path``."""
    overrides = "" if profile == "full" else include_override(profile) + "\n"
    # public endpoints: nothing is served (the profile need not be built)
    overrides += f"artifacts: {tmp_path}\nfetch_endpoints: public\n"
    with open(path) as handle:
        return load_hyperpyyaml(handle, overrides)


def shapes(module):
    return {name: tuple(value.shape) for name, value in module.state_dict().items()}


def test_finetune_yaml_alone_runs_the_full_profile(tmp_path):
    hparams = load_recipe(FINETUNE, "full", tmp_path)
    assert hparams["profile"] == "full"
    assert hparams["recognizer"]["recognizer"] == get_profile("full")["recognizer"]


@pytest.mark.parametrize("profile", profile_names())
def test_finetune_yaml_states_the_published_recognizer(profile, tmp_path):
    hparams = load_recipe(FINETUNE, profile, tmp_path)
    published = load_hyperpyyaml(io.StringIO(build.published_hparams(profile)))
    recognizer = hparams["recognizer"]
    assert hparams["profile"] == profile
    for key in get_profile(profile)["recognizer"]:
        assert recognizer[key] == published[key], key
    # the modules the Pretrainers load into have the checkpoints' shapes
    assert shapes(hparams["asr_model"]) == shapes(published["asr_model"])
    assert shapes(hparams["lm_model"]) == shapes(published["lm_model"])
    # the searcher the Brain decodes with is set up as the interface's
    for name in SEARCH_SETTINGS:
        assert getattr(hparams["test_search"], name) == getattr(published["decoder"], name), name
    assert hparams["test_search"].scorer.weights == published["decoder"].scorer.weights
    assert hparams["test_encoder"].__class__ is published["encoder"].__class__
    # the interface path gets the same values through its overrides
    for key, value in hparams["decoding_overrides"].items():
        assert value == published[key] or key == "padding_invariant", key


def test_the_built_recognizer_is_what_the_profile_publishes(tiny_build):
    """The tiny build's hyperparams.yaml is the one ``published_hparams`` gives."""
    assert (tiny_build.model_dir / "hyperparams.yaml").read_text() == build.published_hparams(
        "tiny"
    )


@pytest.mark.parametrize("profile", profile_names())
def test_training_yamls_build_the_published_modules(profile, tmp_path):
    """base_asr.yaml and base_lm.yaml train the networks hyperparams.yaml loads."""
    overrides = {"output_folder": str(tmp_path), "train_annotation": "a", "valid_annotation": "b"}
    asr = build._load_hparams(
        "base_asr.yaml",
        profile,
        **overrides,
        data_root="d",
        noise_annotation="n",
        rir_annotation="r",
    )
    lm = build._load_hparams("base_lm.yaml", profile, **overrides)
    published = load_hyperpyyaml(io.StringIO(build.published_hparams(profile)))
    assert shapes(asr["model"]) == shapes(published["asr_model"])
    assert shapes(lm["model"]) == shapes(published["lm_model"])
    assert (
        asr["compute_features"].compute_STFT.hop_length
        == published["compute_features"].compute_STFT.hop_length
    )


@pytest.mark.parametrize("profile", profile_names())
def test_multisource_yaml_follows_the_selected_profile(profile, tmp_path):
    hparams = load_recipe(MULTISOURCE, profile, tmp_path)
    assert hparams["profile"] == profile
    assert Path(hparams["local_repo"]).parent.parent == tmp_path / profile


def test_an_unknown_profile_is_named():
    with pytest.raises(ValueError, match="Unknown profile 'huge': choose one of full, tiny"):
        include_override("huge")


def test_profiles_list_every_recognizer_value():
    """Each profile states every value; none falls back on another's."""
    blocks = {name: get_profile(name)["recognizer"] for name in profile_names()}
    keys = {name: set(block) for name, block in blocks.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, keys
    assert all(value is not None for block in blocks.values() for value in block.values())


def test_a_recipe_file_is_read_and_resolved_once(monkeypatch, tmp_path):
    """run_setup.load_hparams, the scripts' one loader: one read of the file,
    one HyperPyYAML resolution of it (its !include:s are resolved on their own)."""
    import hyperpyyaml.core

    from sbtemplate import config_checks, run_setup

    reads, resolved = [], []
    read, resolve = config_checks.read_yaml_file, hyperpyyaml.core.resolve_references

    def counting_read(path):
        reads.append(Path(path))
        return read(path)

    def counting_resolve(stream, *args, **kwargs):
        resolved.append(getattr(stream, "name", None))
        return resolve(stream, *args, **kwargs)

    monkeypatch.setattr(config_checks, "read_yaml_file", counting_read)
    monkeypatch.setattr(hyperpyyaml.core, "resolve_references", counting_resolve)
    overrides = {"artifacts": str(tmp_path), "fetch_endpoints": "public"}
    hparams = run_setup.load_hparams(FINETUNE, overrides)
    assert hparams["url_base"].startswith("https://huggingface.co/")
    assert reads == [FINETUNE]
    assert resolved.count(str(FINETUNE)) == 1, resolved


@pytest.mark.parametrize(
    "script", ["finetune.py", "multisource_mini_recipe.py", "single_node_pretrained.py"]
)
def test_each_script_loads_its_yaml_in_one_place(script):
    """No script reads its YAML another way (plain-key pre-reads, a second
    load): the file is loaded once per process, by run_setup.load_hparams."""
    import ast

    nodes = [n for n in ast.walk(ast.parse((ROOT / script).read_text())) if isinstance(n, ast.Call)]
    calls = [
        n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None) for n in nodes
    ]
    assert calls.count("load_hparams") == 1
    for other in ("load_hyperpyyaml", "resolve_references", "read_plain_keys"):
        assert other not in calls, f"{script} calls {other}"
    opened = [ast.unparse(n.args[0]) for n, name in zip(nodes, calls) if name == "open" and n.args]
    assert "hparams_file" not in opened
