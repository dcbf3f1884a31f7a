"""The ``--debug`` regression check: what must hold on any machine, and how closely.

Training in floating point is not bitwise reproducible across CPU kernels
(AVX2, AVX-512, the portable ``default`` ones, oneDNN's paths): the tiny
recognizer that the test suite builds takes another path to a model of the
same quality on another machine, which transcribes a few words differently.
So the check splits a run's results in three:

* **exact**: what does not come from float arithmetic: the fetched sources,
  the test utterances and their order, the number of epochs, and the bytes of
  the recognizer's portable files (tokenizer, ``hyperparams.yaml``, the
  example audio and its text);
* **within a band**: the numbers, each with the tolerance below. The bands
  were measured by building and running the recipe under other kernels
  (``ATEN_CPU_CAPABILITY=default``, with and without
  ``ONEDNN_MAX_CPU_ISA=SSE41``, and two decoding threads) and set several
  times wider than what moved there, and narrower than what a changed
  decoding weight or another training seed of the recognizer moves;
* **information**: the digests of the trained files (``asr.ckpt``,
  ``lm.ckpt``, ``lm_commands.ckpt``, ``normalizer.ckpt``), reported when they
  differ from those the expectation was made with, never compared.

Each problem line starts with the seam it points at (``[fetching/loading]``,
``[fine-tuning step]``, ...). The recipe's ``--debug`` run calls
:func:`check` itself and exits non-zero when a line comes back; the stored
expectations live in ``sbtemplate/expected/<recipe>_debug_<profile>.json``.
"""

import json
import math
from pathlib import Path

import torch

from sbtemplate.outcome_checks import edit_counts

EXPECTED_DIR = Path(__file__).resolve().parent / "expected"

#: Files of the published recognizer whose bytes do not depend on float
#: arithmetic (made by SentencePiece, a text template, espeak-ng).
PORTABLE_FILES = ("example.flac", "example.txt", "hyperparams.yaml", "tokenizer.ckpt")
#: Trained files: their bytes depend on the CPU's kernels and thread count.
TRAINED_FILES = ("asr.ckpt", "lm.ckpt", "lm_commands.ckpt", "normalizer.ckpt")
EXACT_KEYS = ("profile", "debug", "epochs", "test_utterances", "fetched")

#: Train and valid losses of the semantics decoder: it reads reference
#: transcripts, not the recognizer's, so only its own arithmetic can move them
#: (measured: identical under every kernel tried).
LOSS_RTOL = 1e-4
#: Test loss: the decoder's loss on the recognizer's transcripts (measured
#: under other kernels: up to 3.5e-3 relative; it moves little with the
#: transcripts, which the bands below judge).
TEST_LOSS_RTOL = 2e-2
#: Share of test transcripts that must equal the stored ones word for word
#: (measured on a recognizer rebuilt under other kernels: 11 of 16; without
#: CTC in decoding: 5 of 16).
MIN_IDENTICAL_TRANSCRIPTS = 0.5
#: Word error rate of the run's transcripts against the stored ones, in %
#: (measured on a rebuilt recognizer under other kernels: 8.9%; LM weight 3.0:
#: 16.7%; without CTC: 47.8%).
MAX_TRANSCRIPT_DRIFT = 20.0
#: WER against the references and semantic accuracy, in points (measured
#: under other kernels: 2.2 points; without CTC: 40 points).
WER_POINTS = 10.0
ACCURACY_POINTS = 12.5


def expectation_file(profile, recipe="multisource"):
    """Where the stored expectation of ``recipe``'s ``--debug`` run on ``profile`` lives."""
    return EXPECTED_DIR / f"{recipe}_debug_{profile}.json"


def file_digests(manifest_file):
    """``{file: sha256}`` from a published recognizer's ``manifest.json``."""
    manifest = json.loads(Path(manifest_file).read_text())
    return {name: entry["sha256"] for name, entry in sorted(manifest.items())}


def expectation(results, digests):
    """What is stored for a run: its results (less timings), the portable
    files' digests (compared) and the trained files' (information)."""
    return {
        **{key: value for key, value in results.items() if key != "seconds"},
        "portable_files": {name: digests[name] for name in PORTABLE_FILES},
        "trained_files": {name: digests[name] for name in TRAINED_FILES},
        "made_with": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    }


#: The seam each kind of result points at when it moved.
SEAM_OF_KEY = {
    "profile": "samplers/DDP",
    "debug": "samplers/DDP",
    "epochs": "samplers/DDP",
    "test_utterances": "audio/data",
    "fetched": "fetching/loading",
}


