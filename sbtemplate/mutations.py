"""Mutation harness: would the project's commands notice a regressed SpeechBrain?

Before trusting a SpeechBrain upgrade, plant known one-line regressions in a
copy of the installed package and see which of the three used-by commands go
red (exit status other than 0)::

    python -m sbtemplate.build --profile tiny      # once
    python -m sbtemplate.mutations                 # every mutant, every command
    python -m sbtemplate.mutations --list
    python -m sbtemplate.mutations --mutants lm_scores_zeroed --commands debug

Each mutant is applied to a fresh copy of the package found by
``importlib.util.find_spec("speechbrain")``; the copy goes first on
``PYTHONPATH`` (the installed files are never touched). The commands run on the
``tiny`` profile, each run in its own output folders and fetch caches under
``results/mutations/<run>/<mutant>/<command>/`` (stdout/stderr captured there),
so a mutant cannot leave state behind for the next. An unmutated copy (the
control) runs first on the same overlay: if it is red, every "kill" would be
meaningless and the harness stops with a non-zero status. A command that runs
past ``--timeout`` is "hung", a miss, not a detection.

The harness reports, it does not judge: ``table.md`` and ``results.json`` in
the out folder say which mutants each command detects; a mutant that no
command detects names a check the project lacks. Exit status 0 when the control
is green, 1 when it is red, 2 when the run cannot start (profile not built, a
mutant whose snippet no longer matches the installed SpeechBrain).

The mutants are data (:data:`MUTANTS`): add one with the exact snippet of the
installed file and its replacement. Every snippet must occur exactly once in
its file, or applying it fails naming the mutant: the SpeechBrain version
changed and the mutant needs updating (no silent no-op mutants).
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sbtemplate.paths import PROJECT_ROOT, ProfilePaths

SEAMS = (
    "fetching/loading",
    "LM in decoding",
    "scoring",
    "fine-tuning step",
    "checkpoint/resume",
    "audio/data",
    "samplers/DDP",
)


@dataclass(frozen=True)
class Mutant:
    """One planted regression: ``original`` (exact, once in ``file``) becomes ``replacement``.

    ``file`` is relative to the speechbrain package folder.
    """

    name: str
    seam: str
    file: str
    original: str
    replacement: str
    description: str


# Every snippet below is code the three commands execute on the tiny profile
# (checked by tracing the unmutated runs). Mutants that were tried and removed
# because nothing observable changes on these commands:
# * torch_recovery loading nothing / strict=False, Checkpointer meta dropped:
#   the runs improve every epoch, so the checkpoint recovered for evaluation
#   holds the weights already in memory;
# * get_rank reading LOCAL_RANK before RANK: equal on one node;
# * update_learning_rate ignoring the new lr: NewBob never anneals on these
#   runs (see newbob_anneals_on_improvement for a mutant that makes it);
# * DynamicBatchSampler seeding without the epoch: sbtemplate plans the
#   batches with its own per-epoch seed;
# * RNNLMScorer temperature ignored: the temperature is 1;
# * SER counting every sentence as wrong: the tiny recognizer gets every
#   sentence wrong already.
MUTANTS = [
    # -- fetching/loading ---------------------------------------------------
    Mutant(
        "pretrainer_skips_lm",
        "fetching/loading",
        "utils/parameter_transfer.py",
        "            if not self.is_loadable(name):\n"
        "                continue\n"
        "            loadpath = paramfiles[name]",
        '            if not self.is_loadable(name) or name == "lm":\n'
        "                continue\n"
        "            loadpath = paramfiles[name]",
        "Pretrainer.load_collected skips the `lm` loadable: the LM keeps its random init",
    ),
    Mutant(
        "pretrainer_ignores_paths",
        "fetching/loading",
        "utils/parameter_transfer.py",
        "            if name in self.paths:\n"
        "                source, filename = self.split_path(self.paths[name])",
        "            if name in self.paths and default_source is None:\n"
        "                source, filename = self.split_path(self.paths[name])",
        "from_hparams ignores the pretrainer `paths` overrides: every file comes from the default source",
    ),
    Mutant(
        "fetch_wrong_file",
        "fetching/loading",
        "utils/fetching.py",
        '    source_path = f"{source}/{filename}"',
        '    source_path = f"{source}/{save_filename}"',
        "fetch of a local/URL source takes the save name instead of the requested file name",
    ),
    Mutant(
        "transfer_key_rule_too_broad",
        "fetching/loading",
        "utils/checkpoints.py",
        '    ".convs_intermedite": ".convs_intermediate",',
        '    ".convs_intermedite": ".convs_intermediate", ".norm.": ".normalization.",',
        "a key-renaming compatibility rule matches too much: normalisation layers are left unloaded (a warning only)",
    ),
    # -- LM in decoding -----------------------------------------------------
    Mutant(
        "lm_scores_zeroed",
        "LM in decoding",
        "decoders/scorer.py",
        "            logits, hs = self.lm(inp_tokens, hx=memory)\n"
        "            log_probs = self.softmax(logits / self.temperature)",
        "            logits, hs = self.lm(inp_tokens, hx=memory)\n"
        "            log_probs = self.softmax(logits / self.temperature) * 0.0",
        "RNNLMScorer's log-probabilities multiplied by zero: the beam search ignores the LM",
    ),
    Mutant(
        "lm_state_reset",
        "LM in decoding",
        "decoders/scorer.py",
        "            logits, hs = self.lm(inp_tokens, hx=memory)",
        "            logits, hs = self.lm(inp_tokens, hx=None)",
        "RNNLMScorer drops the LM's recurrent state: every step scores from an empty history",
    ),
    Mutant(
        "lm_cell_state_not_permuted",
        "LM in decoding",
        "decoders/scorer.py",
        "            memory_1 = torch.index_select(memory[1], dim=1, index=index)",
        "            memory_1 = memory[1]",
        "RNNLMScorer reorders the LSTM hidden state with the surviving beams but not the cell state",
    ),
    Mutant(
        "full_scorer_weights_ignored",
        "LM in decoding",
        "decoders/scorer.py",
        "            score, new_memory[k] = impl.score(inp_tokens, memory[k], None, attn)\n"
        "            log_probs += score * self.weights[k]",
        "            score, new_memory[k] = impl.score(inp_tokens, memory[k], None, attn)\n"
        "            log_probs += score",
        "ScorerBuilder adds full scorers (RNNLM, coverage) unweighted: lm_weight acts as 1.0",
    ),
    Mutant(
        "ctc_weight_ignored",
        "LM in decoding",
        "decoders/scorer.py",
        "                inp_tokens, memory[k], candidates, attn\n"
        "            )\n"
        "            log_probs += score * self.weights[k]",
        "                inp_tokens, memory[k], candidates, attn\n"
        "            )\n"
        "            log_probs += score",
        "ScorerBuilder adds partial scorers (CTC) unweighted: ctc_weight_decode acts as 1.0",
    ),
    Mutant(
        "attention_weight_not_reduced",
        "LM in decoding",
        "decoders/seq2seq.py",
        "                self.attn_weight = 1.0 - self.ctc_weight",
        "                self.attn_weight = 1.0",
        "the beam searcher keeps the attention decoder at full weight when CTC joins",
    ),
    Mutant(
        "eos_threshold_inverted",
        "LM in decoding",
        "decoders/seq2seq.py",
        "        cond = eos_probs > (self.eos_threshold * max_probs)",
        "        cond = eos_probs < (self.eos_threshold * max_probs)",
        "the EOS threshold test is inverted: hypotheses end when EOS is unlikely",
    ),
    Mutant(
        "hypotheses_keep_eos",
        "LM in decoding",
        "decoders/seq2seq.py",
        "        top_lengths = (top_lengths - 1) / top_hyps.size(1)",
        "        top_lengths = top_lengths / top_hyps.size(1)",
        "the beam searcher's hypothesis lengths include the EOS token",
    ),
    # -- scoring --------------------------------------------------------------
    Mutant(
        "wer_divides_by_words_and_sentences",
        "scoring",
        "utils/edit_distance.py",
        "        WER = 100.0 * num_edits / num_scored_tokens",
        "        WER = 100.0 * num_edits / (num_scored_tokens + num_scored_sents)",
        "wer_summary divides the edits by words + sentences: every WER comes out too low",
    ),
    Mutant(
        "substitution_counts_twice",
        "scoring",
        "utils/edit_distance.py",
        '                    edits["substitutions"] += 1',
        '                    edits["substitutions"] += 2',
        "count_ops counts a substitution as two edits",
    ),
    Mutant(
        "leading_deletions_ignored",
        "scoring",
        "utils/edit_distance.py",
        '        elif j == 0:\n            edits["deletions"] += 1',
        '        elif j == 0:\n            edits["deletions"] += 0',
        "count_ops does not count deletions before the first hypothesis word",
    ),
    Mutant(
        "ref_hyp_swapped",
        "scoring",
        "utils/metric_stats.py",
        "        scores = wer_details_for_batch(\n            ids,\n            target,\n            predict,",
        "        scores = wer_details_for_batch(\n            ids,\n            predict,\n            target,",
        "ErrorRateStats scores the reference against the hypothesis (insertions and deletions swapped, WER over hypothesis words)",
    ),
    # -- fine-tuning step -----------------------------------------------------
    Mutant(
        "gradients_not_zeroed",
        "fine-tuning step",
        "core.py",
        "        for opt in valid_optimizers.values():\n            opt.zero_grad(set_to_none=True)",
        "        for opt in valid_optimizers.values():\n            pass",
        "Brain stops zeroing gradients after an optimizer step: they accumulate over the epoch",
    ),
    Mutant(
        "optimizer_never_steps",
        "fine-tuning step",
        "core.py",
        "        should_step = (self.step % self.grad_accumulation_factor) == 0",
        "        should_step = (self.step % self.grad_accumulation_factor) == 1",
        "gradient accumulation off by one: with a factor of 1 the optimizer never steps",
    ),
    Mutant(
        "newbob_anneals_on_improvement",
        "fine-tuning step",
        "nnet/schedulers.py",
        "            if improvement < self.improvement_threshold:\n"
        "                if self.current_patient == 0:\n"
        "                    new_value *= self.annealing_factor",
        "            if improvement > self.improvement_threshold:\n"
        "                if self.current_patient == 0:\n"
        "                    new_value *= self.annealing_factor",
        "NewBobScheduler anneals the learning rate while the metric improves",
    ),
    Mutant(
        "validation_in_train_mode",
        "fine-tuning step",
        "core.py",
        "            self.modules.eval()\n            avg_valid_loss = 0.0",
        "            self.modules.train()\n            avg_valid_loss = 0.0",
        "Brain validates with the modules in train mode (dropout on)",
    ),
    Mutant(
        "label_smoothing_ignored",
        "fine-tuning step",
        "nnet/losses.py",
        "        return -label_smoothing * loss_reg + (1 - label_smoothing) * loss",
        "        return loss",
        "nll_loss ignores label_smoothing",
    ),
    Mutant(
        "one_epoch_too_many",
        "fine-tuning step",
        "utils/epoch_loop.py",
        "        if self.current < self.limit:",
        "        if self.current <= self.limit:",
        "EpochCounter runs one epoch more than its limit",
    ),
    # -- checkpoint/resume ----------------------------------------------------
    Mutant(
        "min_key_picks_max",
        "checkpoint/resume",
        "utils/checkpoints.py",
        "                return -ckpt.meta[min_key]",
        "                return ckpt.meta[min_key]",
        "Checkpointer ranks min_key checkpoints by the largest value: keeps and recovers the worst",
    ),
    Mutant(
        "keep_only_deletes_protected",
        "checkpoint/resume",
        "utils/checkpoints.py",
        "            if ckpt not in protected_checkpoints:",
        "            if ckpt in protected_checkpoints:",
        "Checkpointer.delete_checkpoints deletes the checkpoints it should keep",
    ),
    # -- audio/data -----------------------------------------------------------
    Mutant(
        "read_audio_scaled",
        "audio/data",
        "dataio/dataio.py",
        "    audio = audio.transpose(0, 1)\n    return audio.squeeze(1)",
        "    audio = audio.transpose(0, 1)\n    return audio.squeeze(1) * 0.5",
        "read_audio returns the signal at half amplitude",
    ),
    Mutant(
        "read_audio_truncated",
        "audio/data",
        "dataio/dataio.py",
        "    audio = audio.transpose(0, 1)\n    return audio.squeeze(1)",
        "    audio = audio.transpose(0, 1)\n    return audio.squeeze(1)[: audio.shape[0] * 9 // 10]",
        "read_audio drops the last tenth of the signal",
    ),
    Mutant(
        "length_mask_off_by_one",
        "audio/data",
        "dataio/dataio.py",
        "    ).expand(len(length), max_len) < length.unsqueeze(1)",
        "    ).expand(len(length), max_len) <= length.unsqueeze(1)",
        "length_to_mask marks one padding position as valid",
    ),
    Mutant(
        "relative_lengths_all_one",
        "audio/data",
        "utils/data_utils.py",
        "        valid_vals.append(tensor.shape[j] / target_shape[j])",
        "        valid_vals.append(1.0)",
        "pad_right_to (PaddedBatch) reports every relative length as 1.0: padding is taken as data",
    ),
    Mutant(
        "undo_padding_floors",
        "audio/data",
        "utils/data_utils.py",
        "        actual_size = int(torch.round(seq_length * batch_max_len))",
        "        actual_size = int(seq_length * batch_max_len)",
        "undo_padding truncates instead of rounding: a float error drops the last token",
    ),
    Mutant(
        "normalizer_not_applied",
        "audio/data",
        "processing/features.py",
        "        return (x - mean) / std.clamp(min=self.epsilon)",
        "        return x",
        "InputNormalization returns its input unnormalised",
    ),
    Mutant(
        "decode_drops_last_piece",
        "audio/data",
        "inference/ASR.py",
        "                self.tokenizer.decode_ids(token_seq)\n                for token_seq in predicted_tokens",
        "                self.tokenizer.decode_ids(token_seq[:-1])\n                for token_seq in predicted_tokens",
        "EncoderDecoderASR.transcribe_batch decodes every hypothesis without its last token",
    ),
    # -- samplers/DDP ---------------------------------------------------------
    Mutant(
        "dynamic_batches_drop_last",
        "samplers/DDP",
        "dataio/sampler.py",
        "        if not self._drop_last:",
        "        if self._drop_last:",
        "DynamicBatchSampler drops the incomplete batch of every bucket",
    ),
    Mutant(
        "dynamic_batches_overfilled",
        "samplers/DDP",
        "dataio/sampler.py",
        "                len(bucket_batches[bucket_id]) >= self._bucket_lens[bucket_id]",
        "                len(bucket_batches[bucket_id]) > self._bucket_lens[bucket_id]",
        "DynamicBatchSampler closes a batch one example late: batches exceed max_batch_length",
    ),
    Mutant(
        "shuffle_same_every_epoch",
        "samplers/DDP",
        "dataio/sampler.py",
        "        self.generator.manual_seed(self.seed + self.epoch)\n"
        "        return super().__iter__()\n\n\nclass ReproducibleWeightedRandomSampler",
        "        self.generator.manual_seed(self.seed)\n"
        "        return super().__iter__()\n\n\nclass ReproducibleWeightedRandomSampler",
        "ReproducibleRandomSampler shuffles identically every epoch",
    ),
    Mutant(
        "every_rank_is_main",
        "samplers/DDP",
        "utils/distributed.py",
        "    return not is_distributed_initialized() or get_rank() == 0",
        "    return not is_distributed_initialized() or get_rank() is not None",
        "if_main_process is true on every rank: main-only work (saving, logging) runs on all ranks",
    ),
]

# name -> (argv after the interpreter, YAML keys given a fresh folder each run)
COMMANDS = {
    "single_node": (
        ["single_node_pretrained.py", "single_node_pretrained.yaml"],
        {"cache_dir": "fetch-cache", "savedir": "savedir"},
    ),
    "debug": (
        ["multisource_mini_recipe.py", "multisource_mini_recipe.yaml", "--debug"],
        {"output_folder": "output", "fetch_cache": "fetch-cache"},
    ),
    "finetune": (
        ["finetune.py", "finetune.yaml"],
        {
            "output_folder": "output",
            "fetch_cache": "fetch-cache",
            "pretrained_folder": "pretrained",
        },
    ),
}
# Cheapest first, so that --stop-at-first-red saves the most.
COMMAND_ORDER = ("single_node", "debug", "finetune")
PROFILE = "tiny"
PROFILE_OVERRIDE = f"--build_profile=!include:sbtemplate/hparams/profiles/{PROFILE}.yaml"
DEFAULT_TIMEOUT_S = 600
CONTROL = "control"

# A stderr line that says what went wrong (the scripts' own one-liners, an
# exception's last line). torchrun's report of a failed worker starts at its
# agent's "failed (exitcode" line: its traceback and "<script> FAILED" are
# not the message.
_MESSAGE = re.compile(r"\b(ERROR|FAILED|CANNOT RUN|REGRESSION)\b|^\s*[\w.]*(Error|Exception)\b")
_LAUNCHER_REPORT = re.compile(
    r"elastic/multiprocessing/api\.py.*failed \(exitcode|ChildFailedError"
)


class MutantError(ValueError):
    """A mutant does not apply to the installed SpeechBrain (its snippet is missing or ambiguous)."""


@dataclass
class CommandResult:
    """How one command ended on one mutant: ``green``, ``red``, ``hung`` or ``skipped``."""

    status: str
    returncode: int = None
    seconds: float = 0.0
    message: str = ""
    folder: str = ""


@dataclass
class MutantResult:
    """One mutant's (or the control's) results, command by command."""

    name: str
    seam: str
    file: str
    description: str
    commands: dict = field(default_factory=dict)

    @property
    def detected(self):
        """True when a command went red (a hung command is a miss)."""
        return any(r.status == "red" for r in self.commands.values())


def speechbrain_dir():
    """The installed speechbrain package folder (what the mutants are copied from)."""
    spec = importlib.util.find_spec("speechbrain")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("speechbrain is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0])


def check_mutant(mutant, package_dir):
    """Raise :class:`MutantError` unless ``mutant.original`` occurs exactly once in its file."""
    path = Path(package_dir) / mutant.file
    if not path.is_file():
        raise MutantError(
            f"mutant {mutant.name}: {mutant.file} is not in {package_dir} "
            "(the SpeechBrain version changed; update the mutant)"
        )
    count = path.read_text(encoding="utf-8").count(mutant.original)
    if count != 1:
        found = "does not occur" if count == 0 else f"occurs {count} times"
        raise MutantError(
            f"mutant {mutant.name}: the snippet {mutant.original!r} {found} in {mutant.file} "
            "(the SpeechBrain version changed; update the mutant)"
        )


def make_overlay(root, package_dir, mutant=None):
    """Copy the speechbrain package into ``root/speechbrain`` and apply ``mutant`` (None: the control).

    Returns ``root``, the folder to put first on PYTHONPATH. The installed
    package is only read.
    """
    package_dir = Path(package_dir)
    if mutant is not None:
        check_mutant(mutant, package_dir)
    root = Path(root)
    target = root / "speechbrain"
    if target.exists():
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(package_dir, target, symlinks=True)
    if mutant is not None:
        path = target / mutant.file
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(mutant.original, mutant.replacement), encoding="utf-8")
        # The copied bytecode of the old source must not be used.
        for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            cached.unlink()
    return root


def overlay_env(overlay_root, run_dir):
    """The environment of one command: the overlay first on PYTHONPATH, caches in ``run_dir``."""
    env = dict(os.environ)
    paths = [str(Path(overlay_root).resolve())]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["SBTEMPLATE_FETCH_CACHE"] = str(run_dir / "fetch-cache")
    env["HF_HOME"] = str(run_dir / "hf-home")
    env["TMPDIR"] = str(run_dir / "tmp")
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_argv(name, run_dir):
    """The argv of command ``name`` writing everything under ``run_dir``."""
    script, folders = COMMANDS[name]
    python = Path(sys.executable)
    if name == "finetune":
        # Its own rendezvous port: never the default one another job may hold.
        launcher = [
            str(python.with_name("torchrun")),
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
        ]
    else:
        launcher = [str(python)]
    isolation = [f"--{key}={run_dir / sub}" for key, sub in folders.items()]
    return launcher + script + [PROFILE_OVERRIDE] + isolation


def _message_line(text):
    """The last line of ``text`` naming an error (before torchrun's own report), or None."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    report = next((i for i, line in enumerate(lines) if _LAUNCHER_REPORT.search(line)), None)
    if report:
        lines = lines[:report]
    return next((line[:300] for line in reversed(lines) if _MESSAGE.search(line)), None)


def red_message(stderr_text, stdout_text=""):
    """The one-line message of a red command.

    The last stderr line naming an error; else stdout's (SpeechBrain's
    experiment logger prints an uncaught exception there); else the last
    stderr line.
    """
    found = _message_line(stderr_text) or _message_line(stdout_text)
    if found:
        return found
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no stderr)"


