"""``hl7bridge log show``: the text of one message's timeline (``workflow.timeline``); ``--json`` prints
``Timeline.to_json()`` as it is."""

from __future__ import annotations

import json
import time

from hl7bridge.app.cli_format import when
from hl7bridge.core.logs import escape
from hl7bridge.core.status import CommandStatus
from hl7bridge.workflow.timeline import Timeline

#: The message's columns shown, in this order, when they hold a value.
SHOWN = ("id", "received_at", "listener", "peer", "sending_application", "sending_facility", "control_id",
         "message_type", "event", "version", "charset", "status", "action", "appointment_key", "ack_code",
         "ack_text", "route", "note", "replay_of", "error_location", "error", "duplicate_of", "purged_at")  # fmt: skip


def print_timeline(shown: Timeline, raw: bool) -> None:
    row = shown.message
    for key in SHOWN:
        value = row.get(key)
        if value not in (None, ""):
            text = when(value) if key in ("received_at", "purged_at") else str(value)
            print(f"{key:20} {escape(text)}")
    if shown.replays["replayed_by"]:
        print(f"{'replayed as':20} {', '.join(str(i) for i in shown.replays['replayed_by'])}")
    if shown.summary:
        print("summary" + (" (PHI masked; --phi shows it)" if shown.masked else "") + ":")
        for key, value in shown.summary.items():
            if value not in (None, "", [], ()):
                print(f"  {key:22} {escape(json.dumps(value, ensure_ascii=False))}")
    if shown.commands:
        print("commands:")
    for c in shown.commands:
        print(f"  #{c['id']} {c['kind']} via route {c['route']} (chatBotId {c['chat_bot_id']}"
              f"{', flowId ' + c['flow_id'] if c['flow_id'] else ''}): {c['status']}"
              f"{' - ' + escape(c['outcome']) if c['outcome'] else ''} [attempts {c['attempt_count']}]")  # fmt: skip
        if c.get("config_digest"):
            print(f"      configuration {escape(c['config_path'])} (digest {c['config_digest'][:12]}"
                  + (f", file modified {when(c['config_mtime'])})" if c["config_mtime"] is not None else ")"))  # fmt: skip
        if c["resolution"]:
            why = f": {escape(c['resolution_reason'])}" if c["resolution_reason"] else ""
            print(f"      {c['resolution']} by {escape(c['resolved_by'] or '?')} at {when(c['resolved_at'])}{why} "
                  f"(audit entry {c['resolution_audit']})")  # fmt: skip
        if c["status"] == CommandStatus.PENDING and c["next_attempt_at"]:
            # Read now, from the column: a time written into the outcome went stale ("retrying in 3.0 s").
            due = c["next_attempt_at"]
            print(f"      next attempt {'due now' if due <= time.time() else 'at ' + when(due)}")
        if not shown.masked:
            print(f"      parameters {escape(json.dumps(c['parameters'], ensure_ascii=False))}")
        for a in c["attempts"]:
            print(f"      {when(a['at'])} {escape(a['request_summary'])} -> {a['status_code'] or '-'} {a['verdict']}"
                  f" in {a['duration_ms']:.0f} ms{' ' + escape(a['error']) if a['error'] else ''}")  # fmt: skip
    if shown.ack:
        print("ack sent:")
        for line in shown.ack.splitlines():
            print(f"  {escape(line)}")
    if shown.audit:
        print("audit:")
    for e in reversed(shown.audit):
        ids = ",".join(str(i) for i in e["ids"])
        print(f"  #{e['id']} {when(e['at'])} {escape(e['actor'])} via {e['channel']}: {e['action']} {e['target']}"
              f" {ids}{': ' + escape(e['reason']) if e['reason'] else ''}")  # fmt: skip
    if raw:
        print("raw message" + (" (PHI masked; --phi shows it)" if shown.masked else "") + ":")
        for segment in shown.raw if shown.raw is not None else ["(purged)"]:
            print(f"  {escape(segment)}")
