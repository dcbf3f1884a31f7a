"""Data preparation: a LibriSpeech-layout folder → the template's JSON descriptors.

Reads ``<split>/<speaker>/<chapter>/*.trans.txt`` and the audio next to it,
exactly as mini-LibriSpeech is laid out, so the same code prepares the
project's synthetic corpus and the real data. Each entry is
``{utt_id: {"wav": "{data_root}/<split>/...flac", "length": seconds,
"words": "...", "spk_id": "..."}}`` (plus ``semantics`` when the corpus has
labels); ``{data_root}`` is filled in by the dataio pipeline's
``replacements``, as in SpeechBrain's template.
"""

import csv
import json
import logging
from pathlib import Path

import soundfile as sf

from sbtemplate import atomic_write

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".flac", ".wav")


class DataPreparationError(RuntimeError):
    """A data folder or file that cannot be prepared; the message names it."""


def prepare_split(data_root, split, json_file, semantics=None):
    """Write the JSON descriptor for one LibriSpeech-layout split folder.

    ``split`` is the folder relative to ``data_root`` (e.g. ``train-clean-5``).
    Every transcript line must name an existing, readable audio file and carry
    words; otherwise the error names the offending file.
    """
    data_root = Path(data_root)
    split_dir = data_root / split
    if not split_dir.is_dir():
        raise DataPreparationError(
            f"Data folder {split_dir} does not exist (data_root={data_root}, split={split!r})"
        )
    trans_files = sorted(split_dir.rglob("*.trans.txt"))
    if not trans_files:
        raise DataPreparationError(f"No *.trans.txt transcripts under {split_dir}")
    entries = {}
    for trans in trans_files:
        try:
            lines = trans.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataPreparationError(f"Cannot read transcript {trans}: {err}") from err
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            utt_id, _, words = line.strip().partition(" ")
            words = " ".join(words.split())
            if not words:
                raise DataPreparationError(f"Empty transcript for {utt_id} at {trans}:{lineno}")
            audio = _find_audio(trans.parent, utt_id)
            if audio is None:
                raise DataPreparationError(
                    f"Audio for {utt_id} listed in {trans}:{lineno} not found "
                    f"({' or '.join(utt_id + e for e in AUDIO_EXTENSIONS)})"
                )
            try:
                info = sf.info(str(audio))
            except Exception as err:  # soundfile raises several types
                raise DataPreparationError(f"Unreadable audio file {audio}: {err}") from err
            if info.frames == 0:
                raise DataPreparationError(f"Empty audio file {audio}")
            if utt_id in entries:
                raise DataPreparationError(f"Duplicate utterance id {utt_id} in {trans}")
            rel = audio.relative_to(data_root).as_posix()
            entry = {
                "wav": "{data_root}/" + rel,
                "length": info.frames / info.samplerate,
                "words": words,
                "spk_id": utt_id.split("-")[0],
            }
            if semantics is not None and utt_id in semantics:
                entry["semantics"] = semantics[utt_id]
            entries[utt_id] = entry
    atomic_write.write_json(json_file, entries)
    logger.info("Prepared %d utterances of %s in %s", len(entries), split_dir, json_file)
    return entries


def _find_audio(folder, utt_id):
    for ext in AUDIO_EXTENSIONS:
        path = folder / (utt_id + ext)
        if path.is_file():
            return path
    return None


def write_augmentation_csv(folder, csv_file):
    """SpeechBrain's extended noise/RIR CSV for every audio file in ``folder``."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in AUDIO_EXTENSIONS)
    if not files:
        raise DataPreparationError(f"No audio files in augmentation folder {folder}")
    with atomic_write.replacing(csv_file, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "duration", "wav", "wav_format", "wav_opts"])
        for path in files:
            info = sf.info(str(path))
            writer.writerow(
                [
                    path.stem,
                    info.frames / info.samplerate,
                    str(path.resolve()),
                    path.suffix.lstrip("."),
                    "",
                ]
            )


def read_text_lines(path):
    """Sentences of a text-only LM split (one per line)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if line]


def prepare_corpus(corpus_root, manifest_dir, splits):
    """Prepare every speech split and the augmentation CSVs of a built corpus.

    ``splits`` maps descriptor name (``train``, ``valid``, ``test``...) → split
    folder under ``<corpus_root>/LibriSpeech``.
    """
    corpus_root = Path(corpus_root)
    manifest_dir = Path(manifest_dir)
    semantics_file = corpus_root / "semantics.json"
    semantics = json.loads(semantics_file.read_text()) if semantics_file.is_file() else None
    data_root = corpus_root / "LibriSpeech"
    for name, split in splits.items():
        prepare_split(data_root, split, manifest_dir / f"{name}.json", semantics)
    write_augmentation_csv(corpus_root / "noise", manifest_dir / "noise.csv")
    write_augmentation_csv(corpus_root / "rir", manifest_dir / "rir.csv")
    return data_root
