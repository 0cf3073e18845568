"""The service log: JSON lines or journald-friendly text, message ids on every line about a message, no PHI.

Lines about a message pass ``extra={"message_id": ..., "control_id": ...}``;
both formats show them. Patient data only reaches the log through ``phi()``,
which masks it unless ``log_phi = true``. A filter redacts bearer tokens from
any line, whichever library wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime

CONTEXT_FIELDS = ("message_id", "control_id", "command_id", "listener", "peer")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_log_phi = False


def phi(value: object) -> str:
    """Patient data for a log line: masked unless the operator asked for it."""
    text = "" if value is None else str(value)
    if _log_phi or not text:
        return text
    return text[:1] + "***"


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "earer" in message:
            record.msg = _BEARER.sub(r"\1[redacted]", message)
            record.args = ()
        return True


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in CONTEXT_FIELDS if getattr(record, name, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<6>`` priority prefixes and no timestamp under journald (it adds its own), a timestamp otherwise."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = f"{record.name}: {record.getMessage()}" + (f" [{context}]" if context else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        stamp = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
        return f"{stamp} {record.levelname} {line}"


def configure(level: str = "info", fmt: str = "text", log_phi: bool = False) -> None:
    """Set up the root logger once for the service (stderr, which systemd hands to journald)."""
    global _log_phi
    _log_phi = log_phi
    handler = logging.StreamHandler(sys.stderr)
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald))
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
    # Third-party chatter stays at warnings unless we debug.
    for noisy in ("urllib3", "twisted"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
