"""One place for fetching: Hub endpoint, verified downloads, clear errors, DDP.

SpeechBrain fetches from three kinds of source (a local folder, a Hugging Face
Hub repo, a base URL) through ``speechbrain.utils.fetching.fetch``, which
``Pretrainer.collect_files``, ``Pretrained.from_hparams`` and
``Pretrained.load_audio`` all call. :func:`install` routes those calls
through :func:`fetch` here, which keeps SpeechBrain's and huggingface_hub's
real clients doing the transfers and adds:

* **integrity**: every file is checked against the sha256 and size in the
  source's ``manifest.json``; a truncated or corrupted download is removed
  from every cache it reached (Hub blob and snapshot link, URL download,
  the link in ``savedir``) so the next fetch downloads it again;
* **fast, clear errors**: one :class:`FetchError` that names the kind of
  source, the repo or URL, and the file, raised within a second or two (an
  unreachable server is detected with one short TCP probe instead of
  huggingface_hub's ~20-second retry loop); offline with a warm cache works;
* **DDP**: one process downloads, the others wait and then load from the
  cache without touching the network; an error reaches every rank;
* **the Hub endpoint**: huggingface_hub reads ``HF_ENDPOINT`` once, at
  import. :func:`use_hub_endpoint` sets it before the import, or re-points
  every endpoint-derived value if the import already happened, and every Hub
  fetch checks the two still agree.

Nothing in this package imports huggingface_hub or SpeechBrain at import
time, so ``import sbtemplate.fetching`` is safe before the endpoint is set.

One concept per module; this package re-exports the public API:

* ``errors``: :class:`FetchError`, :class:`HubEndpointError`, the source kinds;
* ``endpoint``: the Hub endpoint (:func:`use_hub_endpoint`, :func:`check_hub_endpoint`);
* ``fetch_policy``: :class:`FetchPolicy`, :func:`configure`, :func:`policy`;
* ``records``: :class:`FetchRecord` and ``fetch_log``;
* ``hook``: :func:`install`, :func:`uninstall`, :func:`setup`;
* ``coordination``: :func:`fetch`, one downloader under DDP;
* ``request``, ``backends``, ``probes``, ``verification``: one fetch, by kind
  of source, with reachability probes and manifest checks;
* ``recipe``: configurations that declare sources (:func:`resolve_endpoints`,
  :func:`use_endpoints`, :func:`collect_pretrained`).

Module state lives in one module each (``endpoint._state``,
``fetch_policy._policy``, ``records.fetch_log``, ``hook._sb``,
``verification._verified``, ``recipe._serving``): patch it there, not here.

Typical use (see single_node_pretrained.py)::

    from sbtemplate import fetching
    fetching.setup(hub_endpoint=served.hub_endpoint, cache_dir=cache)
    from speechbrain.inference.ASR import EncoderDecoderASR  # after setup
"""

from sbtemplate.fetching.coordination import fetch
from sbtemplate.fetching.endpoint import (
    PUBLIC_HUB_ENDPOINT,
    check_hub_endpoint,
    current_hub_endpoint,
    hub_endpoint,
    use_hub_endpoint,
)
from sbtemplate.fetching.errors import (
    KIND_HUB,
    KIND_LOCAL,
    KIND_URL,
    FetchError,
    HubEndpointError,
)
from sbtemplate.fetching.fetch_policy import FetchPolicy, configure, get_policy, policy
from sbtemplate.fetching.hook import install, installed, setup, uninstall
from sbtemplate.fetching.recipe import (
    ENDPOINT_MODES,
    PRETRAINER_KEYS,
    collect_pretrained,
    loopback_servers,
    resolve_endpoints,
    stop_serving,
    use_endpoints,
)
from sbtemplate.fetching.records import FetchRecord, fetch_log

__all__ = [
    "KIND_LOCAL",
    "KIND_HUB",
    "KIND_URL",
    "PUBLIC_HUB_ENDPOINT",
    "FetchError",
    "HubEndpointError",
    "use_hub_endpoint",
    "current_hub_endpoint",
    "check_hub_endpoint",
    "hub_endpoint",
    "FetchPolicy",
    "get_policy",
    "configure",
    "policy",
    "FetchRecord",
    "fetch_log",
    "fetch",
    "install",
    "uninstall",
    "installed",
    "setup",
    "ENDPOINT_MODES",
    "resolve_endpoints",
    "loopback_servers",
    "stop_serving",
    "use_endpoints",
    "PRETRAINER_KEYS",
    "collect_pretrained",
]
