"""The duplicate planner: which messages of a group repeat an accepted one (or one earlier in the group),
the rows to insert, and the result each request gets; decided before touching the database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hl7bridge.core.status import MessageStatus

from .schema import commands


@dataclass(slots=True)
class WriteRequest:
    """One message row to insert; ``dedupe_key`` set for messages that would be answered AA."""

    row: dict[str, Any]
    dedupe_key: tuple[str, str, str] | None
    on_done: Callable[[WriteResult], None]
    commands: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class WriteResult:
    message_id: int | None
    duplicate_of: int | None = None
    original_ack: bytes | None = None
    original_ack_code: str | None = None
    error: str | None = None
    command_ids: tuple[int, ...] = ()
    #: With ``error``: the connection was lost during COMMIT, so the message may be in the log (and acted on) or
    #: not. AA would be a guess, AR a refusal of what may be accepted: the sender gets no answer and its
    #: connection is closed, so it resends, and the resend is deduplicated or, if nothing was committed, accepted.
    outcome_unknown: bool = False


COMMAND_COLUMNS = tuple(c.name for c in commands.columns if c.name != "id")


class DuplicatePlan:
    """Which rows of a group are duplicates, of what, and the rows to insert, before touching the database."""

    def __init__(self, group: list[WriteRequest], originals: dict[tuple[str, str, str], Any]) -> None:
        self.group = group
        self.owners: list[int] = []
        self.rows: list[dict[str, Any]] = []
        self.duplicate_of: list[tuple[int, bytes, str] | int | None] = []
        first_in_group: dict[tuple[str, str, str], int] = {}
        for position, request in enumerate(group):
            key, row = request.dedupe_key, request.row
            original: tuple[int, bytes, str] | int | None = None
            if key:
                original = originals.get(key)
                if original is not None:
                    row = dict(row, status=MessageStatus.DUPLICATE, duplicate_of=original[0], ack_raw=original[1],
                               ack_code=original[2])  # fmt: skip
                elif key in first_in_group:
                    original = first_in_group[key]
                    row = dict(row, status=MessageStatus.DUPLICATE)
                else:
                    first_in_group[key] = position
            self.rows.append(row)
            self.duplicate_of.append(original)

    def in_group_duplicates(self, ids: list[int]) -> list[tuple[int, bytes, str, int]]:
        """(original id, its ACK, its code, duplicate id) for repeats of a message in the same group."""
        out = []
        for position, original in enumerate(self.duplicate_of):
            if isinstance(original, int):
                first = self.rows[original]
                out.append((ids[original], first["ack_raw"], first["ack_code"], ids[position]))
        return out

    def command_rows(self, ids: list[int]) -> list[tuple[Any, ...]]:
        """The commands of the messages that are not duplicates, in column order, with their message ids."""
        self.owners = []
        out = []
        for position, request in enumerate(self.group):
            if request.commands and self.duplicate_of[position] is None:
                for command in request.commands:
                    out.append(tuple(ids[position] if c == "message_id" else command.get(c) for c in COMMAND_COLUMNS))
                    self.owners.append(position)
        return out

    def results(self, ids: list[int], command_ids: list[int]) -> list[WriteResult]:
        owned: dict[int, list[int]] = {}
        for owner, command_id in zip(self.owners, command_ids, strict=True):
            owned.setdefault(owner, []).append(command_id)
        results = []
        for position, original in enumerate(self.duplicate_of):
            if original is None:
                results.append(WriteResult(ids[position], command_ids=tuple(owned.get(position, ()))))
            elif isinstance(original, int):
                first = self.rows[original]
                results.append(WriteResult(ids[position], ids[original], first["ack_raw"], first["ack_code"]))
            else:
                results.append(WriteResult(ids[position], original[0], original[1], original[2]))
        return results
