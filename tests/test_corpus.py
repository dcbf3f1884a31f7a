"""The offline corpus: determinism, LibriSpeech layout, disjoint splits, bad input."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sbtemplate.corpus import builder
from sbtemplate.corpus.builder import SPEAKERS, build_corpus, is_complete
from sbtemplate.corpus.grammar import split_domains
from sbtemplate.data_prep import DataPreparationError, prepare_split, read_text_lines

SMALL = {
    "general_train": 6,
    "general_valid": 2,
    "general_test": 3,
    "target_test": 4,
    "target_valid": 2,
    "general_lm_train": 20,
    "general_lm_valid": 5,
    "target_lm_train": 10,
    "target_lm_valid": 4,
    "noise_files": 2,
    "rir_files": 2,
}


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("c1") / "corpus", SMALL, seed=7, progress=False)


def test_same_seed_gives_identical_bytes(small_corpus, tmp_path):
    again = build_corpus(tmp_path / "corpus", SMALL, seed=7, progress=False)
    assert tree_digest(small_corpus) == tree_digest(again)


def test_other_seed_gives_other_corpus(small_corpus, tmp_path):
    other = build_corpus(tmp_path / "corpus", SMALL, seed=8, progress=False)
    assert tree_digest(small_corpus) != tree_digest(other)


def test_librispeech_layout_is_read_back(small_corpus):
    data_root = small_corpus / "LibriSpeech"
    for split, folder in builder.SPEECH_SPLITS.items():
        entries = prepare_split(data_root, folder, small_corpus.parent / f"{split}.json")
        assert len(entries) == SMALL[split]
        for utt_id, entry in entries.items():
            spk, chapter, _ = utt_id.split("-")
            rel = f"{folder}/{spk}/{chapter}/{utt_id}.flac"
            assert entry["wav"] == "{data_root}/" + rel
            info = sf.info(str(data_root / rel))
            assert info.samplerate == 16000 and info.channels == 1
            assert entry["length"] == pytest.approx(info.frames / 16000)
            assert entry["words"] and entry["words"] == entry["words"].upper()
            assert entry["spk_id"] == spk
            trans = data_root / folder / spk / chapter / f"{spk}-{chapter}.trans.txt"
            assert f"{utt_id} {entry['words']}" in trans.read_text().splitlines()


def test_target_speech_carries_semantics(small_corpus):
    semantics = json.loads((small_corpus / "semantics.json").read_text())
    entries = prepare_split(
        small_corpus / "LibriSpeech", "test-target", small_corpus.parent / "t.json", semantics
    )
    assert all("intent" in e["semantics"] for e in entries.values())


def test_speakers_are_distinct_voice_variants():
    voices = list(SPEAKERS.values())
    assert len({v.name for v in voices}) >= 6
    assert len({(v.rate, v.pitch) for v in voices}) == len(voices)
    assert len({v.rate for v in voices}) >= 4 and len({v.pitch for v in voices}) >= 4


def test_augmentation_sets_are_written(small_corpus):
    noises = sorted((small_corpus / "noise").glob("*.wav"))
    rirs = sorted((small_corpus / "rir").glob("*.wav"))
    assert len(noises) == SMALL["noise_files"] and len(rirs) == SMALL["rir_files"]
    rir, rate = sf.read(rirs[0])
    assert rate == 16000 and np.argmax(np.abs(rir)) < 100  # direct path first


def test_splits_are_disjoint_at_scale():
    sizes = {
        "general_train": 700,
        "general_lm_train": 5000,
        "general_test": 100,
        "target_lm_train": 2000,
        "target_test": 150,
        "target_lm_valid": 200,
        "target_valid": 80,
    }
    splits = split_domains(sizes, seed=2602)
    seen = {}
    for name, items in splits.items():
        texts = [i[0] if isinstance(i, tuple) else i for i in items]
        assert len(texts) == sizes[name] == len(set(texts))
        for text in texts:
            assert text not in seen, f"{text!r} in {seen.get(text)} and {name}"
            seen[text] = name


def test_general_speech_covers_every_target_word():
    """LM fine-tuning can only fix word order: the acoustic model must have
    heard each target-domain word in the full profile's general training speech."""
    from sbtemplate.corpus.builder import text_split_sizes
    from sbtemplate.profiles import get_profile

    splits = split_domains(text_split_sizes(get_profile("full")["build"]["corpus"]), seed=2602)
    heard = {w for text in splits["general_train"] for w in text.split()}
    target = {
        w
        for name in ("target_test", "target_lm_train")
        for text, _ in splits[name]
        for w in text.split()
    }
    assert target - heard == set()


