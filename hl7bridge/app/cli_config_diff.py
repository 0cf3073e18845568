"""``hl7bridge config diff``: which configuration is compared with which, the progress bar, and the report's text
and JSON. The comparison is ``workflow.config_diff``'s; the intakes are ``app.wiring.listener_intakes``, the ones
replay judges with."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import add_by, print_table, since_arg, when
from hl7bridge.app.config import Config, ConfigError, load, parse
from hl7bridge.app.config_digest import identity
from hl7bridge.core.logs import escape
from hl7bridge.workflow.config_diff import KINDS, Clock, ConfigRef, DiffReport, IntakeFor, diff
from hl7bridge.workflow.unmask import record_unmask

#: ``--phi`` records the ids of at most this many changed messages in its audit entry (and how many there were).
AUDITED_IDS = 1000


class DiffRefused(ValueError):
    """The diff cannot run as asked; the message says what to change."""


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


def read_config(path: str) -> tuple[Config, str]:
    """The configuration at ``path`` and its text (what the workers parse again); ``ConfigError`` names the
    problems."""
    config = load(path)
    with open(path, encoding="utf-8") as handle:
        return config, handle.read()


def add_parser(sub: Any, with_config: Any, handler: Any) -> None:
    group = sub.add_parser("config", help="configuration tools: diff")
    config_sub = group.add_subparsers(dest="config_command", required=True)
    p = with_config(config_sub.add_parser(
        "diff", help="what a new configuration would do differently to the logged traffic (nothing is sent)"))  # fmt: skip
    p.add_argument("--against", metavar="PATH",
                   help="the configuration to compare with (default: the one the running service recorded)")  # fmt: skip
    p.add_argument(
        "--since", type=since_arg, required=True, metavar="DURATION", help="messages received within, e.g. 7d"
    )
    p.add_argument("--route", metavar="NAME", help="only differences of this route (under either configuration)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--phi", action="store_true", help="show parameter values unmasked (recorded in the audit log)")
    p.add_argument("--reason", metavar="TEXT", help="why you need the patient data, for the audit log (with --phi)")
    p.add_argument("--workers", type=int, metavar="N", help=argparse.SUPPRESS)
    add_by(p, "looks")
    p.set_defaults(func=handler)


def against_default(engine: Engine, new_path: str) -> tuple[str, str]:
    """The file to compare with, and how it was chosen: the configuration the running service recorded (its
    start or last reload), else ``$HL7BRIDGE_CONFIG``."""
    from hl7bridge.store.configs import running_config

    with engine.connect() as conn:
        running = running_config(conn)
    if running is not None and os.path.isfile(running["path"]):
        how = (
            f"the configuration the service runs (loaded {when(running['loaded_at'])}, digest {running['digest'][:12]})"
        )
        mtime = os.stat(running["path"]).st_mtime
        if running["mtime"] is not None and mtime != running["mtime"]:
            how += "; the file has changed since it was loaded, so this compares with the file as it is now"
        return running["path"], how
    env = os.environ.get("HL7BRIDGE_CONFIG")
    if env and os.path.abspath(env) != os.path.abspath(new_path):
        return env, "$HL7BRIDGE_CONFIG (no running service has recorded its configuration)"
    raise DiffRefused("no running service has recorded its configuration in this log; give --against PATH")


def run(args: argparse.Namespace, new_path: str, engine: Engine, actor: str) -> int:
    if args.reason is not None and not args.phi:
        raise DiffRefused("--reason goes with --phi (the reason for seeing the patient data)")
    if args.workers is not None and args.workers < 1:
        raise DiffRefused("--workers: expected a whole number of at least 1")
    new_cfg, new_text = read_config(new_path)
    if args.against:
        against_path, how = args.against, "--against"
    else:
        against_path, how = against_default(engine, new_path)
    try:
        old_cfg, old_text = read_config(against_path)
    except ConfigError as exc:
        raise ConfigError([f"--against: {p}" for p in exc.problems]) from None
    if args.route is not None and args.route not in {r.name for c in (old_cfg, new_cfg) for r in c.routes}:
        raise DiffRefused(f"no route named {args.route!r} in either configuration")
    new_id, old_id = identity(new_cfg), identity(old_cfg)
    report = DiffReport(ConfigRef(new_id.path, new_id.digest, "--config"), ConfigRef(old_id.path, old_id.digest, how),
                        args.since, args.route, masked=not args.phi)  # fmt: skip
    bar = ProgressBar() if sys.stderr.isatty() else None
    sides = TomlSides((old_text, old_id.path), (new_text, new_id.path))
    diff(engine, sides, report, workers=args.workers, progress=bar)
    if bar:
        bar.done()
    if args.phi and report.counts.get("parameter"):
        ids = [d.message_id for d in report.differences if d.kind == "parameter"]
        distinct = list(dict.fromkeys(ids))
        record_unmask(engine, actor, distinct[:AUDITED_IDS], args.reason or "config diff", messages=len(distinct),
                      new_digest=report.new.digest, against_digest=report.against.digest)  # fmt: skip
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 1 if report.counts else 0


def print_report(report: DiffReport) -> None:
    print(f"new:     {escape(report.new.path)} (digest {report.new.digest[:12]})")
    print(f"against: {escape(report.against.path)} (digest {report.against.digest[:12]}): {escape(report.against.how)}")
    scope = f", route {report.route}" if report.route else ""
    skipped = f"; {report.skipped_purged} skipped (raw purged by retention)" if report.skipped_purged else ""
    print(f"{report.messages} message(s) received since {when(report.since)} compared{scope}{skipped}")
    if report.against.digest == report.new.digest:
        print("the two configurations have the same effective settings")
    if not report.counts:
        print("no difference: the new configuration would do exactly what the current one does")
        return
    print(f"{report.changed_messages} message(s) would be handled differently"
          + ("" if not report.masked else "; patient data masked (--phi shows it)"))  # fmt: skip
    print()
    print_table(["route", *KINDS], [[escape(name), *(str(c.get(k, 0)) for k in KINDS)]
                                    for name, c in sorted(report.routes.items())])  # fmt: skip
    titles = {"ack": "ACK verdicts", "command": "commands", "parameter": "journey parameters"}
    for kind in KINDS:
        examples = report.examples(kind)
        if not examples:
            continue
        print(f"\n{titles[kind]}: {report.counts[kind]} (the first, oldest first; 'hl7bridge log show ID' opens one)")
        for d in examples:
            print(f"  {when(d.received_at)} {escape(d.describe())}")
    if report.truncated:
        print(f"\n(only the first {len(report.differences)} differences are listed in --json)")


class ProgressBar:
    """A bar on stderr (a terminal only), redrawn when a whole percent more is done."""

    WIDTH = 30

    def __init__(self) -> None:
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        percent = min(100, done * 100 // max(total, 1))
        if percent == self.shown:
            return
        self.shown = percent
        filled = self.WIDTH * percent // 100
        print(f"\r[{'#' * filled}{' ' * (self.WIDTH - filled)}] {percent:3d}% of {total} message ids", end="",
              file=sys.stderr, flush=True)  # fmt: skip

    def done(self) -> None:
        print("\r\x1b[K", end="", file=sys.stderr, flush=True)
