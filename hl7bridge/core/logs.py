"""The service log: JSON lines or journald-friendly text, message ids on every line about a message, no PHI.

Lines about a message pass ``extra={"message_id": ..., "control_id": ...}``;
lines about a command pass its ``command_id`` and its ``message_id`` too, the id
``hl7bridge log show`` takes (a bare command id was read as a message's). Both
formats show them by name. Patient data only reaches the log through ``phi()``,
which masks it unless ``log_phi = true``. Whoever logs, every line is made
safe by the formatter: each argument and context value is capped at
``MAX_ARG_CHARS``, the message at ``MAX_MESSAGE_CHARS``, bearer tokens are
redacted, and control characters are escaped (a CR/LF or ``<2>`` from a sender
cannot forge a line, a journald priority or a terminal sequence).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

CONTEXT_FIELDS = ("message_id", "control_id", "command_id", "listener", "peer")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
#: C0 and C1 control characters, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_ARG_CHARS = 512
MAX_MESSAGE_CHARS = 4096
MAX_TRACEBACK_CHARS = 16384
_log_phi = False


def masked(text: str) -> str:
    """Patient data shown masked: its first character, enough to tell two values apart in a listing."""
    return text[:1] + "***" if text else text


#: The parsed summary's keys that hold patient data: who the patient is, and the reason for the visit (SCH-7, often
#: clinical free text such as "HIV follow-up", and its code). Kept: the appointment's ids, type (table 0277), status,
#: timing, provider and place, which say nothing about who the patient is (docs/architecture.md, hl7/phi.py).
PHI_KEYS = ("patient_ids", "names", "telecoms", "birth_date", "patient_phone", "patient_email", "reason", "reason_code")
#: Keys inside those values that say what a value is (codes), not who: left unmasked.
_CODE_KEYS = ("type_code", "use", "equipment", "source", "name_type")


def mask(value: Any) -> Any:
    """Patient data masked as the log masks it, leaving the codes that say what a value is."""
    if isinstance(value, str):
        return masked(value)
    if isinstance(value, list):
        return [mask(v) for v in value]
    if isinstance(value, dict):
        return {k: (mask(v) if k not in _CODE_KEYS else v) for k, v in value.items()}
    return value


def masked_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A copy of a message's parsed summary with its patient data masked."""
    return {k: (mask(v) if k in PHI_KEYS else v) for k, v in summary.items()}


def phi(value: object) -> str:
    """Patient data for a log line: masked unless the operator asked for it."""
    text = "" if value is None else str(value)
    return text if _log_phi else masked(text)


def cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


def escape(text: str) -> str:
    """Control characters as visible escapes (``\\n``, ``\\x1b``), so that one record stays one line."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m[0]) or _code(ord(m[0])), text)


def _code(point: int) -> str:
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}"


def _arg(value: object) -> object:
    """A ``%`` argument capped in length; numbers and short objects stay themselves (for ``%d``, ``%r``)."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    return value if len(text) <= MAX_ARG_CHARS else cap(text, MAX_ARG_CHARS)


def message(record: logging.LogRecord) -> str:
    """The record's text, capped, with bearer tokens redacted and control characters escaped."""
    args = record.args
    if isinstance(args, Mapping):
        capped: object = {k: _arg(v) for k, v in args.items()}
    else:
        capped = tuple(_arg(a) for a in args or ())
    text = cap(str(record.msg), MAX_MESSAGE_CHARS)
    if args:
        try:
            text = text % capped
        except (TypeError, ValueError, KeyError):
            text = record.getMessage()
    text = cap(text, MAX_MESSAGE_CHARS)
    if "earer" in text:
        text = _BEARER.sub(r"\1[redacted]", text)
    return escape(text)


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> list[str]:
    """The traceback's lines, each escaped (an exception's text can quote a sender)."""
    text = cap(formatter.formatException(record.exc_info), MAX_TRACEBACK_CHARS)  # type: ignore[arg-type]
    return [escape(_BEARER.sub(r"\1[redacted]", line)) for line in text.split("\n")]