def _kill_group(proc):
    """Stop the whole process group (torchrun's workers too): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(name, run_dir, overlay_root, timeout):
    """Run one command on one overlay; its output goes to ``run_dir/{stdout,stderr}.txt``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = command_argv(name, run_dir)
    (run_dir / "command.txt").write_text(" ".join(argv) + "\n")
    env = overlay_env(overlay_root, run_dir)
    started = time.monotonic()
    with open(run_dir / "stdout.txt", "wb") as out, open(run_dir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            argv, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return CommandResult(
                "hung",
                None,
                round(time.monotonic() - started, 1),
                f"timed out after {timeout} s",
                str(run_dir),
            )
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    seconds = round(time.monotonic() - started, 1)
    if rc == 0:
        return CommandResult("green", 0, seconds, "", str(run_dir))
    stderr, stdout = (
        (run_dir / stream).read_text(encoding="utf-8", errors="replace")
        for stream in ("stderr.txt", "stdout.txt")
    )
    return CommandResult("red", rc, seconds, red_message(stderr, stdout), str(run_dir))


def check_overlay_used(overlay_root, scratch):
    """Fail loudly when the overlay copy is not the speechbrain the commands import."""
    env = overlay_env(overlay_root, scratch)
    found = subprocess.run(
        [sys.executable, "-c", "import speechbrain, sys; sys.stdout.write(speechbrain.__file__)"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(Path(overlay_root).resolve()):
        raise SystemExit(
            f"the overlay is not used: the commands import speechbrain from {found}, "
            f"not from {overlay_root}"
        )


def run_mutant(mutant, out, package_dir, commands, timeout, stop_at_first_red, progress):
    """Apply ``mutant`` (None: the control) to a fresh copy and run ``commands`` on it."""
    name = CONTROL if mutant is None else mutant.name
    folder = out / name
    overlay = make_overlay(folder / "overlay", package_dir, mutant)
    if mutant is None:
        check_overlay_used(overlay, folder)
    else:
        (folder / "mutant.json").write_text(json.dumps(asdict(mutant), indent=1) + "\n")
    result = MutantResult(
        name,
        "-" if mutant is None else mutant.seam,
        "-" if mutant is None else mutant.file,
        "no change" if mutant is None else mutant.description,
    )
    try:
        for command in commands:
            if stop_at_first_red and result.detected:
                result.commands[command] = CommandResult("skipped")
                continue
            progress(f"{command} ...")
            outcome = run_command(command, folder / command, overlay, timeout)
            result.commands[command] = outcome
            note = f": {outcome.message}" if outcome.message else ""
            progress(f"{command} {outcome.status} in {outcome.seconds:.1f} s{note}")
    finally:
        shutil.rmtree(overlay, ignore_errors=True)
    return result


def summary(results):
    """Detected count, share and per-seam counts of the mutants' results."""
    per_seam = {}
    for r in results:
        seen = per_seam.setdefault(r.seam, [0, 0])
        seen[0] += r.detected
        seen[1] += 1
    detected = sum(r.detected for r in results)
    return {
        "detected": detected,
        "total": len(results),
        "share": detected / len(results) if results else 0.0,
        "per_seam": {seam: {"detected": d, "total": t} for seam, (d, t) in per_seam.items()},
    }


def _cell(outcome):
    if outcome is None:
        return "-"
    if outcome.status in ("green", "skipped"):
        return outcome.status
    return f"**{outcome.status}** ({outcome.seconds:.0f} s)"


def markdown_table(results, commands):
    """The results as a markdown table: one row per mutant, one column per command."""
    head = ["mutant", "seam", *commands, "detected", "message of each red command"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        messages = "; ".join(
            f"{c}: {o.message}".replace("|", "\\|")
            for c, o in r.commands.items()
            if o.status in ("red", "hung")
        )
        cells = [r.name, r.seam, *(_cell(r.commands.get(c)) for c in commands)]
        cells += ["yes" if r.detected else "no", messages]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_text(stats):
    """Summary lines: detected / total, share, per seam."""
    lines = [
        f"Detected {stats['detected']} / {stats['total']} mutants "
        f"({100 * stats['share']:.0f}%), a red command counting as a detection."
    ]
    for seam in SEAMS:
        if seam in stats["per_seam"]:
            s = stats["per_seam"][seam]
            lines.append(f"  {seam}: {s['detected']} / {s['total']}")
    return "\n".join(lines)


def write_report(out, control, results, commands, meta):
    """Write ``table.md`` and ``results.json`` into ``out``; return the table's text."""
    stats = summary(results)
    parts = [f"# Mutation run: SpeechBrain {meta['speechbrain_version']}, profile {PROFILE}", ""]
    if control is not None:
        parts += ["Control (unmutated copy):", "", markdown_table([control], commands), ""]
    parts += [markdown_table(results, commands), "", summary_text(stats), ""]
    text = "\n".join(parts)
    (out / "table.md").write_text(text)

    def as_dict(r):
        return {
            "name": r.name,
            "seam": r.seam,
            "file": r.file,
            "description": r.description,
            "detected": r.detected,
            "commands": {c: asdict(o) for c, o in r.commands.items()},
        }

    payload = {
        **meta,
        "commands": list(commands),
        "control": None if control is None else as_dict(control),
        "mutants": [as_dict(r) for r in results],
        "summary": stats,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    return text


def select_mutants(names):
    """The mutants named (all of them for None); an unknown name is a SystemExit naming it."""
    if not names:
        return list(MUTANTS)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
    return [by_name[n] for n in names]


def list_mutants():
    """Print the mutants, grouped by seam."""
    for seam in SEAMS:
        print(f"{seam}:")
        for m in MUTANTS:
            if m.seam == seam:
                print(f"  {m.name:36s} {m.file:30s} {m.description}")


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m sbtemplate.mutations",
        description="Plant one-line regressions in a copy of SpeechBrain and see which commands notice.",
    )
    parser.add_argument("--mutants", nargs="+", metavar="NAME", help="only these (default: all)")
    parser.add_argument(
        "--commands", nargs="+", choices=COMMAND_ORDER, help="only these (default: all three)"
    )
    parser.add_argument(
        "--stop-at-first-red",
        action="store_true",
        help="skip a mutant's remaining commands once one is red",
    )
    parser.add_argument("--list", action="store_true", help="print the mutants and seams")
    parser.add_argument(
        "--out", type=Path, help="results folder (default: results/mutations/<date-time>)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per command before it counts as hung (default {DEFAULT_TIMEOUT_S})",
    )
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the unmutated copy first; it must be green (default: on)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Run the harness; exit status 0 when the control is green, 1 when red, 2 when it cannot start."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        list_mutants()
        return 0
    mutants = select_mutants(args.mutants)
    commands = [c for c in COMMAND_ORDER if c in (args.commands or COMMAND_ORDER)]
    if not (ProfilePaths.for_profile(PROFILE).model_dir / "hyperparams.yaml").is_file():
        print(
            f"The {PROFILE} profile is not built: run `python -m sbtemplate.build --profile {PROFILE}` first",
            file=sys.stderr,
        )
        return 2
    package_dir = speechbrain_dir()
    try:
        for mutant in mutants:
            check_mutant(mutant, package_dir)
    except MutantError as error:
        print(f"CANNOT RUN: {error}", file=sys.stderr)
        return 2
    out = args.out or PROJECT_ROOT / "results" / "mutations" / time.strftime("%Y%m%d-%H%M%S")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "speechbrain_version": (package_dir / "version.txt").read_text().strip()
        if (package_dir / "version.txt").is_file()
        else "unknown",
        "speechbrain_package": str(package_dir),
        "profile": PROFILE,
        "timeout_s": args.timeout,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"Mutation run: {len(mutants)} mutants x {', '.join(commands)}; results in {out}")

    def progress_for(label):
        start = time.monotonic()

        def progress(text):
            print(f"[{label}] {time.monotonic() - start:6.1f} s  {text}", flush=True)

        return progress

    control = None
    if args.control:
        control = run_mutant(
            None, out, package_dir, commands, args.timeout, False, progress_for(CONTROL)
        )
        bad = {c: o for c, o in control.commands.items() if o.status != "green"}
        if bad:
            write_report(out, control, [], commands, meta)
            details = "; ".join(f"{c} {o.status}: {o.message}" for c, o in bad.items())
            print(
                f"CONTROL RED: the unmutated copy fails ({details}). Every 'kill' would be "
                f"meaningless; fix the commands first (logs in {out / CONTROL}).",
                file=sys.stderr,
            )
            return 1
    results = []
    for i, mutant in enumerate(mutants, 1):
        results.append(
            run_mutant(
                mutant,
                out,
                package_dir,
                commands,
                args.timeout,
                args.stop_at_first_red,
                progress_for(f"{i}/{len(mutants)} {mutant.name}"),
            )
        )
        write_report(out, control, results, commands, meta)  # a partial table survives a stop
    text = write_report(out, control, results, commands, meta)
    print()
    print(text)
    print(f"Table: {out / 'table.md'}; details: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
