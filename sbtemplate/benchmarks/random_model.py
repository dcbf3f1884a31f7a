"""A randomly initialised recognizer in the published model-folder layout.

Used by the padding-invariance tests and the padding benchmark when no trained
model is at hand: ``hyperparams.yaml`` (the project's inference
hyperparameters), ``asr.ckpt``, ``lm.ckpt``, ``normalizer.ckpt`` and a
SentencePiece ``tokenizer.ckpt`` trained on generated text, loadable with
``EncoderDecoderASR.from_hparams(source=folder, ...)``.  A random attentional
decoder seldom emits ``eos``, so its hypotheses run to the step limit: the
worst case for the step-limit leak.
"""

import random
import shutil
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

INFERENCE_YAML = Path(__file__).resolve().parent.parent / "hparams" / "inference.yaml"

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _sentences(n, seed):
    rng = random.Random(seed)
    words = [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        for _ in range(600)
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def train_tokenizer(path, vocab_size, seed=0):
    """Train a small unigram SentencePiece model (unk 0, bos 1, eos 2) at ``path``."""
    import sentencepiece as spm

    path = Path(path)
    text = path.with_suffix(".txt")
    text.write_text("\n".join(_sentences(1500, seed)) + "\n")
    prefix = path.with_suffix("")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    shutil.move(str(prefix) + ".model", path)
    Path(str(prefix) + ".vocab").unlink(missing_ok=True)
    text.unlink()
    return path


def write_random_recognizer(folder, seed=0, hparams_file=INFERENCE_YAML):
    """Write a random-weight recognizer folder; returns its path.

    The global normalisation statistics come from one batch of random noise, so
    the features stay in a sane range.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with open(hparams_file) as f:
        hp = load_hyperpyyaml(f)
    g = torch.Generator().manual_seed(seed + 1)
    normalizer = hp["normalizer"]
    normalizer.train()
    with torch.no_grad():
        feats = hp["compute_features"](0.1 * torch.randn(4, 16000, generator=g))
        normalizer(feats, torch.ones(4))
    normalizer.eval()
    torch.save(hp["asr_model"].state_dict(), folder / "asr.ckpt")
    torch.save(hp["lm_model"].state_dict(), folder / "lm.ckpt")
    normalizer._save(folder / "normalizer.ckpt")
    train_tokenizer(folder / "tokenizer.ckpt", hp["output_neurons"], seed)
    shutil.copyfile(hparams_file, folder / "hyperparams.yaml")
    return folder
