"""The base recognizer build: published layout, local loading, caching, interruption."""

import json
import os
import re

import pytest
import torch

from sbtemplate import build as build_mod
from sbtemplate.manifest import read_manifest, sha256_file
from sbtemplate.paths import REPO_ID, ProfilePaths
from sbtemplate.profiles import get_profile

PUBLISHED = (
    "asr.ckpt",
    "lm.ckpt",
    "tokenizer.ckpt",
    "normalizer.ckpt",
    "hyperparams.yaml",
    build_mod.EXAMPLE_WAV,
)


def test_published_layout_and_manifest(tiny_build):
    model_dir = tiny_build.model_dir
    assert model_dir.parent.name == "save" and model_dir.name == "CKPT+latest"
    manifest = read_manifest(model_dir)
    for name in PUBLISHED:
        assert (model_dir / name).is_file(), name
        assert manifest[name]["sha256"] == sha256_file(model_dir / name)
    link = tiny_build.local_repo
    assert link.is_symlink() and link.resolve() == model_dir.resolve()
    assert link.relative_to(tiny_build.root).as_posix() == REPO_ID
    assert not os.path.isabs(os.readlink(link))  # the tree can be moved


def test_the_built_tree_links_only_within_itself(tiny_build):
    """A copied or moved artefacts tree must use its own files: no link in a
    freshly built profile points anywhere by an absolute path."""
    build_mod.evaluate_base(tiny_build)  # what a build does last
    absolute = [
        p for p in tiny_build.root.rglob("*") if p.is_symlink() and os.path.isabs(os.readlink(p))
    ]
    assert absolute == []


def test_build_report_has_both_test_sets(tiny_build):
    report = json.loads(tiny_build.build_report.read_text())
    assert set(report["wer"]) == {"test_general", "test"}
    details = report["details"]["test"]
    test = json.loads((tiny_build.manifests / "test.json").read_text())
    assert details["num_scored_sents"] == len(test)


def test_tiny_model_transcribes_through_local_repo_folder(tiny_build, tmp_path, monkeypatch):
    """The folder named like the Hub repo id is found locally, as the template relies on."""
    from speechbrain.inference.ASR import EncoderDecoderASR

    monkeypatch.chdir(tiny_build.root)
    asr = EncoderDecoderASR.from_hparams(source=REPO_ID, savedir=str(tmp_path / "savedir"))
    example = str(tiny_build.model_dir / build_mod.EXAMPLE_WAV)
    text = asr.transcribe_file(example)
    # The same recognizer as when loaded from the published folder's own path.
    direct = EncoderDecoderASR.from_hparams(
        source=str(tiny_build.model_dir), savedir=str(tmp_path / "direct")
    )
    assert text.strip() and text == direct.transcribe_file(example)
    # The savedir links point into the local folder: nothing was downloaded.
    linked = (tmp_path / "savedir" / "asr.ckpt").resolve()
    assert linked == (tiny_build.model_dir / "asr.ckpt").resolve()


