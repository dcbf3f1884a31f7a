"""The mutation harness (sbtemplate.mutations).

Its mutants must still apply to the installed SpeechBrain (a snippet that no
longer matches would make a silent no-op mutant), applying one must never
touch the installed package, a hung command must not leave workers behind,
and one mutant run end to end must go red with a message that names its seam.
"""

import hashlib
import json
import os
import sys
import time

import pytest

from sbtemplate import mutations
from sbtemplate.mutations import (
    MUTANTS,
    SEAMS,
    Mutant,
    MutantError,
    check_mutant,
    make_overlay,
    red_message,
    speechbrain_dir,
)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mutants_are_many_uniquely_named_and_on_known_seams():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    assert len(MUTANTS) >= 20
    assert {m.seam for m in MUTANTS} <= set(SEAMS)
    assert len({m.seam for m in MUTANTS}) >= 6
    assert all(m.original != m.replacement for m in MUTANTS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_snippet_occurs_once_in_the_installed_speechbrain(mutant):
    check_mutant(mutant, speechbrain_dir())


def test_applying_writes_a_copy_and_leaves_the_installed_package_unchanged(tmp_path):
    mutant = next(m for m in MUTANTS if m.name == "lm_scores_zeroed")
    package = speechbrain_dir()
    before = _digest(package / mutant.file)
    root = make_overlay(tmp_path / "overlay", package, mutant)
    mutated = (root / "speechbrain" / mutant.file).read_text(encoding="utf-8")
    installed = (package / mutant.file).read_text(encoding="utf-8")
    assert mutated == installed.replace(mutant.original, mutant.replacement) != installed
    assert _digest(package / mutant.file) == before
    # The rest of the copy is the installed package as it is.
    assert _digest(root / "speechbrain" / "core.py") == _digest(package / "core.py")


def test_a_snippet_not_in_the_file_is_an_error_naming_mutant_file_and_snippet(tmp_path):
    missing = Mutant("bogus_mutant", "scoring", "utils/edit_distance.py", "no such line", "x", "")
    with pytest.raises(MutantError, match="bogus_mutant") as error:
        make_overlay(tmp_path / "overlay", speechbrain_dir(), missing)
    assert "utils/edit_distance.py" in str(error.value)
    assert "no such line" in str(error.value)
    assert not (tmp_path / "overlay").exists()
    ambiguous = Mutant("twice", "scoring", "utils/edit_distance.py", "import ", "x", "")
    with pytest.raises(MutantError, match=r"twice: .* occurs \d+ times"):
        check_mutant(ambiguous, speechbrain_dir())


def test_red_message_is_the_line_naming_the_error_not_torchruns_epilogue():
    stderr = "\n".join(
        [
            "Traceback (most recent call last):",
            '  File "finetune.py", line 1, in <module>',
            "RuntimeError: epoch 2: the ranks' LM weights differ",
            "E1207 12:00:00.66 9863 torch/distributed/elastic/multiprocessing/api.py:1002] "
            "failed (exitcode: 1) local_rank: 0 (pid: 9925) of binary: python",
            "Traceback (most recent call last):",
            '  File "torchrun", line 6, in <module>',
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
            "============================================================",
            "finetune.py FAILED",
            "[0]:",
            "  exitcode  : 1 (pid: 9925)",
            "",
        ]
    )
    assert red_message(stderr) == "RuntimeError: epoch 2: the ranks' LM weights differ"
    assert red_message("a warning\nCANNOT RUN: no profile\nbye\n") == "CANNOT RUN: no profile"
    assert red_message("just this\n\n") == "just this"
    # SpeechBrain's experiment logger prints an uncaught exception on stdout.
    progress = "  0%|          | 0/2 [00:00<?, ?it/s]\n"
    assert red_message(progress, "Traceback ...\nRuntimeError: bad hidden size\n") == (
        "RuntimeError: bad hidden size"
    )


def test_a_hung_command_is_killed_with_its_children(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time;"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid));"
        "time.sleep(120)"
    )
    monkeypatch.setattr(
        mutations, "command_argv", lambda name, run_dir: [sys.executable, "-c", script]
    )
    started = time.monotonic()
    result = mutations.run_command("debug", tmp_path / "run", tmp_path, timeout=3)
    assert result.status == "hung"
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hung command's child {child} survived")


def test_an_unbuilt_profile_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SBTEMPLATE_ARTIFACTS", str(tmp_path / "nothing"))
    assert mutations.main(["--out", str(tmp_path / "out")]) == 2
    assert "python -m sbtemplate.build --profile tiny" in capsys.readouterr().err


def test_smoke_a_fetching_mutant_turns_the_debug_run_red(tiny_build, tmp_path):
    # fetch_wrong_file makes the URL fetch of lm_commands.ckpt return lm.ckpt;
    # the project's sha256 check of every fetched file must catch it. The
    # control (same overlay, no change) must be green for the kill to count.
    out = tmp_path / "out"
    status = mutations.main(
        [
            "--mutants",
            "fetch_wrong_file",
            "--commands",
            "debug",
            "--timeout",
            "300",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert results["control"]["commands"]["debug"]["status"] == "green"
    [mutant] = results["mutants"]
    debug = mutant["commands"]["debug"]
    assert debug["status"] == "red", debug
    assert "FETCH FAILED" in debug["message"] and "lm_commands.ckpt" in debug["message"]
    assert results["summary"]["detected"] == 1
    assert "fetch_wrong_file" in (out / "table.md").read_text()
    # Each run wrote into its own folders, and the overlay copy is gone.
    assert (out / "fetch_wrong_file" / "debug" / "fetch-cache").is_dir()
    assert not (out / "fetch_wrong_file" / "overlay").exists()


def test_a_red_control_stops_the_run_and_a_red_command_skips_the_rest(
    tiny_build, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(mutations, "check_overlay_used", lambda overlay, scratch: None)
    red = mutations.CommandResult("red", 1, 0.1, "FAILED: planted")
    monkeypatch.setattr(mutations, "run_command", lambda *args: red)
    argv = ["--mutants", "lm_scores_zeroed", "--commands", "single_node", "debug"]
    assert mutations.main([*argv, "--out", str(tmp_path / "a")]) == 1
    assert "CONTROL RED" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "results.json").read_text())["mutants"] == []

    out = tmp_path / "b"
    assert mutations.main([*argv, "--no-control", "--stop-at-first-red", "--out", str(out)]) == 0
    [mutant] = json.loads((out / "results.json").read_text())["mutants"]
    assert mutant["commands"]["single_node"]["status"] == "red"
    assert mutant["commands"]["debug"]["status"] == "skipped"
    assert mutant["detected"]
