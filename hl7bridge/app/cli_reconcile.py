"""`hl7bridge reconcile`: the report of drift between the log and the Journeys API, and its repairs."""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import when
from hl7bridge.app.config import Config
from hl7bridge.core.logs import escape
from hl7bridge.dispatch.journeys import JourneysClient
from hl7bridge.workflow.reconcile import ReconcileError, Report, reconcile, repair, route_facts

#: Exit statuses: drift was found; the check could not finish (the API, or the call cap). 0: no drift.
EXIT_DRIFT = 1
EXIT_INCOMPLETE = 3

DESCRIBE = {
    "missing": "log: active; API: no active instance",
    "doubled": "log: one journey; API: {active_instances} active instances",
    "stale_start": "API's start time is not the log's last one ({parameters})",
    "stale_parameters": "API's parameters are not those last triggered ({parameters})",
    "active_cancelled": "log: {state}; API: {active_instances} active instance(s)",
}


def run(cfg: Config, engine: Engine, since: float, args: argparse.Namespace, actor: str) -> int:
    routes = route_facts(cfg.routes)
    client = JourneysClient(cfg.api, cfg.reconcile.tokens(cfg.api.tokens()))
    try:
        report = reconcile(engine, client, since, routes, args.route, cfg.reconcile)
    except ReconcileError as exc:
        print(f"hl7bridge: reconcile stopped, nothing repaired: {escape(str(exc))}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if args.repair:
        repair(engine, report, routes, actor, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print_report(report)
    if not report.complete:
        print(f"hl7bridge: stopped after reconcile.max_calls = {cfg.reconcile.max_calls} searches; "
              f"{report.skipped.get('cap', 0)} appointment(s) left unchecked", file=sys.stderr)  # fmt: skip
        return EXIT_INCOMPLETE
    return EXIT_DRIFT if report.findings else 0


def print_report(report: Report) -> None:
    since = when(report.since)
    skipped = ", ".join(f"{why} {n}" for why, n in sorted(report.skipped.items()))
    print(f"checked {report.checked} appointment(s) changed since {since} with {report.calls} search(es)"
          + (f"; not checked: {skipped}" if skipped else ""))  # fmt: skip
    if not report.findings:
        print("no drift")
        return
    print("drift: " + ", ".join(f"{kind} {n}" for kind, n in sorted(report.counts.items())))
    for f in report.findings:
        what = DESCRIBE[f.kind].format(**{k: ", ".join(v) if isinstance(v, list) else v for k, v in f.details.items()})
        line = f"  {f.kind:<16} appointment {f.appointment}  message {f.message_id}  route {f.route}: {what}"
        if f.repair is not None:
            plan = f.repair
            if plan["queued"]:
                line += f"  -> queued {plan['command']} command {plan['command_id']}"
            else:
                line += f"  -> {plan['command']}: {plan['note']}"
        print(escape(line))
