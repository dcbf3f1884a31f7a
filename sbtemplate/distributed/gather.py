"""Gather per-rank ``ErrorRateStats`` into one exact summary.

Each rank scores its own shard with an ordinary ``ErrorRateStats``. At the end
of the stage every rank sends its ``.scores`` (one dict per utterance) in a
single ``all_gather_object`` (a :func:`~sbtemplate.distributed.sync.exchange`
sync point, so a failed rank makes every rank raise). The scores are merged,
sorted by utterance id and checked against a ledger (every expected id exactly
once), and the summary is computed by ``ErrorRateStats.summarize()`` on the
merged object: WER, insertions, deletions, substitutions, scored words and
sentences are integer sums, so they equal the single-process numbers exactly.

Rank 0 alone prints one line per rank and one summary, and writes the merged
per-utterance file and the JSON summary; a second sync point makes a failure
while writing fail every rank.
"""

import copy
import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .sync import exchange, rank_and_world_size

SUMMARY_FIELDS = (
    "WER",
    "SER",
    "num_edits",
    "num_scored_tokens",
    "num_erroneous_sents",
    "num_scored_sents",
    "num_absent_sents",
    "num_ref_sents",
    "insertions",
    "deletions",
    "substitutions",
    "error_rate",
)
UTTERANCE_COLUMNS = (
    "id",
    "reference",
    "hypothesis",
    "errors",
    "insertions",
    "deletions",
    "substitutions",
    "ref_words",
)


class LedgerError(RuntimeError):
    """The gathered utterances are not the expected set, each exactly once."""

    def __init__(self, duplicated, missing, unexpected):
        self.duplicated = duplicated
        self.missing = missing
        self.unexpected = unexpected
        parts = []
        for name, ids in (
            ("duplicated", duplicated),
            ("missing", missing),
            ("unexpected", unexpected),
        ):
            if ids:
                shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
                parts.append(f"{len(ids)} {name} ({shown})")
        super().__init__(
            "[samplers/DDP] evaluation ledger mismatch: "
            + "; ".join(parts)
            + " (at fault: speechbrain.dataio.sampler / sbtemplate.distributed.sharding)"
        )


def check_ledger(got_ids, expected_ids=None):
    """Raise :class:`LedgerError` on any duplicated id, or any id missing from / not in ``expected_ids``."""
    counts = Counter(str(i) for i in got_ids)
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    missing = unexpected = []
    if expected_ids is not None:
        expected = Counter(str(i) for i in expected_ids)
        doubled = sorted(i for i, n in expected.items() if n > 1)
        if doubled:
            raise ValueError(f"expected ids are not unique: {doubled[:10]}")
        missing = sorted(set(expected) - set(counts))
        unexpected = sorted(set(counts) - set(expected))
    if duplicated or missing or unexpected:
        raise LedgerError(duplicated, missing, unexpected)


def merge_error_rate_stats(template, scores):
    """A copy of ``template`` (same settings) holding ``scores`` sorted by id, summarised."""
    merged = copy.copy(template)
    merged.scores = sorted(scores, key=lambda s: str(s["key"]))
    merged.ids = [s["key"] for s in merged.scores]
    merged.summary = {}
    merged.summarize()
    return merged


def _share_summary(rank, scores, loss):
    # Not wer_summary: it divides by the number of sentences, and a shard may be empty.
    scored = [s for s in scores if s["scored"]]
    edits = sum(s["num_edits"] for s in scored)
    words = sum(s["num_ref_tokens"] for s in scored)
    return {
        "rank": rank,
        "utterances": len(scores),
        "WER": 100.0 * edits / words if words else None,
        "num_edits": edits,
        "num_scored_tokens": words,
        "loss_sum": loss[0] if loss else 0.0,
        "loss_batches": loss[1] if loss else 0,
    }