def _context(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            out[name] = value if isinstance(value, int) else escape(cap(str(value), MAX_ARG_CHARS))
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message(record),
            **_context(record),
        }
        if record.exc_info:
            data["exc"] = "\n".join(_traceback(self, record))
        return json.dumps(data, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<6>`` priority prefixes and no timestamp under journald (it adds its own), a timestamp otherwise.

    A traceback's lines each carry the record's prefix (journald) or an indent, so none can pass for a record."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = f"{record.name}: {message(record)}" + (f" [{context}]" if context else "")
        if self.journald:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            first, more = prefix, prefix + "  "
        else:
            first = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
            first, more = f"{first} {record.levelname} ", "    "
        lines = [first + line]
        if record.exc_info:
            lines += [more + tb for tb in _traceback(self, record)]
        return "\n".join(lines)


def configure(level: str = "info", fmt: str = "text", log_phi: bool = False) -> None:
    """Set up the root logger once for the service (stderr, which systemd hands to journald)."""
    global _log_phi
    _log_phi = log_phi
    handler = logging.StreamHandler(sys.stderr)
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([twisted_observer()], redirectStandardIO=False)
    # Third-party chatter stays at warnings unless we debug.
    for noisy in ("urllib3", "twisted"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


#: The process out of descriptors: reported by the listeners' ``FdWatch`` (``/healthz``, one line), not a bug.
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def twisted_observer() -> Any:
    """Twisted's log events into ``logging`` (logger ``twisted``), except that a failure which is the process out of
    descriptors becomes one warning line with its error: Twisted's accept logs a traceback when it cannot re-reserve
    its spare descriptor, and a traceback in the service's log for a condition the service handles reads as a
    crash."""
    from twisted.logger import LogLevel, STDLibLogObserver

    bridge = STDLibLogObserver(name="twisted")

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None and getattr(failure.value, "errno", None) in _OUT_OF_DESCRIPTORS:
            event = {**event, "log_failure": None, "log_level": LogLevel.warn, "hl7bridge_error": str(failure.value),
                     "log_format": f"{event.get('log_format') or ''} ({{hl7bridge_error}})"}  # fmt: skip
        bridge(event)

    return observe


def local_time(ts: float) -> str:
    """Epoch seconds in this machine's zone, to the second: how every operator-facing text shows a time."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


class Clock(Protocol):
    """What ``RefusalLog`` reads the time from: a reactor (``IReactorTime``), or ``MonotonicClock`` in a thread."""

    def seconds(self) -> float: ...


class MonotonicClock:
    """``seconds()`` for code off the reactor (a thread of its own)."""

    def seconds(self) -> float:
        return time.monotonic()


#: The key that the warnings beyond ``RefusalLog.max_keys`` share (one more entry than ``max_keys``).
_MANY_PEERS = ("(many peers)",)


class RefusalLog:
    """One warning per key per ``interval``; repeats are counted and reported with the next one.

    A peer opening thousands of connections, or a failure repeating every second, must not write thousands of
    lines. The table of keys is bounded: past ``max_keys`` live keys, new ones share a single "many peers" key."""

    def __init__(self, logger: logging.Logger, clock: Clock, interval: float = 60.0, max_keys: int = 1024):
        self.logger = logger
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._seen: dict[tuple[str, ...], list[float]] = {}

    def warn(self, key: tuple[str, ...], message: str, *args: object) -> None:
        now = self.clock.seconds()
        if key not in self._seen and len(self._seen) >= self.max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
            if len(self._seen) >= self.max_keys:
                key, message, args = _MANY_PEERS, "refusing connections from more than %d peers", (self.max_keys,)
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        repeats = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        if repeats:
            message += f" ({repeats} more like it in the last {self.interval:.0f} s)"
        self.logger.warning(message, *args)
