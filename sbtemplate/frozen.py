"""Frozen modules that stay frozen, and a hash that proves it.

Fine-tuning only the LM keeps the recognizer's modules next to it (they are
needed to decode the test set), but ``Brain.fit`` calls ``modules.train()``
every epoch: a frozen ``InputNormalization`` in train mode would update its
running statistics on every forward, and dropout would change the outputs.
:class:`FrozenModule` pins a module in eval mode with ``requires_grad=False``
(so ``Brain._wrap_distributed`` leaves it out of DDP), and
:func:`state_digest` hashes every parameter, buffer and normaliser statistic,
so "frozen" can be checked before and after training on every rank.
"""

import hashlib

import torch


class FrozenModule(torch.nn.Module):
    """Wraps a module: no gradients, always in eval mode (``train()`` is a no-op)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode=True):  # noqa: D401 - nn.Module interface
        """Stays in eval mode whatever ``mode`` is asked for."""
        return super().train(False)

    def forward(self, *args, **kwargs):
        """The wrapped module's forward, unchanged."""
        return self.module(*args, **kwargs)


def freeze(module):
    """A :class:`FrozenModule` around ``module`` (returned as is if it already is one)."""
    return module if isinstance(module, FrozenModule) else FrozenModule(module)


def _tensors(module):
    """``(name, tensor)`` for every parameter, buffer and plain-attribute statistic, sorted."""
    items = {}
    for name, tensor in module.named_parameters():
        items["param:" + name] = tensor
    for name, tensor in module.named_buffers():
        items["buffer:" + name] = tensor
    # InputNormalization keeps its statistics in plain attributes.
    for prefix, sub in module.named_modules():
        stats = getattr(sub, "_statistics_dict", None)
        if callable(stats):
            for key, value in stats().items():
                name = f"stat:{prefix}.{key}"
                items[name] = value if torch.is_tensor(value) else torch.tensor(value)
    return sorted(items.items())


def state_digest(module):
    """sha256 of every parameter, buffer and statistic of ``module`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in _tensors(module):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def state_digests(modules):
    """``{name: state_digest(module)}`` for a mapping of modules."""
    return {name: state_digest(module) for name, module in sorted(modules.items())}


def trainable_parameters(modules):
    """Parameters with ``requires_grad`` (each once), for the optimizer."""
    seen, params = set(), []
    for parameter in modules.parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            params.append(parameter)
    return params
