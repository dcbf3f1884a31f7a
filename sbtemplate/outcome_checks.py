"""Outcome checks: what a run produced, against an independent computation.

Agreement between two paths through the same SpeechBrain code proves little
when that code is broken: both paths give the same wrong answer. Each check
here compares what SpeechBrain produced with something computed without it:

* ``fetching/loading``: every loaded module holds the tensors of the file
  fetched for it (``torch.load`` of that file), and the file holds the bytes
  the published manifest lists (sha256);
* ``audio/data``: audio read through SpeechBrain (``read_audio``, a padded
  batch) equals the samples soundfile reads;
* ``LM in decoding``: the RNNLM scorer's scores equal the log-softmax of the
  LM module's own output, and the configured LM weight changes the search's
  scores against weight 0;
* ``scoring``: WER and its counts equal an edit distance counted here, from
  the references in the manifest;
* ``fine-tuning step``: two optimizer steps taken by ``Brain.fit_batch``
  equal the Adam steps computed here from fresh gradients;
* ``checkpoint/resume``: the checkpoint recovered is the best by its key
  (read from the ``CKPT.yaml`` files), a resumed run starts from the newest;
* ``samplers/DDP``: every example is seen exactly once per epoch across the
  ranks, and each rank ran the batches its sampler promised.

A failed check raises :class:`OutcomeError`: one line naming the seam, what is
wrong, and the module most likely at fault.
"""

import hashlib
import json
import math
from pathlib import Path

import torch

SEAMS = (
    "fetching/loading",
    "audio/data",
    "LM in decoding",
    "decoding",
    "scoring",
    "fine-tuning step",
    "checkpoint/resume",
    "samplers/DDP",
)


class OutcomeError(RuntimeError):
    """A run produced a wrong result: ``[seam] what (at fault: module)``."""

    def __init__(self, seam, message, culprit):
        assert seam in SEAMS, seam
        self.seam, self.culprit = seam, culprit
        super().__init__(f"[{seam}] {message} (at fault: {culprit})")


def _fail(seam, message, culprit):
    raise OutcomeError(seam, message, culprit)


# --------------------------------------------------------------------------
# fetching/loading


def sha256_of(path):
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def published_digests(local_repo):
    """``{file: sha256}`` from a published folder's ``manifest.json`` (empty if none)."""
    manifest = Path(local_repo) / "manifest.json"
    if not manifest.is_file():
        return {}
    return {name: entry["sha256"] for name, entry in json.loads(manifest.read_text()).items()}


def _unwrap(module):
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _tensor_mismatch(expected, actual):
    """A short description of how two ``{name: tensor}`` maps differ ('' if equal)."""
    missing = sorted(set(expected) - set(actual))
    if missing:
        return f"has no {missing[0]}"
    for name, want in expected.items():
        got = actual[name]
        if not torch.is_tensor(want):
            if got != want:
                return f"{name} is {got!r}, the file says {want!r}"
            continue
        got = torch.as_tensor(got).detach().cpu()
        if got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
            diff = (
                float((got.float() - want.float()).abs().max())
                if got.shape == want.shape
                else "shape"
            )
            return f"{name} differs (max |diff| {diff})"
    return ""


def loaded_state(loadable):
    """What a loaded object holds, in the form its checkpoint file is saved in."""
    loadable = _unwrap(loadable)
    if hasattr(loadable, "_statistics_dict"):  # InputNormalization saves its statistics
        return loadable._statistics_dict()
    if isinstance(loadable, torch.nn.Module):
        return loadable.state_dict()
    if hasattr(loadable, "serialized_model_proto"):  # SentencePieceProcessor
        return loadable.serialized_model_proto()
    return None


def check_loadable_holds_file(name, loadable, path, culprit):
    """``loadable`` holds what the file at ``path`` holds (tensors or bytes)."""
    state = loaded_state(loadable)
    if state is None:
        return f"{name}: not comparable ({type(loadable).__name__})"
    if isinstance(state, bytes):
        if state != Path(path).read_bytes():
            _fail(
                "fetching/loading",
                f"{name} does not hold the bytes of {path}",
                culprit,
            )
        return f"{name}: bytes equal"
    expected = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(expected, dict):
        return f"{name}: not comparable ({type(expected).__name__} in file)"
    expected = {k: v for k, v in expected.items() if k in state or torch.is_tensor(v)}
    problem = _tensor_mismatch(expected, state)
    if problem:
        _fail(
            "fetching/loading",
            f"module {name!r} does not hold the tensors of {Path(path).name} fetched for it: "
            f"{problem}",
            culprit,
        )
    return f"{name}: {len(expected)} tensors equal"


