"""multisource_mini_recipe.py: the --debug regression run on the tiny profile.

The recipe runs in a subprocess, as a user runs it, with the loopback-only
network guard installed inside that process. One ``--debug`` run (module
fixture) is checked for its time, its result files, the sources it fetched
from, and against the stored expectation with the tolerances of
``sbtemplate/regression.py``, which the ``--debug`` run applies itself
(exact where the result does not depend on float arithmetic, within
measured bands where it does). A rebuild and a run under
other CPU kernels must pass the same check; a changed decoding weight must
not. Wrong sources (missing Hub repo, missing or unreachable URL, local
folder without the file) must fail with the fetching layer's one-line error.

Regenerate the expectation after an intended change (a rebuilt tiny
recognizer, a changed recipe) with::

    python multisource_mini_recipe.py multisource_mini_recipe.yaml --debug \
        --build_profile='!include:sbtemplate/hparams/profiles/tiny.yaml' --update_expected=True
"""

import copy
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sbtemplate import regression
from sbtemplate.paths import ProfilePaths
from sbtemplate.profiles import profile_file
from sbtemplate.run_lock import hold_output_folder, release_output_folder
from sbtemplate.servers import unused_loopback_port
from sbtemplate.slu import parse_semantics, serialize_semantics

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECIPE = ROOT / "multisource_mini_recipe.py"
HPARAMS = ROOT / "multisource_mini_recipe.yaml"
EXPECTED = regression.expectation_file("tiny")
DEBUG_SECONDS = 90  # acceptance: --debug under 90 s on 2 CPU cores
FETCH_FAILED = 2

# Runs the recipe with the network guard: any non-loopback access raises, and
# the process exits with status 3 if one was attempted (even if swallowed).
GUARDED = """
import atexit, os, runpy, sys
sys.path.insert(0, {tests!r})
import network_guard
network_guard.install()
def _report():
    if network_guard.violations:
        sys.stderr.write("NETWORK VIOLATION: " + "; ".join(network_guard.violations) + "\\n")
        os._exit(3)
atexit.register(_report)
sys.argv = [{recipe!r}] + sys.argv[1:]
code = 0
try:
    runpy.run_path({recipe!r}, run_name="__main__")
except SystemExit as exit:
    code = exit.code
_report()
sys.exit(code)
"""


def run_recipe(*args, timeout=600, env=None):
    command = [
        sys.executable,
        "-c",
        GUARDED.format(tests=str(TESTS), recipe=str(RECIPE)),
        str(HPARAMS),
        f"--build_profile=!include:{profile_file('tiny')}",
        *args,
    ]
    env = {**os.environ, **(env or {})}
    env.pop("HF_ENDPOINT", None)  # the recipe points the Hub client itself
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, {"wall": time.monotonic() - started, "cpu": cpu}


@pytest.fixture(scope="module")
def debug_run(tiny_build, tmp_path_factory):
    """One ``--debug`` run of the recipe on the tiny profile."""
    output = tmp_path_factory.mktemp("multisource_debug")
    done, seconds = run_recipe("--debug", "--output_folder", str(output))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    return {
        "output": output,
        "seconds": seconds,
        "results": results,
        "paths": tiny_build,
        "stdout": done.stdout,
    }


def test_debug_run_is_fast(debug_run):
    # CPU time of the whole process (start-up, serving, fetching, training,
    # decoding): the recipe runs on one thread, so on an idle 2-core machine
    # this is its wall time; on a shared, busy machine the wall time is not
    # the recipe's to answer for.
    seconds = debug_run["seconds"]
    assert seconds["cpu"] < DEBUG_SECONDS, (
        f"--debug used {seconds['cpu']:.1f} s of CPU ({seconds['wall']:.1f} s wall); "
        f"limit {DEBUG_SECONDS} s"
    )


def test_debug_run_writes_its_result_files(debug_run):
    output, results = debug_run["output"], debug_run["results"]
    # The result files the YAML names (default names, under output_folder).
    wer = (output / "wer_transcripts.txt").read_text()
    semantics = (output / "semantics_test.txt").read_text()
    assert wer.startswith("%WER ")
    assert semantics.startswith("Semantic exact-match accuracy: ")
    assert (output / "train_log.txt").read_text().count("epoch:") == 2
    # SpeechBrain's --debug: 2 epochs of 2 batches, 2 test batches (of 8).
    assert results["debug"] is True and results["profile"] == "tiny"
    assert results["epochs"] == 2
    assert len(results["test_utterances"]) == 16
    assert set(results["transcripts"]) == set(results["test_utterances"])
    test = json.loads((debug_run["paths"].manifests / "test.json").read_text())
    # The reported accuracy is the share of decoded semantics equal to the references.
    references = {uid: serialize_semantics(entry["semantics"]) for uid, entry in test.items()}
    correct = sum(
        results["semantics"][uid] == references[uid] for uid in results["test_utterances"]
    )
    assert results["semantic_accuracy"] == pytest.approx(100.0 * correct / 16)
    assert f"{results['semantic_accuracy']:.2f}%" in semantics
    assert f"%WER {results['wer']['WER']:.2f}" in wer
    assert set(results["test_utterances"]) <= set(test)


