"""One message's whole story for an operator: what arrived (raw and parsed), the ACK sent, each command with
every API attempt, its replays, and the audit entries naming it. ``log show``, the JSON API and the console show
this one function's answer.

Patient data is masked unless the caller unmasks, and an unmask states a reason that is committed to the audit
log before any data is read: whoever saw whose message, the audit log already says so, even when the showing
fails afterwards."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.core.logs import mask, masked, masked_summary
from hl7bridge.dispatch.rules import masked_outcome
from hl7bridge.hl7.phi import mask_segments
from hl7bridge.hl7.problems import without_told_value
from hl7bridge.store.audit import AuditEntry
from hl7bridge.store.timeline import message_exists, timeline_rows
from hl7bridge.workflow.unmask import record_unmask

#: An unmask's reason: stated (not blank) and short enough to be a reason.
MAX_REASON_CHARS = 500


class UnmaskError(ValueError):
    """An unmask refused before anything was written or read; the message says what to fix."""


@dataclass(frozen=True)
class Unmask:
    """Who asks to see a message's patient data, why, and through what (``cli``, ``api``, ``console``)."""

    actor: str
    reason: str
    channel: str


@dataclass(frozen=True)
class Timeline:
    #: The log's columns (no raw bytes, summary or search columns), times as epoch seconds.
    message: dict[str, Any]
    summary: dict[str, Any] | None
    #: The raw message's segments (batch headers included), masked unless unmasked; None once purged.
    raw: list[str] | None
    ack: str | None
    #: Each command's columns, ``attempt_count``, and ``attempts`` (every API attempt, oldest first).
    commands: list[dict[str, Any]]
    #: ``replay_of``: the message this one replays; ``replayed_by``: the messages replaying this one.
    replays: dict[str, Any]
    #: Audit entries naming the message or its commands, newest first.
    audit: list[dict[str, Any]]
    masked: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "summary": self.summary,
            "raw": self.raw,
            "ack": self.ack,
            "commands": self.commands,
            "replays": self.replays,
            "audit": self.audit,
            "masked": self.masked,
        }


def checked_reason(reason: str) -> str:
    """The reason stripped, or ``UnmaskError`` saying what is wrong with it."""
    stated = (reason or "").strip()
    if not stated:
        raise UnmaskError("a reason is required to see patient data: say why you need it")
    if len(stated) > MAX_REASON_CHARS:
        raise UnmaskError(f"the reason is {len(stated)} characters long; give at most {MAX_REASON_CHARS}")
    return stated


def timeline(engine: Engine, message_id: int, *, unmask: Unmask | None = None) -> Timeline | None:
    """Message ``message_id``'s timeline, None when there is no such message. With ``unmask``, its reason is
    checked (``UnmaskError``: nothing written) and the ``unmask`` audit entry committed before the data is read;
    the timeline's audit entries then include it."""
    if unmask is not None:
        reason = checked_reason(unmask.reason)
        if not message_exists(engine, message_id):
            return None
        record_unmask(engine, unmask.actor, [message_id], reason, unmask.channel)
    rows = timeline_rows(engine, message_id)
    if rows is None:
        return None
    hide = unmask is None
    charset = rows.message.get("charset") or "utf-8"
    summary = json.loads(rows.summary) if rows.summary else None
    raw = None
    if rows.raw is not None:
        text = _decode(rows.raw, charset)
        raw = segments(mask_segments(text) if hide else text)
    ack = None
    if rows.ack_raw:
        ack = _decode(rows.ack_raw, charset).replace("\r\n", "\n").replace("\r", "\n").strip()
        ack = mask_segments(ack) if hide else ack
    tried: dict[int, list[dict[str, Any]]] = {}
    for attempt in rows.attempts:
        body = attempt["response_body"]
        tried.setdefault(attempt["command_id"], []).append({
            "id": attempt["id"], "call_id": attempt["call_id"], "at": attempt["at"], "operation": attempt["operation"],
            "request_summary": attempt["request_summary"], "status_code": attempt["status_code"],
            "verdict": attempt["verdict"], "duration_ms": attempt["duration_ms"], "error": attempt["error"],
            "response_body": _masked_body(body) if hide else body,
        })  # fmt: skip
    commands = []
    for command in rows.commands:
        shown = {k: v for k, v in command.items() if k not in ("attempts", "parameters", "identifiers")}
        parameters, identifiers = _json(command["parameters"]), _json(command["identifiers"])
        shown["parameters"] = mask(parameters) if hide else parameters
        shown["identifiers"] = mask(identifiers) if hide else identifiers
        if hide:
            shown["outcome"] = masked_outcome(command["outcome"])
        shown["attempt_count"] = command["attempts"]
        shown["attempts"] = tried.get(command["id"], [])
        commands.append(shown)
    message = dict(rows.message)
    if hide and message.get("ack_text"):
        message["ack_text"] = without_told_value(message["ack_text"], masked)
    return Timeline(
        message=message,
        summary=masked_summary(summary) if summary and hide else summary,
        raw=raw,
        ack=ack,
        commands=commands,
        replays={"replay_of": rows.message.get("replay_of"), "replayed_by": rows.replayed_by},
        audit=[_audit(e) for e in rows.audit],
        masked=hide,
    )


def segments(text: str) -> list[str]:
    """ER7 text's segments, whichever line break (CR, LF, CRLF) separates them."""
    return [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]


def _decode(data: bytes, charset: str) -> str:
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return data.decode(charset, errors="replace")


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _masked_body(body: str | None) -> str | None:
    """An API answer with its values masked (search answers carry the journey's parameters, refusals may quote
    one); its shape and keys stay, so an analyst still sees what kind of answer it was."""
    if not body:
        return body
    try:
        return json.dumps(mask(json.loads(body)), ensure_ascii=False)
    except ValueError:
        return masked(body)


def _audit(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.id, "at": entry.at, "actor": entry.actor, "channel": entry.channel, "action": entry.action,
            "target": entry.target, "ids": list(entry.ids), "reason": entry.reason, "details": entry.details}  # fmt: skip
