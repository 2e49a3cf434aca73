"""The exception tree of the Nexus Edge Agent.

Every error carries what a person needs to act on it::

    NexusError
    ├── ConfigError            a config key path (or file) and what is wrong with it
    ├── ProtocolError          a message that breaks the wire protocol
    │   ├── LocalProtocolError     we were about to send something invalid (our bug)
    │   └── RemoteProtocolError    the peer sent something invalid (its fault)
    ├── AuthError              a token that cannot be used (missing, unreadable, too open)
    ├── CommandRejected        a command request refused by the allow-list, with the reason
    ├── NotStored              a message the outbox could not store, and whether that is
    │                          a lock being waited out
    └── StoreError             (store.py) a state file that cannot be used now: its path,
                               the reason, and whether trying later may work

Outside the tree, because they are control flow of one module and never reach a
person as they are: ``transport.ConnectionLost`` (and ``AuthRefused``), which end
one connection (the transport logs them and reconnects); ``provision.ProvisionError``
(its message is printed by the ``provision`` command); ``cluster.Unreachable``
(Redis did not answer; the node says so in its health).

The module imports nothing, so every other module may import it.
"""

from __future__ import annotations


class NexusError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(NexusError):
    """A configuration value is wrong. ``key`` is the dotted path, e.g. ``server.url``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class ProtocolError(NexusError):
    """A message that breaks the protocol.

    ``code`` is the wire error code (``INVALID_MESSAGE`` ...), ``field`` the
    dotted path of the offending field when there is one, and ``msg_id`` the id
    of the message when it could be read, so an error reply can carry it.
    """

    def __init__(
        self, code: str, message: str, field: str | None = None, msg_id: str | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.msg_id = msg_id


class LocalProtocolError(ProtocolError):
    """We tried to build a message the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a message the protocol does not allow."""


class AuthError(NexusError):
    """A token is missing, unreadable, or stored with unsafe permissions."""


class CommandRejected(NexusError):
    """A command request that will not run; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotStored(NexusError):
    """The outbox could not store a message (a full or failing disk, a lock held by another
    process). ``waiting`` is True for a lock: that is waited out, and one that never ends
    means the agent is stuck; anything else is the disk's condition, not a stuck agent."""

    def __init__(self, reason: str, waiting: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.waiting = waiting
