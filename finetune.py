#!/usr/bin/env python3
"""Fine-tune only the LM of a fetched recognizer, under DDP, with dynamic batching.

The recognizer (CRDNN encoder, attention decoder, CTC, normaliser, RNNLM,
tokenizer) is fetched from three kinds of source (see finetune.yaml). Its RNNLM
is fine-tuned on target-domain text (next-token NLL), every ASR module frozen;
then the recognizer is evaluated on target-domain speech with the base and the
fine-tuned LM in its beam search, through the Brain's evaluate() and through
the pretrained interface, each DDP-valid.

    torchrun --nproc_per_node=2 finetune.py finetune.yaml            # 2 ranks
    python finetune.py finetune.yaml \
        --build_profile='!include:sbtemplate/hparams/profiles/tiny.yaml'  # 1 process, tiny

On CPUs the backend is gloo, on GPUs NCCL (``--distributed_backend`` and
``--device`` override). Multi-node and SLURM launches: docs/launching.md.
Authors: the sbtemplate contributors, after SpeechBrain's templates.
"""

import logging
import sys
import time
from pathlib import Path

# Configures the Hub endpoint before anything imports huggingface_hub.
from sbtemplate import fetching

logger = logging.getLogger(__name__)
# What the run is doing, for the message when the ranks lose each other.
STAGE = {"now": "set-up"}


