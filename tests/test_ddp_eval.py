"""DDP-valid evaluation: sharding, exact gathering, ledger and failure propagation.

Distributed cases run this file as a worker script, one process per rank,
over a gloo process group on 127.0.0.1 (CPU). Every launch runs many
scenarios, so only a few process start-ups are paid for.
"""

import json
import os
import random
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

SIZES = (7, 40, 101)
WORLD_SIZES = (1, 2, 3)
BATCH_SIZE = 8
DYNAMIC = {"max_batch_length": 12.0, "num_buckets": 4}
MODES = ("fixed", "dynamic")
PATHS = ("brain", "items")
VOCAB = (
    "THE A OF TO AND IN THAT IT WAS HE FOR ON ARE AS WITH HIS THEY AT BE THIS "
    "FROM HAVE OR BY ONE HAD NOT BUT WHAT ALL WERE WHEN WE THERE CAN AN YOUR"
).split()
SUMMARY_KEYS = (
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
)
LAUNCH_TIMEOUT_S = 150


# --------------------------------------------------------------------------
# Synthetic test sets and a deterministic fake recogniser (shared by both sides)


def make_utterances(size):
    """``[(id, words, length)]`` in a scrambled order, with tied lengths."""
    rng = random.Random(1000 + size)
    utts = []
    for k in range(size):
        spk, chap = rng.randrange(3), rng.randrange(2)
        n_words = rng.randint(1, 12)
        words = " ".join(rng.choice(VOCAB) for _ in range(n_words))
        length = round(0.3 * n_words + rng.choice((0.0, 0.2, 0.4)), 1)  # ties on purpose
        utts.append((f"{100 + spk}-{200 + chap}-{k:04d}", words, length))
    rng.shuffle(utts)
    return utts


