"""Every audio file checked before any work starts.

A recipe that reads audio at test time finds a bad file only after the whole
training, and some faults never raise: an 8 kHz file read as 16 kHz decodes
into wrong words with exit status 0, and a stereo file fails deep in the
feature extractor with a tensor-shape error naming neither file nor cause.
:func:`check_audio_format` reads every file's header (soundfile: no decoding,
milliseconds per file) and names each file that is missing, undecodable,
empty, or not of the expected sample rate and channel count.
"""

from pathlib import Path

import soundfile

#: Files named in one error; the count of the rest follows.
SHOWN = 10


class AudioFormatError(ValueError):
    """Audio files the recipe cannot use as they are."""


def check_audio_format(entries, manifest, sample_rate, channels=1):
    """Raise :class:`AudioFormatError` naming every unusable file of ``entries``.

    ``entries``: ``{utterance id: {"wav": path, ...}}`` with resolved paths;
    ``manifest``: where they were listed (named in the error).
    """
    problems = []
    for uid, entry in entries.items():
        path = Path(entry["wav"])
        if not path.is_file():
            problems.append(f"{uid}: {path}: no such file")
            continue
        try:
            info = soundfile.info(str(path))
        except (RuntimeError, soundfile.LibsndfileError) as error:  # not audio soundfile can decode
            problems.append(f"{uid}: {path}: cannot be decoded ({error})")
            continue
        found = []
        if info.samplerate != sample_rate:
            found.append(f"{info.samplerate} Hz")
        if info.channels != channels:
            found.append(f"{info.channels} channels")
        if info.frames == 0:
            found.append("no samples")
        if found:
            problems.append(f"{uid}: {path}: {', '.join(found)}")
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        want = "mono" if channels == 1 else f"{channels} channels"
        raise AudioFormatError(
            f"{len(problems)} of {len(entries)} audio files listed in {manifest} cannot be used "
            f"(expected {sample_rate} Hz {want}; convert them first, e.g. "
            f"sox in.wav -r {sample_rate} -c {channels} out.wav):\n  "
            + "\n  ".join(problems[:SHOWN])
            + more
        )
