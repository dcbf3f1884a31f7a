"""Single-process evaluation through the pretrained interface.

Used by the build to report the base recognizer's WER; the distributed
evaluation paths (``sbtemplate.distributed``) shard the same work over ranks.
"""

import json
from pathlib import Path

import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataio import read_audio
from speechbrain.utils.metric_stats import ErrorRateStats


def load_asr(model_dir, savedir, run_opts=None):
    from speechbrain.inference.ASR import EncoderDecoderASR

    return EncoderDecoderASR.from_hparams(
        source=str(model_dir), savedir=str(savedir), run_opts=run_opts or {"device": "cpu"}
    )


def transcribe_manifest(model_dir, manifest, data_root, savedir, batch_size=8, asr=None):
    """Transcribe a JSON descriptor's utterances (length-sorted batches) and score them."""
    asr = asr or load_asr(model_dir, savedir)
    entries = json.loads(Path(manifest).read_text())
    ids = sorted(entries, key=lambda k: (entries[k]["length"], k))
    stats = ErrorRateStats()
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        batch = PaddedBatch(
            [
                {
                    "id": i,
                    "sig": read_audio(entries[i]["wav"].replace("{data_root}", str(data_root))),
                }
                for i in chunk
            ]
        )
        wavs, wav_lens = batch.sig
        with torch.no_grad():
            words, _ = asr.transcribe_batch(wavs, wav_lens)
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