def fake_hypothesis(utt_id, words):
    """A deterministic corruption of the reference, keyed by the id only."""
    tokens = words.split()
    h = zlib.crc32(utt_id.encode())
    if h % 3 == 0 and tokens:
        tokens[(h // 3) % len(tokens)] = "ZZZ"
    if h % 5 == 0 and tokens:
        del tokens[(h // 5) % len(tokens)]
    if h % 7 == 0:
        tokens.insert((h // 7) % (len(tokens) + 1), "UH")
    if h % 11 == 0:
        tokens = tokens[: len(tokens) // 2]
    return tokens


# --------------------------------------------------------------------------
# Worker side (one process per rank)


def _init_worker():
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    return dist.get_rank(), dist.get_world_size()


def _dataset(utts, wav_dir=None):
    import speechbrain as sb
    from speechbrain.dataio.dataset import DynamicItemDataset

    data = {}
    for utt_id, words, length in utts:
        data[utt_id] = {"words": words, "length": length}
        if wav_dir is not None:
            data[utt_id]["wav"] = str(Path(wav_dir) / f"{utt_id}.wav")
    keys = ["id", "words"]
    dataset = DynamicItemDataset(data)
    if wav_dir is not None:

        @sb.utils.data_pipeline.takes("wav")
        @sb.utils.data_pipeline.provides("sig")
        def audio_pipeline(wav):
            return sb.dataio.dataio.read_audio(wav)

        dataset.add_dynamic_item(audio_pipeline)
        keys.append("sig")
    dataset.set_output_keys(keys)
    return dataset


def _fake_brain_class():
    import speechbrain as sb
    import torch
    from speechbrain.utils.metric_stats import ErrorRateStats

    from sbtemplate.distributed import DDPEvalMixin

    class FakeASR(DDPEvalMixin, sb.Brain):
        """Brain whose 'decoder' corrupts references; its module is DDP-wrapped."""

        out_dir = None
        valid_log = ()
        ddp_eval_timeout_s = float(os.environ.get("TEST_EVAL_TIMEOUT_S", 1800))

        def compute_forward(self, batch, stage):
            # Goes through the module as a recipe would (DDP-wrapped after fit).
            out = self.modules.model(torch.ones(len(batch.id), 4))
            if stage == sb.Stage.TRAIN:
                return out
            self.seen.append(list(batch.id))
            return [fake_hypothesis(i, w) for i, w in zip(batch.id, batch.words)]

        def compute_objectives(self, predictions, batch, stage):
            if stage == sb.Stage.TRAIN:
                return predictions.pow(2).mean()
            self.wer_metric.append(batch.id, predictions, [w.split() for w in batch.words])
            return torch.tensor(float(len(batch.id)))

        def on_stage_start(self, stage, epoch=None):
            self.wer_metric = ErrorRateStats()
            self.seen = []

        def on_stage_end(self, stage, stage_loss, epoch=None):
            if stage == sb.Stage.TRAIN:
                return
            self.report = self.gather_eval_stats(stage, self.wer_metric, out_dir=self.out_dir)
            if stage == sb.Stage.VALID:
                self.valid_log.append(
                    {
                        "epoch": epoch,
                        "summary": self.report.to_json(),
                        "seen": self.seen,
                        "wrapped": type(self.modules["model"]).__name__,
                    }
                )

    return FakeASR


def _make_brain(rank):
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    brain = _fake_brain_class()(
        modules={"model": net},
        run_opts={"device": "cpu", "distributed_backend": "gloo", "noprogressbar": True},
    )
    # As after fit(). Brain._wrap_distributed would also convert BatchNorm to
    # SyncBatchNorm, which DDP refuses for CPU modules, so wrap directly.
    brain.modules["model"] = torch.nn.parallel.DistributedDataParallel(net)
    return brain


def _loader_kwargs(mode, dataset):
    from speechbrain.dataio.sampler import DynamicBatchSampler

    if mode == "fixed":
        return {"batch_size": BATCH_SIZE}
    return {
        "batch_sampler": DynamicBatchSampler(
            dataset,
            length_func=lambda x: x["length"],
            shuffle=False,
            batch_ordering="ascending",
            **DYNAMIC,
        )
    }


def _items_batching(mode):
    return {"batch_size": BATCH_SIZE} if mode == "fixed" else {"dynamic": dict(DYNAMIC)}


def worker_exact(out_root):
    """Every size x batching mode x path, with a gather each; logs what each rank saw."""
    import torch

    from sbtemplate.distributed import evaluate_sharded

    rank, world_size = _init_worker()
    brain = _make_brain(rank)
    bn = brain.modules.model.module[1]
    log = {"rank": rank, "runs": {}}
    for size in SIZES:
        utts = make_utterances(size)
        dataset = _dataset(utts)
        for mode in MODES:
            key = f"n{size}/{mode}"
            # Brain path: drifted buffers must be replaced by rank 0's.
            with torch.no_grad():
                bn.running_mean.fill_(float(rank))
            brain.out_dir = Path(out_root) / key / "brain"
            brain.evaluate(dataset, test_loader_kwargs=_loader_kwargs(mode, dataset))
            log["runs"][f"{key}/brain"] = {
                "batches": brain.seen,
                "loss": brain.report.loss,
                "running_mean": float(bn.running_mean[0]),
            }
            # Items path (pretrained interface): same plan, same gather.
            seen = []

            def score_batch(batch, stats):
                seen.append([u[0] for u in batch])  # noqa: B023 - called within this iteration
                stats.append(
                    [u[0] for u in batch],
                    [fake_hypothesis(u[0], u[1]) for u in batch],
                    [u[1].split() for u in batch],
                )

            evaluate_sharded(
                utts,
                [u[2] for u in utts],
                score_batch,
                name="test",
                out_dir=Path(out_root) / key / "items",
                **_items_batching(mode),
            )
            log["runs"][f"{key}/items"] = {"batches": seen}
    log["ddp_wrapped_after"] = type(brain.modules["model"]).__name__

    # A loader that is not DDP-valid (every rank reads everything) is refused
    # on every rank by the ledger, instead of reporting a wrong WER.
    from speechbrain.dataio.dataloader import make_dataloader

    from sbtemplate.distributed import LedgerError

    dataset = _dataset(make_utterances(7))
    brain.out_dir = None
    try:
        brain.evaluate(make_dataloader(dataset, batch_size=BATCH_SIZE))
        log["plain_loader_error"] = None
    except LedgerError as exc:
        log["plain_loader_error"] = str(exc)

    # fit(): the VALID stage is sharded and gathered every epoch, and training
    # goes on with the DDP wrapper (no BatchNorm: Brain's SyncBatchNorm
    # conversion is refused by DDP for CPU modules).
    import speechbrain as sb

    fitter = _fake_brain_class()(
        modules={"model": torch.nn.Linear(4, 4)},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
        hparams={},
        run_opts={"device": "cpu", "distributed_backend": "gloo", "noprogressbar": True},
    )
    fitter.valid_log = []
    fitter.out_dir = Path(out_root) / "fit"
    train, valid = _dataset(make_utterances(40)), _dataset(make_utterances(101))
    fitter.fit(
        sb.utils.epoch_loop.EpochCounter(2),
        train,
        valid,
        train_loader_kwargs={"batch_size": 8},
        valid_loader_kwargs={"batch_size": 8},
    )
    log["fit"] = {
        "valid": fitter.valid_log,
        "weight": fitter.modules["model"].module.weight.sum().item(),
    }
    (Path(out_root) / f"log_rank{rank}.json").write_text(json.dumps(log))


def worker_fail(out_root, wav_dir):
    """A corrupt audio file in one rank's shard: items path (caught), then Brain path (not)."""
    import speechbrain as sb

    from sbtemplate.distributed import RankFailure, evaluate_sharded

    rank, world_size = _init_worker()
    utts = make_utterances(7)

    def score_batch(batch, stats):
        for utt_id, _words, _ in batch:
            sb.dataio.dataio.read_audio(str(Path(wav_dir) / f"{utt_id}.wav"))
        stats.append(
            [u[0] for u in batch], [u[1].split() for u in batch], [u[1].split() for u in batch]
        )

    outcome = {"rank": rank}
    try:
        evaluate_sharded(utts, [u[2] for u in utts], score_batch, batch_size=2)
        outcome["items"] = "no error"
    except RankFailure as exc:
        outcome["items"] = str(exc)
        outcome["failed_ranks"] = [f["rank"] for f in exc.failures]
    (Path(out_root) / f"fail_rank{rank}.json").write_text(json.dumps(outcome))

    brain = _make_brain(rank)
    dataset = _dataset(utts, wav_dir=wav_dir)
    brain.evaluate(dataset, test_loader_kwargs={"batch_size": 2})  # must raise on every rank
    print("evaluation returned normally", flush=True)


def worker_die(out_root):
    """Rank 1 dies outright (no Python exception) in the middle of its shard."""
    from sbtemplate.distributed import evaluate_sharded

    rank, world_size = _init_worker()
    utts = make_utterances(40)

    def score_batch(batch, stats):
        if rank == 1:
            os._exit(17)
        stats.append(
            [u[0] for u in batch], [u[1].split() for u in batch], [u[1].split() for u in batch]
        )

    evaluate_sharded(utts, [u[2] for u in utts], score_batch, batch_size=4)
    print("evaluation returned normally", flush=True)


# --------------------------------------------------------------------------
# Launcher
#
# Importing torch's DDP (it pulls in torch._dynamo) and speechbrain costs
# 5-10 s per process on a busy 2-core machine, so rank processes are forked
# from one server process that has imported everything once and run no torch
# op yet. Each rank is still its own OS process with its own gloo process
# group, stdout/stderr files and exit status.

SCENARIOS = {
    "exact": lambda d: worker_exact(d),
    "fail": lambda d, w: worker_fail(d, w),
    "die": lambda d: worker_die(d),
}
REPLY = "@@rank-server "


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_env(rank, world_size, port, eval_timeout_s):
    return dict(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TEST_EVAL_TIMEOUT_S=str(eval_timeout_s),  # read by the scenarios' Brains
    )


def _run_rank(job, rank, port):
    """In the forked child: become rank ``rank`` and run the scenario; never returns."""
    import traceback

    code = 1
    try:
        directory = Path(job["dir"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(
                directory / f"{name}_{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            )
            os.dup2(target, fd)
            os.close(target)
        os.environ.update(_rank_env(rank, job["world_size"], port, job["eval_timeout_s"]))
        SCENARIOS[job["args"][0]](*job["args"][1:])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - shown like an uncaught exception
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def rank_server():
    """Serve launch requests (JSON lines on stdin) by forking one process per rank."""
    import signal

    import soundfile  # noqa: F401
    import speechbrain.core  # noqa: F401
    import speechbrain.dataio.dataio  # noqa: F401
    import speechbrain.dataio.dataloader  # noqa: F401
    import speechbrain.dataio.sampler  # noqa: F401
    import speechbrain.utils.metric_stats  # noqa: F401
    import torch._dynamo  # noqa: F401 - what DistributedDataParallel imports lazily

    import sbtemplate.distributed  # noqa: F401

    print(REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        port = _free_port()
        start = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for rank in range(job["world_size"]):
            pid = os.fork()
            if pid == 0:
                _run_rank(job, rank, port)
            pids.append(pid)
        codes = [None] * len(pids)
        deadline = start + job["timeout_s"]
        while None in codes:
            for i, pid in enumerate(pids):
                if codes[i] is None:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[i] = os.waitstatus_to_exitcode(status)
            if None in codes and time.monotonic() > deadline:
                for i, pid in enumerate(pids):
                    if codes[i] is None:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        codes[i] = "killed after timeout"
            time.sleep(0.02)
        reply = {"codes": codes, "wall_s": time.monotonic() - start}
        print(REPLY + json.dumps(reply), flush=True)


class RankLauncher:
    """Test-side handle on :func:`rank_server`."""

    def __init__(self, log_path):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "rank-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=PROJECT_ROOT,
            env=env,
        )
        self._reply()

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise RuntimeError(f"rank server exited (code {self.proc.wait()}); see {self.log.name}")

    def launch(self, world_size, args, tmp_path, eval_timeout_s=30, timeout_s=LAUNCH_TIMEOUT_S):
        """Run scenario ``args`` on ``world_size`` ranks: per-rank (exit code, stdout, stderr), wall s."""
        job = {
            "world_size": world_size,
            "args": [str(a) for a in args],
            "dir": str(tmp_path),
            "eval_timeout_s": eval_timeout_s,
            "timeout_s": timeout_s,
        }
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        results = [
            (
                code,
                (tmp_path / f"stdout_{r}.txt").read_text(),
                (tmp_path / f"stderr_{r}.txt").read_text(),
            )
            for r, code in enumerate(reply["codes"])
        ]
        return results, reply["wall_s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


if __name__ == "__main__":
    # ``rank-server``, or one rank of a scenario when started by torchrun.
    if sys.argv[1] == "rank-server":
        rank_server()
    else:
        SCENARIOS[sys.argv[1]](*sys.argv[2:])
    sys.exit(0)


# --------------------------------------------------------------------------
# Tests

import pytest  # noqa: E402 - workers above do not need pytest

from sbtemplate.distributed import (  # noqa: E402
    LedgerError,
    ShardedEvalBatchSampler,
    check_ledger,
    fixed_size_batches,
    gather_error_rate_stats,
    read_utterance_file,
    shard_items,
    sharded_eval_loader_kwargs,
)
from sbtemplate.distributed.sharding import assign_batches, dynamic_batches  # noqa: E402


def reference_summary(utts):
    """What one process computes over the whole set, in dataset order, unsharded."""
    from speechbrain.utils.metric_stats import ErrorRateStats

    stats = ErrorRateStats()
    for start in range(0, len(utts), 5):
        chunk = utts[start : start + 5]
        stats.append(
            [u[0] for u in chunk],
            [fake_hypothesis(u[0], u[1]) for u in chunk],
            [u[1].split() for u in chunk],
        )
    return stats.summarize()


# ---- sharding (in process) ----


@pytest.mark.parametrize("size", (0, 1, 7, 40, 101))
@pytest.mark.parametrize("world_size", (1, 2, 3, 5, 8))
@pytest.mark.parametrize("mode", MODES)
def test_shards_partition_and_are_length_sorted(size, world_size, mode):
    lengths = [u[2] for u in make_utterances(size)]
    if mode == "fixed":
        batches = fixed_size_batches(size, BATCH_SIZE, lengths)
        make = lambda r: ShardedEvalBatchSampler(batches, lengths, r, world_size, num_items=size)  # noqa: E731
    else:
        batches = dynamic_batches(lengths, **DYNAMIC)
        make = lambda r: ShardedEvalBatchSampler.dynamic(lengths, r, world_size, **DYNAMIC)  # noqa: E731
    shards = [make(r) for r in range(world_size)]
    everything = [i for s in shards for i in s.indices]
    assert sorted(everything) == list(range(size))  # no duplicate, no drop, no padding
    # Whole batches of the global plan, nothing re-formed.
    assert sorted(map(sorted, (b for s in shards for b in s))) == sorted(map(sorted, batches))
    for shard in shards:
        maxima = [max(lengths[i] for i in b) for b in shard]
        assert maxima == sorted(maxima)
        for batch in shard:
            assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
            if mode == "fixed":
                assert 1 <= len(batch) <= BATCH_SIZE
    # Every rank computes the same assignment on its own.
    assert all(s.assignment == shards[0].assignment for s in shards)


def test_fixed_batches_match_a_plain_loader_on_sorted_data():
    lengths = sorted(u[2] for u in make_utterances(40))
    plain = [list(range(i, min(i + BATCH_SIZE, 40))) for i in range(0, 40, BATCH_SIZE)]
    assert fixed_size_batches(40, BATCH_SIZE, lengths) == plain


def test_balancing_uses_padded_cost():
    lengths = [10.0] * 4 + [1.0] * 12
    batches = fixed_size_batches(len(lengths), 4, lengths)
    shares = assign_batches(batches, 2, lengths)
    # The one long batch (cost 40) alone against three short ones (cost 12).
    costs = [sum(len(batches[p]) * max(lengths[i] for i in batches[p]) for p in s) for s in shares]
    assert sorted(costs) == [12.0, 40.0]


def test_ranks_may_get_no_batch():
    lengths = [1.0] * 7
    shards = [ShardedEvalBatchSampler.fixed(lengths, 8, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [1, 0, 0]
    assert shard_items(list("abcdefg"), lengths, rank=2, world_size=3, batch_size=8) == []


def test_loader_kwargs_refuse_duplicating_or_dropping_options():
    from speechbrain.dataio.dataset import DynamicItemDataset

    dataset = DynamicItemDataset({f"u{i}": {"length": float(i)} for i in range(5)})
    for bad in ({"shuffle": True}, {"drop_last": True}, {"sampler": range(5)}):
        with pytest.raises(ValueError):
            sharded_eval_loader_kwargs(dataset, dict(bad, batch_size=2), 0, 1)
    kwargs = sharded_eval_loader_kwargs(dataset, {"batch_size": 2, "num_workers": 0}, 1, 2)
    assert set(kwargs) == {"batch_sampler", "num_workers"}
    # A batch sampler that drops items is refused.
    with pytest.raises(ValueError, match="not a partition"):
        sharded_eval_loader_kwargs(dataset, {"batch_sampler": [[0, 1], [2]]}, 0, 1)


# ---- ledger (in process) ----


def test_ledger_catches_duplicates_missing_and_unexpected():
    check_ledger(["a", "b", "c"], ["c", "b", "a"])
    with pytest.raises(LedgerError, match="1 duplicated"):
        check_ledger(["a", "b", "b", "c"], ["a", "b", "c"])
    with pytest.raises(LedgerError, match="1 missing"):
        check_ledger(["a", "c"], ["a", "b", "c"])
    with pytest.raises(LedgerError, match="1 unexpected"):
        check_ledger(["a", "b", "c", "d"], ["a", "b", "c"])
    with pytest.raises(LedgerError, match="duplicated"):
        check_ledger(["a", "a"])  # duplicates are caught even without the expected set


def test_ledger_rejects_distributed_sampler_padding():
    """torch's DistributedSampler repeats utterances to even out the shards."""
    from torch.utils.data.distributed import DistributedSampler

    ids = [u[0] for u in make_utterances(7)]
    got = [
        ids[i]
        for r in range(3)
        for i in DistributedSampler(ids, num_replicas=3, rank=r, shuffle=False)
    ]
    with pytest.raises(LedgerError, match="duplicated"):
        check_ledger(got, ids)


def test_gather_raises_on_a_duplicated_utterance():
    from speechbrain.utils.metric_stats import ErrorRateStats

    utts = make_utterances(7)
    stats = ErrorRateStats()
    for rows in (utts, utts[3:4]):  # the same utterance scored twice
        stats.append(
            [u[0] for u in rows], [u[1].split() for u in rows], [u[1].split() for u in rows]
        )
    with pytest.raises(LedgerError, match="duplicated"):
        gather_error_rate_stats(stats, expected_ids=[u[0] for u in utts], printer=None)
    stats = ErrorRateStats()
    stats.append(
        [u[0] for u in utts[1:]], [u[1].split() for u in utts[1:]], [u[1].split() for u in utts[1:]]
    )
    with pytest.raises(LedgerError, match="missing"):
        gather_error_rate_stats(stats, expected_ids=[u[0] for u in utts], printer=None)


def test_sync_point_single_process():
    from sbtemplate.distributed import RankFailure, SyncPoint

    with SyncPoint("decoding") as point:
        point.payload = {"n": 3}
    assert point.results == [{"n": 3}]
    with pytest.raises(RankFailure, match="decoding failed on rank 0") as info:
        with SyncPoint("decoding"):
            raise OSError("unreadable.flac")
    assert "OSError: unreadable.flac" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


# ---- distributed exactness (gloo, 1-3 ranks) ----


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    handle = RankLauncher(tmp_path_factory.mktemp("rank_server") / "server.log")
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def exact_runs(launcher, tmp_path_factory):
    runs = {}
    for world_size in WORLD_SIZES:
        tmp = tmp_path_factory.mktemp(f"exact_ws{world_size}")
        results, wall = launcher.launch(world_size, ["exact", tmp], tmp)
        for rank, (rc, _out, err) in enumerate(results):
            assert rc == 0, f"rank {rank} of {world_size} failed:\n{err[-4000:]}"
        logs = [json.loads((tmp / f"log_rank{r}.json").read_text()) for r in range(world_size)]
        runs[world_size] = {"dir": tmp, "results": results, "logs": logs, "wall": wall}
    return runs


def _cases():
    return [(ws, n, m, p) for ws in WORLD_SIZES for n in SIZES for m in MODES for p in PATHS]


@pytest.mark.parametrize("world_size,size,mode,path", _cases())
def test_gathered_summary_equals_single_process(exact_runs, world_size, size, mode, path):
    run = exact_runs[world_size]
    utts = make_utterances(size)
    key = f"n{size}/{mode}/{path}"
    summary = json.loads((run["dir"] / key / "test_summary.json").read_text())
    expected = reference_summary(utts)
    for field in SUMMARY_KEYS:
        assert summary[field] == expected[field], field  # exact, floats included
    assert summary["world_size"] == world_size

    # Ledger on the merged file: every id exactly once, sorted by id.
    rows = read_utterance_file(run["dir"] / key / "test_utterances.tsv")
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids)
    check_ledger(ids, [u[0] for u in utts])
    # ... and on what the ranks actually processed.
    processed = [i for log in run["logs"] for b in log["runs"][key]["batches"] for i in b]
    check_ledger(processed, [u[0] for u in utts])
    counts = Counter({r["rank"]: r["utterances"] for r in summary["per_rank"]})
    for log in run["logs"]:
        assert counts[log["rank"]] == sum(len(b) for b in log["runs"][key]["batches"])

    # Batches are length-sorted on every rank.
    length = {u[0]: u[2] for u in utts}
    for log in run["logs"]:
        batches = log["runs"][key]["batches"]
        maxima = [max(length[i] for i in b) for b in batches]
        assert maxima == sorted(maxima)
        for b in batches:
            assert [length[i] for i in b] == sorted(length[i] for i in b)

    # An independent WER computation on the merged file agrees.
    import jiwer

    wer = 100.0 * jiwer.wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    assert wer == pytest.approx(summary["WER"], abs=1e-9)
    assert sum(r["errors"] for r in rows) == summary["num_edits"]


@pytest.mark.parametrize(
    "world_size,size,mode", [(ws, n, m) for ws in WORLD_SIZES for n in SIZES for m in MODES]
)
def test_both_paths_and_all_world_sizes_agree(exact_runs, world_size, size, mode):
    base = exact_runs[1]["dir"] / f"n{size}/{mode}"
    here = exact_runs[world_size]["dir"] / f"n{size}/{mode}"
    brain = (here / "brain" / "test_utterances.tsv").read_text()
    assert brain == (here / "items" / "test_utterances.tsv").read_text()
    assert brain == (base / "brain" / "test_utterances.tsv").read_text()
    # Same batches as one process (so the same padding for each utterance).
    batches = lambda ws: sorted(  # noqa: E731
        sorted(b)
        for log in exact_runs[ws]["logs"]
        for b in log["runs"][f"n{size}/{mode}/brain"]["batches"]
    )
    assert batches(world_size) == batches(1)
    # Loss averaged over all ranks' batches equals the single-process mean.
    loss = [log["runs"][f"n{size}/{mode}/brain"]["loss"] for log in exact_runs[world_size]["logs"]]
    assert len(set(loss)) == 1
    assert loss[0] == pytest.approx(
        exact_runs[1]["logs"][0]["runs"][f"n{size}/{mode}/brain"]["loss"]
    )


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_reports_are_printed_once_with_rank_lines(exact_runs, world_size):
    results = exact_runs[world_size]["results"]
    # + the refused plain loader (printed only when it passes, with 1 rank)
    # + 2 VALID stages in fit()
    n_gathers = len(SIZES) * len(MODES) * len(PATHS) + (world_size == 1) + 2
    for rank, (_, out, _) in enumerate(results):
        summaries = [line for line in out.splitlines() if "summary: WER" in line]
        rank_lines = [line for line in out.splitlines() if line.startswith("rank ")]
        if rank == 0:
            assert len(summaries) == n_gathers
            assert len(rank_lines) == n_gathers * world_size
        else:
            assert summaries == [] and rank_lines == []
    lines = results[0][1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rank 0: "))
    first = lines[start : start + world_size + 1]
    assert "summary: WER" in first[world_size]
    for r in range(world_size):
        assert first[r].startswith(f"rank {r}: ") and " utterances, WER " in first[r]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_evaluation_uses_unwrapped_modules_and_rank0_state(exact_runs, world_size):
    for log in exact_runs[world_size]["logs"]:
        # DDP wrapper restored after evaluation; rank 0's buffers everywhere.
        assert log["ddp_wrapped_after"] == "DistributedDataParallel"
        for run_key, run in log["runs"].items():
            if run_key.endswith("/brain"):
                assert run["running_mean"] == 0.0


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_loader_that_is_not_ddp_valid_is_refused(exact_runs, world_size):
    for log in exact_runs[world_size]["logs"]:
        if world_size == 1:
            assert log["plain_loader_error"] is None
        else:
            assert "7 duplicated" in log["plain_loader_error"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fit_gathers_the_valid_stage_every_epoch(exact_runs, world_size):
    expected = reference_summary(make_utterances(101))
    logs = exact_runs[world_size]["logs"]
    for log in logs:
        valid = log["fit"]["valid"]
        assert [v["epoch"] for v in valid] == [1, 2]
        for v in valid:
            assert v["wrapped"] == "Linear"  # unwrapped during the stage
            for field in SUMMARY_KEYS:
                assert v["summary"][field] == expected[field], field
    # Training went on under DDP after each VALID stage: replicas still agree.
    assert len({log["fit"]["weight"] for log in logs}) == 1
    for epoch in (0, 1):
        seen = [i for log in logs for b in log["fit"]["valid"][epoch]["seen"] for i in b]
        check_ledger(seen, [u[0] for u in make_utterances(101)])


# ---- failure propagation ----


def _owner_rank(utts, bad_id, world_size, batch_size):
    for rank in range(world_size):
        shard = shard_items(
            utts, [u[2] for u in utts], rank=rank, world_size=world_size, batch_size=batch_size
        )
        if any(u[0] == bad_id for b in shard for u in b):
            return rank
    raise AssertionError("bad utterance in no shard")


def test_unreadable_audio_on_one_rank_fails_every_rank(launcher, tmp_path):
    import numpy as np
    import soundfile as sf

    world_size = 2
    utts = make_utterances(7)
    wav_dir = tmp_path / "wavs"
    wav_dir.mkdir()
    for utt_id, _, length in utts:
        sf.write(wav_dir / f"{utt_id}.wav", np.zeros(int(1600 * length), dtype="float32"), 16000)
    bad_id = max(utts, key=lambda u: u[2])[0]
    (wav_dir / f"{bad_id}.wav").write_bytes(b"this is not audio")
    owner = _owner_rank(utts, bad_id, world_size, batch_size=2)

    results, wall = launcher.launch(
        world_size, ["fail", tmp_path, wav_dir], tmp_path, eval_timeout_s=30
    )
    assert wall < 60, f"took {wall:.0f} s"
    for rank, (rc, out, err) in enumerate(results):
        assert rc != 0, f"rank {rank} exited 0:\n{out}\n{err[-3000:]}"
        assert "evaluation returned normally" not in out
        assert "RankFailure" in err and f"failed on rank {owner}" in err, err[-3000:]
        assert bad_id in err, err[-3000:]  # the cause is shown on every rank
        outcome = json.loads((tmp_path / f"fail_rank{rank}.json").read_text())
        assert outcome["failed_ranks"] == [owner]
        assert bad_id in outcome["items"]


def test_a_rank_that_dies_fails_the_others_quickly(launcher, tmp_path):
    results, wall = launcher.launch(2, ["die", tmp_path], tmp_path, eval_timeout_s=120)
    assert wall < 60, f"took {wall:.0f} s: the survivor waited for the timeout"
    assert results[1][0] == 17
    rc, out, err = results[0]
    assert rc != 0 and "evaluation returned normally" not in out
    assert "SyncLost" in err and "lost contact" in err, err[-3000:]
