"""finetune.py end to end on the tiny profile: one 2-rank torchrun run shared
by most assertions, plus the runs that need their own launch (world size 1
against 2, resume, two nodes on loopback, bad input).

Issue 4: only the LM moves (ASR digests per rank), ranks agree after every
epoch, perplexity falls, dynamic batches are equal per rank with nothing
dropped, resume equals an uninterrupted run, a two-node launch equals
--nproc_per_node=2, bad input fails fast on every rank.
Issue 5: both evaluation paths give identical hypotheses, WER agrees with
jiwer on the merged files, one summary with per-rank lines, and the gathered
result of world size 1 equals that of world size 2.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from network_guard import _forbid_network  # noqa: F401 - autouse fixture

from sbtemplate.profiles import profile_file

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
TORCHRUN = PYTHON.parent / "torchrun"
TIMEOUT_S = 420

# A small but complete run: 2 epochs, 6 test utterances in batches of 2 (so
# both ranks decode), a short beam.
TINY = f"--build_profile=!include:{profile_file('tiny')}"
RUN_OVERRIDES = [
    TINY,
    "--number_of_epochs=2",
    "--test_limit=6",
    "--test_batch_size=2",
    "--max_decode_ratio=0.6",
    "--noprogressbar",
    "--collective_timeout_s=120",
]
EVAL_NAMES = (
    "test_base_lm",
    "test_finetuned_brain",
    "test_finetuned_interface_load_audio",
    "test_finetuned_interface_read_audio",
)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def torchrun(out, *extra, nproc=2, timeout=TIMEOUT_S, script="finetune.py"):
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        script,
        "finetune.yaml",
        *RUN_OVERRIDES,
        f"--output_folder={out}",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def single(out, *extra, timeout=TIMEOUT_S):
    cmd = [
        str(PYTHON),
        "finetune.py",
        "finetune.yaml",
        *RUN_OVERRIDES,
        f"--output_folder={out}",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def results_of(out):
    return json.loads((Path(out) / "results.json").read_text())


def summary_of(out, name):
    data = json.loads((Path(out) / "eval" / f"{name}_summary.json").read_text())
    return {k: v for k, v in data.items() if k not in ("world_size", "per_rank")}


def utterances_of(out, name):
    return (Path(out) / "eval" / f"{name}_utterances.tsv").read_text()


@pytest.fixture(scope="module")
def ddp_run(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "ws2"
    proc = _check(torchrun(out))
    return {"out": out, "proc": proc, "results": results_of(out)}


# ------------------------------------------------------------------ issue 4 --
def test_two_rank_run_prints_per_rank_and_one_summary(ddp_run):
    stdout = ddp_run["proc"].stdout
    assert stdout.count("== Summary: tiny profile, world size 2 ==") == 1
    for name in EVAL_NAMES:
        assert stdout.count(f"{name} summary: WER") == 1
    for rank in (0, 1):
        # each rank's line says its rank and utterance count (6 in batches of 2)
        assert re.search(rf"^rank {rank}: [1-5] utterances, WER", stdout, re.M)
        assert f"[epoch 2] rank {rank}: " in stdout and "padding" in stdout
    assert ddp_run["results"]["world_size"] == 2 and ddp_run["results"]["backend"] == "gloo"


def test_asr_is_frozen_on_every_rank_and_the_lm_moved(ddp_run):
    res = ddp_run["results"]
    per_rank = res["frozen"]["per_rank"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    for r in per_rank:
        assert set(r["before"]) == {"asr", "normalizer"}
        assert r["before"] == r["after"], f"rank {r['rank']}: an ASR module changed"
        assert r["after"] == per_rank[0]["after"]
    assert res["frozen"]["unchanged_on_every_rank"]
    assert res["lm"]["changed"] and res["lm"]["max_abs_change"] > 0
    assert res["lm"]["finetuned_digest"] != res["lm"]["base_digest"]


def test_ranks_hold_identical_lm_weights_after_each_epoch(ddp_run):
    epochs = ddp_run["results"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    digests = [e["lm_digest_per_rank"] for e in epochs]
    for per_rank in digests:
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert digests[0][0] != digests[1][0], "the LM should change between epochs"


def test_dynamic_batches_are_equal_per_rank_and_cover_the_text(ddp_run, tiny_build):
    n_train = len(json.loads((tiny_build.manifests / "target_lm_train.json").read_text()))
    for epoch in ddp_run["results"]["epochs"]:
        ranks = epoch["batching_per_rank"]
        assert ranks[0]["batches"] == ranks[1]["batches"] > 0
        assert sum(r["items"] for r in ranks) == n_train == epoch["train_sentences"]
        # finetune.yaml's buckets hold one sentence length each: at most 10% padding
        # on every rank (SpeechBrain's warped buckets gave 27-29% on the full corpus)
        assert all(0 <= r["padding_fraction"] <= 0.10 for r in ranks), ranks


def test_target_perplexity_falls(ddp_run):
    ppl = ddp_run["results"]["perplexity"]
    assert ppl["finetuned"]["target_valid"] < ppl["base"]["target_valid"]


def test_resume_after_an_interruption_gives_the_same_lm(ddp_run, tmp_path):
    out = tmp_path / "resumed"
    quick = ["--evaluate_base=False", "--evaluate_finetuned=False"]
    stopped = torchrun(out, "--stop_after_steps=5", *quick)
    assert stopped.returncode != 0
    assert stopped.stderr.count("stopped after 5 optimizer steps") == 2, stopped.stderr[-3000:]
    intra = [
        c
        for c in (out / "save").glob("CKPT+*")
        if "brain_intra_epoch_ckpt: true" in (c / "CKPT.yaml").read_text()
    ]
    assert len(intra) == 1, "no intra-epoch checkpoint written"
    resumed = _check(torchrun(out, *quick))
    # The second run started from the checkpoint the first one left.
    log = resumed.stdout + resumed.stderr + (out / "log.txt").read_text()
    assert f"Loading a checkpoint from {intra[0]}" in log, log[-3000:]
    res = results_of(out)
    assert res["lm"]["finetuned_digest"] == ddp_run["results"]["lm"]["finetuned_digest"]
    assert res["perplexity"]["finetuned"] == ddp_run["results"]["perplexity"]["finetuned"]


def test_a_busy_output_folder_is_refused_on_every_rank(tiny_build, tmp_path):
    """Two runs on one output folder: the second stops at once on both ranks,
    names the holder, and leaves the first one's checkpoints alone."""
    from sbtemplate.run_lock import hold_output_folder, release_output_folder

    out = tmp_path / "busy"
    (out / "save" / "CKPT+earlier").mkdir(parents=True)
    hold_output_folder(out)
    try:
        done = torchrun(out, "--evaluate_base=False", "--evaluate_finetuned=False", timeout=300)
    finally:
        release_output_folder(out)
    assert done.returncode != 0
    holder = f"output folder {out.resolve()} is in use by pid {os.getpid()} on "
    for rank in (0, 1):
        lines = [
            line for line in done.stderr.splitlines() if line.startswith(f"rank {rank}: ERROR:")
        ]
        assert len(lines) == 1 and holder in lines[0], done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".run.lock", "save"]
    assert [p.name for p in (out / "save").iterdir()] == ["CKPT+earlier"]


