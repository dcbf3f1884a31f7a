"""The fetch entry point, and one downloader under DDP.

:func:`fetch` is the drop-in for ``speechbrain.utils.fetching.fetch`` that
:func:`sbtemplate.fetching.install` puts in SpeechBrain's place. Alone, a
process fetches by itself. When several torch.distributed processes call it
together, rank 0 fetches (and downloads) while the others wait, then load
from the cache without touching the network; an error on rank 0 is
broadcast, so every rank raises the same :class:`FetchError` instead of
hanging.
"""

import os
import sys

from sbtemplate.fetching.backends import _fetch_here
from sbtemplate.fetching.errors import FetchError
from sbtemplate.fetching.request import _kind_of


def fetch(
    filename,
    source,
    savedir=None,
    save_filename=None,
    local_strategy=None,
    fetch_config=None,
):
    """Drop-in for ``speechbrain.utils.fetching.fetch``: verified, with clear
    errors, one downloader under DDP. Returns the local path."""
    from speechbrain.utils.fetching import FetchConfig, LocalStrategy

    if local_strategy is None:
        local_strategy = LocalStrategy.SYMLINK
    if fetch_config is None:
        fetch_config = FetchConfig()
    args = (filename, source, savedir, save_filename, local_strategy, fetch_config)
    world = _ddp_world()
    if world is None:
        return _fetch_here(*args, network=True)
    return _fetch_coordinated(world, args)


def _ddp_world():
    """torch.distributed when several processes take part in this call, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from speechbrain.utils.distributed import ddp_prevent_block

    if ddp_prevent_block():  # inside run_on_main / main_process_only: only we run
        return None
    return dist


def _fetch_coordinated(dist, args):
    """Rank 0 fetches (and downloads); the others wait, then load from the cache."""
    from speechbrain.utils.distributed import MainProcessContext, if_main_process

    if dist.get_rank() == 0:
        error = None
        try:
            if not if_main_process():
                # SpeechBrain picks its main process from the RANK variable;
                # without it, its helpers would download nowhere.
                raise RuntimeError(
                    f"torch.distributed rank 0 has RANK={os.environ.get('RANK')!r}: "
                    "launch with torchrun (or set RANK and LOCAL_RANK)"
                )
            # MainProcessContext: SpeechBrain's own main_process_only helpers
            # inside fetch must not broadcast, only this function does.
            with MainProcessContext():
                path = _fetch_here(*args, network=True)
            outcome = ("ok", str(path))
        except FetchError as exc:
            error, outcome = exc, ("fetch_error", exc.as_dict())
        except BaseException as exc:  # noqa: BLE001 - must reach the other ranks
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        return path
    box = [None]
    dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if status == "fetch_error":
        raise FetchError(**payload)
    if status == "error":
        kind, source = _kind_of(args[1])
        raise FetchError(kind, source, args[0], f"the main process failed: {payload}")
    with MainProcessContext():
        return _fetch_here(*args, network=False, after_main=True)
