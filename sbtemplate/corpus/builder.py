"""Builds the offline speech corpus in the LibriSpeech folder layout.

``<root>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac``
with one ``<speaker>-<chapter>.trans.txt`` per chapter, exactly as
mini-LibriSpeech, so ``sbtemplate.data_prep`` reads either. Beside it:
``text/`` (text-only LM splits), ``noise/`` and ``rir/`` (augmentation sets,
as the template's OpenRIR) and ``semantics.json`` for the target-domain speech.

The corpus is written to a temporary sibling folder and renamed into place only
when complete, so an interrupted build never leaves a folder that a later run
mistakes for a finished one. Same seed and sizes → identical bytes.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from sbtemplate.corpus.grammar import split_domains
from sbtemplate.corpus.synthesis import TARGET_SAMPLE_RATE, EspeakSynthesizer, Voice

CORPUS_VERSION = 4  # bump when the grammar, voices or synthesis change the bytes
COMPLETE_MARKER = "CORPUS_COMPLETE.json"

# Six espeak-ng voice variants, each with its own rate/pitch: the speakers.
# (LibriSpeech-style numeric speaker ids.)
SPEAKERS = {
    "1001": Voice("en-us+m1", rate=165, pitch=45, pitch_range=50),
    "1002": Voice("en+f3", rate=150, pitch=70, pitch_range=60),
    "1003": Voice("en+m2", rate=180, pitch=35, pitch_range=40),
    "1004": Voice("en-us+f2", rate=160, pitch=62, pitch_range=70),
    "1005": Voice("en+m3", rate=140, pitch=50, pitch_range=30),
    "1006": Voice("en-us+f4", rate=175, pitch=75, pitch_range=55),
    "1007": Voice("en+m5", rate=155, pitch=40, pitch_range=65),
    "1008": Voice("en-us+f1", rate=170, pitch=58, pitch_range=45),
}

# corpus split name -> LibriSpeech-style folder name
SPEECH_SPLITS = {
    "general_train": "train-general",
    "general_valid": "dev-general",
    "general_test": "test-general",
    "target_test": "test-target",
    # Target-domain dev speech: decoding weights are tuned on it, never on test.
    "target_valid": "dev-target",
}
TEXT_SPLITS = ("general_lm_train", "general_lm_valid", "target_lm_train", "target_lm_valid")


def text_split_sizes(sizes):
    """The sentence counts of a profile's corpus sizes (speech and text-only
    splits; not the noise and RIR file counts)."""
    return {k: v for k, v in sizes.items() if k in SPEECH_SPLITS or k in TEXT_SPLITS}


def corpus_fingerprint(sizes, seed):
    """What the corpus bytes depend on; a cached corpus is reused only if it matches."""
    return {"version": CORPUS_VERSION, "seed": seed, "sizes": dict(sorted(sizes.items()))}


def is_complete(root, sizes, seed):
    """Whether ``root`` holds a finished corpus of these sizes and seed (its marker matches)."""
    marker = Path(root) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == corpus_fingerprint(sizes, seed)
    except ValueError:
        return False


def build_corpus(root, sizes, seed=2602, progress=True):
    """Synthesise the corpus into ``root`` (skipped when a matching one is there)."""
    root = Path(root)
    if is_complete(root, sizes, seed):
        return root
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    splits = split_domains(text_split_sizes(sizes), seed)
    _write_text_splits(partial / "text", splits)

    rng = np.random.default_rng(seed)
    speaker_ids = sorted(SPEAKERS)
    semantics = {}
    jobs = []
    for split, folder in SPEECH_SPLITS.items():
        # chapter per (split, speaker), like LibriSpeech's speaker/chapter tree
        chapter_base = 100 * (list(SPEECH_SPLITS).index(split) + 1)
        counters = {}
        transcripts = {}
        for item in splits.get(split, []):
            text, sem = item if isinstance(item, tuple) else (item, None)
            spk = speaker_ids[int(rng.integers(len(speaker_ids)))]
            chapter = str(chapter_base + int(spk) % 100)
            idx = counters.get((spk, chapter), 0)
            counters[(spk, chapter)] = idx + 1
            utt_id = f"{spk}-{chapter}-{idx:04d}"
            out_dir = partial / "LibriSpeech" / folder / spk / chapter
            out_dir.mkdir(parents=True, exist_ok=True)
            level_db = float(rng.uniform(-26, -16))
            jobs.append((str(out_dir / f"{utt_id}.flac"), text.lower(), SPEAKERS[spk], level_db))
            transcripts.setdefault(out_dir / f"{spk}-{chapter}.trans.txt", []).append(
                f"{utt_id} {text}"
            )
            if sem is not None:
                semantics[utt_id] = sem
        for path, lines in transcripts.items():
            path.write_text("\n".join(lines) + "\n")
    (partial / "semantics.json").write_text(json.dumps(semantics, indent=1, sort_keys=True) + "\n")
    _synthesize_in_fresh_process(jobs, progress)

    babble_sources = [job[0] for job in jobs if "train-general" in job[0]]
    _write_noise(partial / "noise", sizes.get("noise_files", 4), rng, babble_sources)
    _write_rirs(partial / "rir", sizes.get("rir_files", 4), rng)

    (partial / COMPLETE_MARKER).write_text(json.dumps(corpus_fingerprint(sizes, seed)))
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return root


def _synthesize_in_fresh_process(jobs, progress):
    """Run all synthesis, in order, in one newly spawned process.

    libespeak-ng keeps static generator state (voicing jitter, flutter phase)
    that no API call resets, so a waveform depends on everything synthesised
    before it in the same process. A fresh process per build with a fixed job
    order makes the corpus bytes a function of the seed alone.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        for _ in tqdm(
            pool.imap(_synthesize_job, jobs, chunksize=16),
            total=len(jobs),
            desc="synthesising speech",
            disable=not progress,
        ):
            pass