def test_every_source_kind_is_used(debug_run):
    fetched = {row["file"]: row["kind"] for row in debug_run["results"]["fetched"]}
    assert fetched == {
        "hyperparams.yaml": "huggingface",
        "asr.ckpt": "huggingface",
        "lm_commands.ckpt": "url",  # the command-domain LM, not the Hub repo's lm.ckpt
        "tokenizer.ckpt": "url",
        "normalizer.ckpt": "local",
    }
    collected = debug_run["output"] / "pretrained" / "asr"
    assert os.path.realpath(collected / "normalizer.ckpt") == os.path.realpath(
        debug_run["paths"].local_repo / "normalizer.ckpt"
    )


def test_debug_run_passes_the_regression_check(debug_run):
    """The run compared itself with the stored expectation and passed (it
    exits 1 otherwise: see test_a_changed_decoding_weight_fails_the_check)."""
    assert EXPECTED.is_file(), f"no stored expectation {EXPECTED}: see this module's docstring"
    assert f"Regression check: passed against {EXPECTED.name}" in debug_run["stdout"]
    assert "Outcome check: transcripts: WER" in debug_run["stdout"]


def test_a_changed_decoding_weight_fails_the_check(debug_run, tmp_path):
    """The check still sees a real change: decoding without CTC (weight 0.7 ->
    0) moves the transcripts beyond the bands, and the --debug run itself
    exits 1 naming what moved."""
    done, _ = run_recipe("--debug", "--ctc_weight_decode=0.0", "--output_folder", str(tmp_path))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    line = [x for x in done.stderr.splitlines() if x.startswith("REGRESSION:")]
    assert len(line) == 1, done.stderr[-3000:]
    problems = line[0].split(": ", 2)[2].split("; ")
    assert any(
        re.fullmatch(
            r"\[decoding\] transcripts: \d+ of \d+ identical to the stored ones \(at least \d+\)", p
        )
        for p in problems
    ), problems
    # What does not depend on the recognizer did not move.
    assert not any(
        p.startswith(("[fine-tuning step] losses[0]", "[fine-tuning step] losses[1]"))
        or "fetched" in p
        or "test_utterances" in p
        for p in problems
    ), problems


def _other_kernels():
    """Environment that selects other CPU kernels than this machine's own:
    ATen's portable ones (unless they are the native ones) and oneDNN's SSE4.1."""
    env = {"ONEDNN_MAX_CPU_ISA": "SSE41"}
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        env["ATEN_CPU_CAPABILITY"] = "default"
    return env