def run(hparams_file, run_opts, overrides):
    import speechbrain as sb
    import torch
    from hyperpyyaml import load_hyperpyyaml

    from sbtemplate import finetune_eval as fe
    from sbtemplate import lm_finetuning as lf
    from sbtemplate import run_lock
    from sbtemplate.audio_check import check_audio_format
    from sbtemplate.config_checks import check_override_types
    from sbtemplate.distributed import exchange, rank_and_world_size
    from sbtemplate.frozen import state_digest
    from sbtemplate.paths import ProfilePaths

    timings, started = {}, time.time()
    # The file's syntax and the overrides' types, named clearly, before anything.
    check_override_types(hparams_file, overrides)
    keys = fetching.read_plain_keys(
        hparams_file, ["profile", "artifacts", "collective_timeout_s"], overrides
    )
    profile, artifacts = str(keys["profile"]), keys["artifacts"]
    paths = ProfilePaths.for_profile(profile, root=None if artifacts == "artifacts" else artifacts)

    # 1. Process group first (one timeout on every collective), so that every
    #    rank fetches through rank 0's endpoints.
    lf.init_distributed(run_opts, keys["collective_timeout_s"])
    rank, world = rank_and_world_size()
    cache = paths.root / "fetch-cache"

    with fetching.fetch_endpoints(hparams_file, overrides, cache_dir=cache) as ep:
        # 2. Hyperparameters (a misspelt override fails here, on every rank).
        with open(hparams_file) as fin:
            hparams = load_hyperpyyaml(fin, lf.shared_endpoints(ep, cache))

        # 3. Data preparation: unusable test audio (missing, undecodable, another
        #    sample rate or channel count) is reported now, on every rank, before
        #    any training.
        test_entries = lf.read_test_manifest(
            hparams["test_annotation"], hparams["data_root"], hparams["test_limit"]
        )
        check_audio_format(test_entries, hparams["test_annotation"], hparams["sample_rate"])
        # One run per output folder: rank 0 locks it, every rank learns the outcome.
        busy = None
        if rank == 0:
            try:
                run_lock.hold_output_folder(hparams["output_folder"])
            except run_lock.OutputFolderInUse as error:
                busy = str(error)
        busy = exchange(busy, what="output folder lock")[0]
        if busy:
            raise run_lock.OutputFolderInUse(busy)
        sb.create_experiment_directory(
            experiment_directory=hparams["output_folder"],
            hyperparams_to_save=hparams_file,
            overrides=ep.overrides,
        )
        main = rank == 0
        if main:
            print(
                f"Fine-tuning the LM of {hparams['repo_id']} ({profile} profile) on "
                f"{world} rank(s), backend {torch.distributed.get_backend() if torch.distributed.is_initialized() else '-'}, "
                f"device {run_opts.device}; {ep.describe()}",
                flush=True,
            )

        # 4. Fetch (rank 0 downloads, the others wait) and load the recognizer.
        STAGE["now"] = "fetching the recognizer"
        fetching.collect_pretrained(hparams)
        tokenizer = hparams["tokenizer"]
        text = {
            name: lf.lm_text_dataset(
                lf.read_text_split(hparams[key]),
                tokenizer,
                hparams["bos_index"],
                hparams["eos_index"],
            )
            for name, key in (
                ("train", "lm_train_annotation"),
                ("valid", "lm_valid_annotation"),
                ("general", "general_lm_valid"),
            )
        }
        test_set = lf.speech_test_dataset(test_entries)

        # 5. The Brain: the LM trains, the ASR modules are frozen beside it.
        modules = {"lm": hparams["lm_model"], **lf.frozen_asr_modules(hparams)}
        brain = lf.LMFineTuneBrain(
            modules=modules,
            opt_class=hparams["opt_class"],
            hparams=hparams,
            run_opts=run_opts,
            checkpointer=hparams["checkpointer"],
            tokenizer=tokenizer,
        )
        train_sampler = lf.train_batch_sampler(
            text["train"], hparams["train_dynamic_batching"], hparams["seed"]
        )
        train_kwargs = {"batch_sampler": train_sampler}
        valid_kwargs = {
            "batch_sampler": lf.eval_batch_sampler(text["valid"], hparams["valid_dynamic_batching"])
        }
        general_kwargs = {
            "batch_sampler": lf.eval_batch_sampler(
                text["general"], hparams["valid_dynamic_batching"]
            )
        }
        test_kwargs = {"batch_size": hparams["test_batch_size"]}
        if main:
            for line in train_sampler.describe():
                print(f"[train batching, epoch 0] {line}", flush=True)

        frozen_before = brain.frozen_digests()
        base_lm = lf.lm_state(brain)
        base_digest = state_digest(brain.lm)
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        results = {
            "profile": profile,
            "world_size": world,
            "device": str(run_opts.device),
            "backend": backend,
            "perplexity": {},
            "wer": {},
        }
        eval_dir = Path(hparams["eval_folder"])
        timings["setup_s"] = time.time() - started

        # 6. Before fine-tuning: perplexities and WER with the base LM.
        STAGE["now"] = "evaluation with the base LM"
        t = time.time()
        results["perplexity"]["base"] = {
            "target_valid": brain.lm_perplexity(text["valid"], valid_kwargs)["perplexity"],
            "general_valid": brain.lm_perplexity(text["general"], general_kwargs)["perplexity"],
        }
        if hparams["evaluate_base"]:
            report = brain.decode_test_set(test_set, test_kwargs, eval_dir, "test_base_lm")
            results["wer"]["base_lm"] = report.wer
        timings["base_eval_s"] = time.time() - t

        # 7. Fine-tune the LM (resumes from the last checkpoint if interrupted).
        STAGE["now"] = "fine-tuning"
        t = time.time()
        brain.fit(
            hparams["epoch_counter"],
            text["train"],
            text["valid"],
            train_loader_kwargs=train_kwargs,
            valid_loader_kwargs=valid_kwargs,
        )
        timings["fit_s"] = time.time() - t
        brain.checkpointer.recover_if_possible(min_key="valid_perplexity")
        tuned_lm = lf.lm_state(brain)
        final_digests = exchange(
            state_digest(brain.lm), group=brain.ddp_eval_group, what="fine-tuned LM check"
        )
        if len(set(final_digests)) != 1:
            raise RuntimeError(f"the ranks hold different fine-tuned LMs: {final_digests}")
        if main:
            fe.export_finetuned_model(
                paths.model_dir, Path(hparams["output_folder"]) / "finetuned_model", tuned_lm
            )

        # 8. After: perplexities, then the test set through both evaluation paths.
        STAGE["now"] = "evaluation with the fine-tuned LM"
        t = time.time()
        results["perplexity"]["finetuned"] = {
            "target_valid": brain.lm_perplexity(text["valid"], valid_kwargs)["perplexity"],
            "general_valid": brain.lm_perplexity(text["general"], general_kwargs)["perplexity"],
        }
        reports = {}
        if hparams["evaluate_finetuned"]:
            reports["brain"] = brain.decode_test_set(
                test_set, test_kwargs, eval_dir, "test_finetuned_brain"
            )
            if hparams["interface_readers"]:
                asr = fe.load_interface(
                    hparams["interface_source"],
                    Path(hparams["output_folder"]) / "interface",
                    hparams["decoding_overrides"],
                    run_opts.device,
                    lm_state=tuned_lm,
                )
                for reader in hparams["interface_readers"]:
                    reports[f"interface_{reader}"] = fe.interface_evaluation(
                        asr,
                        test_entries,
                        reader,
                        hparams["test_batch_size"],
                        brain.ddp_eval_group,
                        eval_dir,
                        f"test_finetuned_interface_{reader}",
                    )
        timings["finetuned_eval_s"] = time.time() - t

        # 9. Checks: frozen ASR on every rank, LM moved, paths agree.
        STAGE["now"] = "the final checks"
        frozen_after = brain.frozen_digests()
        per_rank = exchange(
            {"rank": rank, "before": frozen_before, "after": frozen_after},
            group=brain.ddp_eval_group,
            what="frozen check",
        )
        results["frozen"] = {
            "unchanged_on_every_rank": all(r["before"] == r["after"] for r in per_rank),
            "ranks_agree": all(r["after"] == per_rank[0]["after"] for r in per_rank),
            "per_rank": per_rank,
        }
        results["lm"] = {
            "base_digest": base_digest,
            "finetuned_digest": final_digests[0],
            "changed": final_digests[0] != base_digest,
            "max_abs_change": max(
                float((tuned_lm[k].float() - base_lm[k].float()).abs().max()) for k in base_lm
            ),
        }
        results["epochs"] = brain.epoch_records
        if reports:
            identical, differing = fe.compare_hypotheses(reports)
            results["wer"].update({f"finetuned_{name}": r.wer for name, r in reports.items()})
            results["paths"] = {
                "identical_hypotheses": identical,
                "differing_ids": differing,
                "utterances": len(reports["brain"].stats.scores),
                "jiwer_wer": {
                    name: fe.jiwer_wer(r.files["utterances"]) if main else None
                    for name, r in reports.items()
                },
                "files": {name: r.files for name, r in reports.items()},
                "per_rank": {name: r.per_rank for name, r in reports.items()},
            }
        results["timings"] = timings
        if main:
            fe.write_json(Path(hparams["output_folder"]) / "results.json", results)
            print_summary(results)
        problems = []
        if not results["frozen"]["unchanged_on_every_rank"]:
            problems.append("an ASR module changed during LM fine-tuning")
        if not results["lm"]["changed"]:
            problems.append("the LM did not change")
        if reports and not results["paths"]["identical_hypotheses"]:
            problems.append(
                f"evaluation paths disagree on {results['paths']['differing_ids'][:10]}"
            )
        if problems:
            raise RuntimeError("; ".join(problems))
        return results


