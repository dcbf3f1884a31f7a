"""Fine-tuning benchmark: LM-only against whole-recognizer steps, dynamic against fixed batching.

Two comparisons, side by side in one run, on a profile's published recognizer:

1. One optimisation step (forward, backward, Adam step) on the *same* batch of
   speech utterances: the LM alone on their transcripts (next-token NLL, what
   ``finetune.py`` trains) against the whole recognizer (features, normaliser,
   CRDNN encoder, attention decoder and CTC: the seq2seq + CTC loss of the ASR
   recipe). Median of ``--repeats`` timed steps after a warm-up; the ratio says
   how much cheaper LM-only fine-tuning is per step.
2. One epoch of LM training over the target-domain text with the dynamic
   batches of ``finetune.yaml`` (``train_dynamic_batching``) against shuffled
   fixed-size batches (by default as many batches as the dynamic plan, so
   both take the same number of optimizer steps): padding fraction of the
   padded token tensors and training throughput (real tokens and sentences per
   second), from the same initial LM.

Not a test: timings depend on the machine and its load (the load average is
reported).

    python -m sbtemplate.benchmarks.finetune --profile tiny [--json out.json]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sbtemplate.profiles import profile_names

ROOT = Path(__file__).resolve().parents[2]
#: The project's hyperparams.yaml with SpeechBrain's own encoder and searcher classes.
STOCK_CLASSES = {"padding_invariant": False}


def load_recognizer(model_dir, work_dir, overrides=STOCK_CLASSES):
    """The published modules, loaded from ``model_dir`` (by default with the stock
    SpeechBrain classes; ``overrides=None`` for a repo that names them itself)."""
    from hyperpyyaml import load_hyperpyyaml

    with open(Path(model_dir) / "hyperparams.yaml") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    pretrainer = hparams["pretrainer"]
    pretrainer.set_collect_in(str(work_dir))
    pretrainer.collect_files(default_source=str(model_dir))
    pretrainer.load_collected()
    return hparams


def speech_batch(manifest, data_root, tokenizer, size, bos, eos):
    """The ``size`` first utterances (by id) of a speech descriptor as padded tensors."""
    from speechbrain.dataio.batch import PaddedBatch
    from speechbrain.dataio.dataio import read_audio

    entries = json.loads(Path(manifest).read_text())
    ids = sorted(entries)[:size]
    items = []
    for i in ids:
        tokens = tokenizer.encode_as_ids(entries[i]["words"])
        items.append(
            {
                "id": i,
                "sig": read_audio(entries[i]["wav"].replace("{data_root}", str(data_root))),
                "tokens_bos": torch.LongTensor([bos] + tokens),
                "tokens_eos": torch.LongTensor(tokens + [eos]),
                "tokens": torch.LongTensor(tokens),
            }
        )
    return PaddedBatch(items)


def _nll(log_probs, targets, rel_lens):
    from speechbrain.nnet.losses import nll_loss

    return nll_loss(log_probs, targets, length=rel_lens)


def lm_step_fn(hparams):
    """A training step of the LM alone (Adam, next-token NLL) and the LM's parameter count.

    Returns ``(step, n_params)``; ``step(batch)`` trains on the batch's
    transcripts and returns the loss.
    """
    lm = hparams["lm_model"]
    lm.train()
    optimizer = torch.optim.Adam(lm.parameters(), lr=1e-3)

    def step(batch):
        tokens_bos, _ = batch.tokens_bos
        tokens_eos, lens = batch.tokens_eos
        out = lm(tokens_bos)
        logits = out[0] if isinstance(out, tuple) else out
        loss = _nll(torch.log_softmax(logits, dim=-1), tokens_eos, lens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, sum(p.numel() for p in lm.parameters())


def asr_step_fn(hparams, ctc_weight=0.3, blank_index=0):
    """A training step of the whole recognizer (seq2seq NLL + CTC) and its parameter count.

    Returns ``(step, n_params)``; ``step(batch)`` trains on a speech batch and
    returns the loss, ``ctc_weight`` weighting CTC as the ASR recipe does.
    """
    from speechbrain.nnet.losses import ctc_loss

    modules = torch.nn.ModuleList([hparams["asr_model"], hparams["normalizer"]])
    modules.train()
    enc, emb, dec, ctc_lin, seq_lin = hparams["asr_model"]
    features, normalizer = hparams["compute_features"], hparams["normalizer"]
    optimizer = torch.optim.Adam(hparams["asr_model"].parameters(), lr=1e-3)

    def step(batch):
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos
        tokens_eos, eos_lens = batch.tokens_eos
        tokens, tok_lens = batch.tokens
        feats = normalizer(features(wavs), wav_lens)
        encoded = enc(feats)
        decoded, _ = dec(emb(tokens_bos), encoded, wav_lens)
        p_seq = torch.log_softmax(seq_lin(decoded), dim=-1)
        p_ctc = torch.log_softmax(ctc_lin(encoded), dim=-1)
        loss = (1 - ctc_weight) * _nll(p_seq, tokens_eos, eos_lens) + ctc_weight * ctc_loss(
            p_ctc, tokens, wav_lens, tok_lens, blank_index=blank_index
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, sum(p.numel() for p in hparams["asr_model"].parameters())


def time_steps(step, batch, repeats, warmup=2):
    """Seconds per ``step(batch)``: median and minimum of ``repeats`` calls, after a warm-up."""
    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "steps": repeats}


def lm_epoch(hparams, dataset, batches):
    """One LM training epoch over ``batches`` (lists of dataset indices); wall time."""
    from speechbrain.dataio.batch import PaddedBatch

    step, _ = lm_step_fn(hparams)
    t = time.perf_counter()
    for indices in batches:
        step(PaddedBatch([dataset[i] for i in indices]))
    return time.perf_counter() - t


def batching_comparison(hparams, text_file, dynamic_opts, fixed_batch_size, seed):
    """One LM epoch with dynamic batches against one with shuffled fixed-size batches.

    Both start from the same LM weights, restored afterwards. Without
    ``fixed_batch_size`` the fixed plan has as many batches as the dynamic one (the
    same number of steps). Returns each plan's padding statistics, wall time and
    tokens and sentences per second.
    """
    from sbtemplate.base_recognizer import lm_text_dataset, read_text_split
    from sbtemplate.ddp_dynamic_batching import (
        DistributedDynamicBatchSampler,
        dataset_lengths,
        fixed_size_batches_stats,
    )

    dataset = lm_text_dataset(
        read_text_split(text_file), hparams["tokenizer"], hparams["bos_index"], hparams["eos_index"]
    )
    lengths = dataset_lengths(dataset)
    sampler = DistributedDynamicBatchSampler(
        lengths, seed=seed, rank=0, world_size=1, epoch=1, **dynamic_opts
    )
    if not fixed_batch_size:  # as many batches as the dynamic plan
        fixed_batch_size = max(1, round(len(lengths) / len(sampler.rank_batches)))
    fixed, fixed_stats = fixed_size_batches_stats(lengths, fixed_batch_size, seed=seed)
    plans = {"dynamic": (sampler.rank_batches, sampler.stats()), "fixed": (fixed, fixed_stats)}
    initial = copy.deepcopy(hparams["lm_model"].state_dict())
    out = {}
    for name, (batches, stats) in plans.items():
        hparams["lm_model"].load_state_dict(initial)
        lm_epoch(hparams, dataset, batches[:2])  # warm-up shapes
        hparams["lm_model"].load_state_dict(initial)
        wall = lm_epoch(hparams, dataset, batches)
        out[name] = dict(
            stats,
            wall_s=wall,
            tokens_per_s=stats["real"] / wall,
            sentences_per_s=stats["items"] / wall,
        )
    hparams["lm_model"].load_state_dict(initial)
    out["fixed"]["batch_size"] = fixed_batch_size
    out["dynamic"]["options"] = dynamic_opts
    return out


def finetune_yaml_batching(path=ROOT / "finetune.yaml"):
    """``train_dynamic_batching`` of finetune.yaml, its tags resolved by HyperPyYAML.

    The block alone is loaded (the rest of the file needs the run's values).
    """
    import io

    import ruamel.yaml
    from hyperpyyaml import load_hyperpyyaml

    yaml = ruamel.yaml.YAML(typ="rt")
    block = io.StringIO()
    yaml.dump({"block": yaml.load(Path(path).read_text())["train_dynamic_batching"]}, block)
    return dict(load_hyperpyyaml(block.getvalue())["block"])


def run(profile="tiny", batch_size=8, repeats=5, fixed_batch_size=None, threads=None, seed=0):
    """Both comparisons (training step, batching) on a built profile's recognizer; the figures."""
    from sbtemplate.paths import ProfilePaths

    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    paths = ProfilePaths.for_profile(profile)
    work = Path(tempfile.mkdtemp(prefix="finetune_bench_"))
    hparams = load_recognizer(paths.model_dir, work / "pretrained")
    tokenizer = hparams["tokenizer"]
    batch = speech_batch(
        paths.manifests / "train.json",
        paths.corpus / "LibriSpeech",
        tokenizer,
        batch_size,
        hparams["bos_index"],
        hparams["eos_index"],
    )
    initial_lm = copy.deepcopy(hparams["lm_model"].state_dict())
    lm_step, lm_params = lm_step_fn(hparams)
    asr_step, asr_params = asr_step_fn(
        hparams, hparams["ctc_weight_decode"], hparams["blank_index"]
    )
    lm_time = time_steps(lm_step, batch, repeats)
    asr_time = time_steps(asr_step, batch, repeats)
    hparams["lm_model"].load_state_dict(initial_lm)
    wavs, _ = batch.sig
    figures = {
        "profile": profile,
        "threads": torch.get_num_threads(),
        "step": {
            "batch_size": batch_size,
            "audio_s": float(wavs.shape[0] * wavs.shape[1]) / 16000,
            "lm_only": dict(lm_time, trainable_params=lm_params),
            "whole_recognizer": dict(asr_time, trainable_params=asr_params),
            "ratio": asr_time["median_s"] / lm_time["median_s"],
        },
        "batching": batching_comparison(
            hparams,
            paths.manifests / "target_lm_train.json",
            finetune_yaml_batching(),
            fixed_batch_size,
            seed,
        ),
        "load_average": os.getloadavg()[0],
    }
    d, f = figures["batching"]["dynamic"], figures["batching"]["fixed"]
    figures["batching"]["throughput_ratio"] = d["tokens_per_s"] / f["tokens_per_s"]
    return figures


def format_table(fig):
    """The figures of :func:`run` as a plain-text table."""
    s, b = fig["step"], fig["batching"]
    lines = [
        f"{fig['profile']} profile, {fig['threads']} threads, load average {fig['load_average']:.1f}",
        f"One step on the same {s['batch_size']} utterances:",
        f"  {'':18} {'median s':>9} {'trainable params':>17}",
        f"  {'LM only':18} {s['lm_only']['median_s']:>9.4f} {s['lm_only']['trainable_params']:>17,}",
        f"  {'whole recognizer':18} {s['whole_recognizer']['median_s']:>9.4f}"
        f" {s['whole_recognizer']['trainable_params']:>17,}",
        f"  LM-only step is {s['ratio']:.1f}x cheaper",
        "One LM epoch over the target-domain text:",
        f"  {'':18} {'batches':>7} {'padding':>8} {'wall s':>7} {'tokens/s':>9} {'sent/s':>7}",
    ]
    for name in ("dynamic", "fixed"):
        r = b[name]
        label = name if name == "dynamic" else f"fixed ({r['batch_size']})"
        lines.append(
            f"  {label:18} {r['batches']:>7} {100 * r['padding_fraction']:>7.1f}%"
            f" {r['wall_s']:>7.2f} {r['tokens_per_s']:>9.0f} {r['sentences_per_s']:>7.1f}"
        )
    lines.append(f"  dynamic/fixed throughput: {b['throughput_ratio']:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    """Command line of :func:`run`: prints the table, optionally writes the JSON; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", choices=profile_names())
    parser.add_argument("--batch-size", type=int, default=8, help="utterances in the step batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median kept)")
    parser.add_argument(
        "--fixed-batch-size",
        type=int,
        default=None,
        help="default: the dynamic plan's mean batch size (same number of steps)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    figures = run(args.profile, args.batch_size, args.repeats, args.fixed_batch_size, args.threads)
    print(format_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
