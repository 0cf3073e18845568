"""Every status a message or a command can have in the log, spelled once.

They are ``StrEnum``s: the log stores, and the CLI prints, the plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    IGNORED = "ignored"
    DUPLICATE = "duplicate"
    #: Waiting for the Journeys API's verdict (``ack_mode = "dispatched"``).
    PENDING = "pending"


class CommandStatus(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    #: Settled without a call: cancelled before its trigger was sent.
    ANNIHILATED = "annihilated"
    DEAD = "dead"
    FAILED = "failed"
    #: A dead letter an operator chose not to send (``dead-letters discard``): final, neither sent nor dead.
    DISCARDED = "discarded"


#: Commands the dispatcher still has to work on.
OPEN_STATUSES = (CommandStatus.PENDING, CommandStatus.IN_FLIGHT)
#: Commands settled for good.
FINAL_STATUSES = frozenset(
    {CommandStatus.DONE, CommandStatus.ANNIHILATED, CommandStatus.DEAD, CommandStatus.FAILED, CommandStatus.DISCARDED}
)
#: Final and successful: what the command asked for holds at the API (or never needed a call).
SUCCEEDED = (CommandStatus.DONE, CommandStatus.ANNIHILATED)
#: Final and unsuccessful: the operator's dead letters.
DEAD_LETTERS = (CommandStatus.DEAD, CommandStatus.FAILED)


class ServiceState(StrEnum):
    """The service's state as ``GET /status`` and ``hl7bridge status`` report it (``workflow.status``)."""

    OK = "ok"
    #: Working, but something needs an operator's attention soon (held API, dead letters, token expiring).
    DEGRADED = "degraded"
    #: Not doing its job (token refused, dispatcher down, log unwritable, listeners down).
    FAILING = "failing"


class Role(StrEnum):
    """An account's role (``workflow.accounts``): what its holder may do is ``workflow.accounts.may``."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class Permission(StrEnum):
    """What a request needs: reading (patient data masked), unmasking one message with a reason, acting on the
    log (retry, discard, replay), administering accounts."""

    READ = "read"
    UNMASK = "unmask"
    ACT = "act"
    ADMIN = "admin"