_SYNTH = None


def _synthesize_job(job):
    global _SYNTH
    if _SYNTH is None:
        _SYNTH = EspeakSynthesizer()
    path, text, voice, level_db = job
    audio = _SYNTH.synthesize(text, voice)
    rms = float(np.sqrt(np.mean(audio**2))) + 1e-9
    audio = np.clip(audio * (10 ** (level_db / 20) / rms), -0.99, 0.99).astype(np.float32)
    sf.write(path, audio, TARGET_SAMPLE_RATE, subtype="PCM_16")
    return path


def _write_text_splits(folder, splits):
    folder.mkdir(parents=True)
    for name in TEXT_SPLITS:
        items = splits.get(name, [])
        if name.startswith("target"):
            data = {
                f"{name}-{i:05d}": {"words": text, "semantics": sem}
                for i, (text, sem) in enumerate(items)
            }
            (folder / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        else:
            (folder / f"{name}.txt").write_text("\n".join(items) + "\n")


def _write_noise(folder, count, rng, babble_sources):
    """Coloured noises, mains hum and babble from training speech (4 s each)."""
    folder.mkdir(parents=True)
    n = 4 * TARGET_SAMPLE_RATE
    for i in range(count):
        kind = ("white", "pink", "brown", "hum", "babble")[i % 5]
        if kind == "white":
            x = rng.standard_normal(n)
        elif kind in ("pink", "brown"):
            spec = np.fft.rfft(rng.standard_normal(n))
            f = np.arange(spec.size) + 1.0
            spec /= np.sqrt(f) if kind == "pink" else f
            x = np.fft.irfft(spec, n)
        elif kind == "hum":
            t = np.arange(n) / TARGET_SAMPLE_RATE
            base = rng.choice([50.0, 60.0])
            x = sum(
                np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 6)
            )
            x = x + 0.05 * rng.standard_normal(n)
        else:
            x = np.zeros(n)
            for _ in range(4):
                source = babble_sources[int(rng.integers(len(babble_sources)))]
                s = sf.read(source, dtype="float32")[0][:n]
                start = int(rng.integers(0, n - s.size + 1))
                x[start : start + s.size] += s
        x = 0.3 * x / (np.max(np.abs(x)) + 1e-9)
        sf.write(
            folder / f"noise_{i:03d}_{kind}.wav",
            x.astype(np.float32),
            TARGET_SAMPLE_RATE,
            subtype="PCM_16",
        )


def _write_rirs(folder, count, rng):
    """Exponentially decaying noise tails with a direct path (RT60 0.15–0.7 s)."""
    folder.mkdir(parents=True)
    for i in range(count):
        rt60 = rng.uniform(0.15, 0.7)
        n = int(TARGET_SAMPLE_RATE * min(1.0, rt60 * 1.2))
        t = np.arange(n) / TARGET_SAMPLE_RATE
        tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * 0.3
        delay = int(rng.integers(10, 80))
        tail[:delay] = 0.0
        tail[0] = 1.0
        # a few early reflections
        for _ in range(5):
            k = int(rng.integers(delay, min(n, delay + 800)))
            tail[k] += rng.uniform(0.2, 0.6) * rng.choice([-1, 1])
        rir = tail / np.max(np.abs(tail))
        sf.write(
            folder / f"rir_{i:03d}.wav",
            rir.astype(np.float32),
            TARGET_SAMPLE_RATE,
            subtype="PCM_16",
        )
