"""Decode a set of utterances under a given batching, as the evaluation does.

Shared by the padding-invariance tests and the padding benchmark: the same
waveforms decoded one by one, in fixed-size batches and in dynamic batches
(SpeechBrain's ``DynamicBatchSampler``), each batch padded by SpeechBrain's
``PaddedBatch`` and decoded with ``EncoderDecoderASR.transcribe_batch``.
"""

import time

import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.sampler import DynamicBatchSampler
from speechbrain.utils.metric_stats import ErrorRateStats

from sbtemplate.evaluation import pad_waveforms


def fixed_size_batches(n, batch_size, order=None):
    """Index lists of ``batch_size`` items, following ``order`` (default: as given)."""
    order = list(range(n)) if order is None else list(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def by_length(lengths, descending=False):
    """Indices sorted by length (stable)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=descending)


def dynamic_batches(durations, max_batch_length, num_buckets=4):
    """Index lists from SpeechBrain's ``DynamicBatchSampler`` (no shuffling).

    ``durations`` in seconds; ``max_batch_length`` is the summed duration a
    batch may hold.
    """
    data = {str(i): {"duration": float(d)} for i, d in enumerate(durations)}
    dataset = DynamicItemDataset(data)
    sampler = DynamicBatchSampler(
        dataset,
        max_batch_length=max_batch_length,
        num_buckets=min(num_buckets, len(durations)),
        length_func=lambda x: x["duration"],
        shuffle=False,
        batch_ordering="descending",
    )
    ids = dataset.data_ids
    return [[int(ids[i]) for i in batch] for batch in sampler]


@torch.no_grad()
def decode(asr, wavs, batches):
    """Decode ``wavs`` batch by batch with ``asr.transcribe_batch``.

    Returns a dict with per-utterance ``tokens``, ``words`` and ``scores`` (the
    best hypothesis' score, captured from the searcher's output) in the order of
    ``wavs``, plus ``seconds`` (decoding wall time, padding excluded),
    ``cpu_seconds`` (this process's CPU time over the same spans: with one
    thread, robust against other processes sharing the machine) and the
    ``batches`` used.
    """
    n = len(wavs)
    tokens, words, scores = [None] * n, [None] * n, [None] * n
    captured = {}

    def hook(module, args, output):
        captured["scores"] = output[2]

    handle = asr.mods.decoder.register_forward_hook(hook)
    seconds = cpu_seconds = 0.0
    try:
        for batch in batches:
            sig, rel = pad_waveforms([wavs[i] for i in batch])
            start, start_cpu = time.perf_counter(), time.process_time()
            batch_words, batch_tokens = asr.transcribe_batch(sig, rel)
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - start_cpu
            batch_scores = captured["scores"].reshape(len(batch), -1)[:, 0]
            for k, i in enumerate(batch):
                tokens[i] = [int(t) for t in batch_tokens[k]]
                words[i] = batch_words[k]
                scores[i] = float(batch_scores[k])
    finally:
        handle.remove()
    return {
        "tokens": tokens,
        "words": words,
        "scores": scores,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "batches": [list(b) for b in batches],
    }


def wer(refs, hyps):
    """Word error rate summary (SpeechBrain ``ErrorRateStats``) of word strings."""
    stats = ErrorRateStats()
    ids = [str(i) for i in range(len(refs))]
    stats.append(ids, [h.split() for h in hyps], [r.split() for r in refs])
    summary = stats.summarize()
    return {
        k: summary[k]
        for k in ("WER", "insertions", "deletions", "substitutions", "num_scored_tokens")
    }


def compare(reference, other):
    """How ``other`` decoding differs from ``reference`` (e.g. batch size 1)."""
    same = sum(a == b for a, b in zip(reference["tokens"], other["tokens"]))
    diff = max(abs(a - b) for a, b in zip(reference["scores"], other["scores"]))
    return {"identical": same, "total": len(reference["tokens"]), "max_score_diff": diff}
