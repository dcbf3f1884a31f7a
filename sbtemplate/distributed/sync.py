"""Sync points where ranks exchange an ok/error status, so that none hangs.

A rank that fails (unreadable audio in its shard, a decoding error...) does
not simply die and leave the others blocked in a collective: it still takes
part in the next sync point, carrying its error instead of its results. Every
rank then raises :class:`RankFailure` naming the failed ranks and their
errors, so all of them exit non-zero with the cause shown.

Sync points run on a dedicated gloo group with its own timeout
(:func:`new_eval_group`), independent of the default group's (SpeechBrain
creates that one with a 2-hour timeout). If a rank dies outright (killed,
segfault), gloo notices the closed connection and the others fail at once; if
it stalls, they fail when the timeout expires. The timeout must cover the
difference in evaluation time between the fastest and the slowest rank:
the caller passes it (finetune.yaml: ``collective_timeout_s``), else 1800 s.
"""

import datetime
import traceback

import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


def is_distributed():
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size(group=None):
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def eval_timeout_s(timeout_s=None):
    """The sync-point timeout: the argument, else ``DEFAULT_TIMEOUT_S``."""
    return float(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)


def new_eval_group(timeout_s=None):
    """A gloo group over all ranks for status and metric exchange (``None`` if not distributed).

    This is a collective call: every rank must make it, in the same order
    relative to other group creations.
    """
    if not is_distributed():
        return None
    timeout = datetime.timedelta(seconds=eval_timeout_s(timeout_s))
    return dist.new_group(backend="gloo", timeout=timeout)


def describe_exception(exc, limit_chars=4000):
    """``(one line, traceback text)`` for an exception."""
    line = f"{type(exc).__name__}: {exc}"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > limit_chars:
        text = "...\n" + text[-limit_chars:]
    return line, text


class RankFailure(RuntimeError):
    """Raised on every rank when at least one rank reported an error at a sync point.

    ``failures`` is a list of ``{"rank", "error", "traceback"}`` dicts.
    """

    def __init__(self, what, failures, world_size):
        self.what = what
        self.failures = failures
        self.world_size = world_size
        ranks = ", ".join(str(f["rank"]) for f in failures)
        lines = [f"{what} failed on rank {ranks} (world size {world_size}):"]
        lines += [f"  rank {f['rank']}: {f['error']}" for f in failures]
        for f in failures:
            lines.append(f"--- traceback from rank {f['rank']} ---")
            lines.append(f["traceback"].rstrip())
        super().__init__("\n".join(lines))


class SyncLost(RuntimeError):
    """The sync point itself failed: another rank died, was killed or stalled past the timeout."""

    def __init__(self, what, rank, cause):
        super().__init__(
            f"{what}: rank {rank} lost contact with the other ranks at the sync point"
            f" (one crashed, was killed or stalled past the sync-point timeout): {cause}"
        )


def exchange(payload=None, error=None, group=None, what="evaluation"):
    """One sync point: gather ``payload`` from every rank, or raise everywhere.

    Every rank must call this the same number of times. A rank that failed
    passes its exception as ``error`` (its payload is not sent). Returns the
    list of payloads indexed by rank when all ranks are fine; otherwise raises
    :class:`RankFailure` on every rank (chained to ``error`` where given).
    """
    rank, world_size = rank_and_world_size(group)
    status = {"rank": rank, "ok": error is None, "payload": payload if error is None else None}
    if error is not None:
        status["error"], status["traceback"] = describe_exception(error)
    if world_size == 1:
        gathered = [status]
    else:
        gathered = [None] * world_size
        try:
            dist.all_gather_object(gathered, status, group=group)
        except RuntimeError as exc:  # gloo: peer closed/reset, or timeout
            raise SyncLost(what, rank, exc) from (error or exc)
    failures = [
        {"rank": s["rank"], "error": s["error"], "traceback": s["traceback"]}
        for s in gathered
        if not s["ok"]
    ]
    if failures:
        raise RankFailure(what, failures, world_size) from error
    return [s["payload"] for s in gathered]


class SyncPoint:
    """Context manager: run a rank's work, then :func:`exchange` its result or error.

    >>> with SyncPoint("decoding") as point:   # doctest: +SKIP
    ...     point.payload = decode(my_shard)
    >>> everything = point.results             # one entry per rank

    An exception inside the block is sent to the other ranks and turned into
    :class:`RankFailure` on every rank.
    """

    def __init__(self, what="evaluation", group=None):
        self.what = what
        self.group = group
        self.payload = None
        self.results = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: let the process go
        self.results = exchange(self.payload, error=exc, group=self.group, what=self.what)
        return False
