"""Identities this node refuses (``nexus-server --deny-file FILE``): revocation for tokens
that renew themselves and certificates that live a year.

Rules:

* The file holds one identity a line: ``device ID``, ``operator NAME`` or ``claim NAME``
  (a bare ``ID`` is a device); ``#`` starts a comment; blank lines are skipped. A line
  that is none of these is reported with its number and the whole file is refused (the
  list in force stays): a typo must not silently unrevoke anyone.
* It is read when the node starts (a bad file stops the start) and again whenever its
  modification time, size or inode changes (and at every check while it was modified
  less than 3 s ago: two edits in one mtime tick keep the stamp), checked once a second
  (:meth:`DenyList.refresh`, from the server's ticker): an edit takes effect within a
  second, for new connections and for open ones (closed with 4000).
* A denied identity is refused at connect with ``AUTH_FAILED`` ("revoked"), whatever its
  credential: a token (renewed or not) or a client certificate. A node reads its own
  file: in a cluster, give every node the same file.
"""

from __future__ import annotations

import logging
import os
import time
from typing import FrozenSet, Optional, Tuple

from ..auth import read_bounded
from ..errors import AuthError

log = logging.getLogger("nexus.server")

KINDS = ("device", "operator", "claim")
MAX_FILE_BYTES = 16 << 20
# A file changed this recently may change again with the same stamp (mtime moves in coarse
# ticks, 1 or 2 s on some file systems): it is read every refresh until it is older (git's
# "racily clean" entries).
RACY_NS = 3_000_000_000
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
        self._racy = False
        if path is not None:
            stamp = self._stamp()
            self.denied = parse(self._read(), path)  # a bad file stops the start
            self._note(stamp)

    def refused(self, role: str, subject: str) -> bool:
        return (role, subject) in self.denied

    def refresh(self) -> FrozenSet[Key]:
        """Read the file again if it changed; the identities denied since the last read
        (to close their connections). A file that cannot be read or parsed leaves the
        list as it was, and says why once per change."""
        if self.path is None:
            return frozenset()
        stamp = self._stamp()
        changed = stamp != self._seen
        if not changed and not self._racy:
            return frozenset()
        self._note(stamp)
        try:
            denied = parse(self._read(), self.path)
        except AuthError as exc:
            log.error("%s; the deny list in force is kept (%d identities)", exc,
                      len(self.denied))
            return frozenset()
        if not changed and denied == self.denied:
            return frozenset()  # read again only because it was recent: no news
        added = denied - self.denied
        log.warning("deny file %s read again: %d identities denied (%d new)", self.path,
                    len(denied), len(added))
        self.denied = denied
        return added

    def _note(self, stamp: Optional[Tuple[int, int, int]]) -> None:
        # Taken before the read: a write after it changes the stamp or is within RACY_NS.
        self._seen = stamp
        self._racy = stamp is not None and stamp[0] > time.time_ns() - RACY_NS

    def _stamp(self) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(self.path or "")
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> str:
        return read_bounded(self.path or "", MAX_FILE_BYTES, "deny file").decode(
            "utf-8-sig", "replace")  # -sig: an editor's byte-order mark is not an id