def check_pretrainer_loaded(pretrainer, digests=None, fetch_log=(), culprit=None):
    """Every loadable of a collected and loaded Pretrainer holds its file; each
    file holds the published bytes.

    ``digests``: {published file name: sha256}; ``fetch_log``: the fetch
    records (``filename`` fetched, ``path`` written), which tell the published
    name of each collected file (``lm.ckpt`` may come from ``lm_commands.ckpt``).
    A file no record names is compared by tensors only. One line per loadable.
    """
    culprit = culprit or "speechbrain.utils.parameter_transfer (Pretrainer.load_collected)"
    published = {}
    for record in fetch_log:
        published[Path(record.path).resolve()] = record.filename
    lines = []
    for name, loadable in pretrainer.loadables.items():
        path = Path(pretrainer.paths[name])
        if not path.exists():
            _fail(
                "fetching/loading",
                f"{name}: the collected file {path} does not exist",
                "speechbrain.utils.parameter_transfer (Pretrainer.collect_files)",
            )
        source_name = published.get(path.resolve())
        wanted = (digests or {}).get(source_name)
        if wanted is not None:
            got = sha256_of(path)
            if got != wanted:
                _fail(
                    "fetching/loading",
                    f"{name}: {path} is not the published {source_name} (sha256 {got[:12]},"
                    f" published {wanted[:12]})",
                    "speechbrain.utils.fetching (fetch)",
                )
        line = check_loadable_holds_file(name, loadable, path, culprit)
        lines.append(line + (f" (= published {source_name})" if wanted else ""))
    return lines


# --------------------------------------------------------------------------
# audio/data


def check_audio(entries, limit=4):
    """``read_audio`` and a padded batch give the samples soundfile reads.

    ``entries``: {id: {"wav": path, ...}}; the ``limit`` first ids by sorted id
    (two of them of different lengths go into one ``PaddedBatch``).
    """
    import soundfile
    from speechbrain.dataio.batch import PaddedBatch
    from speechbrain.dataio.dataio import read_audio

    ids = sorted(entries)[:limit]
    truth = {}
    for utt_id in ids:
        path = entries[utt_id]["wav"]
        samples, _rate = soundfile.read(path, dtype="float32", always_2d=False)
        truth[utt_id] = torch.from_numpy(samples)
        got = read_audio(path)
        if got.shape != truth[utt_id].shape or not torch.allclose(
            got.float(), truth[utt_id], atol=1e-6
        ):
            _fail(
                "audio/data",
                f"read_audio({path}) differs from soundfile's samples "
                f"(shapes {tuple(got.shape)} vs {tuple(truth[utt_id].shape)})",
                "speechbrain.dataio.dataio (read_audio) / speechbrain.dataio.audio_io",
            )
    batch = PaddedBatch([{"id": i, "sig": truth[i]} for i in ids])
    wavs, rel_lens = batch.sig
    frames = wavs.shape[1]
    for row, utt_id in enumerate(ids):
        n = truth[utt_id].shape[0]
        length = int(torch.round(rel_lens[row] * frames))
        if (
            length != n
            or not torch.equal(wavs[row, :n], truth[utt_id])
            or bool(wavs[row, n:].abs().sum())
        ):
            _fail(
                "audio/data",
                f"a padded batch does not hold {utt_id} as read (length {length} of {frames}"
                f" frames, the file has {n})",
                "speechbrain.dataio.batch (PaddedBatch) / speechbrain.utils.data_utils",
            )
    return f"{len(ids)} files equal soundfile's samples, alone and padded"


# --------------------------------------------------------------------------
# LM in decoding


#: The names SpeechBrain's ScorerBuilder gives its LM scorers.
LM_SCORERS = ("rnnlm", "transformerlm")