@dataclass
class EvalReport:
    """The gathered result of one distributed evaluation (identical on every rank)."""

    stats: object  # merged ErrorRateStats, scores sorted by id
    summary: dict
    per_rank: list
    world_size: int
    name: str = "test"
    files: dict = field(default_factory=dict)

    @property
    def wer(self):
        """Word error rate over all ranks, in percent."""
        return self.summary["WER"]

    @property
    def loss(self):
        """Mean batch loss over all ranks' batches (``None`` if no loss was given)."""
        batches = sum(r["loss_batches"] for r in self.per_rank)
        if not batches:
            return None
        return sum(r["loss_sum"] for r in self.per_rank) / batches

    def rank_lines(self):
        """One line per rank: utterances scored and the shard's WER (``n/a`` if it is empty)."""
        lines = []
        for r in self.per_rank:
            wer = "n/a" if r["WER"] is None else f"{r['WER']:.2f}%"
            lines.append(
                f"rank {r['rank']}: {r['utterances']} utterances, WER {wer}"
                f" ({r['num_edits']} errors / {r['num_scored_tokens']} words)"
            )
        return lines

    def summary_line(self):
        """The one-line summary over all ranks: WER with edit counts, SER and utterance count."""
        s = self.summary
        return (
            f"{self.name} summary: WER {s['WER']:.2f}% [{s['num_edits']} / {s['num_scored_tokens']},"
            f" {s['insertions']} ins, {s['deletions']} del, {s['substitutions']} sub],"
            f" SER {s['SER']:.2f}% over {s['num_scored_sents']} utterances from"
            f" {self.world_size} rank{'s' if self.world_size != 1 else ''}"
        )

    def to_json(self):
        """The JSON summary file's content: summary fields, world size, loss, per-rank figures."""
        out = {key: self.summary[key] for key in SUMMARY_FIELDS if key in self.summary}
        out["name"] = self.name
        out["world_size"] = self.world_size
        out["loss"] = self.loss
        out["per_rank"] = [
            {k: r[k] for k in ("rank", "utterances", "WER", "num_edits", "num_scored_tokens")}
            for r in self.per_rank
        ]
        return out

    def utterance_rows(self):
        """``(id, reference, hypothesis, errors, ins, del, sub, ref_words)`` sorted by id."""
        for s in self.stats.scores:
            ref = s.get("ref_tokens") or []
            hyp = s.get("hyp_tokens") or []
            yield (
                str(s["key"]),
                " ".join(map(str, ref)),
                " ".join(map(str, hyp)),
                s["num_edits"],
                s["insertions"],
                s["deletions"],
                s["substitutions"],
                s["num_ref_tokens"],
            )

    def write(self, out_dir, sb_wer_file=False):
        """Write ``<name>_utterances.tsv`` and ``<name>_summary.json`` (and SpeechBrain's ``wer_<name>.txt``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "utterances": out_dir / f"{self.name}_utterances.tsv",
            "summary": out_dir / f"{self.name}_summary.json",
        }
        with open(files["utterances"], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(UTTERANCE_COLUMNS)
            writer.writerows(self.utterance_rows())
        files["summary"].write_text(json.dumps(self.to_json(), indent=2) + "\n")
        if sb_wer_file:
            files["wer"] = out_dir / f"wer_{self.name}.txt"
            with open(files["wer"], "w", encoding="utf-8") as handle:
                self.stats.write_stats(handle)
        self.files = {k: str(v) for k, v in files.items()}
        return self.files


def print_flush(line):
    """``print`` that flushes, so rank 0's lines are not lost if a peer fails later."""
    print(line, flush=True)


def read_utterance_file(path):
    """Rows of a merged per-utterance file as dicts (ints converted)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for row in rows:
        for key in UTTERANCE_COLUMNS[3:]:
            row[key] = int(row[key])
    return rows


def gather_error_rate_stats(
    stats,
    expected_ids=None,
    loss=None,
    group=None,
    name="test",
    error=None,
    out_dir=None,
    sb_wer_file=False,
    printer=print_flush,
):
    """Gather every rank's ``ErrorRateStats`` into one :class:`EvalReport`.

    Collective: every rank calls it once per evaluation, whatever the size of
    its shard (including none). A rank that failed passes its exception as
    ``error`` instead (``stats`` may then be ``None``); every rank then raises
    :class:`~sbtemplate.distributed.sync.RankFailure`.

    Arguments
    ---------
    stats : ErrorRateStats
        This rank's scores.
    expected_ids : iterable of str, optional
        The full test set: the ledger check then also catches missing and
        unexpected ids (duplicates are always caught).
    loss : (float, int), optional
        This rank's (sum of batch losses, number of batches), for the global mean.
    group : ProcessGroup, optional
        Group for the exchange (see :func:`~sbtemplate.distributed.sync.new_eval_group`).
    out_dir : path, optional
        Where rank 0 writes the merged files (nothing is written without it).
    printer : callable or None
        Rank 0 prints each rank's line and the summary with it.
    """
    payload = None
    if error is None:
        payload = {"scores": list(stats.scores), "ids": [str(i) for i in stats.ids], "loss": loss}
    gathered = exchange(payload, error=error, group=group, what=f"{name} evaluation")
    rank, world_size = rank_and_world_size(group)

    per_rank = [_share_summary(r, p["scores"], p["loss"]) for r, p in enumerate(gathered)]
    scores = [s for p in gathered for s in p["scores"]]
    # Appended ids catch a duplicate inside one batch too (scores are keyed by id).
    check_ledger([i for p in gathered for i in p["ids"]], expected_ids)
    check_ledger([s["key"] for s in scores], expected_ids)
    if not scores:
        raise ValueError(f"{name} evaluation scored no utterance on any rank")
    merged = merge_error_rate_stats(stats, scores)
    report = EvalReport(merged, dict(merged.summary), per_rank, world_size, name)

    # Rank 0 reports; the others learn at the next sync point whether it worked.
    write_error = None
    if rank == 0:
        try:
            if printer is not None:
                for line in report.rank_lines():
                    printer(line)
                printer(report.summary_line())
            if out_dir is not None:
                report.write(out_dir, sb_wer_file=sb_wer_file)
        except Exception as exc:  # noqa: BLE001 - sent to every rank below
            write_error = exc
    files = exchange(
        report.files if rank == 0 else None, error=write_error, group=group, what=f"{name} report"
    )[0]
    report.files = dict(files or {})
    return report