def test_second_build_reuses_every_stage(tiny_build, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cached stage was trained again")

    from sbtemplate import base_recognizer

    monkeypatch.setattr(base_recognizer.ASRBrain, "fit", refuse)
    monkeypatch.setattr(base_recognizer.LMBrain, "fit", refuse)
    monkeypatch.setattr(base_recognizer, "train_tokenizer", refuse)
    monkeypatch.setattr(build_mod, "evaluate_base", refuse)
    assert build_mod.build("tiny", progress=False) == tiny_build


def test_interrupted_stage_is_redone_not_reused(tmp_path):
    target = tmp_path / "stage"

    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_mod._stage(target, {"v": 1}, crash)
    assert not target.exists()

    calls = []

    def work(tmp):
        calls.append(tmp)
        (tmp / "full.bin").write_bytes(b"ok")

    build_mod._stage(target, {"v": 1}, work)
    assert (target / "full.bin").read_bytes() == b"ok" and not (target / "half.bin").exists()
    assert not target.with_name("stage.partial").exists()
    build_mod._stage(target, {"v": 1}, work)  # cached: no second call
    build_mod._stage(target, {"v": 2}, work)  # other inputs: rebuilt
    assert len(calls) == 2


def test_a_reused_stage_keeps_the_seconds_it_took_to_make(tmp_path, monkeypatch):
    target = tmp_path / "stage"
    clock = iter([100.0, 107.5, 500.0, 500.0])
    monkeypatch.setattr(build_mod.time, "time", lambda: next(clock))
    build_mod._stage(target, {"v": 1}, lambda tmp: None)
    assert build_mod._stage_seconds(target) == pytest.approx(7.5)
    build_mod._stage(target, {"v": 1}, lambda tmp: None)  # reused: no new timing
    assert build_mod._stage_seconds(target) == pytest.approx(7.5)
    assert build_mod._stage_seconds(tmp_path / "never-built") is None


def test_later_stages_depend_on_the_corpus_version(tmp_path, monkeypatch):
    """A new corpus (grammar or voices changed, same sizes) must retrain the
    tokenizer, LM and ASR: their fingerprints carry the corpus version."""
    from sbtemplate.corpus import builder

    seen = []

    def record(paths, cfg, *args):
        seen.append(cfg["corpus"])
        raise StopIteration  # stop after the first stage

    monkeypatch.setattr(build_mod, "build_corpus", lambda *a, **k: None)
    monkeypatch.setattr(build_mod, "build_manifests", record)
    paths = ProfilePaths("tiny", tmp_path)
    versions = []
    for version in (1, 2):
        monkeypatch.setattr(builder, "CORPUS_VERSION", version)
        with pytest.raises(StopIteration):
            build_mod._build_locked(paths, force=False, progress=False)
        versions.append(seen[-1]["version"])
    assert versions == [1, 2]
    assert seen[0]["sizes"] == get_profile("tiny")["build"]["corpus"]


def test_lm_training_is_deterministic(tiny_build, tmp_path, monkeypatch):
    """Twice the same LM, also when the caller has seeded SpeechBrain with
    another seed (SB_GLOBAL_SEED, which seeds its shuffling samplers)."""
    cfg = build_mod.build_config("tiny")
    tokenizer = next((tiny_build.root / "tokenizer").glob("*.model"))
    weights = []
    for run in ("a", "b"):
        if run == "b":
            monkeypatch.setenv("SB_GLOBAL_SEED", "1986")
        paths = ProfilePaths("tiny", tmp_path / run)
        paths.root.mkdir(parents=True)
        (paths.root / "manifests").symlink_to(tiny_build.manifests)
        with build_mod.build_environment("tiny"):
            weights.append(torch.load(build_mod.build_lm(paths, cfg, tokenizer)))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


@pytest.mark.parametrize("profile", ["tiny", "full"])
def test_published_hparams_state_the_profile(profile):
    """hyperparams.yaml is inference.yaml with the profile's recognizer block:
    every other line as it is, every value of the block in it."""
    import io

    from hyperpyyaml import load_hyperpyyaml

    text = build_mod.published_hparams(profile)
    values = get_profile(profile)["recognizer"]
    loaded = load_hyperpyyaml(io.StringIO(text))
    assert {key: loaded[key] for key in values} == values
    source = (build_mod.HPARAMS_DIR / "inference.yaml").read_text().splitlines()
    changed = [line for line in source if line not in text.splitlines()]
    # the block's placeholders, and booleans the YAML writer spells in lower case
    assert all(
        "!PLACEHOLDER" in line or line.rstrip().endswith(("True", "False")) for line in changed
    )


def test_published_hparams_refuses_a_profile_missing_a_value(tmp_path, monkeypatch):
    import sbtemplate.profiles as profiles

    original = profiles.profile_file("tiny").read_text()
    text = re.sub(r"(?m)^    beam_size: .*\n", "", original)
    assert text != original
    (tmp_path / "tiny.yaml").write_text(text)
    monkeypatch.setattr(profiles, "PROFILES_DIR", tmp_path)
    with pytest.raises(KeyError, match="beam_size"):
        build_mod.published_hparams("tiny")


def test_tiny_build_trains_on_one_thread_and_restores_the_callers(tiny_build, monkeypatch):
    """Float rounding depends on the thread count; the debug-run expectation pins
    the tiny models' bytes, so the tiny build uses one thread on every machine."""
    seen = []
    monkeypatch.setattr(
        build_mod,
        "_build_stages",
        lambda paths, force, progress: seen.append(torch.get_num_threads()) or paths,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_mod.build("tiny", progress=False)
        assert seen == [get_profile("tiny")["build"]["threads"]] == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _asr_stage_inputs(tiny_build, tmp_path, **asr):
    """A fresh root reusing the tiny build's corpus and manifests, and a profile
    copy whose ASR stage has the given settings (one epoch by default)."""
    cfg = json.loads(json.dumps(build_mod.build_config("tiny")))
    cfg["asr"] = {**cfg["asr"], "number_of_epochs": 1, "number_of_ctc_epochs": 1, **asr}
    paths = ProfilePaths("tiny", tmp_path / "root")
    paths.root.mkdir(parents=True)
    (paths.root / "manifests").symlink_to(tiny_build.manifests)
    paths.corpus.symlink_to(tiny_build.corpus)
    return paths, cfg, next((tiny_build.root / "tokenizer").glob("*.model"))


def test_asr_stage_trains_on_two_ddp_ranks(tiny_build, tmp_path, monkeypatch):
    """``ranks: 2`` trains under torchrun (gloo, CPU): each rank takes half of
    every batch, the replicas end identical (checked inside the run) and the
    checkpoint has the published recognizer's parameters."""
    monkeypatch.setattr(build_mod.torch.cuda, "is_available", lambda: False)
    paths, cfg, tokenizer = _asr_stage_inputs(tiny_build, tmp_path, ranks=2)
    folder = build_mod.build_asr(paths, cfg, tokenizer)
    job = json.loads((folder / "asr_job.json").read_text())
    import ruamel.yaml

    overrides = ruamel.yaml.YAML(typ="rt").load(job["overrides"])
    assert overrides["batch_size"] == cfg["asr"]["batch_size"] // 2
    assert json.loads((folder / "asr_valid.json").read_text())["ranks"] == 2
    trained = torch.load(folder / "asr.ckpt")
    published = torch.load(tiny_build.model_dir / "asr.ckpt")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in published.items()}


def test_failed_ddp_asr_stage_leaves_nothing_finished(tiny_build, tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod.torch.cuda, "is_available", lambda: False)
    paths, cfg, _ = _asr_stage_inputs(tiny_build, tmp_path, ranks=2)
    with pytest.raises(RuntimeError, match="ASR training under torchrun failed"):
        build_mod.build_asr(paths, cfg, tmp_path / "missing-tokenizer.model")
    assert not paths.experiment.exists()
    with pytest.raises(ValueError, match="batch_size 7 is not a multiple of ranks 2"):
        build_mod.build_asr(paths, {**cfg, "asr": {**cfg["asr"], "batch_size": 7}}, tmp_path / "x")