def lm_scorer(searcher):
    """``(name, scorer)`` of the searcher's LM scorer; ``(None, None)`` if it has none."""
    builder = getattr(searcher, "scorer", None)
    for name in LM_SCORERS:
        if builder is not None and name in builder.full_scorers:
            return name, builder.full_scorers[name]
    return None, None


def check_lm_scores(searcher, lm_module, bos_index, device="cpu", temperature=None):
    """The RNNLM scorer scores with ``lm_module``: its log-probabilities equal
    the log-softmax of the module's output divided by ``temperature`` (the
    configured one; default: the scorer's), for two steps from BOS."""
    name, scorer = lm_scorer(searcher)
    if scorer is None:
        _fail("LM in decoding", "the beam searcher has no LM scorer", "the recipe YAML")
    if name != "rnnlm":
        return f"{name} scorer: scores not recomputed (only RNNLM scorers are)"
    temperature = scorer.temperature if temperature is None else temperature
    lm = _unwrap(lm_module)
    if _unwrap(scorer.lm) is not lm:
        _fail(
            "LM in decoding",
            "the rnnlm scorer holds another LM than the one fine-tuned and evaluated",
            "the recipe YAML (rnnlm_scorer: language_model)",
        )
    tokens = torch.full((3,), bos_index, dtype=torch.long, device=device)
    nxt = torch.tensor([3, 5, 7], device=device)
    with torch.no_grad():
        got1, memory = scorer.score(tokens, None, None, None)
        got2, _ = scorer.score(nxt, memory, None, None)
        logits, hidden = lm(tokens.unsqueeze(1), hx=None)
        want1 = torch.log_softmax(logits.squeeze(1) / temperature, dim=-1)
        logits, _ = lm(nxt.unsqueeze(1), hx=hidden)
        want2 = torch.log_softmax(logits.squeeze(1) / temperature, dim=-1)
    for step, (got, want) in enumerate(((got1, want1), (got2, want2)), 1):
        got = got.reshape(want.shape)
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            _fail(
                "LM in decoding",
                f"the rnnlm scorer's log-probabilities at step {step} differ from the LM's own"
                f" (max |diff| {float((got - want).abs().max()):.3g})",
                "speechbrain.decoders.scorer (RNNLMScorer.score)",
            )
    return "rnnlm scorer = log-softmax of the LM module, 2 steps"


def check_weights_matter(search, encode, wavs, wav_lens, eos_index=None):
    """Decoding with each configured LM and CTC weight gives other scores than
    with that weight at 0; no hypothesis holds the EOS token (``eos_index``).

    ``encode(wavs, wav_lens)`` -> encoder states; ``search`` the beam searcher.
    One line.
    """
    scorer = search.scorer
    lm_name, _ = lm_scorer(search)
    names = [n for n in (lm_name, "ctc") if n and scorer.weights.get(n)]
    with torch.no_grad():
        encoded = encode(wavs, wav_lens)
        hyps, _, scores, _ = search(encoded, wav_lens)
        every = [hyps]
        lines = []
        for name in names:
            weight = scorer.weights[name]
            scorer.weights[name] = 0.0
            try:
                hyps0, _, scores0, _ = search(encoded, wav_lens)
            finally:
                scorer.weights[name] = weight
            every.append(hyps0)
            if torch.allclose(scores.float(), scores0.float(), atol=1e-6) and hyps == hyps0:
                _fail(
                    "LM in decoding" if name == lm_name else "decoding",
                    f"the {name} weight {weight} changes no score of {len(hyps)} utterances"
                    " against weight 0",
                    f"speechbrain.decoders.scorer (ScorerBuilder.score / the {name} scorer)"
                    " or speechbrain.decoders.seq2seq",
                )
            changed = sum(a != b for a, b in zip(hyps, hyps0))
            lines.append(f"{name} weight {weight} vs 0: scores differ, {changed}/{len(hyps)} hyps")
    if eos_index is not None and any(int(eos_index) in map(int, h) for hs in every for h in hs):
        _fail(
            "decoding",
            f"a hypothesis of the beam search holds the EOS token ({eos_index})",
            "speechbrain.decoders.seq2seq (S2SBeamSearcher) / speechbrain.utils.data_utils"
            " (undo_padding)",
        )
    return "; ".join(lines) or "no LM or CTC weight: nothing to check"


