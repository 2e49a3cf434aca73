"""Identities this node refuses (``nexus-server --deny-file FILE``): revocation for tokens
that renew themselves and certificates that live a year.

Rules:

* The file holds one identity a line: ``device ID``, ``operator NAME`` or ``claim NAME``
  (a bare ``ID`` is a device); ``#`` starts a comment; blank lines are skipped. A line
  that is none of these is reported with its number and the whole file is refused (the
  list in force stays): a typo must not silently unrevoke anyone.
* It is read when the node starts (a bad file stops the start) and again whenever its
  modification time, size or inode changes, checked at most once a second
  (:meth:`DenyList.refresh`, from the server's ticker): an edit takes effect within a
  second, for new connections and for open ones (closed with 4000).
* A denied identity is refused at connect with ``AUTH_FAILED`` ("revoked"), whatever its
  credential: a token (renewed or not) or a client certificate. A node reads its own
  file: in a cluster, give every node the same file.
"""

from __future__ import annotations

import logging
import os
from typing import FrozenSet, Optional, Tuple

from ..auth import read_bounded
from ..errors import AuthError

log = logging.getLogger("nexus.server")

KINDS = ("device", "operator", "claim")
MAX_FILE_BYTES = 16 << 20
Key = Tuple[str, str]


def parse(text: str, path: str) -> FrozenSet[Key]:
    """The (role, subject) pairs of a deny file; AuthError naming the bad line."""
    out = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 1:
            parts = ["device", parts[0]]
        if len(parts) != 2 or parts[0] not in KINDS or len(parts[1]) > 128:
            raise AuthError(f"deny file {path}, line {number}: expected 'device ID', "
                            "'operator NAME', 'claim NAME' or a bare device ID")
        out.add((parts[0], parts[1]))
    return frozenset(out)


class DenyList:
    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.denied: FrozenSet[Key] = frozenset()
        self._seen: Optional[Tuple[int, int, int]] = None
        if path is not None:
            self.denied = parse(self._read(), path)  # a bad file stops the start
            self._seen = self._stamp()

    def refused(self, role: str, subject: str) -> bool:
        return (role, subject) in self.denied

    def refresh(self) -> FrozenSet[Key]:
        """Read the file again if it changed; the identities denied since the last read
        (to close their connections). A file that cannot be read or parsed leaves the
        list as it was, and says why once per change."""
        if self.path is None:
            return frozenset()
        stamp = self._stamp()
        if stamp == self._seen:
            return frozenset()
        self._seen = stamp
        try:
            denied = parse(self._read(), self.path)
        except AuthError as exc:
            log.error("%s; the deny list in force is kept (%d identities)", exc,
                      len(self.denied))
            return frozenset()
        added = denied - self.denied
        log.warning("deny file %s read again: %d identities denied (%d new)", self.path,
                    len(denied), len(added))
        self.denied = denied
        return added

    def _stamp(self) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(self.path or "")
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> str:
        return read_bounded(self.path or "", MAX_FILE_BYTES, "deny file").decode(
            "utf-8", "replace")
