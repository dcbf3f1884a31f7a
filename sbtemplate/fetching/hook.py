"""The fetch hook: routing SpeechBrain's fetching through this package.

SpeechBrain fetches through ``speechbrain.utils.fetching.fetch``, which
``Pretrainer.collect_files``, ``Pretrained.from_hparams`` and
``Pretrained.load_audio`` all call, and several SpeechBrain modules hold their
own reference to it (``from speechbrain.utils.fetching import fetch``).
:func:`install` rebinds ``fetch`` in every loaded SpeechBrain module to
:func:`sbtemplate.fetching.fetch`, which still uses SpeechBrain's own fetch
(saved here) for the transfers; :func:`uninstall` undoes it. :func:`setup`
configures the endpoint and the policy in the right order, then installs.

Module state: ``_sb["fetch"]``, SpeechBrain's original fetch, saved the
first time it is needed.
"""

import sys
from pathlib import Path

from sbtemplate.fetching import endpoint
from sbtemplate.fetching.coordination import fetch
from sbtemplate.fetching.endpoint import check_hub_endpoint, current_hub_endpoint, use_hub_endpoint
from sbtemplate.fetching.fetch_policy import configure

_sb = {"fetch": None}


def _speechbrain_fetch():
    if _sb["fetch"] is None:
        import speechbrain.utils.fetching as sb_fetching

        if sb_fetching.fetch is fetch:  # pragma: no cover - cannot happen in-process
            raise RuntimeError("speechbrain's fetch was replaced before it was saved")
        _sb["fetch"] = sb_fetching.fetch
    return _sb["fetch"]


def _speechbrain_modules():
    """Loaded SpeechBrain modules (lazy placeholders are skipped: once loaded,
    they import ``fetch`` from speechbrain.utils.fetching, already replaced)."""
    import types

    for name, module in list(sys.modules.items()):
        if (name == "speechbrain" or name.startswith("speechbrain.")) and type(
            module
        ) is types.ModuleType:
            yield module


def install():
    """Route SpeechBrain's fetching (Pretrainer, from_hparams, load_audio, ...)
    through :func:`fetch`. Idempotent; :func:`uninstall` undoes it."""
    original = _speechbrain_fetch()
    for module in _speechbrain_modules():
        if vars(module).get("fetch") is original:
            module.fetch = fetch


def uninstall():
    """Give SpeechBrain back its own fetch (no-op if :func:`install` never ran)."""
    original = _sb["fetch"]
    if original is None:
        return
    for module in _speechbrain_modules():
        if vars(module).get("fetch") is fetch:
            module.fetch = original


def installed():
    """Whether SpeechBrain's fetching currently goes through :func:`fetch`."""
    module = sys.modules.get("speechbrain.utils.fetching")
    return module is not None and module.fetch is fetch


def setup(hub_endpoint=None, *, cache_dir=None, hub_cache_dir=None, allow_network=None):
    """Configure everything, in the right order, then install the fetch hook.

    ``hub_endpoint``: where the Hub client goes (default: keep ``HF_ENDPOINT``
    or the public Hub). ``cache_dir``: this project's fetch cache; the Hub
    cache defaults to ``<cache_dir>/hub`` when it is given.
    """
    if hub_endpoint is not None:
        use_hub_endpoint(hub_endpoint)
    elif endpoint._state["endpoint"] is None:
        endpoint._state["endpoint"] = current_hub_endpoint()
    changes = {}
    if cache_dir is not None:
        changes["cache_dir"] = str(cache_dir)
        changes["hub_cache_dir"] = str(hub_cache_dir or Path(cache_dir) / "hub")
    elif hub_cache_dir is not None:
        changes["hub_cache_dir"] = str(hub_cache_dir)
    if allow_network is not None:
        changes["allow_network"] = allow_network
    configure(**changes)
    install()
    check_hub_endpoint()