def print_summary(results):
    ppl, wer = results["perplexity"], results["wer"]
    lines = [f"== Summary: {results['profile']} profile, world size {results['world_size']} =="]
    for key in ("target_valid", "general_valid"):
        lines.append(
            f"LM perplexity ({key.replace('_', ' ')}): base {ppl['base'][key]:.3f}"
            f" -> fine-tuned {ppl['finetuned'][key]:.3f}"
        )
    if "base_lm" in wer and "finetuned_brain" in wer:
        before, after = wer["base_lm"], wer["finetuned_brain"]
        rel = 100.0 * (before - after) / before if before else float("nan")
        lines.append(
            f"Target-domain test WER: base LM {before:.2f}% -> fine-tuned LM {after:.2f}%"
            f" ({rel:.1f}% relative reduction)"
        )
    if "paths" in results:
        p = results["paths"]
        wers = ", ".join(
            f"{k[len('finetuned_') :]} {v:.2f}%"
            for k, v in wer.items()
            if k.startswith("finetuned_")
        )
        lines.append(
            f"Evaluation paths ({wers}): identical hypotheses for all {p['utterances']}"
            f" utterances: {p['identical_hypotheses']}; jiwer on the merged files: "
            + ", ".join("n/a" if v is None else f"{v:.2f}%" for v in p["jiwer_wer"].values())
        )
    frozen = results["frozen"]
    lines.append(
        f"ASR frozen (parameter/buffer digests unchanged on every rank):"
        f" {frozen['unchanged_on_every_rank']}; LM changed: {results['lm']['changed']}"
        f" (max |delta| {results['lm']['max_abs_change']:.3g})"
    )
    for record in results["epochs"]:
        lines.append(
            f"epoch {record['epoch']}: train ppl {record['train_perplexity']:.3f},"
            f" valid ppl {record.get('valid_perplexity', float('nan')):.3f},"
            f" LM identical on all ranks: {record['ranks_identical']}"
        )
    print("\n".join(lines), flush=True)


def main(argv=None):
    import os

    import speechbrain as sb

    from sbtemplate import lm_finetuning as lf

    argv = sys.argv[1:] if argv is None else list(argv)
    # The original template's launch line, python -m torch.distributed.launch
    # [--distributed_launch]: the launcher passes --local-rank=N and sets the
    # same LOCAL_RANK/RANK variables as torchrun, which SpeechBrain reads.
    launched = [lf.pop_option(argv, flag) for flag in ("--local-rank", "--local_rank")]
    if "--distributed_launch" in argv:
        argv.remove("--distributed_launch")
    if any(v is not None for v in launched) and os.environ.get("RANK", "0") == "0":
        print(
            "note: torch.distributed.launch is deprecated; the same run is "
            "torchrun --nproc_per_node=<N> finetune.py finetune.yaml ...",
            file=sys.stderr,
            flush=True,
        )
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    run_opts = lf.setup_run(run_opts)
    rank = os.environ.get("RANK", "0")
    try:
        import ruamel.yaml

        # Round-trip: tags such as --build_profile='!include:...' stay tags.
        overrides = ruamel.yaml.YAML(typ="rt").load(overrides or "") or {}
        run(hparams_file, run_opts, overrides)
    except lf.TrainingInterrupted as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
        lf.failure_barrier()
        return lf.EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one clear line per rank, non-zero exit
        logger.debug("failure", exc_info=True)
        if lf.is_collective_timeout(exc):
            # A rank stalled or died: find which before saying so.
            missing = [r for r in lf.failure_barrier() if r >= 0]
            who = f"rank {', '.join(map(str, missing))}" if missing else "another rank"
            print(
                f"rank {rank}: ERROR: {who} stopped answering during {STAGE['now']}: a collective "
                f"waited past collective_timeout_s ({type(exc).__name__}: {exc})",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"rank {rank}: ERROR: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            lf.failure_barrier()
        if os.environ.get("SBTEMPLATE_TRACEBACK"):
            raise
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
