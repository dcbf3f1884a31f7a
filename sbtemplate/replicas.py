"""Random-weight replicas of the public SpeechBrain LibriSpeech recognizers.

Users of the template bring ``speechbrain/asr-crdnn-rnnlm-librispeech`` or its
TransformerLM sibling; nothing can be downloaded here, but their architectures
are public. This module writes each as a model folder in the real repo's
layout (``hyperparams.yaml`` naming SpeechBrain's own classes, ``asr.ckpt``,
``lm.ckpt``, ``tokenizer.ckpt``, ``normalizer.ckpt``, ``example.wav``, and the
``manifest.json`` of digests every fetch here is checked against) with
seeded random weights, so that the recipes, the fetching and the decoding run
on the real topology, sizes and token ids. WER means nothing on them;
exactness, cost and speed do.

The architecture is ``sbtemplate/hparams/replicas/<name>.yaml``; the widths
``sbtemplate/hparams/replicas/sizes/<size>.yaml`` (``full``: the real ones,
``reduced``: an eighth, for the tests). The folders are written under
``<artifacts>/replicas/<size>/<repo id>`` and served on the loopback Hub under
the real repo ids by the recipes' ``endpoints`` block.

    python -m sbtemplate.replicas --size reduced
    python -m sbtemplate.replicas --size full
"""

import argparse
import hashlib
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from sbtemplate.manifest import write_manifest
from sbtemplate.paths import artifacts_root

REPLICAS_DIR = Path(__file__).resolve().parent / "hparams" / "replicas"
REPO_IDS = (
    "speechbrain/asr-crdnn-rnnlm-librispeech",
    "speechbrain/asr-crdnn-transformerlm-librispeech",
)
SIZES = ("full", "reduced")
#: Written last: a folder with it is complete (and says what it was built from).
MARKER = "replica.json"
#: Bumped when what a replica folder holds changes: older folders are rewritten.
FORMAT = 3

# Special ids of the real tokenizers: the 1000-piece one has only unk (0), the
# recognizer uses 0 for blank, bos and eos; the 5000-piece one has bos 1, eos 2.
TOKENIZER_IDS = {
    "speechbrain/asr-crdnn-rnnlm-librispeech": {"unk_id": 0, "bos_id": -1, "eos_id": -1},
    "speechbrain/asr-crdnn-transformerlm-librispeech": {"unk_id": 0, "bos_id": 1, "eos_id": 2},
}


def _name(repo_id):
    if repo_id not in REPO_IDS:
        raise ValueError(f"No replica of {repo_id!r}; known: {', '.join(REPO_IDS)}")
    return repo_id.split("/", 1)[1]


def widths(repo_id, size):
    """The widths of ``repo_id`` in ``sizes/<size>.yaml`` (a plain mapping)."""
    from hyperpyyaml import load_hyperpyyaml

    if size not in SIZES:
        raise ValueError(f"Unknown replica size {size!r}; known: {', '.join(SIZES)}")
    with open(REPLICAS_DIR / "sizes" / f"{size}.yaml") as handle:
        return dict(load_hyperpyyaml(handle)[_name(repo_id)])


def replica_hparams(repo_id, size):
    """The replica's ``hyperparams.yaml``: the architecture file with the widths
    of ``size`` filled in as plain values (YAML in, YAML out, comments kept)."""
    from sbtemplate.build import round_trip_yaml

    yaml = round_trip_yaml()
    document = yaml.load((REPLICAS_DIR / f"{_name(repo_id)}.yaml").read_text())
    values = widths(repo_id, size)
    placeholders = {
        k
        for k, v in document.items()
        if getattr(v, "tag", None) is not None and str(v.tag.value) == "!PLACEHOLDER"
    }
    if placeholders != set(values):
        raise KeyError(
            f"sizes/{size}.yaml gives {sorted(values)} for {repo_id}; its file needs {sorted(placeholders)}"
        )
    for key, value in values.items():
        document[key] = yaml.load(f"v: {value}")["v"]
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def replica_folder(repo_id, size, root=None):
    """Where the replica of ``repo_id`` at ``size`` lives: a folder named like the repo id."""
    _name(repo_id)
    base = Path(root) if root is not None else artifacts_root()
    return base / "replicas" / size / repo_id