def _tensors(path):
    state = torch.load(path, map_location="cpu")
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def test_a_build_on_other_cpu_kernels_passes_the_check(debug_run, tmp_path):
    """Another machine, reproduced here: the tiny recognizer rebuilt and the
    recipe run under other kernels. Portable files keep their bytes, the
    normaliser stays within tolerance, the LMs' perplexities within 5%, and
    the run passes its own regression check."""
    paths = debug_run["paths"]
    root = tmp_path / "artifacts"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "corpus").symlink_to(paths.corpus)  # espeak-ng audio: portable, reused
    env = {**os.environ, **_other_kernels()}
    built = subprocess.run(
        [sys.executable, "-m", "sbtemplate.build", "--profile", "tiny", "--root", str(root)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    other = ProfilePaths.for_profile("tiny", root)
    # The normaliser's statistics are sums over the data: within 1e-5. The LMs
    # are trained far enough that their weights take another path under other
    # kernels (0.2 of a tensor's scale apart): they must model the text as well.
    here, there = (
        _tensors(paths.model_dir / "normalizer.ckpt"),
        _tensors(other.model_dir / "normalizer.ckpt"),
    )
    assert here.keys() == there.keys()
    for key, value in here.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert (value - there[key]).abs().max() <= 1e-5 * scale, f"normalizer.ckpt:{key}"
    reports = [json.loads(p.build_report.read_text()) for p in (paths, other)]
    for key in ("lm_valid", "domain_lm_valid"):
        assert reports[1][key]["perplexity"] == pytest.approx(
            reports[0][key]["perplexity"], rel=0.05
        ), key
    done, _ = run_recipe(
        "--debug",
        "--artifacts",
        str(root),
        "--output_folder",
        str(tmp_path / "out"),
        env=_other_kernels(),
    )
    # The run checks itself against the expectation: exit 0 means it passed.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Regression check: passed against {EXPECTED.name}" in done.stdout


def test_the_check_names_what_moved_and_by_how_much(debug_run):
    results = debug_run["results"]
    digests = regression.file_digests(debug_run["paths"].model_dir / "manifest.json")
    stored = regression.expectation(results, digests)
    assert regression.check(results, digests, stored) == []

    within = copy.deepcopy(results)
    within["losses"][0]["train_loss"] *= 1 + 1e-6
    within["losses"][-1]["test_loss"] *= 1 + 1e-4
    assert regression.check(within, digests, stored) == []

    drifted = copy.deepcopy(results)
    drifted["losses"][1]["valid_loss"] *= 1.01
    for uid in drifted["test_utterances"][:9]:
        drifted["transcripts"][uid] += " EXTRA"
    drifted["wer"]["WER"] += 20
    problems = regression.check(drifted, digests, stored)
    assert any(
        p.startswith("[fine-tuning step] losses[1].valid_loss moved by +1.00e-02 relative")
        for p in problems
    ), problems
    n = len(results["test_utterances"])
    need = math.ceil(regression.MIN_IDENTICAL_TRANSCRIPTS * n)
    assert (
        f"[decoding] transcripts: {n - 9} of {n} identical to the stored ones (at least {need})"
        in problems
    )
    assert any(
        p.startswith("[decoding] WER against the references moved by +20.00 points")
        for p in problems
    )

    other_bytes = {**digests, "tokenizer.ckpt": "0" * 64, "asr.ckpt": "1" * 64}
    problems = regression.check(results, other_bytes, stored)
    assert problems == [
        f"[fetching/loading] tokenizer.ckpt: its bytes changed (sha256 {digests['tokenizer.ckpt'][:12]} -> 000000000000)"
    ]
    assert "asr.ckpt" in regression.information(other_bytes, stored)

    fewer = copy.deepcopy(results)
    fewer["losses"].pop()
    assert (
        f"[fine-tuning step] losses: expected {len(results['losses'])} entries,"
        f" got {len(fewer['losses'])}"
    ) in (regression.check(fewer, digests, stored))


@pytest.mark.parametrize(
    "case",
    [
        "missing_repo",
        "missing_url_file",
        "unreachable_url",
        "local_folder_without_file",
        "missing_local_folder",
    ],
)
def test_a_wrong_source_fails_with_the_fetching_error(case, tiny_build, tmp_path):
    override, expected = {
        "missing_repo": (
            ["--asr_repo_id", "synthspeech/no-such-repo"],
            "Cannot fetch 'hyperparams.yaml' from Hugging Face Hub repo 'synthspeech/no-such-repo'",
        ),
        "missing_url_file": (
            ["--lm_file", "no-such-lm.ckpt"],
            "Cannot fetch 'no-such-lm.ckpt' from URL http://127.0.0.1:",
        ),
        "unreachable_url": (
            [
                "--tokenizer_source",
                f"http://127.0.0.1:{unused_loopback_port()}/models/tokenizer.ckpt",
            ],
            "Cannot fetch 'tokenizer.ckpt' from URL http://127.0.0.1:",
        ),
        "local_folder_without_file": (
            ["--normalizer_source", str(tmp_path / "normalizer.ckpt")],
            f"Cannot fetch 'normalizer.ckpt' from local folder '{tmp_path}'",
        ),
        "missing_local_folder": (  # not a Hub repo id, though SpeechBrain would take it for one
            ["--lm_source", str(tmp_path / "missing" / "path" / "lm.ckpt")],
            f"Cannot fetch 'lm.ckpt' from local folder '{tmp_path / 'missing' / 'path'}'",
        ),
    }[case]
    reason = {
        "missing_repo": "repository not found",
        "missing_url_file": "file not found on the server (HTTP 404)",
        "unreachable_url": "the server is unreachable (connection refused",
        "local_folder_without_file": "no such file in the folder",
        "missing_local_folder": "no such folder",
    }[case]
    done, _ = run_recipe("--output_folder", str(tmp_path / "out"), *override, timeout=300)
    assert done.returncode == FETCH_FAILED, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("FETCH FAILED: ")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert expected in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_an_unbuilt_profile_is_reported(tmp_path):
    done, _ = run_recipe(
        "--artifacts",
        str(tmp_path / "nothing"),
        "--output_folder",
        str(tmp_path / "out"),
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "CANNOT RUN: Nothing to serve" in done.stderr
    assert "python -m sbtemplate.build --profile tiny" in done.stderr
    assert "Traceback" not in done.stderr


def test_semantics_serialisation_round_trips():
    semantics = {
        "intent": "convert_units",
        "slots": {"to": "kilometers", "amount": "ninety five", "from": "miles"},
    }
    text = serialize_semantics(semantics)
    assert text == "convert_units | amount = ninety five | from = miles | to = kilometers"
    assert parse_semantics(text) == semantics
    assert serialize_semantics({"intent": "cancel_timer", "slots": {}}) == "cancel_timer"
    for malformed in ("", "| =", "set_timer | duration", "set_timer | = ten", "a b | x = y"):
        assert parse_semantics(malformed) is None


def test_a_busy_output_folder_is_refused_untouched(tiny_build, tmp_path):
    """Another run holds the folder (here: this test process): the recipe
    stops within seconds, names the holder and writes nothing there."""
    out = tmp_path / "out"
    hold_output_folder(out)
    try:
        started = time.monotonic()
        done, _ = run_recipe("--output_folder", str(out), timeout=300)
    finally:
        release_output_folder(out)
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        f"CANNOT RUN: output folder {out.resolve()} is in use by pid {os.getpid()} on "
        in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert [p for p in out.rglob("*") if p.is_file()] == [out / ".run.lock"]  # nothing written
    assert time.monotonic() - started < 60
