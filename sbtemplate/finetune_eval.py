"""After LM fine-tuning: DDP-valid evaluation through the pretrained interface,
and the cross-checks between evaluation paths.

Path (a) is ``EncoderDecoderASR.from_hparams`` on the fetched recognizer with
the fine-tuned LM swapped in, audio read with the interface's ``load_audio``
or with SpeechBrain's ``read_audio``, decoded with ``transcribe_batch``;
:func:`sbtemplate.distributed.evaluate_sharded` shards it with the batch plan
of the Brain's DDP-valid test loader (path b) and gathers it the same way.
"""

import functools
from pathlib import Path

import torch
from speechbrain.dataio.dataio import read_audio
from speechbrain.utils.distributed import MainProcessContext

from sbtemplate import atomic_write
from sbtemplate.distributed import evaluate_sharded, read_utterance_file
from sbtemplate.evaluation import transcribe_files

READERS = ("load_audio", "read_audio")


def load_interface(source, savedir, overrides, device, lm_state=None):
    """``EncoderDecoderASR.from_hparams`` (every rank calls it: fetching is coordinated).

    ``lm_state``: a state dict loaded into ``mods.lm_model`` (the fine-tuned LM).
    """
    from speechbrain.inference.ASR import EncoderDecoderASR

    asr = EncoderDecoderASR.from_hparams(
        source=source,
        savedir=str(savedir),
        overrides=dict(overrides),
        run_opts={"device": device},
    )
    if lm_state is not None:
        swap_lm(asr, lm_state)
    return asr


def swap_lm(asr, lm_state):
    """Load ``lm_state`` into the interface's LM (the one its RNNLM scorer uses)."""
    asr.mods.lm_model.load_state_dict(lm_state)
    asr.mods.lm_model.eval()


def _reader(asr, name):
    if name == "load_audio":

        def load(path):
            # load_audio fetches the path first; on one rank only (the fetch
            # hook would otherwise coordinate it with ranks reading other files).
            with MainProcessContext():
                return asr.load_audio(path)

        return load
    if name == "read_audio":
        return read_audio
    raise ValueError(f"reader must be one of {READERS}, not {name!r}")


def interface_evaluation(asr, entries, reader, batch_size, group, out_dir, name):
    """Decode ``entries`` ({id: {"wav", "length", "words"}}) sharded over the ranks; EvalReport."""
    load = _reader(asr, reader)
    ids = sorted(entries)
    items = [(i, entries[i]["wav"], entries[i]["words"]) for i in ids]
    lengths = [float(entries[i]["length"]) for i in ids]

    def score_batch(batch, stats):
        words = transcribe_files(asr, [wav for _, wav, _ in batch], reader=load)
        stats.append(
            [i for i, _, _ in batch],
            [w.split() for w in words],
            [ref.split() for _, _, ref in batch],
        )

    return evaluate_sharded(
        items, lengths, score_batch, batch_size=batch_size, group=group, name=name, out_dir=out_dir
    )


def hypotheses(report):
    """``{id: hypothesis words}`` of a gathered EvalReport."""
    return {
        str(s["key"]): " ".join(map(str, s.get("hyp_tokens") or [])) for s in report.stats.scores
    }


def compare_hypotheses(reports):
    """``(identical, differing ids)`` over several EvalReports of the same test set."""
    names = list(reports)
    first = hypotheses(reports[names[0]])
    differing = set()
    for name in names[1:]:
        other = hypotheses(reports[name])
        if set(other) != set(first):
            differing |= set(other) ^ set(first)
        differing |= {i for i in first if i in other and other[i] != first[i]}
    return not differing, sorted(differing)


def jiwer_wer(utterance_file):
    """WER (%) of a merged per-utterance file computed by jiwer (independent of SpeechBrain).

    None when jiwer is not installed (it is only needed for this cross-check).
    """
    try:
        import jiwer
    except ImportError:
        return None

    rows = read_utterance_file(utterance_file)
    refs = [r["reference"] for r in rows]
    hyps = [r["hypothesis"] for r in rows]
    return 100.0 * jiwer.wer(refs, hyps)


def export_finetuned_model(model_dir, out_dir, lm_state):
    """A loadable recognizer folder: the fetched files linked, ``lm.ckpt`` replaced."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("hyperparams.yaml", "asr.ckpt", "normalizer.ckpt", "tokenizer.ckpt"):
        target = out_dir / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to((model_dir / name).resolve())
    torch.save(lm_state, out_dir / "lm.ckpt")
    (out_dir / "README.txt").write_text(
        f"Recognizer of {model_dir} with the LM fine-tuned by finetune.py (lm.ckpt).\n"
    )
    return out_dir


#: ``results.json`` and the like, written atomically; values JSON cannot hold
#: (paths) are written as strings.
write_json = functools.partial(atomic_write.write_json, default=str)