def check(results, digests, expected):
    """The ways a ``--debug`` run's results differ from the expectation beyond
    the tolerances above, one readable line each, starting with its seam
    (empty: the run passes)."""
    problems = []
    for name, digest in expected["portable_files"].items():
        if digests.get(name) != digest:
            problems.append(
                f"[fetching/loading] {name}: its bytes changed (sha256 {digest[:12]} -> "
                f"{str(digests.get(name))[:12]})"
            )
    for key in EXACT_KEYS:
        if results.get(key) != expected[key]:
            problems.append(
                f"[{SEAM_OF_KEY[key]}] {key}: expected {_short(expected[key])},"
                f" got {_short(results.get(key))}"
            )
    problems += _losses(results["losses"], expected["losses"])
    problems += _transcripts(results, expected)
    wer, wer_then = results["wer"]["WER"], expected["wer"]["WER"]
    if abs(wer - wer_then) > WER_POINTS:
        problems.append(
            f"[decoding] WER against the references moved by {wer - wer_then:+.2f} points "
            f"({wer_then:.2f}% -> {wer:.2f}%; at most {WER_POINTS:g})"
        )
    accuracy, accuracy_then = results["semantic_accuracy"], expected["semantic_accuracy"]
    if abs(accuracy - accuracy_then) > ACCURACY_POINTS:
        problems.append(
            f"[fine-tuning step] semantic accuracy moved by {accuracy - accuracy_then:+.2f}"
            f" points ({accuracy_then:.2f}% -> {accuracy:.2f}%; at most {ACCURACY_POINTS:g})"
        )
    return problems


def information(digests, expected):
    """Trained files whose bytes differ from the expectation's (not a failure)."""
    changed = [
        name for name, digest in expected["trained_files"].items() if digests.get(name) != digest
    ]
    if not changed:
        return ""
    made = expected.get("made_with", {})
    return (
        f"trained files with other bytes than when the expectation was made "
        f"(torch {made.get('torch')}, {made.get('cpu_capability')} kernels; here torch "
        f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}): {', '.join(changed)}"
    )


def _losses(actual, expected):
    if len(actual) != len(expected):
        return [f"[fine-tuning step] losses: expected {len(expected)} entries, got {len(actual)}"]
    problems = []
    for index, (got, want) in enumerate(zip(actual, expected)):
        if set(got) != set(want):
            problems.append(
                f"[fine-tuning step] losses[{index}]: keys {sorted(got)} != {sorted(want)}"
            )
            continue
        for key, b in sorted(want.items()):
            a = got[key]
            if key.endswith("_loss"):
                rtol = TEST_LOSS_RTOL if key == "test_loss" else LOSS_RTOL
                seam = "decoding" if key == "test_loss" else "fine-tuning step"
                if not math.isclose(a, b, rel_tol=rtol):
                    problems.append(
                        f"[{seam}] losses[{index}].{key} moved by {(a - b) / b:+.2e} relative "
                        f"({b!r} -> {a!r}; at most {rtol:g})"
                    )
            elif key == "valid_semantic_accuracy":
                if abs(a - b) > ACCURACY_POINTS:
                    problems.append(
                        f"[fine-tuning step] losses[{index}].{key} moved by {a - b:+.2f} points "
                        f"({b} -> {a}; at most {ACCURACY_POINTS:g})"
                    )
            elif a != b:
                problems.append(
                    f"[fine-tuning step] losses[{index}].{key}: expected {b!r}, got {a!r}"
                )
    return problems


def _transcripts(results, expected):
    ids = expected["test_utterances"]
    got, want = results["transcripts"], expected["transcripts"]
    if set(got) != set(want):
        return [f"[audio/data] transcripts: for {len(got)} utterances, expected {len(want)}"]
    same = sum(got[uid] == want[uid] for uid in ids)
    counts = [edit_counts(want[uid].split(), got[uid].split()) for uid in ids]
    words = sum(n for _, n in counts)
    drift = 100.0 * sum(e for e, _ in counts) / words if words else 0.0
    need = math.ceil(MIN_IDENTICAL_TRANSCRIPTS * len(ids))
    problems = []
    if same < need:
        problems.append(
            f"[decoding] transcripts: {same} of {len(ids)} identical to the stored ones"
            f" (at least {need})"
        )
    if drift > MAX_TRANSCRIPT_DRIFT:
        problems.append(
            f"[decoding] transcripts moved by {drift:.2f}% WER from the stored ones "
            f"(at most {MAX_TRANSCRIPT_DRIFT:g}%)"
        )
    return problems


def _short(value, limit=300):
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."