def test_general_speech_hears_every_number_word_often():
    """Uniform numbers made "seven" five times as frequent as "eleven" in the
    training speech, and the recognizer heard "eleven" as "seven". No number
    word may be heard less than a quarter as often as the most frequent one."""
    import collections

    from sbtemplate.corpus.builder import text_split_sizes
    from sbtemplate.corpus.grammar import ONES, TEENS, TENS
    from sbtemplate.profiles import get_profile

    splits = split_domains(text_split_sizes(get_profile("full")["build"]["corpus"]), seed=2602)
    counts = collections.Counter(w for text in splits["general_train"] for w in text.split())
    numbers = {w.upper(): counts[w.upper()] for w in ONES[1:] + TEENS + TENS}
    rarest = min(numbers, key=numbers.get)
    assert numbers[rarest] >= max(numbers.values()) / 4, numbers


def test_adding_the_dev_split_keeps_every_other_split():
    """The target dev split is drawn last: the other splits' sentences do not
    depend on whether (or how large) it is."""
    from sbtemplate.corpus.builder import text_split_sizes
    from sbtemplate.profiles import get_profile

    sizes = text_split_sizes(get_profile("full")["build"]["corpus"])
    without = {k: v for k, v in sizes.items() if k != "target_valid"}
    with_dev, without_dev = split_domains(sizes, 2602), split_domains(without, 2602)
    assert len(with_dev["target_valid"]) == sizes["target_valid"] > 0
    assert all(with_dev[name] == without_dev[name] for name in without)


def test_word_lists_are_part_of_general_speech():
    """About LIST_SHARE of general sentences are word lists (only list words and
    numbers), ending on many different words."""
    import random

    from sbtemplate.corpus.grammar import (
        _LIST_WORDS,
        LIST_SHARE,
        ONES,
        TEENS,
        TENS,
        general_sentence,
    )

    vocabulary = {w.upper() for phrase in _LIST_WORDS + ONES + TEENS + TENS for w in phrase.split()}
    rng = random.Random(1)
    sentences = [general_sentence(rng) for _ in range(2000)]
    lists = [s for s in sentences if set(s.split()) <= vocabulary]
    assert 0.8 * LIST_SHARE < len(lists) / len(sentences) < 1.2 * LIST_SHARE
    assert len({s.split()[-1] for s in lists}) >= 30


def test_no_test_sentence_in_any_training_text(tiny_build):
    m = tiny_build.manifests
    training = set(read_text_lines(m / "lm_train.txt"))
    training |= {e["words"] for e in json.loads((m / "train.json").read_text()).values()}
    training |= {e["words"] for e in json.loads((m / "target_lm_train.json").read_text()).values()}
    training |= {e["words"] for e in json.loads((m / "valid.json").read_text()).values()}
    for name in ("test.json", "test_general.json", "valid_target.json"):
        test = {e["words"] for e in json.loads((m / name).read_text()).values()}
        assert test and not (test & training)


# ----------------------------------------------------------------- bad input --
def _layout(tmp_path, text="HELLO WORLD", audio=True):
    folder = tmp_path / "LibriSpeech" / "split" / "11" / "22"
    folder.mkdir(parents=True)
    (folder / "11-22.trans.txt").write_text(f"11-22-0000 {text}\n")
    if audio:
        sf.write(folder / "11-22-0000.flac", np.zeros(1600, dtype=np.float32), 16000)
    return tmp_path / "LibriSpeech", folder


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(DataPreparationError, match=re.escape(str(tmp_path / "nope"))):
        prepare_split(tmp_path, "nope", tmp_path / "x.json")


def test_empty_transcript_is_named(tmp_path):
    root, folder = _layout(tmp_path, text="")
    with pytest.raises(
        DataPreparationError, match="Empty transcript for 11-22-0000.*11-22.trans.txt"
    ):
        prepare_split(root, "split", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_missing_audio_is_named(tmp_path):
    root, _ = _layout(tmp_path, audio=False)
    with pytest.raises(DataPreparationError, match="11-22-0000.*not found"):
        prepare_split(root, "split", tmp_path / "x.json")


def test_corrupt_audio_is_named(tmp_path):
    root, folder = _layout(tmp_path)
    (folder / "11-22-0000.flac").write_bytes(b"fLaC this is not audio")
    with pytest.raises(DataPreparationError, match=r"Unreadable audio file .*11-22-0000\.flac"):
        prepare_split(root, "split", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_interrupted_corpus_build_is_not_mistaken_for_finished(tmp_path, monkeypatch):
    def boom(jobs, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "_synthesize_in_fresh_process", boom)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "corpus", SMALL, seed=7, progress=False)
    assert not (tmp_path / "corpus").exists()
    assert not is_complete(tmp_path / "corpus", SMALL, 7)
    monkeypatch.undo()
    build_corpus(tmp_path / "corpus", SMALL, seed=7, progress=False)
    assert is_complete(tmp_path / "corpus", SMALL, 7)
    assert not (tmp_path / "corpus.partial").exists()
