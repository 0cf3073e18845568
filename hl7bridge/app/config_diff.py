"""``config diff`` from configurations: the two sides as TOML text (each worker process parses them again), the
default to compare with (what the running service recorded), and one run with its audit entry, for
``hl7bridge config diff``, ``POST /api/v1/config-diff`` and the console's ``/config-diff`` alike. The comparison is
``workflow.config_diff``'s; the intakes are ``app.wiring.listener_intakes``, the ones replay judges with."""

from __future__ import annotations

import os
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import when
from hl7bridge.app.config import Config, ConfigError, parse
from hl7bridge.app.config_digest import identity
from hl7bridge.workflow.config_diff import Clock, ConfigRef, DiffBusy, DiffRefused, DiffReport, IntakeFor, diff
from hl7bridge.workflow.unmask import record_unmask

#: A configuration file or upload compared, at most (the example, fully commented, is 20 KiB).
MAX_CONFIG_BYTES = 256 * 1024
#: A ``phi`` run records the ids of at most this many changed messages in its audit entry (and how many there were).
AUDITED_IDS = 1000
#: The longest window the service's own diff (console, API) takes, in seconds.
SERVICE_WINDOW = 31 * 86400.0


@dataclass(frozen=True)
class Side:
    """One configuration compared: parsed, its TOML text, and how it was chosen."""

    config: Config
    text: str
    how: str


@dataclass(frozen=True)
class TomlSides:
    """Both configurations as TOML text, so that each worker process parses and builds them itself."""

    before: tuple[str, str]
    after: tuple[str, str]

    def __call__(self, clock: Clock) -> tuple[IntakeFor, IntakeFor]:
        from hl7bridge.app.wiring import listener_intakes

        return listener_intakes(_parsed(*self.before), clock), listener_intakes(_parsed(*self.after), clock)


def _parsed(text: str, source: str) -> Config:
    return parse(tomllib.loads(text), source)


def from_text(text: str, source: str, how: str) -> Side:
    """A configuration given as text (an upload); ``ConfigError`` names each problem."""
    if len(text.encode("utf-8")) > MAX_CONFIG_BYTES:
        raise DiffRefused(f"{source}: larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    return Side(parse(data, source), text, how)


def from_file(path: str, how: str) -> Side:
    """The configuration file at ``path``; ``ConfigError`` names each problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such configuration file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}"]) from None
    return from_text(text, os.path.abspath(path), how)


def running(engine: Engine) -> Side | None:
    """The configuration the running service recorded (its start or last reload), read from its file now."""
    from hl7bridge.store.configs import running_config

    with engine.connect() as conn:
        row = running_config(conn)
    if row is None or not os.path.isfile(row["path"]):
        return None
    how = f"the configuration the service runs (loaded {when(row['loaded_at'])}, digest {row['digest'][:12]})"
    side = from_file(row["path"], how)
    if identity(side.config).digest != row["digest"]:
        # Copied over the running file before the reload, the new file would be compared with itself.
        raise DiffRefused(f"{row['path']} has changed since the service loaded it (digest {row['digest'][:12]}): "
                          "it is no longer what the service runs; name the file to compare with by --against")  # fmt: skip
    return side


def within(directory: Path, path: str) -> str:
    """``path`` (relative to ``directory``, or absolute) when it names a file inside ``directory``, links
    resolved; ``DiffRefused`` otherwise (the console reads no other file)."""
    base = directory.resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise DiffRefused(f"path: name a configuration file in {base} (the running configuration's directory)")
    return str(target)


def run_diff(engine: Engine, new: Side, against: Side, since: float, *, route: str | None = None, phi: bool = False,
             actor: str, channel: str, reason: str = "", workers: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> DiffReport:  # fmt: skip
    """Judge the window with both configurations; with ``phi``, the ``unmask`` entry is committed before the report
    is returned (it names the messages whose parameter values it shows)."""
    if route is not None and route not in {r.name for side in (new, against) for r in side.config.routes}:
        raise DiffRefused(f"no route named {route!r} in either configuration")
    new_id, old_id = identity(new.config), identity(against.config)
    report = DiffReport(ConfigRef(new_id.path, new_id.digest, new.how), ConfigRef(old_id.path, old_id.digest, against.how),
                        since, route, masked=not phi)  # fmt: skip
    sides = TomlSides((against.text, old_id.path), (new.text, new_id.path))
    diff(engine, sides, report, workers=workers, progress=progress)
    if phi and report.counts.get("parameter"):
        distinct = list(dict.fromkeys(d.message_id for d in report.differences if d.kind == "parameter"))
        record_unmask(engine, actor, distinct[:AUDITED_IDS], reason or "config diff", channel, messages=len(distinct),
                      new_digest=new_id.digest, against_digest=old_id.digest)  # fmt: skip
    return report


@dataclass(frozen=True)
class ServiceDiff:
    """The console's and the JSON API's diff: a new configuration uploaded (TOML text) or named by a path in the
    running configuration's directory (no other file is read), compared with the configuration the service runs.

    It runs inside the service, beside the listeners and the writer: in-process (no worker per CPU), one at a time,
    over at most ``SERVICE_WINDOW`` seconds; a longer window is for ``hl7bridge config diff``."""

    engine: Engine
    clock: Callable[[], float] = time.time
    _running: threading.Lock = field(default_factory=threading.Lock, init=False, compare=False, repr=False)

    def __call__(self, *, toml: str | None, path: str | None, since: float, route: str | None, phi: bool,
                 actor: str, channel: str, reason: str = "") -> DiffReport:  # fmt: skip
        if (toml is None) == (path is None):
            raise DiffRefused("toml: give the new configuration's text, or a path (not both)")
        if since < self.clock() - SERVICE_WINDOW:
            raise DiffRefused(f"since: at most {SERVICE_WINDOW // 86400:.0f} days here; for a longer window run "
                              "'hl7bridge config diff' on the service's machine")  # fmt: skip
        if not self._running.acquire(blocking=False):
            raise DiffBusy("another config diff is running in the service: try again when it is done")
        try:
            return self._run(toml, path, since, route, phi, actor, channel, reason)
        finally:
            self._running.release()

    def _run(self, toml: str | None, path: str | None, since: float, route: str | None, phi: bool, actor: str,
             channel: str, reason: str) -> DiffReport:  # fmt: skip
        try:
            against = running(self.engine)
            if against is None:
                raise DiffRefused("the service has recorded no configuration file to compare with")
            if toml is not None:
                new = from_text(toml, "(uploaded)", "uploaded")
            else:
                new = from_file(within(Path(against.config.source).parent, path or ""), "path")
        except ConfigError as exc:
            raise DiffRefused("; ".join(exc.problems)) from None
        return run_diff(self.engine, new, against, since, route=route, phi=phi, actor=actor, channel=channel,
                        reason=reason, workers=1)  # fmt: skip
