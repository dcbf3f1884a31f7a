"""Shard, score and gather a list of utterances without a DataLoader.

This is the evaluation driver for the pretrained interface (e.g.
``EncoderDecoderASR.transcribe_batch``), which takes file paths or waveforms
rather than a Brain's batches. It uses the same batch plan as the Brain's
DDP-valid loader and the same gather, so both paths report alike::

    def score_batch(batch, stats):                  # batch: [(id, wav, words), ...]
        wavs = [asr.load_audio(wav) for _, wav, _ in batch]
        ...
        hyps, _ = asr.transcribe_batch(padded, rel_lens)
        stats.append([i for i, _, _ in batch], [h.split() for h in hyps],
                     [w.split() for _, _, w in batch])

    report = evaluate_sharded(items, lengths, score_batch, batch_size=8,
                              group=new_eval_group(), out_dir=...)
"""

from .gather import gather_error_rate_stats, print_flush
from .sharding import shard_items


def evaluate_sharded(
    items,
    lengths,
    score_batch,
    batch_size=None,
    dynamic=None,
    stats=None,
    expected_ids=None,
    id_of=None,
    group=None,
    name="test",
    out_dir=None,
    sb_wer_file=False,
    sort="ascending",
    printer=print_flush,
):
    """Score this rank's share of ``items`` with ``score_batch(batch, stats)`` and gather.

    Collective: every rank calls it with the same ``items`` and ``lengths``.
    ``expected_ids`` defaults to ``id_of(item)`` for every item (``item[0]``
    by default). An exception on any rank makes every rank raise
    ``RankFailure``. Returns the :class:`~sbtemplate.distributed.gather.EvalReport`.
    """
    items = list(items)
    id_of = id_of or (lambda item: item[0])
    if expected_ids is None:
        expected_ids = [str(id_of(item)) for item in items]
    if stats is None:
        from speechbrain.utils.metric_stats import ErrorRateStats

        stats = ErrorRateStats()
    error = None
    try:
        for batch in shard_items(items, lengths, batch_size=batch_size, dynamic=dynamic, sort=sort):
            score_batch(batch, stats)
    except Exception as exc:  # noqa: BLE001 - sent to every rank by the gather
        error = exc
    return gather_error_rate_stats(
        stats,
        expected_ids=expected_ids,
        group=group,
        name=name,
        error=error,
        out_dir=out_dir,
        sb_wer_file=sb_wer_file,
        printer=printer,
    )
