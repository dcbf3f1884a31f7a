"""Length-homogeneous sub-batches inside one padding-invariant call.

A padded batch costs its longest member times its size: in the encoder every
utterance is run over the longest one's frames, and in the beam search every
utterance is stepped (and attends, and is CTC-scored over all encoder frames)
until the longest one ends. Batches of files in the order they come mix
lengths freely, and decoding them that way was measured slower than decoding
the files one by one.

Because the padding-invariant components give each utterance the result it
would get alone, whatever else is in the batch, they are free to reorganise the
work of one call: the encoder and the beam searcher split a batch into groups
of similar length, run each group on its own (padded only to its own longest
member), and put the results back in the caller's order. What a caller passes
and gets back is unchanged; only the cost is.
"""

import torch

#: Defaults: a group's shortest member is at least its longest divided by this.
#: The encoder's work is mostly convolutions whose cost grows with the padded
#: frames and barely with the number of calls, so it takes tighter groups than
#: the beam search, where every group pays a fixed cost per decoding step
#: (measured on the full profile: docs/benchmarks.md).
ENCODER_MAX_LENGTH_RATIO = 1.5
SEARCH_MAX_LENGTH_RATIO = 2.0


def length_groups(lengths, max_length_ratio=SEARCH_MAX_LENGTH_RATIO):
    """Partition batch indices into groups of similar length, longest first.

    The indices are sorted by length (longest first, ties in batch order) and a
    new group starts where an item is shorter than the current group's longest
    divided by ``max_length_ratio``. ``None`` or ``inf`` keeps the batch whole.

    Arguments
    ---------
    lengths : sequence of int or torch.Tensor
        Each item's own length (samples or frames).
    max_length_ratio : float or None
        At least 1.

    Returns
    -------
    list of list of int

    Example
    -------
    >>> length_groups([100, 30, 95, 20, 60], max_length_ratio=1.5)
    [[0, 2], [4], [1, 3]]
    """
    if torch.is_tensor(lengths):
        lengths = lengths.tolist()
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if max_length_ratio is None or max_length_ratio == float("inf"):
        return [order] if order else []
    if max_length_ratio < 1:
        raise ValueError(f"max_length_ratio must be at least 1, got {max_length_ratio}")
    groups = []
    for i in order:
        if groups and lengths[i] * max_length_ratio >= lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def scatter_padded(parts, groups, batch_size, pad_value=0):
    """Put per-group ``[group, time, ...]`` tensors back into one batch.

    Each part is padded along axis 1 to the longest part with ``pad_value``;
    row ``k`` of ``parts[g]`` goes to batch row ``groups[g][k]``.
    """
    width = max(p.shape[1] for p in parts)
    first = parts[0]
    out = first.new_full((batch_size, width) + tuple(first.shape[2:]), pad_value)
    for part, rows in zip(parts, groups):
        index = torch.as_tensor(rows, device=first.device)
        out[index, : part.shape[1]] = part
    return out


def scatter_rows(parts, groups, batch_size):
    """Put per-group ``[group, ...]`` tensors (same trailing shape) back into one batch."""
    first = parts[0]
    out = first.new_empty((batch_size,) + tuple(first.shape[1:]))
    for part, rows in zip(parts, groups):
        out[torch.as_tensor(rows, device=first.device)] = part
    return out


__all__ = [
    "ENCODER_MAX_LENGTH_RATIO",
    "SEARCH_MAX_LENGTH_RATIO",
    "length_groups",
    "scatter_padded",
    "scatter_rows",
]