# --------------------------------------------------------------------------
# scoring


def edit_counts(reference, hypothesis):
    """Word-level Levenshtein distance ``(edits, reference words)``, counted here."""
    prev = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        cur = [i] + [0] * len(hypothesis)
        for j, hyp_word in enumerate(hypothesis, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ref_word != hyp_word))
        prev = cur
    return prev[-1], len(reference)


def references_of(manifest_file, ids=None):
    """``{id: words}`` read straight from a JSON manifest."""
    data = json.loads(Path(manifest_file).read_text(encoding="utf-8"))
    return {k: v["words"] for k, v in data.items() if ids is None or k in ids}


def check_wer(summary, hypotheses, references, what):
    """A WER summary equals the edit distance counted here.

    ``summary``: SpeechBrain's ErrorRateStats summary (``WER``, ``num_edits``,
    ``num_scored_tokens``, ``num_scored_sents``); ``hypotheses``/``references``:
    {id: text}; every reference id must have been decoded exactly once.
    """
    if set(hypotheses) != set(references):
        missing = sorted(set(references) - set(hypotheses))
        extra = sorted(set(hypotheses) - set(references))
        _fail(
            "samplers/DDP",
            f"{what}: decoded utterances are not the test set (missing {missing[:5]},"
            f" unexpected {extra[:5]})",
            "speechbrain.dataio.sampler / sbtemplate.distributed.sharding",
        )
    edits = words = 0
    for utt_id, ref in references.items():
        e, n = edit_counts(ref.split(), hypotheses[utt_id].split())
        edits, words = edits + e, words + n
    wer = 100.0 * edits / words if words else 0.0
    got = (summary["num_edits"], summary["num_scored_tokens"], summary["num_scored_sents"])
    if got != (edits, words, len(references)) or not math.isclose(
        summary["WER"], wer, abs_tol=1e-9
    ):
        _fail(
            "scoring",
            f"{what}: WER {summary['WER']:.4f}% ({got[0]} edits / {got[1]} words, {got[2]}"
            f" utterances) but an independent count gives {wer:.4f}% ({edits} / {words},"
            f" {len(references)})",
            "speechbrain.utils.metric_stats (ErrorRateStats) / speechbrain.utils.edit_distance",
        )
    return f"{what}: WER {wer:.2f}% = independent count ({edits}/{words})"


def recorded_wer(report, split, repo):
    """The WER a build recorded for ``split`` in its ``build_report.json``, if
    the recognizer at ``repo`` is the one that build published (the folder
    resolves inside the build's); None if unknown."""
    path = Path(report) if report else None
    if path is None or not path.is_file():
        return None
    if not Path(repo).resolve().is_relative_to(path.parent.resolve()):
        return None
    return json.loads(path.read_text()).get("wer", {}).get(split)


def wer_bound(recorded, tolerance):
    """The highest WER allowed against a recorded one: ``recorded`` plus the
    larger of ``tolerance['points']`` and ``tolerance['relative']`` of it."""
    return recorded + max(float(tolerance["points"]), float(tolerance["relative"]) * recorded)


def check_quality(wer, bound, what, seam, culprit):
    """A WER is not above ``bound`` (what the model is known to reach)."""
    if wer > bound:
        _fail(seam, f"{what}: WER {wer:.2f}% is above {bound:.2f}%", culprit)
    return f"{what}: WER {wer:.2f}% <= {bound:.2f}%"


# --------------------------------------------------------------------------
# fine-tuning step


