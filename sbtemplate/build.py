"""Builds everything the template assumes exists, offline and cached.

    python -m sbtemplate.build --profile full     # the main job's default
    python -m sbtemplate.build --profile tiny     # what the tests use

Stages: corpus → manifests → tokenizer → RNNLM → CRDNN ASR → publish →
evaluate. Each stage works in a ``*.partial`` folder and renames it into place
when done, with a ``DONE.json`` fingerprint; a later run reuses finished stages
and redoes an interrupted one from scratch, so nothing half-written is ever
mistaken for a finished artefact.
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from sbtemplate import atomic_write
from sbtemplate.corpus.builder import SPEECH_SPLITS, build_corpus, corpus_fingerprint, is_complete
from sbtemplate.data_prep import prepare_corpus, read_text_lines
from sbtemplate.manifest import write_manifest
from sbtemplate.paths import SEED, ProfilePaths
from sbtemplate.profiles import get_profile, include_override, profile_file, profile_names

logger = logging.getLogger("sbtemplate.build")

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"
DONE = "DONE.json"
# The recognizer block's decoding values: they change what is published, not
# what is trained.
DECODING_KEYS = ("beam_size", "lm_weight", "ctc_weight_decode", "eos_threshold")
# Seconds the stage's work took when it ran (a reused stage keeps its own).
STAGE_SECONDS = "stage_seconds.json"
# descriptor name -> split folder of the LibriSpeech layout
DESCRIPTORS = {
    "train": SPEECH_SPLITS["general_train"],
    "valid": SPEECH_SPLITS["general_valid"],
    "test_general": SPEECH_SPLITS["general_test"],
    "test": SPEECH_SPLITS["target_test"],
    "valid_target": SPEECH_SPLITS["target_valid"],
}
EXAMPLE_WAV = "example.flac"
# The target-domain LM published beside the recognizer's own lm.ckpt.
DOMAIN_LM_FILE = "lm_commands.ckpt"
# Bumped when the architecture or training code in hparams/ changes, so cached
# models are retrained.
ARCHITECTURE_VERSION = 6


def _stage(folder, fingerprint, work, force=False):
    """Run ``work(tmp_folder)`` unless ``folder`` holds a matching DONE.json."""
    folder = Path(folder)
    # Compare as JSON sees it (tuples become lists).
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
    marker = folder / DONE
    if not force and marker.is_file():
        try:
            if json.loads(marker.read_text()) == fingerprint:
                logger.info("Reusing %s", folder)
                return folder
        except ValueError:
            pass
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    start = time.time()
    work(partial)
    (partial / STAGE_SECONDS).write_text(json.dumps({"seconds": time.time() - start}))
    (partial / DONE).write_text(json.dumps(fingerprint, sort_keys=True))
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def _stage_seconds(folder):
    """How long a stage's work took when it ran (None for one made before this was recorded)."""
    try:
        return json.loads((Path(folder) / STAGE_SECONDS).read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return None


def _run_opts():
    # The build always runs in one process, on the CPU unless CUDA is free to use.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    return {"device": device, "debug": False}


def hparams_overrides(profile, **values):
    """HyperPyYAML overrides for a YAML of hparams/: the profile (an ``!include:``
    of its file) and plain ``values`` (the stage's training settings, paths).

    The YAML files read their defaults from the same profile; the build passes
    the stage's values so that a stage can be run with other settings."""
    lines = [include_override(profile)]
    lines += [f"{key}: {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _load_hparams(name, profile, **values):
    from hyperpyyaml import load_hyperpyyaml

    with open(HPARAMS_DIR / name) as handle:
        return load_hyperpyyaml(handle, hparams_overrides(profile, **values))


def build_config(profile):
    """What the stages need of a profile, and what their fingerprints hold."""
    data = get_profile(profile)
    recognizer = data["recognizer"]
    cfg = dict(data["build"])
    cfg["tokenizer"] = {"vocab_size": recognizer["output_neurons"]}
    cfg["recognizer"] = dict(recognizer)
    return cfg


# ------------------------------------------------------------------ stages --
def build_manifests(paths, cfg):
    """Stage: the corpus's JSON descriptors and the LM text files; returns the manifests folder.

    ``lm_train.txt`` is the general-domain LM text plus the ASR training
    transcripts; the target-domain text splits are copied as they are.
    """

    def work(tmp):
        prepare_corpus(paths.corpus, tmp, DESCRIPTORS)
        text = paths.corpus / "text"
        train_words = [e["words"] for e in json.loads((tmp / "train.json").read_text()).values()]
        (tmp / "lm_train.txt").write_text(
            "\n".join(read_text_lines(text / "general_lm_train.txt") + train_words) + "\n"
        )
        shutil.copy(text / "general_lm_valid.txt", tmp / "lm_valid.txt")
        shutil.copy(text / "target_lm_train.json", tmp / "target_lm_train.json")
        shutil.copy(text / "target_lm_valid.json", tmp / "target_lm_valid.json")

    # The noise/RIR CSVs hold absolute paths: they are rebuilt if the tree moves.
    return _stage(paths.manifests, {"corpus": cfg["corpus"], "root": str(paths.root)}, work)


def build_tokenizer(paths, cfg):
    """Stage: the SentencePiece unigram tokenizer of ``lm_train.txt``; its ``.model`` file."""
    from sbtemplate.base_recognizer import train_tokenizer

    vocab = cfg["tokenizer"]["vocab_size"]

    def work(tmp):
        train_tokenizer(tmp, read_text_lines(paths.manifests / "lm_train.txt"), vocab)

    folder = _stage(
        paths.root / "tokenizer", {"corpus": cfg["corpus"], "tok": cfg["tokenizer"], "v": 2}, work
    )
    return folder / f"{vocab}_unigram.model"


def _lm_sizes(cfg):
    return {
        k: v for k, v in cfg["recognizer"].items() if k.startswith("lm_") or k == "output_neurons"
    }


def _train_lm(
    tmp, profile, training, tokenizer_file, annotations, read_sentences, out_name, init_lm=None
):
    """SpeechBrain's LM recipe (base_lm.yaml + LMBrain) on a train and a valid file.

    ``init_lm``: a checkpoint to start from instead of the seeded initialisation.
    Writes ``tmp/out_name`` (the best epoch by valid loss) and ``tmp/lm_valid.json``.
    """
    from sbtemplate.base_recognizer import LMBrain, lm_text_dataset, load_tokenizer, seed_everything

    seed_everything(SEED)
    hparams = _load_hparams(
        "base_lm.yaml",
        profile,
        **training,
        output_folder=str(tmp),
        train_annotation=str(annotations[0]),
        valid_annotation=str(annotations[1]),
    )
    if init_lm is not None:
        hparams["model"].load_state_dict(torch.load(init_lm, map_location="cpu"))
    tokenizer = load_tokenizer(tokenizer_file)
    train, valid = (
        lm_text_dataset(
            read_sentences(hparams[key]), tokenizer, hparams["bos_index"], hparams["eos_index"]
        )
        for key in ("train_annotation", "valid_annotation")
    )
    brain = LMBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=_run_opts(),
        checkpointer=hparams["checkpointer"],
    )
    brain.fit(
        hparams["epoch_counter"],
        train,
        valid,
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    hparams["checkpointer"].recover_if_possible(min_key="loss")
    torch.save(hparams["model"].state_dict(), tmp / out_name)
    (tmp / "lm_valid.json").write_text(json.dumps(brain.last_stats))


def build_lm(paths, cfg, tokenizer_file):
    """Stage: the base RNNLM trained on the general LM text; returns its ``lm.ckpt``."""
    fingerprint = {
        "corpus": cfg["corpus"],
        "tok": cfg["tokenizer"],
        "lm": cfg["lm"],
        "model": _lm_sizes(cfg),
    }

    def work(tmp):
        _train_lm(
            tmp,
            paths.profile,
            cfg["lm"],
            tokenizer_file,
            (paths.manifests / "lm_train.txt", paths.manifests / "lm_valid.txt"),
            read_text_lines,
            "lm.ckpt",
        )

    folder = _stage(paths.root / "lm", fingerprint, work)
    return folder / "lm.ckpt"


def _words_of(json_file):
    return [entry["words"] for _, entry in sorted(json.loads(Path(json_file).read_text()).items())]


def build_domain_lm(paths, cfg, tokenizer_file, lm_file):
    """The base LM continued on the target domain's text-only split.

    Published beside the recognizer's own LM (``DOMAIN_LM_FILE``), as a provider
    publishes a domain LM for a recognizer; the SLU recipe fetches it from a URL.
    """
    fingerprint = {
        "corpus": cfg["corpus"],
        "tok": cfg["tokenizer"],
        "lm": cfg["lm"],
        "domain_lm": cfg["domain_lm"],
        "model": _lm_sizes(cfg),
    }

    def work(tmp):
        _train_lm(
            tmp,
            paths.profile,
            cfg["domain_lm"],
            tokenizer_file,
            (paths.manifests / "target_lm_train.json", paths.manifests / "target_lm_valid.json"),
            _words_of,
            DOMAIN_LM_FILE,
            init_lm=lm_file,
        )

    folder = _stage(paths.root / "domain_lm", fingerprint, work)
    return folder / DOMAIN_LM_FILE


def build_asr(paths, cfg, tokenizer_file):
    """Stage: the CRDNN recognizer (CTC + attention); returns the experiment folder.

    Trains in this process, or on ``ranks`` CPU DDP processes under torchrun that
    each take ``batch_size // ranks`` utterances per step (one process on a GPU).
    """
    from sbtemplate.base_recognizer import train_asr

    sizes = {
        k: v
        for k, v in cfg["recognizer"].items()
        if not k.startswith("lm_") and k not in DECODING_KEYS
    }
    fingerprint = {
        "corpus": cfg["corpus"],
        "tok": cfg["tokenizer"],
        "asr": cfg["asr"],
        "model": sizes,
        "architecture": ARCHITECTURE_VERSION,
    }
    # ``batch_size`` is the utterances per optimiser step; ``ranks`` DDP
    # processes (CPU only) each take an equal share of it.
    ranks = cfg["asr"].get("ranks", 1)
    if torch.cuda.is_available():
        ranks = 1  # one GPU process takes the whole batch
    if cfg["asr"]["batch_size"] % ranks:
        raise ValueError(
            f"profile {paths.profile!r}: asr batch_size {cfg['asr']['batch_size']} "
            f"is not a multiple of ranks {ranks}"
        )

    training = {k: v for k, v in cfg["asr"].items() if k != "ranks"}

    def work(tmp):
        job = {
            "hparams_file": str(HPARAMS_DIR / "base_asr.yaml"),
            "overrides": hparams_overrides(
                paths.profile,
                **{**training, "batch_size": cfg["asr"]["batch_size"] // ranks},
                output_folder=str(tmp),
                train_annotation=str(paths.manifests / "train.json"),
                valid_annotation=str(paths.manifests / "valid.json"),
                data_root=str(paths.corpus / "LibriSpeech"),
                noise_annotation=str(paths.manifests / "noise.csv"),
                rir_annotation=str(paths.manifests / "rir.csv"),
            ),
            "tokenizer": str(tokenizer_file),
            "out_dir": str(tmp),
            "seed": SEED,
            "device": _run_opts()["device"],
        }
        # The same JSON in both cases, so one rank and N ranks read identical values.
        job_file = tmp / "asr_job.json"
        job_file.write_text(json.dumps(job, indent=1) + "\n")
        if ranks == 1:
            train_asr(json.loads(job_file.read_text()))
        else:
            _torchrun_asr(job_file, ranks)

    return _stage(paths.experiment, fingerprint, work)


def _torchrun_asr(job_file, ranks):
    """``torchrun --standalone --nproc_per_node=<ranks> -m sbtemplate.base_recognizer <job>``."""
    import subprocess

    # One thread per rank on any machine: float rounding depends on the thread
    # count, and with it the epoch in which training leaves the CTC blank
    # plateau, which moved the full profile's WER by several points. Small
    # tensors gain little from more threads (2 threads: 1.3x at batch 4).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "sbtemplate.base_recognizer",
        str(job_file),
    ]
    logger.info("ASR training on %d DDP ranks (gloo): %s", ranks, " ".join(cmd[2:]))
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"ASR training under torchrun failed (exit status {done.returncode}); "
            f"job: {job_file}. The ranks' errors are printed above."
        )


def publish(paths, cfg, tokenizer_file, lm_file, experiment, domain_lm_file):
    """Lay out the model folder as the Hub repo would, and link the repo-id folder to it."""
    model_dir = paths.model_dir
    tmp = model_dir.with_name(model_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copy(experiment / "asr.ckpt", tmp / "asr.ckpt")
    shutil.copy(experiment / "normalizer.ckpt", tmp / "normalizer.ckpt")
    shutil.copy(lm_file, tmp / "lm.ckpt")
    shutil.copy(domain_lm_file, tmp / DOMAIN_LM_FILE)
    shutil.copy(tokenizer_file, tmp / "tokenizer.ckpt")
    (tmp / "hyperparams.yaml").write_text(published_hparams(paths.profile))
    test = json.loads((paths.manifests / "test.json").read_text())
    first = sorted(test)[0]
    shutil.copy(
        test[first]["wav"].replace("{data_root}", str(paths.corpus / "LibriSpeech")),
        tmp / EXAMPLE_WAV,
    )
    (tmp / "example.txt").write_text(test[first]["words"] + "\n")
    write_manifest(tmp)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    link = paths.local_repo
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(model_dir, link.parent), target_is_directory=True)
    return model_dir


def published_hparams(profile):
    """The hyperparams.yaml published with profile ``profile``'s recognizer."""
    import ruamel.yaml

    values = ruamel.yaml.YAML(typ="rt").load(profile_file(profile).read_text())["recognizer"]
    return inference_hparams(values, f"profile {profile!r}")


def round_trip_yaml():
    """A ruamel.yaml round-trip loader/dumper in the layout of the project's
    hparams files: comments, tags and order kept, lines never folded."""
    import ruamel.yaml

    yaml = ruamel.yaml.YAML(typ="rt")
    yaml.width = 4096
    yaml.indent(mapping=4, sequence=6, offset=4)
    return yaml


def inference_hparams(values, what="the recognizer"):
    """inference.yaml with its ``recognizer`` block filled in from ``values``
    (YAML in, YAML out, comments kept); every key of the block is required."""
    import io

    yaml = round_trip_yaml()
    document = yaml.load((HPARAMS_DIR / "inference.yaml").read_text())
    block = document["recognizer"]
    if set(block) != set(values):
        raise KeyError(
            f"{what}: recognizer keys {sorted(values)} differ from inference.yaml's {sorted(block)}"
        )
    for key in block:
        value = values[key]
        if isinstance(value, tuple):  # written as HyperPyYAML's plain "(a, b)"
            value = yaml.load(f"v: ({', '.join(map(str, value))})")["v"]
        block[key] = value
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def evaluate_base(paths, batch_size=8):
    """WER of the published recognizer (beam search + RNNLM) on both test sets."""
    import tempfile

    from sbtemplate.evaluation import transcribe_manifest

    report = {}
    # SpeechBrain links the savedir to the model folder by absolute paths:
    # kept in the tree, a copy of the tree would point into the original.
    shutil.rmtree(paths.root / "pretrained_eval", ignore_errors=True)  # what older builds kept
    with tempfile.TemporaryDirectory(dir=paths.root, prefix="evaluating.") as savedir:
        for name in ("test_general", "test"):
            report[name] = transcribe_manifest(
                paths.model_dir,
                paths.manifests / f"{name}.json",
                paths.corpus / "LibriSpeech",
                savedir=savedir,
                batch_size=batch_size,
            )
    return report


def build(profile="tiny", root=None, force=False, progress=True):
    """Build (or reuse) everything for ``profile`` and return its ProfilePaths.

    Concurrent builds of one profile (two test runs, several ranks) serialise
    on a lock file: the first builds, the others then find it finished.
    """
    import fcntl

    paths = ProfilePaths.for_profile(profile, root)
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(paths, force, progress)


def _build_locked(paths, force, progress):
    with build_environment(paths.profile):
        return _build_stages(paths, force, progress)


@contextlib.contextmanager
def build_environment(profile):
    """The process settings a build trains under; the caller's come back on exit.

    Float rounding depends on the number of CPU threads: a profile can pin it
    so that its models have the same bytes on machines with other core counts
    (other CPU kernels still change them; see docs/determinism.md). And
    SpeechBrain seeds its shuffling samplers from SB_GLOBAL_SEED, which any
    seed_everything() in the calling process sets (a recipe YAML loaded
    before the build): the build uses SpeechBrain's default seed, so that its
    models do not depend on what ran before it.
    """
    previous_threads = torch.get_num_threads()
    threads = get_profile(profile)["build"]["threads"]
    if threads:
        torch.set_num_threads(threads)
    caller_seed = os.environ.pop("SB_GLOBAL_SEED", None)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        if caller_seed is not None:
            os.environ["SB_GLOBAL_SEED"] = caller_seed


def _build_stages(paths, force, progress):
    torch.set_flush_denormal(True)
    profile = paths.profile
    cfg = build_config(profile)
    timings = {}
    t0 = time.time()
    corpus_reused = is_complete(paths.corpus, cfg["corpus"], SEED)
    build_corpus(paths.corpus, cfg["corpus"], seed=SEED, progress=progress)
    # Every later stage depends on the corpus bytes, not only on its sizes: a
    # new corpus version (grammar, voices) must retrain them.
    cfg = {**cfg, "corpus": corpus_fingerprint(cfg["corpus"], SEED)}
    timings["corpus"] = time.time() - t0
    t = time.time()
    build_manifests(paths, cfg)
    tokenizer_file = build_tokenizer(paths, cfg)
    timings["tokenizer"] = time.time() - t
    t = time.time()
    lm_file = build_lm(paths, cfg, tokenizer_file)
    timings["lm"] = time.time() - t
    t = time.time()
    domain_lm_file = build_domain_lm(paths, cfg, tokenizer_file, lm_file)
    timings["domain_lm"] = time.time() - t
    t = time.time()
    experiment = build_asr(paths, cfg, tokenizer_file)
    timings["asr"] = time.time() - t
    report_file = paths.build_report
    fingerprint = {
        **json.loads((experiment / DONE).read_text()),
        "domain_lm": json.loads((domain_lm_file.parent / DONE).read_text()),
        "recognizer": json.loads(json.dumps(cfg["recognizer"])),
    }  # as the report holds it
    if not force and report_file.is_file() and paths.model_dir.is_dir():
        report = json.loads(report_file.read_text())
        if report.get("fingerprint") == fingerprint:
            return paths
    publish(paths, cfg, tokenizer_file, lm_file, experiment, domain_lm_file)
    t = time.time()
    wers = evaluate_base(paths)
    timings["evaluate"] = time.time() - t
    # Report what each artefact cost to make, not what this run spent reusing it.
    previous = json.loads(report_file.read_text()) if report_file.is_file() else {}
    made = {
        "corpus": previous.get("seconds", {}).get("corpus") if corpus_reused else timings["corpus"],
        "tokenizer": _stage_seconds(tokenizer_file.parent),
        "lm": _stage_seconds(lm_file.parent),
        "domain_lm": _stage_seconds(domain_lm_file.parent),
        "asr": _stage_seconds(experiment),
        "evaluate": timings["evaluate"],
    }
    report = {
        "profile": profile,
        "fingerprint": fingerprint,
        "wer": {k: v["WER"] for k, v in wers.items()},
        "details": wers,
        "lm_valid": json.loads((paths.root / "lm" / "lm_valid.json").read_text()),
        "domain_lm_valid": json.loads((domain_lm_file.parent / "lm_valid.json").read_text()),
        "asr_valid": json.loads((experiment / "asr_valid.json").read_text()),
        "seconds": made,
        "seconds_this_run": timings,
    }
    atomic_write.write_json(report_file, report)
    print(
        f"Base recognizer ({profile}): WER general test {report['wer']['test_general']:.2f}%, "
        f"target-domain test {report['wer']['test']:.2f}% (beam search + RNNLM). "
        f"Report: {report_file}"
    )
    return paths


def main(argv=None):
    """Command line of :func:`build`; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=profile_names())
    parser.add_argument("--root", default=None, help="artefacts root (default: ./artifacts)")
    parser.add_argument("--force", action="store_true", help="re-publish and re-evaluate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    build(args.profile, args.root, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
