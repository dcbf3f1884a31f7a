"""Audio is checked before any work: each unusable file is named with the reason."""

import numpy as np
import pytest
import soundfile

from sbtemplate.audio_check import AudioFormatError, check_audio_format


@pytest.fixture
def files(tmp_path):
    tone = np.sin(np.arange(16000) / 5.0).astype("float32") * 0.1
    paths = {
        "good": tmp_path / "good.flac",
        "narrowband": tmp_path / "narrowband.wav",
        "stereo": tmp_path / "stereo.wav",
        "empty": tmp_path / "empty.wav",
        "noise": tmp_path / "noise.wav",
    }
    soundfile.write(paths["good"], tone, 16000)
    soundfile.write(paths["narrowband"], tone[:8000], 8000)
    soundfile.write(paths["stereo"], np.stack([tone, tone], axis=1), 16000)
    soundfile.write(paths["empty"], tone[:0], 16000)
    paths["noise"].write_bytes(np.random.default_rng(0).bytes(4000))
    paths["missing"] = tmp_path / "missing.wav"
    return paths


def test_good_audio_passes(files):
    check_audio_format({"a": {"wav": str(files["good"])}}, "test.json", 16000)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("narrowband", "8000 Hz"),
        ("stereo", "2 channels"),
        ("empty", "no samples"),
        ("noise", "cannot be decoded"),
        ("missing", "no such file"),
    ],
)
def test_each_fault_names_the_file_and_the_expected_format(files, case, reason):
    entries = {"ok": {"wav": str(files["good"])}, "bad": {"wav": str(files[case])}}
    with pytest.raises(AudioFormatError) as caught:
        check_audio_format(entries, "manifests/test.json", 16000)
    message = str(caught.value)
    assert message.startswith(
        "1 of 2 audio files listed in manifests/test.json cannot be used (expected 16000 Hz mono"
    )
    assert f"bad: {files[case]}: {reason}" in message
    assert "ok:" not in message


def test_many_faults_are_counted_not_all_listed(files):
    entries = {f"u{i}": {"wav": str(files["stereo"])} for i in range(25)}
    with pytest.raises(AudioFormatError, match=r"(?s)25 of 25 audio files .*\.\.\. and 15 more"):
        check_audio_format(entries, "x.json", 16000)
