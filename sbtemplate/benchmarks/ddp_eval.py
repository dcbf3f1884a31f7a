"""DDP evaluation benchmark: wall time of the sharded evaluation on N ranks.

Runs the pretrained-interface path (``EncoderDecoderASR.from_hparams``,
``load_audio``, ``transcribe_batch``) through
:func:`sbtemplate.distributed.evaluate_sharded` on 1 and 2 gloo ranks (CPU),
with the machine's cores split between the ranks (``torch.set_num_threads``),
and reports the evaluation wall time of each world size, their ratio, the
per-rank busy time and share, and whether every hypothesis is identical
across world sizes.

On a machine shared with other jobs, intra-op threads beyond the cores that
are actually free make torch much slower (threads wait for each other), so
``--threads-per-rank 1`` is the fair setting there; the table shows the
1-minute load average after each run.

The timed span starts when every rank has loaded the model and decoded a
warm-up utterance (a barrier) and ends when rank 0 holds the gathered
summary; process start-up and model loading are reported separately.

Without ``--model-dir`` a random-weight recognizer is written
(``sbtemplate.benchmarks.random_model``) and decoded on noise: its
decoder seldom emits ``eos``, so every hypothesis runs to the step limit and
the times are an upper bound for a trained model. With ``--manifest`` (a JSON
descriptor: ``{id: {"wav": "{data_root}/...", "length": s, "words": ...}}``)
and ``--data-root`` the benchmark decodes a real test set instead.

``python -m sbtemplate.benchmarks.ddp_eval [--ranks 1 2] [--json out.json]``
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_RATE = 16000


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available_cores():
    """Cores this process may run on (its CPU affinity, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def synthetic_test_set(folder, n, min_s, max_s, seed=0):
    """Noise wavs of random lengths and a JSON descriptor for them; returns the manifest path."""
    import numpy as np
    import soundfile as sf

    folder = Path(folder)
    (folder / "wavs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = "THE CAT SAT ON A MAT AND THEN IT RAN AWAY FROM HOME".split()
    entries = {}
    for k in range(n):
        length = round(rng.uniform(min_s, max_s), 2)
        utt_id = f"bench-{k:04d}"
        noise = np.random.default_rng(seed + k).standard_normal(int(length * SAMPLE_RATE))
        sf.write(folder / "wavs" / f"{utt_id}.wav", (0.1 * noise).astype("float32"), SAMPLE_RATE)
        entries[utt_id] = {
            "wav": "{data_root}/wavs/" + f"{utt_id}.wav",
            "length": length,
            "words": " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))),
            "spk_id": "bench",
        }
    manifest = folder / "test.json"
    manifest.write_text(json.dumps(entries, indent=1))
    return manifest


def read_items(manifest, data_root, limit=None):
    """``[(id, wav path, words)]`` and lengths from a JSON descriptor."""
    entries = json.loads(Path(manifest).read_text())
    ids = sorted(entries)[:limit] if limit else sorted(entries)
    items = [
        (i, entries[i]["wav"].replace("{data_root}", str(data_root)), entries[i]["words"])
        for i in ids
    ]
    return items, [float(entries[i]["length"]) for i in ids]


# --------------------------------------------------------------------------
# One rank


def worker(job):
    """One rank of a benchmark run, in its own process (``--worker job.json``).

    Loads the recognizer and decodes a warm-up utterance outside the timed span,
    then times :func:`~sbtemplate.distributed.evaluate_sharded` from a barrier to
    the gathered summary; rank 0 writes ``result.json`` (wall time, per-rank busy
    seconds, WER).
    """
    import datetime

    import torch
    import torch.distributed as dist
    from speechbrain.dataio.dataio import read_audio
    from speechbrain.inference.ASR import EncoderDecoderASR

    from sbtemplate.distributed import evaluate_sharded, exchange, new_eval_group
    from sbtemplate.evaluation import transcribe_files

    started = time.perf_counter()
    torch.set_num_threads(job["threads"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job["timeout_s"]))
    # The process groups are destroyed before exit: a rank that leaves with
    # gloo's threads still running can abort ("terminate called without an
    # active exception"), as one 2-rank launch in six did.
    try:
        rank = dist.get_rank()
        group = new_eval_group(job["timeout_s"])
        out_dir = Path(job["out_dir"])
        overrides = {"beam_size": job["beam_size"]} if job["beam_size"] else {}
        asr = EncoderDecoderASR.from_hparams(
            source=job["model_dir"],
            savedir=str(out_dir / f"savedir_rank{rank}"),
            overrides=overrides,
            run_opts={"device": "cpu"},
        )
        items, lengths = read_items(job["manifest"], job["data_root"], job["limit"])
        load = asr.load_audio if job["reader"] == "load_audio" else read_audio
        with torch.no_grad():  # warm-up outside the timed span
            asr.transcribe_batch(0.1 * torch.randn(1, SAMPLE_RATE // 2), torch.ones(1))
        busy = [0.0, 0]

        def score_batch(batch, stats):
            t = time.perf_counter()
            words = transcribe_files(asr, [wav for _, wav, _ in batch], reader=load)
            stats.append(
                [i for i, _, _ in batch],
                [w.split() for w in words],
                [ref.split() for _, _, ref in batch],
            )
            busy[0] += time.perf_counter() - t
            busy[1] += len(batch)

        ready = time.perf_counter() - started
        dist.barrier(group=group)
        t0 = time.perf_counter()
        report = evaluate_sharded(
            items,
            lengths,
            score_batch,
            batch_size=job["batch_size"],
            group=group,
            name="bench",
            out_dir=out_dir,
            printer=None,
        )
        wall = time.perf_counter() - t0
        ranks = exchange(
            {"rank": rank, "busy_s": busy[0], "utterances": busy[1], "ready_s": ready},
            group=group,
            what="benchmark timing",
        )
        if rank == 0:
            result = {
                "wall_s": wall,
                "ranks": ranks,
                "WER": report.wer,
                "utterances": len(items),
                "threads_per_rank": job["threads"],
            }
            (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------
# Launcher


def launch(world_size, job, out_dir, timeout_s):
    """Run ``world_size`` rank processes; returns rank 0's result dict and the launch wall time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    job = dict(job, out_dir=str(out_dir))
    job_file = out_dir / "job.json"
    job_file.write_text(json.dumps(job))
    port = _free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(job["threads"]),
        )
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "sbtemplate.benchmarks.ddp_eval",
                        "--worker",
                        str(job_file),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=max(1.0, start + timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append(f"rank {rank}: {code}")
    if failed:
        tail = (out_dir / "rank0.log").read_text()[-3000:]
        raise RuntimeError(f"{world_size}-rank run failed ({', '.join(failed)}):\n{tail}")
    result = json.loads((out_dir / "result.json").read_text())
    result["launch_s"] = time.monotonic() - start
    result["load_average_after"] = os.getloadavg()[0]  # other work on a shared machine
    return result


def run(
    ranks=(1, 2),
    repeats=1,
    n_utterances=16,
    min_s=1.0,
    max_s=3.0,
    batch_size=4,
    beam_size=None,
    model_dir=None,
    manifest=None,
    data_root=None,
    reader="load_audio",
    threads_per_rank=None,
    timeout_s=1200,
    work_dir=None,
):
    """Benchmark each world size in ``ranks``; returns the figures as a dict."""
    cores = available_cores()
    work = Path(work_dir or tempfile.mkdtemp(prefix="ddp_eval_bench_"))
    random_model = model_dir is None
    if random_model:
        from sbtemplate.benchmarks.random_model import write_random_recognizer

        model_dir = write_random_recognizer(work / "random_model", seed=0)
    if manifest is None:
        manifest = synthetic_test_set(work / "data", n_utterances, min_s, max_s)
        data_root = work / "data"
        limit = None
    else:
        limit = n_utterances
    figures = {
        "cores": cores,
        "random_model": random_model,
        "batch_size": batch_size,
        "beam_size": beam_size,
        "reader": reader,
        "runs": {},
    }
    for world_size in ranks:
        threads = threads_per_rank or max(1, cores // world_size)
        job = {
            "model_dir": str(model_dir),
            "manifest": str(manifest),
            "data_root": str(data_root),
            "limit": limit,
            "batch_size": batch_size,
            "beam_size": beam_size,
            "reader": reader,
            "threads": threads,
            "timeout_s": timeout_s,
        }
        best = None
        for repeat in range(repeats):
            result = launch(world_size, job, work / f"ws{world_size}_r{repeat}", timeout_s)
            if best is None or result["wall_s"] < best["wall_s"]:
                best = dict(result, out_dir=str(work / f"ws{world_size}_r{repeat}"))
        figures["runs"][world_size] = best
    base = figures["runs"][ranks[0]]
    base_tsv = Path(base["out_dir"]) / "bench_utterances.tsv"
    for result in figures["runs"].values():
        result["ratio_to_first"] = result["wall_s"] / base["wall_s"]
        tsv = Path(result["out_dir"]) / "bench_utterances.tsv"
        result["identical_hypotheses"] = tsv.read_text() == base_tsv.read_text()
    figures["utterances"] = base["utterances"]
    figures["work_dir"] = str(work)
    return figures


def format_table(figures):
    """The figures of :func:`run` as a plain-text table, one row per world size."""
    lines = [
        f"{figures['utterances']} utterances, batch size {figures['batch_size']},"
        f" {figures['cores']} cores, reader {figures['reader']},"
        f" {'random-weight' if figures['random_model'] else 'trained'} recognizer",
        f"{'ranks':>5} {'threads/rank':>12} {'eval wall s':>11} {'ratio':>6}"
        f" {'per-rank busy s (utts)':>30} {'same hyps':>9} {'launch s':>8} {'load':>5}",
    ]
    for world_size, r in figures["runs"].items():
        busy = ", ".join(f"{x['busy_s']:.1f} ({x['utterances']})" for x in r["ranks"])
        lines.append(
            f"{world_size:>5} {r['threads_per_rank']:>12} {r['wall_s']:>11.2f}"
            f" {r['ratio_to_first']:>6.2f} {busy:>30} {str(r['identical_hypotheses']):>9}"
            f" {r['launch_s']:>8.1f} {r['load_average_after']:>5.1f}"
        )
    return "\n".join(lines)


def main(argv=None):
    """Command line of :func:`run`, or of one rank with ``--worker``; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs per world size (best kept)")
    parser.add_argument(
        "--utterances",
        type=int,
        default=16,
        help="synthetic set size, or the first N of --manifest (0: all)",
    )
    parser.add_argument("--min-s", type=float, default=1.0, help="synthetic utterance lengths")
    parser.add_argument("--max-s", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--beam-size", type=int, default=None, help="override the model's")
    parser.add_argument("--model-dir", help="model folder (default: a random-weight one)")
    parser.add_argument("--manifest", help="JSON descriptor (default: synthetic noise)")
    parser.add_argument("--data-root", help="replaces {data_root} in the manifest")
    parser.add_argument("--reader", choices=("load_audio", "read_audio"), default="load_audio")
    parser.add_argument(
        "--threads-per-rank", type=int, default=None, help="default: cores // ranks"
    )
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--work-dir")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    if args.manifest and not args.data_root:
        parser.error("--manifest needs --data-root")
    figures = run(
        ranks=tuple(args.ranks),
        repeats=args.repeats,
        n_utterances=args.utterances,
        min_s=args.min_s,
        max_s=args.max_s,
        batch_size=args.batch_size,
        beam_size=args.beam_size,
        model_dir=args.model_dir,
        manifest=args.manifest,
        data_root=args.data_root,
        reader=args.reader,
        threads_per_rank=args.threads_per_rank,
        timeout_s=args.timeout,
        work_dir=args.work_dir,
    )
    print(format_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
