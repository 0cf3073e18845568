"""`hl7bridge reconcile`: the report of drift between the log and the Journeys API, and its repairs.

It searches where the service dispatches (``workflow.dispatch_target``): searching the config's API while the
service sends elsewhere (``serve --api-url``/``--sandbox``) would read every active appointment as missing, and
``--repair`` would message each patient again. So when the recorded target is not ``api.base_url``, reconcile
refuses until the operator names the API with ``--api-url``; a named URL is searched as given (the operator
chose it knowingly) and the report says which URL was searched and where the service dispatches."""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import when
from hl7bridge.app.config import Config
from hl7bridge.core.logs import escape
from hl7bridge.dispatch.journeys import JourneysClient
from hl7bridge.workflow.dispatch_target import dispatch_target
from hl7bridge.workflow.reconcile import ReconcileError, Report, reconcile, repair, route_facts

#: Exit statuses: drift was found; the check could not finish (the API, or the call cap). 0: no drift.
EXIT_DRIFT = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3

DESCRIBE = {
    "missing": "log: active; API: no active instance",
    "doubled": "log: one journey; API: {active_instances} active instances",
    "stale_start": "API's start time is not the log's last one ({parameters})",
    "stale_parameters": "API's parameters are not those last triggered ({parameters})",
    "active_cancelled": "log: {state}; API: {active_instances} active instance(s)",
}


def run(cfg: Config, engine: Engine, since: float, args: argparse.Namespace, actor: str) -> int:
    recorded = dispatch_target(engine, cfg.api.base_url)
    named = args.reconcile_api_url
    if named is None and _differ(recorded.base_url, cfg.api.base_url):
        print(f"hl7bridge: the service dispatches to {recorded.describe()}, not to api.base_url "
              f"{cfg.api.base_url}; name the API to search with --api-url {recorded.base_url}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    target = recorded.base_url if named is None else named
    searched = recorded.describe() if not _differ(target, recorded.base_url) else (
        f"{target} (--api-url; the service dispatches to {recorded.describe()})")  # fmt: skip
    routes = route_facts(cfg.routes)
    api = cfg.with_overrides(api_url=target).api
    client = JourneysClient(api, cfg.reconcile.tokens(api.tokens()))
    try:
        report = reconcile(engine, client, since, routes, args.route, cfg.reconcile)
    except ReconcileError as exc:
        print(f"hl7bridge: reconcile stopped, nothing repaired: {escape(str(exc))}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if args.repair:
        repair(engine, report, routes, actor, dry_run=args.dry_run)
    if args.json:
        print(
            json.dumps(
                {**report.to_json(), "searched": target, "dispatch_target": recorded.to_json()},
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        print(f"searched {searched}")
        print_report(report)
    if not report.complete:
        print(f"hl7bridge: stopped after reconcile.max_calls = {cfg.reconcile.max_calls} searches; "
              f"{report.skipped.get('cap', 0)} appointment(s) left unchecked", file=sys.stderr)  # fmt: skip
        return EXIT_INCOMPLETE
    return EXIT_DRIFT if report.findings else 0


def _differ(one: str, other: str) -> bool:
    return one.rstrip("/") != other.rstrip("/")


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
