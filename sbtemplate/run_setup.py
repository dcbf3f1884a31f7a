"""Run set-up shared by the recipe scripts: one thread budget per rank, the
backend and device chosen from the hardware (overridable), the process group
with a timeout on every collective, and how a failing run ends.

finetune.py reads top to bottom like SpeechBrain's recipe scripts; what every
DDP run needs before and around it lives here.
"""

import datetime
import logging
import os
import re

import torch

logger = logging.getLogger(__name__)

# The scripts' exit statuses: 0 done; 1 failed (the error and its traceback
# are printed); 2 an input error (configuration, arguments, data, sources: one
# line names what is wrong); 3 stopped on purpose by ``stop_after_steps``.
EXIT_FAILED = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 3


def _input_errors():
    from sbtemplate.audio_check import AudioFormatError
    from sbtemplate.config_checks import ConfigError
    from sbtemplate.ddp_dynamic_batching import NotEnoughBatches
    from sbtemplate.fetching import FetchError, HubEndpointError
    from sbtemplate.run_lock import OutputFolderInUse

    return (
        AudioFormatError,
        ConfigError,
        NotEnoughBatches,
        FetchError,
        HubEndpointError,
        OutputFolderInUse,
        FileNotFoundError,
    )


#: Errors in what the user gave (exit status 2, no traceback needed).
INPUT_ERRORS = _input_errors()


def report(line):
    """Write ``line`` to stderr in one system call.

    Every rank of a torchrun job writes to the same stderr; ``print`` writes
    the text and its newline separately, so two ranks failing at once can
    run their lines together.
    """
    import sys

    data = (line.rstrip("\n") + "\n").encode()
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), data)
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor
        sys.stderr.write(data.decode())
        sys.stderr.flush()


def exit_status(error):
    """The exit status for ``error``: 2 for an input error, else 1."""
    return EXIT_INPUT_ERROR if isinstance(error, INPUT_ERRORS) else EXIT_FAILED


class TrainingInterrupted(Exception):
    """Raised on every rank after the intra-epoch checkpoint of ``stop_after_steps``."""


# --------------------------------------------------------------------------
# Run set-up


def pop_option(argv, name):
    """Remove ``name=value`` or ``name value`` from ``argv`` (in place); the value or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
    return None


def choose_backend_and_device(run_opts):
    """NCCL and ``cuda:<LOCAL_RANK>`` with GPUs, gloo and CPU without; given options win.

    Returns a new ``RunOptions`` (they are frozen) with both marked as set.
    """
    import dataclasses

    given = set(getattr(run_opts, "overridden_args", set()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    changes = {}
    if "distributed_backend" not in given:
        changes["distributed_backend"] = "nccl" if cuda else "gloo"
    if "device" not in given:
        changes["device"] = f"cuda:{local_rank}" if cuda else "cpu"
    return dataclasses.replace(
        run_opts, **changes, overridden_args=given | {"distributed_backend", "device"}
    )


def threads_per_rank():
    """Cores of this machine shared by the ranks on it (torchrun sets OMP_NUM_THREADS)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def init_distributed(run_opts, timeout_s):
    """``sb.utils.distributed.ddp_init_group`` with a configurable collective timeout.

    Does nothing without ``RANK``/``LOCAL_RANK`` (single process).
    """
    if os.environ.get("RANK") is None or os.environ.get("LOCAL_RANK") is None:
        return False
    if torch.distributed.is_initialized():
        return True
    backend = run_opts["distributed_backend"]
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        timeout=datetime.timedelta(seconds=float(timeout_s)),
    )
    # A group used for nothing but the failure barrier below, so that it can
    # never be matched against another collective.
    _failure["group"] = torch.distributed.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=FAILURE_BARRIER_S)
    )
    return True


#: How long a failing rank waits for the others at the failure barrier.
FAILURE_BARRIER_S = 20.0
_failure = {"group": None}


def failure_barrier(run_opts=None):
    """Let every rank that fails at the same point report before any exits.

    torchrun stops all workers as soon as one exits non-zero, which could cut
    off the others' error messages when they all fail alike (a bad override, a
    missing file, too few batches). A failing rank waits here, at most
    ``FAILURE_BARRIER_S`` seconds, for the others; a rank that fails alone
    times out and exits, and torchrun ends the rest. Returns the ranks that
    did not come (rank 0 learns them all; the others, at most that some did
    not: ``[-1]``), empty when all met.

    A run that fails before its process group exists (while loading its
    YAML) passes ``run_opts``: the group is made here, with the barrier's
    timeout, so that every rank still reports.
    """
    if run_opts is not None and not torch.distributed.is_initialized():
        try:
            init_distributed(run_opts, FAILURE_BARRIER_S)
        except Exception:  # noqa: BLE001 - the others are gone: report alone
            return [-1]
    group = _failure["group"]
    if group is None or not torch.distributed.is_initialized():
        return []
    try:
        torch.distributed.monitored_barrier(
            group=group, timeout=datetime.timedelta(seconds=FAILURE_BARRIER_S), wait_all_ranks=True
        )
        return []
    except RuntimeError as error:
        # "Ranks 1, 3 failed to pass monitoredBarrier in 20000 ms"
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(error))
        return [int(r) for r in found.group(1).replace(" ", "").split(",") if r] if found else [-1]


def is_collective_timeout(error):
    """Whether ``error`` is a collective that waited past its timeout (gloo, NCCL)."""
    text = f"{type(error).__name__}: {error}"
    return (
        "Timed out waiting" in text
        or "DistBackendError" in text
        or "Watchdog caught collective operation timeout" in text
    )


def parse_arguments(argv):
    """``sb.parse_arguments``, with the overrides as a round-trip YAML mapping
    (tags such as ``--build_profile='!include:...'`` stay tags)."""
    import ruamel.yaml
    import speechbrain as sb

    hparams_file, run_opts, overrides = sb.parse_arguments(list(argv))
    return hparams_file, run_opts, ruamel.yaml.YAML(typ="rt").load(overrides or "") or {}


def load_hparams(hparams_file, overrides):
    """The recipe's YAML with the overrides, loaded once.

    The file is read once; a syntax error or an override of the wrong type
    (``--number_of_epochs=abc``) is named with the file and the key before
    HyperPyYAML builds anything.
    """
    import io

    from hyperpyyaml import load_hyperpyyaml

    from sbtemplate.config_checks import check_override_types, check_yaml_text, read_yaml_file

    text = read_yaml_file(hparams_file)
    check_override_types(hparams_file, overrides, check_yaml_text(hparams_file, text))
    stream = io.StringIO(text)
    stream.name = str(hparams_file)  # !include: paths are relative to the file
    return load_hyperpyyaml(stream, overrides)


def setup_run(run_opts):
    """Process-wide settings before anything heavy runs."""
    torch.set_flush_denormal(True)  # denormals make CPU RNNs many times slower
    torch.set_num_threads(threads_per_rank())
    return choose_backend_and_device(run_opts)
