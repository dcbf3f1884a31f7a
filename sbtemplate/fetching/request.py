"""One fetch request: which file, from which kind of source, to where.

:func:`_kind_of` tells a local folder, a Hub repo id and a base URL apart
(as SpeechBrain does, except that a path-like source is never taken for a
repo id). A :class:`_Request` carries what one fetch is about; the back-ends
use it to build their :class:`FetchError` and to call SpeechBrain's own
fetch for the transfer. The two file helpers are shared by the back-ends.
"""

import dataclasses
import os
from pathlib import Path

from sbtemplate.fetching.endpoint import current_hub_endpoint
from sbtemplate.fetching.errors import KIND_HUB, KIND_LOCAL, KIND_URL, FetchError


def _kind_of(source):
    from speechbrain.utils.fetching import FetchFrom, guess_source

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    fetch_from, where = guess_source(source)
    if fetch_from == FetchFrom.HUGGING_FACE and _looks_like_a_path(str(where)):
        # SpeechBrain takes any source that is not an existing folder for a
        # Hub repo id; a missing folder then fails as an invalid repo id.
        fetch_from = FetchFrom.LOCAL
    kind = {
        FetchFrom.LOCAL: KIND_LOCAL,
        FetchFrom.HUGGING_FACE: KIND_HUB,
        FetchFrom.URI: KIND_URL,
    }[fetch_from]
    return kind, str(where)


def _looks_like_a_path(source):
    """A filesystem path, never a Hub repo id (``owner/name`` or ``name``)."""
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


@dataclasses.dataclass
class _Request:
    """One file asked of one source, with the SpeechBrain arguments to fetch it."""

    kind: str
    source: str
    filename: str
    savedir: object
    save_filename: str
    local_strategy: object
    config: object

    @property
    def destination(self):
        if self.savedir is None:
            return None
        return (Path(self.savedir) / self.save_filename).absolute()

    def error(self, reason):
        revision = endpoint = None
        if self.kind == KIND_HUB:
            revision = self.config.revision or "main"
            endpoint = current_hub_endpoint()
        return FetchError(self.kind, self.source, self.filename, reason, revision, endpoint)

    def sb_fetch(self, filename=None, savedir=None, save_filename=None, use_savedir=True):
        from speechbrain.utils.fetching import FetchFrom, FetchSource

        fetch_from = {
            KIND_LOCAL: FetchFrom.LOCAL,
            KIND_HUB: FetchFrom.HUGGING_FACE,
            KIND_URL: FetchFrom.URI,
        }[self.kind]
        # Imported here: the hook imports the fetch path, which imports this module.
        from sbtemplate.fetching import hook

        return hook._speechbrain_fetch()(
            filename=filename or self.filename,
            source=FetchSource(fetch_from, self.source),
            savedir=self.savedir if use_savedir else savedir,
            save_filename=self.save_filename if use_savedir else save_filename,
            local_strategy=self.local_strategy,
            fetch_config=self.config,
        )


def _exists(path):
    return path is not None and os.path.exists(path)


def _remove_link_or_file(path):
    if path is not None and (os.path.islink(path) or os.path.exists(path)):
        try:
            os.unlink(path)
        except OSError:
            pass
