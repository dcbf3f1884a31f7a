"""What was fetched: one :class:`FetchRecord` per fetch, for reports.

Every fetch appends a record (kind of source, source, file, local path,
whether it was downloaded, cached or local, and how long it took) to
``fetch_log``, so that scripts can print where each file came from and tests
can check that a second fetch hit the cache.

Module state: ``fetch_log``, a list that is only ever appended to or cleared
in place (``del fetch_log[:]``), never rebound.
"""

import dataclasses

from sbtemplate.fetching.errors import _KIND_LABEL


@dataclasses.dataclass
class FetchRecord:
    """One fetched file: where from, where to, and whether it was downloaded."""

    kind: str
    source: str
    filename: str
    path: str
    status: str  # "downloaded", "cached" or "local"
    seconds: float

    def describe(self):
        """One report line: file, status (downloaded/cached/local), source and local path."""
        label = _KIND_LABEL[self.kind]
        return f"{self.filename:<22} {self.status:<10} from {label} {self.source} -> {self.path}"


fetch_log = []