def adam_steps(params, grads_per_step, group, max_grad_norm):
    """The parameters after Adam steps from fresh state, computed here.

    ``params``: {name: tensor}; ``grads_per_step``: one {name: grad} per step,
    each clipped to ``max_grad_norm`` as ``Brain.optimizers_step`` does.
    """
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    params = {k: v.double().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(grads_per_step, 1):
        grads = {k: g.double() for k, g in grads.items()}
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        if max_grad_norm and norm > max_grad_norm:
            scale = max_grad_norm / (norm + 1e-6)
            grads = {k: g * scale for k, g in grads.items()}
        for k, g in grads.items():
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v2[k] = beta2 * v2[k] + (1 - beta2) * g * g
            m_hat = m[k] / (1 - beta1**t)
            v_hat = v2[k] / (1 - beta2**t)
            params[k] = params[k] - lr * m_hat / (v_hat.sqrt() + eps)
    return params


def token_nll(lm, items):
    """Mean next-token NLL of ``items`` (``tokens_bos``/``tokens_eos`` each),
    padded and masked here from the items' own lengths."""
    lengths = [len(item["tokens_bos"]) for item in items]
    device = next(lm.parameters()).device
    inputs = torch.zeros(len(items), max(lengths), dtype=torch.long, device=device)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros(inputs.shape, device=device)
    for row, (item, n) in enumerate(zip(items, lengths)):
        inputs[row, :n] = item["tokens_bos"]
        targets[row, :n] = item["tokens_eos"]
        mask[row, :n] = 1.0
    out = lm(inputs)
    logits = out[0] if isinstance(out, tuple) else out
    nll = -torch.log_softmax(logits, dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)
    return (nll * mask).sum() / mask.sum()


#: Largest relative distance between the update ``fit_batch`` made and the one
#: computed here (float32 against float64 arithmetic: measured below 1e-4).
STEP_TOLERANCE = 1e-2


def check_optimizer_steps(fit_batch, lm, optimizer, item_batches, max_grad_norms, clipping=None):
    """``fit_batch`` on each batch of ``item_batches`` moves the LM as Adam steps
    from fresh gradients do, each clipped to its ``max_grad_norms`` entry,
    computed here. ``clipping``: the object whose ``max_grad_norm`` attribute
    ``fit_batch`` clips to (the Brain), set for each step and put back; a
    tiny norm on one step makes clipping itself part of the check.

    The LM, its gradients and the optimizer are put back as they were.
    ``fit_batch`` is the Brain's: under DDP every rank calls this with the same
    batches, so the averaged gradient is each rank's own.
    """
    import copy

    from speechbrain.dataio.batch import PaddedBatch

    group = optimizer.param_groups[0]
    if (
        type(optimizer) is not torch.optim.Adam
        or len(optimizer.param_groups) != 1
        or group.get("weight_decay")
        or group.get("amsgrad")
    ):
        return f"optimizer step: not checked ({type(optimizer).__name__} is not plain Adam)"
    lm = _unwrap(lm)
    params = dict(lm.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    saved = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict())
    was_training = lm.training
    start = {n: params[n].detach().double().clone() for n in names}
    taken = []
    lm.eval()  # no dropout: the step computed here must see the same forward
    configured = getattr(clipping, "max_grad_norm", None)
    try:
        for p in lm.parameters():
            p.grad = None
        for items, max_norm in zip(item_batches, max_grad_norms):
            if clipping is not None:
                clipping.max_grad_norm = max_norm
            fit_batch(PaddedBatch(items))
            taken.append({n: params[n].detach().double() - start[n] for n in names})
    finally:
        if clipping is not None:
            clipping.max_grad_norm = configured
        lm.load_state_dict(saved)
        optimizer.load_state_dict(saved_opt)
        for p in lm.parameters():
            p.grad = None
        lm.train(was_training)

    ref = copy.deepcopy(lm).eval()
    ref_params = dict(ref.named_parameters())
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    current, distances = dict(start), []
    m = {n: torch.zeros_like(v) for n, v in start.items()}
    v = {n: torch.zeros_like(x) for n, x in start.items()}
    for t, (items, max_grad_norm) in enumerate(zip(item_batches, max_grad_norms), 1):
        with torch.no_grad():
            for n in names:
                ref_params[n].copy_(current[n].to(ref_params[n].dtype))
        loss = token_nll(ref, items)
        grads = torch.autograd.grad(loss, [ref_params[n] for n in names], allow_unused=True)
        grads = {
            n: (torch.zeros_like(current[n]) if g is None else g.double())
            for n, g in zip(names, grads)
        }
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        if max_grad_norm and norm > max_grad_norm:
            grads = {n: g * (max_grad_norm / (norm + 1e-6)) for n, g in grads.items()}
        for n, g in grads.items():
            m[n] = beta1 * m[n] + (1 - beta1) * g
            v[n] = beta2 * v[n] + (1 - beta2) * g * g
            step = lr * (m[n] / (1 - beta1**t)) / ((v[n] / (1 - beta2**t)).sqrt() + eps)
            current[n] = current[n] - step
        want = {n: current[n] - start[n] for n in names}
        distance = relative_distance(taken[t - 1], want)
        distances.append(distance)
        if not distance <= STEP_TOLERANCE:
            _fail(
                "fine-tuning step",
                f"optimizer step {t} of Brain.fit_batch moved the LM by {distance:.3g} (relative)"
                f" away from Adam's step computed from fresh gradients (at most {STEP_TOLERANCE})",
                "speechbrain.core (Brain.fit_batch / optimizers_step: zero_grad, clipping, step)",
            )
    return (
        f"optimizer steps: {len(item_batches)} Brain steps = Adam from fresh gradients"
        f" (relative distance {max(distances):.1e})"
    )


def check_lr_annealing(optimizer, lr_before, previous_loss, loss, scheduler):
    """After a valid stage, the optimizer's learning rate is NewBob's rule
    applied here: annealed by ``annealing_factor`` when the loss improved by
    less than ``improvement_threshold`` (relative), else unchanged. Checked
    when this process saw the previous loss and ``patient`` is 0; None otherwise."""
    if previous_loss is None or getattr(scheduler, "patient", None) != 0:
        return None
    improvement = (previous_loss - loss) / previous_loss if previous_loss else 0.0
    anneal = improvement < scheduler.improvement_threshold
    expected = lr_before * scheduler.annealing_factor if anneal else lr_before
    got = optimizer.param_groups[0]["lr"]
    if not math.isclose(got, expected, rel_tol=1e-9):
        _fail(
            "fine-tuning step",
            f"the learning rate after a valid loss {previous_loss:.5g} -> {loss:.5g} is {got:.6g},"
            f" NewBob's rule gives {expected:.6g}",
            "speechbrain.nnet.schedulers (NewBobScheduler / update_learning_rate)",
        )
    return f"learning rate annealed as NewBob's rule says ({lr_before:.3g} -> {got:.3g})"


def relative_distance(got, want):
    """``||got - want|| / ||want||`` over all tensors of two {name: tensor} maps."""
    num = sum(float(((got[k].double() - want[k]) ** 2).sum()) for k in want)
    den = sum(float((want[k] ** 2).sum()) for k in want)
    return math.sqrt(num / den) if den else math.sqrt(num)


# --------------------------------------------------------------------------
# checkpoint/resume


def checkpoints_in(save_folder):
    """``[(folder, meta)]`` of the checkpoints in ``save_folder``, read from their ``CKPT.yaml``."""
    import yaml

    found = []
    for folder in sorted(Path(save_folder).glob("CKPT+*")):
        meta_file = folder / "CKPT.yaml"
        if meta_file.is_file():
            found.append((folder, yaml.safe_load(meta_file.read_text()) or {}))
    return found


def check_recovered_best(save_folder, lm_module, key, epoch_values=(), all_epochs_here=True):
    """The LM holds the checkpoint with the lowest ``key`` (read from the
    ``CKPT.yaml`` files); that value is the lowest of ``epoch_values`` (the
    epochs this process ran: equal when it ran them all, else not above)."""
    found = [(f, m) for f, m in checkpoints_in(save_folder) if key in m]
    if not found:
        _fail(
            "checkpoint/resume",
            f"no checkpoint with {key!r} in {save_folder}",
            "speechbrain.utils.checkpoints (Checkpointer.save_and_keep_only)",
        )
    folder, meta = min(found, key=lambda fm: fm[1][key])
    if epoch_values:
        best = min(epoch_values)
        same = math.isclose(meta[key], best, rel_tol=1e-9, abs_tol=1e-12)
        if not (same or (not all_epochs_here and meta[key] < best)):
            _fail(
                "checkpoint/resume",
                f"the best kept checkpoint has {key} {meta[key]:.6g} but the best epoch had"
                f" {best:.6g}",
                "speechbrain.utils.checkpoints (save_and_keep_only / keep-only selection)",
            )
    lm_file = folder / "lm.ckpt"
    problem = _tensor_mismatch(
        torch.load(lm_file, map_location="cpu", weights_only=False), _unwrap(lm_module).state_dict()
    )
    if problem:
        _fail(
            "checkpoint/resume",
            f"the LM recovered is not {folder.name}, the best by {key}: {problem}",
            "speechbrain.utils.checkpoints (Checkpointer.recover_if_possible / find_checkpoint)",
        )
    return f"recovered {folder.name} ({key} {meta[key]:.4g}), the lowest of {len(found)}"


def check_resumed_from_newest(save_folder, lm_module, epoch_counter):
    """After ``on_fit_start`` recovered: the LM and the epoch counter are the
    newest checkpoint's (by its ``unixtime``). ``(line, end of epoch)``; None
    when there is no checkpoint."""
    found = checkpoints_in(save_folder)
    if not found:
        return None
    folder, meta = max(found, key=lambda fm: fm[1].get("unixtime", 0))
    problem = _tensor_mismatch(
        torch.load(folder / "lm.ckpt", map_location="cpu", weights_only=False),
        _unwrap(lm_module).state_dict(),
    )
    end_of_epoch = bool(meta.get("end-of-epoch", True))
    counter_file = folder / "counter.ckpt"
    done = None  # epochs completed: an intra-epoch checkpoint's epoch is run again
    if counter_file.is_file():
        done = int(counter_file.read_text().strip()) - (0 if end_of_epoch else 1)
    if problem or (done is not None and int(epoch_counter.current) != done):
        _fail(
            "checkpoint/resume",
            f"the resumed run does not start from the newest checkpoint {folder.name}"
            f" ({problem or f'{epoch_counter.current} epochs done, the checkpoint says {done}'})",
            "speechbrain.utils.checkpoints (Checkpointer.recover_if_possible)",
        )
    kind = "end of epoch" if end_of_epoch else "within epoch"
    return f"resumed from {folder.name} ({kind}, {done} epochs done)", end_of_epoch


# --------------------------------------------------------------------------
# samplers/DDP


def check_seen_once(seen_per_rank, expected_ids, what, partial=False):
    """Every expected id seen exactly once over the ranks (``partial``: a
    resumed epoch, some may be missing, none twice)."""
    seen = [i for ids in seen_per_rank for i in ids]
    counts = {}
    for i in seen:
        counts[i] = counts.get(i, 0) + 1
    twice = sorted(i for i, c in counts.items() if c > 1)
    unknown = sorted(set(counts) - set(expected_ids))
    missing = [] if partial else sorted(set(expected_ids) - set(counts))
    if twice or unknown or missing:
        _fail(
            "samplers/DDP",
            f"{what}: examples not seen exactly once across ranks (twice {twice[:5]},"
            f" missing {missing[:5]}, unknown {unknown[:5]}; {len(seen)} seen of"
            f" {len(expected_ids)})",
            "speechbrain.dataio.sampler (DynamicBatchSampler) / sbtemplate.ddp_dynamic_batching",
        )
    return f"{what}: {len(seen)} examples, each once"


def check_batch_budget(largest_per_rank, max_batch_length, max_batch_ex, what):
    """No batch a rank ran held more padded positions than ``max_batch_length``
    or more examples than ``max_batch_ex`` (``largest_per_rank``: one
    ``(padded, examples)`` maximum per rank, measured on the tensors)."""
    padded = max(p for p, _ in largest_per_rank)
    examples = max(n for _, n in largest_per_rank)
    if padded > max_batch_length or (max_batch_ex and examples > max_batch_ex):
        _fail(
            "samplers/DDP",
            f"{what}: a batch held {padded} padded tokens / {examples} examples, over"
            f" max_batch_length {max_batch_length} / max_batch_ex {max_batch_ex}",
            "speechbrain.dataio.sampler (DynamicBatchSampler)",
        )
    return f"{what}: largest batch {padded} padded tokens, {examples} examples, within budget"


def check_batch_counts(ran, promised, what):
    """Each rank ran as many batches as its sampler promised."""
    if list(ran) != list(promised):
        _fail(
            "samplers/DDP",
            f"{what}: ranks ran {list(ran)} batches, their samplers promised {list(promised)}",
            "speechbrain.dataio.dataloader / speechbrain.core (Brain._fit_train)",
        )
    return f"{what}: batches per rank {list(ran)} as promised"
