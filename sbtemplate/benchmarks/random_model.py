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

from sbtemplate.build import inference_hparams

# The sizes and decoding values of the random recognizer (the ``recognizer``
# block of a profile): two LSTM layers, larger than the tiny profile.
RANDOM_RECOGNIZER = {
    "output_neurons": 200,
    "hop_length": 10,
    "cnn_channels": (32, 64),
    "time_pooling_size": 4,
    "rnn_type": "LSTM",
    "rnn_layers": 2,
    "rnn_neurons": 128,
    "dnn_neurons": 128,
    "emb_size": 64,
    "dec_neurons": 128,
    "attn_dim": 128,
    "lm_emb_size": 64,
    "lm_rnn_layers": 2,
    "lm_rnn_neurons": 256,
    "lm_dnn_neurons": 128,
    "beam_size": 8,
    "lm_weight": 0.5,
    "ctc_weight_decode": 0.3,
    "eos_threshold": 1.5,
}

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _sentences(n, seed):
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)]
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


def write_random_recognizer(folder, seed=0, recognizer=None):
    """Write a random-weight recognizer folder; returns its path.

    ``recognizer``: the sizes and decoding values (default ``RANDOM_RECOGNIZER``).

    The global normalisation statistics come from one batch of random noise, so
    the features stay in a sane range.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text = inference_hparams(
        RANDOM_RECOGNIZER if recognizer is None else recognizer, "the random recognizer"
    )
    hp = load_hyperpyyaml(text)
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
    (folder / "hyperparams.yaml").write_text(text)
    return folder
