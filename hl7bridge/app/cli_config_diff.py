"""``hl7bridge config diff``: its arguments, the progress bar, and the report's text and JSON; the run is
``app.config_diff``'s."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import add_by, print_table, since_arg, when
from hl7bridge.app.config import ConfigError
from hl7bridge.app.config_diff import DiffRefused, Side, from_file, run_diff, running
from hl7bridge.core.logs import escape
from hl7bridge.workflow.config_diff import KINDS, DiffReport


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


def run(args: argparse.Namespace, new_path: str, engine: Engine, actor: str) -> int:
    if args.reason is not None and not args.phi:
        raise DiffRefused("--reason goes with --phi (the reason for seeing the patient data)")
    if args.workers is not None and args.workers < 1:
        raise DiffRefused("--workers: expected a whole number of at least 1")
    new = from_file(new_path, "--config")
    if args.against:
        try:
            against = from_file(args.against, "--against")
        except ConfigError as exc:
            raise ConfigError([f"--against: {p}" for p in exc.problems]) from None
    else:
        against = running(engine) or _environment(new_path)
    bar = ProgressBar() if sys.stderr.isatty() else None
    report = run_diff(engine, new, against, args.since, route=args.route, phi=args.phi, actor=actor, channel="cli",
                      reason=args.reason or "", workers=args.workers, progress=bar)  # fmt: skip
    if bar:
        bar.done()
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 1 if report.counts else 0


def _environment(new_path: str) -> Side:
    """``--against``'s default when no running service has recorded its configuration: ``$HL7BRIDGE_CONFIG``."""
    env = os.environ.get("HL7BRIDGE_CONFIG")
    if env and os.path.abspath(env) != os.path.abspath(new_path):
        return from_file(env, "$HL7BRIDGE_CONFIG (no running service has recorded its configuration)")
    raise DiffRefused("no running service has recorded its configuration in this log; give --against PATH")


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