@pytest.mark.parametrize("flag", [[], ["--distributed_launch"]])
def test_the_original_launch_line_runs_on_two_ranks(tiny_build, tmp_path, flag):
    """python -m torch.distributed.launch (the original template's line) passes
    --local-rank=N to every rank: the run takes it as torchrun's."""
    out = tmp_path / "launch"
    cmd = [
        str(PYTHON),
        "-m",
        "torch.distributed.launch",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "finetune.py",
        "finetune.yaml",
        *RUN_OVERRIDES,
        *flag,
        "--evaluate_base=False",
        "--evaluate_finetuned=False",
        f"--output_folder={out}",
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results_of(out)["world_size"] == 2
    assert done.stderr.count("note: torch.distributed.launch is deprecated") == 1


def test_ctrl_c_during_a_checkpoint_save_never_poisons_the_rerun(ddp_run, tmp_path):
    """Ctrl-C on both ranks while epoch 2's checkpoint is being saved: the
    half-saved checkpoint is never listed, the rerun resumes from epoch 1's
    and ends with the uninterrupted run's LM."""
    from sbtemplate.checkpoints import STAGING_PREFIX

    out = tmp_path / "ctrl_c"
    quick = ["--evaluate_base=False", "--evaluate_finetuned=False"]
    stopped = torchrun(out, *quick, script="tests/interrupted_finetune.py")
    assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr, stopped.stderr[-3000:]
    saved = sorted(p.name for p in (out / "save").iterdir())
    assert len([n for n in saved if n.startswith("CKPT+")]) == 1, saved
    assert len([n for n in saved if n.startswith(STAGING_PREFIX)]) == 1, saved
    _check(torchrun(out, *quick))
    res = results_of(out)
    assert res["lm"]["finetuned_digest"] == ddp_run["results"]["lm"]["finetuned_digest"]
    assert not [p for p in (out / "save").iterdir() if p.name.startswith(STAGING_PREFIX)]


def _stalled_run(tmp_path, *extra, timeout=TIMEOUT_S):
    """tests/stalled_finetune.py on 2 ranks (rank 1 stops in its first training
    step), no evaluation, with ``extra`` overrides."""
    overrides = [o for o in RUN_OVERRIDES if not o.startswith("--collective_timeout_s")]
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "tests/stalled_finetune.py",
        "finetune.yaml",
        *overrides,
        *extra,
        "--evaluate_base=False",
        "--evaluate_finetuned=False",
        f"--output_folder={tmp_path / 'out'}",
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def test_a_stalled_rank_is_named_with_what_the_run_was_doing(tiny_build, tmp_path):
    """Rank 1 stops answering in its first training step: rank 0 fails after
    the collective timeout, naming the rank and the stage."""
    done = _stalled_run(tmp_path, "--collective_timeout_s=10")
    assert done.returncode != 0
    assert (
        "rank 0: ERROR: rank 1 stopped answering during fine-tuning: a collective waited past "
        "collective_timeout_s"
    ) in done.stderr, done.stderr[-3000:]


def test_a_stalled_rank_is_named_by_the_watchdog_long_before_the_timeout(tiny_build, tmp_path):
    """Rank 1 stops in its first training step, the collective timeout is
    15 minutes: the hang watchdog ends the run within its stall_s, naming where
    each rank waits (rank 1 asleep in stalled_fit_batch)."""
    started = time.monotonic()
    done = _stalled_run(
        tmp_path,
        "--collective_timeout_s=900",
        "--hang_watchdog={mismatch_s: 5, stall_s: 10, poll_s: 0.5}",
        timeout=300,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 120
    line = [x for x in done.stderr.splitlines() if "ranks hang" in x]
    assert line, done.stderr[-3000:]
    assert "[samplers/DDP]" in line[0] and "stalled_fit_batch" in line[0], line[0]


def test_two_nodes_on_loopback_match_one_node(ddp_run, tmp_path):
    out = tmp_path / "two_nodes"
    port = _free_port()
    procs = []
    for node, host in ((0, "true"), (1, "false")):
        cmd = [
            str(TORCHRUN),
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            "finetune-test",
            "--rdzv_conf",
            f"is_host={host}",
            "--max_restarts",
            "0",
            "finetune.py",
            "finetune.yaml",
            *RUN_OVERRIDES,
            f"--output_folder={out}",
        ]
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(
            (subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log)
        )
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs
    res, ref = results_of(out), ddp_run["results"]
    assert res["world_size"] == 2
    assert res["lm"]["finetuned_digest"] == ref["lm"]["finetuned_digest"]
    assert res["wer"] == ref["wer"] and res["perplexity"] == ref["perplexity"]
    for name in EVAL_NAMES:
        assert utterances_of(out, name) == utterances_of(ddp_run["out"], name)


def _bad_run(tmp_path, *extra):
    proc = torchrun(tmp_path / "bad", *extra, timeout=240)
    assert proc.returncode != 0
    return proc.stderr


def test_override_of_a_missing_key_fails_on_every_rank(tmp_path, tiny_build):
    stderr = _bad_run(tmp_path, "--no_such_key=1")
    for rank in (0, 1):
        assert f"rank {rank}: ERROR: KeyError" in stderr and "no_such_key" in stderr, stderr[-3000:]


@pytest.mark.parametrize(
    "fault, reason",
    [("missing", "no such file"), ("narrowband", "8000 Hz"), ("stereo", "2 channels")],
)
def test_unusable_audio_fails_on_every_rank_before_training(tmp_path, tiny_build, fault, reason):
    import soundfile

    entries = json.loads((tiny_build.manifests / "test.json").read_text())
    first = sorted(entries)[0]
    source = entries[first]["wav"].replace("{data_root}", str(tiny_build.corpus / "LibriSpeech"))
    audio, rate = soundfile.read(source, dtype="float32")
    bad = tmp_path / f"{fault}.wav"
    if fault == "narrowband":  # 8 kHz audio would be decoded as if it were 16 kHz
        soundfile.write(bad, audio[::2], rate // 2)
    elif fault == "stereo":
        soundfile.write(bad, np.stack([audio, audio], axis=1), rate)
    entries[first]["wav"] = str(bad)
    manifest = tmp_path / "test.json"
    manifest.write_text(json.dumps(entries))
    stderr = _bad_run(tmp_path, f"--test_annotation={manifest}")
    for rank in (0, 1):
        assert re.search(
            rf"rank {rank}: ERROR: AudioFormatError: 1 of \d+ audio files listed in "
            rf"{re.escape(str(manifest))} cannot be used \(expected 16000 Hz mono",
            stderr,
        ), stderr[-3000:]
    assert f"{first}: {bad}: {reason}" in stderr
    assert (
        not list((tmp_path / "bad").rglob("CKPT*"))
        and not (tmp_path / "bad" / "results.json").exists()
    )


def test_an_override_of_the_wrong_type_names_the_key(tmp_path, tiny_build):
    done = single(tmp_path / "out", "--seed=abc", timeout=240)
    assert done.returncode != 0
    assert (
        "rank 0: ERROR: ConfigError: --seed='abc': finetune.yaml gives seed as an integer"
        in done.stderr
    ), done.stderr[-3000:]


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, tiny_build):
    broken = tmp_path / "broken.yaml"
    lines = (ROOT / "finetune.yaml").read_text().splitlines()
    lines[4] = "seed: [1986"  # an unclosed flow sequence
    broken.write_text("\n".join(lines) + "\n")
    cmd = [str(PYTHON), "finetune.py", str(broken), TINY, f"--output_folder={tmp_path / 'out'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert f"rank 0: ERROR: ConfigError: {broken}: YAML syntax error at line " in done.stderr, (
        done.stderr[-3000:]
    )
    assert "<unicode string>" not in done.stderr


def test_world_size_larger_than_the_batches_fails_on_every_rank(tmp_path, tiny_build):
    one_batch = (
        "--train_dynamic_batching={max_batch_length: 10000000, num_buckets: null,"
        " bucket_boundaries: [1000], max_batch_ex: 100000}"
    )
    stderr = _bad_run(tmp_path, one_batch)
    for rank in (0, 1):
        assert f"rank {rank}: ERROR: NotEnoughBatches" in stderr, stderr[-3000:]
    assert "for a world size of 2" in stderr


# ------------------------------------------------------------------ issue 5 --
def test_both_evaluation_paths_give_identical_hypotheses(ddp_run):
    from sbtemplate.distributed import read_utterance_file

    paths = ddp_run["results"]["paths"]
    assert paths["identical_hypotheses"] and paths["differing_ids"] == []
    names = [n for n in EVAL_NAMES if n != "test_base_lm"]
    rows = {n: read_utterance_file(ddp_run["out"] / "eval" / f"{n}_utterances.tsv") for n in names}
    hyps = {n: [(r["id"], r["hypothesis"]) for r in rows[n]] for n in names}
    assert len(hyps[names[0]]) == 6
    assert all(h == hyps[names[0]] for h in hyps.values())


def test_wer_agrees_with_jiwer_on_the_merged_files(ddp_run):
    import jiwer

    from sbtemplate.distributed import read_utterance_file

    for name in EVAL_NAMES:
        rows = read_utterance_file(ddp_run["out"] / "eval" / f"{name}_utterances.tsv")
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == 6
        expected = 100 * jiwer.wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
        summary = summary_of(ddp_run["out"], name)
        assert summary["WER"] == pytest.approx(expected, abs=1e-9)
        per_rank = json.loads((ddp_run["out"] / "eval" / f"{name}_summary.json").read_text())[
            "per_rank"
        ]
        assert [r["rank"] for r in per_rank] == [0, 1]
        assert (
            sum(r["utterances"] for r in per_rank) == 6
            and min(r["utterances"] for r in per_rank) > 0
        )


def test_world_size_one_gives_the_gathered_result_of_two(ddp_run, tmp_path):
    """The same fine-tuned LM evaluated by one process: a rerun in a copy of the
    2-rank output folder resumes at the finished checkpoint and only evaluates."""
    out = tmp_path / "ws1"
    shutil.copytree(ddp_run["out"], out, symlinks=True)
    shutil.rmtree(out / "eval")
    proc = _check(single(out))
    assert "rank 0: 6 utterances" in proc.stdout and "rank 1:" not in proc.stdout
    res = results_of(out)
    assert res["world_size"] == 1 and res["epochs"] == []
    assert res["lm"]["finetuned_digest"] == ddp_run["results"]["lm"]["finetuned_digest"]
    assert res["perplexity"]["finetuned"] == ddp_run["results"]["perplexity"]["finetuned"]
    for name in EVAL_NAMES:
        assert summary_of(out, name) == summary_of(ddp_run["out"], name), name
        assert utterances_of(out, name) == utterances_of(ddp_run["out"], name), name
