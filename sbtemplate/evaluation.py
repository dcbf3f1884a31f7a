"""Decoding and evaluation through the pretrained interface.

:func:`transcribe_files` is the one decode step every evaluation path shares
(read audio, pad as SpeechBrain's data loader does, ``transcribe_batch``), so
that the build's WER, the fine-tuning cross-checks, the decoding-weight tuning
and the DDP benchmark decode alike. :func:`transcribe_manifest` is the build's
single-process evaluation; the distributed paths (``sbtemplate.distributed``)
shard the same step over ranks.
"""

import json
from pathlib import Path

import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataio import read_audio
from speechbrain.utils.metric_stats import ErrorRateStats


def load_asr(model_dir, savedir, run_opts=None):
    """The recognizer in ``model_dir`` through the pretrained interface; on the CPU by default."""
    from speechbrain.inference.ASR import EncoderDecoderASR

    return EncoderDecoderASR.from_hparams(
        source=str(model_dir), savedir=str(savedir), run_opts=run_opts or {"device": "cpu"}
    )


def pad_waveforms(wavs):
    """Pad 1-D waveforms as the data loader does (SpeechBrain's ``PaddedBatch``).

    Returns ``(batch, relative lengths)``, the arguments ``transcribe_batch``
    takes, so a batch decodes the same here as in a Brain's test loop.
    """
    sig = PaddedBatch([{"sig": w} for w in wavs]).sig
    return sig.data, sig.lengths


def transcribe_waveforms(asr, wavs):
    """Words of each waveform, decoded as one padded batch by ``asr.transcribe_batch``."""
    padded, rel = pad_waveforms(wavs)
    with torch.no_grad():
        words, _ = asr.transcribe_batch(padded.to(asr.device), rel.to(asr.device))
    return words


def transcribe_files(asr, paths, reader=read_audio):
    """Words of each audio file, read with ``reader`` and decoded as one batch.

    ``reader``: SpeechBrain's ``read_audio`` by default, or the interface's
    ``load_audio`` (which fetches and resamples).
    """
    return transcribe_waveforms(asr, [reader(path) for path in paths])


def transcribe_manifest(model_dir, manifest, data_root, savedir, batch_size=8, asr=None):
    """Transcribe a JSON descriptor's utterances (length-sorted batches) and score them."""
    asr = asr or load_asr(model_dir, savedir)
    entries = json.loads(Path(manifest).read_text())
    ids = sorted(entries, key=lambda k: (entries[k]["length"], k))
    stats = ErrorRateStats()
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        words = transcribe_files(
            asr, [entries[i]["wav"].replace("{data_root}", str(data_root)) for i in chunk]
        )
        stats.append(
            chunk,
            [w.split() for w in words],
            [entries[i]["words"].split() for i in chunk],
        )
    summary = stats.summarize()
    return {
        k: summary[k]
        for k in (
            "WER",
            "SER",
            "num_edits",
            "num_scored_tokens",
            "num_scored_sents",
            "insertions",
            "deletions",
            "substitutions",
        )
    }