def tokenizer_text(seed=0, general=6000, target=2000, filler=20000):
    """Training text for the replicas' tokenizers.

    The corpus grammar's sentences (both domains) and, because the corpus
    vocabulary (about 300 words) cannot fill 1000 or 5000 unigram pieces,
    sentences of pronounceable pseudo-words drawn from a fixed lexicon.
    """
    from sbtemplate.corpus.grammar import general_sentence, target_sentence

    rng = random.Random(seed)
    lines = [general_sentence(rng) for _ in range(general)]
    lines += [target_sentence(rng)[0] for _ in range(target)]
    syllables = [c + v for c in "BDFGKLMNPRSTVZ" for v in "AEIOU"]
    syllables += [c + v + e for c in "BDKLMNPST" for v in "AEIOU" for e in "NRS"]
    lexicon = sorted(
        {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(12000)}
    )
    lines += [
        " ".join(rng.choice(lexicon) for _ in range(rng.randint(3, 12))) for _ in range(filler)
    ]
    return lines


def train_tokenizer(path, vocab_size, special_ids, seed=0):
    """A unigram SentencePiece model of ``vocab_size`` pieces at ``path``."""
    import sentencepiece as spm

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text("\n".join(tokenizer_text(seed)) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(Path(tmp) / "tokenizer"),
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
            **special_ids,
        )
        shutil.move(str(Path(tmp) / "tokenizer.model"), path)
    return path


def example_audio(path, sample_rate=16000, seconds=1.5, seed=0):
    """A short deterministic signal as the repo's ``example.wav`` (a sweep in noise)."""
    import soundfile

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    sweep = 0.2 * torch.sin(2 * torch.pi * (150 + 200 * t) * t)
    audio = sweep + 0.01 * torch.randn(t.shape, generator=g)
    soundfile.write(str(path), audio.numpy(), sample_rate, subtype="PCM_16")
    return path


def parameter_counts(hparams):
    """Parameters of the ASR (``asr_model``) and of the LM (``lm_model``)."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"asr": count(hparams["asr_model"]), "lm": count(hparams["lm_model"])}


def _fingerprint(text, seed):
    return hashlib.sha256(f"{FORMAT}\n{seed}\n{text}".encode()).hexdigest()[:16]


def is_complete(folder, text, seed):
    """Whether ``folder`` holds the replica built from ``text`` and ``seed``."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == _fingerprint(text, seed)
    except ValueError:
        return False


def write_replica(repo_id, size, root=None, seed=0, log=print):
    """Write the replica of ``repo_id`` at ``size`` (if not already there); its folder.

    The folder is written beside its final place and renamed into it when
    complete, so an interrupted run leaves no half-written replica.
    """
    from hyperpyyaml import load_hyperpyyaml

    folder = replica_folder(repo_id, size, root)
    text = replica_hparams(repo_id, size)
    if is_complete(folder, text, seed):
        log(f"{repo_id} ({size}): up to date in {folder}")
        return folder
    started = time.time()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        torch.manual_seed(seed)
        hp = load_hyperpyyaml(text)
        counts = parameter_counts(hp)
        log(f"{repo_id} ({size}): {counts['asr']:,} ASR + {counts['lm']:,} LM parameters")
        normalizer = hp["normalizer"]
        g = torch.Generator().manual_seed(seed + 1)
        normalizer.train()
        with torch.no_grad():  # statistics of quiet noise: features in a sane range
            normalizer(
                hp["compute_features"](0.1 * torch.randn(4, 16000, generator=g)), torch.ones(4)
            )
        normalizer.eval()
        torch.save(hp["asr_model"].state_dict(), work / "asr.ckpt")
        torch.save(hp["lm_model"].state_dict(), work / "lm.ckpt")
        normalizer._save(work / "normalizer.ckpt")
        train_tokenizer(work / "tokenizer.ckpt", hp["output_neurons"], TOKENIZER_IDS[repo_id], seed)
        example_audio(work / "example.wav", hp["sample_rate"], seed=seed)
        (work / "hyperparams.yaml").write_text(text)
        write_manifest(work)  # the digests the loopback servers publish and fetches check
        record = {
            "repo_id": repo_id,
            "size": size,
            "seed": seed,
            "parameters": counts,
            "fingerprint": _fingerprint(text, seed),
        }
        (work / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"{repo_id} ({size}): written in {time.time() - started:.1f} s to {folder}")
    return folder


def write_replicas(size, root=None, repo_ids=REPO_IDS, seed=0, log=print):
    """Write every replica of ``size``; their folders by repo id."""
    return {repo_id: write_replica(repo_id, size, root, seed, log) for repo_id in repo_ids}


def main(argv=None):
    """Command line: write the replicas of one size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="reduced")
    parser.add_argument("--repo", choices=REPO_IDS, action="append", help="default: both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_replicas(args.size, repo_ids=args.repo or REPO_IDS, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
