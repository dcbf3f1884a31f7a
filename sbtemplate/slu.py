"""Decoupled spoken-language understanding: data, targets and result files.

Used by ``multisource_mini_recipe.py`` (speech -> ASR transcript -> semantics).

* Semantics labels ``{"intent": ..., "slots": {...}}`` become one flat,
  deterministic target string, ``intent | slot = value | ...`` with the slots
  in sorted order (:func:`serialize_semantics`); exact match of that string is
  exact match of the semantics. :func:`parse_semantics` inverts it.
* :func:`prepare_slu_data` writes the recipe's JSON descriptors from the
  profile's manifests (text-only target-domain train/valid, target-domain test
  speech).

Nothing here imports huggingface_hub, so it is safe to import before the Hub
endpoint is configured.
"""

import json
from pathlib import Path

import torch

from sbtemplate import atomic_write

SLOT_SEPARATOR = "|"
VALUE_SEPARATOR = "="


# ---------------------------------------------------------------------------
# Semantics <-> target string
# ---------------------------------------------------------------------------


def serialize_semantics(semantics):
    """``{"intent": "set_timer", "slots": {"unit": "hours", "duration": "ten"}}``
    -> ``"set_timer | duration = ten | unit = hours"`` (slots sorted by name,
    whitespace normalised, lower case)."""
    parts = [_clean(semantics["intent"])]
    for name in sorted(semantics.get("slots", {})):
        value = _clean(semantics["slots"][name])
        parts.append(f"{_clean(name)} {VALUE_SEPARATOR} {value}")
    return f" {SLOT_SEPARATOR} ".join(parts)


def _clean(text):
    text = " ".join(str(text).lower().split())
    if not text or SLOT_SEPARATOR in text or VALUE_SEPARATOR in text:
        raise ValueError(f"cannot serialise semantics field {text!r}")
    return text


def parse_semantics(text):
    """Inverse of :func:`serialize_semantics`; ``None`` if ``text`` is malformed
    (an untrained decoder produces such strings)."""
    parts = [p.strip() for p in " ".join(text.split()).split(SLOT_SEPARATOR)]
    if not parts or not parts[0] or " " in parts[0] or VALUE_SEPARATOR in parts[0]:
        return None
    slots = {}
    for part in parts[1:]:
        name, sep, value = (p.strip() for p in part.partition(VALUE_SEPARATOR))
        if not sep or not name or not value or " " in name or name in slots:
            return None
        if VALUE_SEPARATOR in value:
            return None
        slots[name] = value
    return {"intent": parts[0], "slots": slots}


def semantic_tokens(text):
    """The decoder's output units: the target string's whitespace-separated words."""
    return text.split()


# ---------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------

#: recipe split -> (manifest in <profile_root>/manifests, has speech)
SPLITS = {
    "train": ("target_lm_train.json", False),
    "valid": ("target_lm_valid.json", False),
    "test": ("test.json", True),
}


def prepare_slu_data(manifests_folder, save_folder, splits=SPLITS):
    """Write ``<save_folder>/<split>.json`` for the SLU recipe.

    Each entry keeps ``words`` (the reference transcript) and gets
    ``semantics`` as the serialised target string; speech splits keep ``wav``
    (with its ``{data_root}`` placeholder), ``length`` and ``spk_id``. Skipped
    when the files exist and were prepared from the same manifests.
    """
    manifests_folder = Path(manifests_folder)
    save_folder = Path(save_folder)
    save_folder.mkdir(parents=True, exist_ok=True)
    marker = save_folder / "prepared.json"
    fingerprint = {
        split: {
            "manifest": str(manifests_folder / name),
            "size": (manifests_folder / name).stat().st_size,
        }
        for split, (name, _) in splits.items()
    }
    if marker.is_file() and all((save_folder / f"{s}.json").is_file() for s in splits):
        try:
            if json.loads(marker.read_text()) == fingerprint:
                return {s: save_folder / f"{s}.json" for s in splits}
        except ValueError:
            pass
    written = {}
    for split, (name, speech) in splits.items():
        source = json.loads((manifests_folder / name).read_text())
        out = {}
        for uid in sorted(source):
            entry = source[uid]
            item = {"words": entry["words"], "semantics": serialize_semantics(entry["semantics"])}
            if speech:
                item.update(wav=entry["wav"], length=entry["length"], spk_id=entry.get("spk_id"))
            out[uid] = item
        target = save_folder / f"{split}.json"
        atomic_write.write_json(target, out, indent=1)
        written[split] = target
    atomic_write.write_json(marker, fingerprint, indent=1)
    return written


def pad_token_ids(sequences, pad_value=0):
    """Lists of token ids -> (``[batch, max_len]`` LongTensor, relative lengths,
    integer lengths). An empty sequence counts as one padding token so that
    every utterance has something to attend to."""
    lengths = [max(len(s), 1) for s in sequences]
    longest = max(lengths)
    padded = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            padded[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    abs_lens = torch.tensor(lengths, dtype=torch.long)
    return padded, abs_lens.float() / longest, abs_lens


# ---------------------------------------------------------------------------
# Fetch report
# ---------------------------------------------------------------------------


def fetched_sources(records):
    """The fetch log (``sbtemplate.fetching.fetch_log``) as sorted plain dicts,
    without ports or absolute paths, so that runs can be compared."""
    rows = {(r.filename, r.kind) for r in records}
    return [{"file": f, "kind": k} for f, k in sorted(rows)]
