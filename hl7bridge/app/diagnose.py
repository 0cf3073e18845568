"""``hl7bridge check``: a message explained field by field, with hl7apy's names and strict checks."""

from __future__ import annotations

from hl7bridge.app.config import Config, ListenerConfig
from hl7bridge.app.wiring import intake_for
from hl7bridge.core.logs import escape
from hl7bridge.hl7 import charsets, strict, tables
from hl7bridge.hl7.ack import Outcome
from hl7bridge.hl7.er7 import Er7Error, Er7Message, Path

PHI_SEGMENTS = frozenset({"PID", "PD1", "NK1", "GT1", "IN1", "IN2"})


def explain(raw: bytes, config: Config, listener: ListenerConfig) -> tuple[str, bool]:
    """A report and whether the bridge would accept the message: judged by the intake ``serve`` runs for
    this listener (routes, mapping, required parameters, its feed zone and strict validation). Each line is
    escaped: the message's control characters must not drive the operator's terminal."""
    lines: list[str] = []
    decoded = charsets.decode(raw, listener.charset_fallback)
    lines.append(f"charset: {decoded.charset} (MSH-18: {decoded.declared or 'absent'})"
                 + (f" - {decoded.note}" if decoded.note else ""))  # fmt: skip
    intake = intake_for(config, listener)
    frame = intake.read_frame(raw)
    accepted = True
    for received in frame.messages:
        try:
            msg = Er7Message.parse(received.text.lstrip(), received.charset)
        except Er7Error as exc:
            lines.append(f"not readable as HL7: {exc} (at {exc.location})")
            msg = None
        version = received.header.version if received.header else ""
        if msg is not None:
            lines.extend(_fields(msg, version if tables.supported(version) else "2.5.1"))
        if received.event is not None:
            lines.append("bridge reading:")
            for key, value in received.event.summary().items():
                if value not in (None, "", [], ()):
                    lines.append(f"  {key:22} {value}")
        if received.route or received.commands:
            lines.append(f"route: {received.route or 'none'}" + (f" ({received.note})" if received.note else ""))
            for command in received.commands:
                lines.append(f"  {command['kind']} {command['chat_bot_id']}: {command['parameters']}")
        if received.outcome is Outcome.ACCEPT and received.event is not None:
            problem = strict.validate(received.text)
            verdict = "passes" if problem is None else problem.describe()
            scope = (
                ""
                if listener.validation == "strict"
                else " (not part of the answer: this listener's validation is fast)"
            )
            lines.append(f"strict validation (hl7apy): {verdict}{scope}")
            if problem is not None and listener.validation == "strict":
                intake.strict_failed(received, problem)
        ack = received.ack
        if ack is None:
            lines.append("answer: none (an acknowledgment is never answered, or MSH-15/16 ask for none)")
        else:
            lines.append(f"answer: {ack.code} - {ack.text}")
            for seg in ack.payload.decode(received.charset, errors="replace").split("\r"):
                if seg:
                    lines.append(f"  {seg}")
            accepted = accepted and ack.code in ("AA", "CA")
    return "\n".join(escape(line) for line in lines), accepted


def _fields(msg: Er7Message, version: str) -> list[str]:
    out = [f"{len(msg.segments)} segments, HL7 v{version}, delimiters {msg.encoding.field}{msg.encoding.msh2}"]
    seen: dict[str, int] = {}
    for seg in msg.segments:
        seen[seg.name] = index = seen.get(seg.name, 0) + 1
        known = tables.segment_fields(version, seg.name) is not None
        out.append(f"{seg.name}" + (f"[{index}]" if index > 1 else "") + ("" if known or seg.name.startswith("Z")
                   else f"  (not a v{version} segment)"))  # fmt: skip
        for number in range(1, len(seg.fields)):
            for rep_no, rep in enumerate(seg.repetitions(number), 1):
                if not rep:
                    continue
                info = tables.element(version, Path(seg.name, 1, number))
                label = f"{seg.name}-{number}" + (f"({rep_no})" if rep_no > 1 else "")
                name = f"{info.name} [{info.datatype}]" if info else "(not in the standard)"
                out.append(f"  {label:12} {name:48} {msg.unescape(rep)}")
                parts = info and tables.components(version, info.datatype or "")
                if parts and msg.encoding.component in rep and number > 2:
                    for c_no, comp in enumerate(rep.split(msg.encoding.component), 1):
                        if comp and c_no <= len(parts):
                            cname = f"{parts[c_no - 1].name} [{parts[c_no - 1].datatype}]"
                            out.append(f"    .{c_no:<9} {cname:48} {msg.unescape(comp)}")
    return out
