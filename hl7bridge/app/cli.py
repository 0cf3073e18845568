"""The command line: serve, check-config, check, send, log. Errors are one clear line, never a traceback."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import shtab

from hl7bridge import __version__
from hl7bridge.app.cli_format import add_by, outbox_line, parse_duration, print_table, since_arg, when
from hl7bridge.app.config import Config, ConfigError, load
from hl7bridge.core.logs import cap, escape
from hl7bridge.core.status import CommandStatus, MessageStatus

#: Exit statuses shared by every command: bad input (usage, arguments, the config), and a runtime failure
#: that kept the command from acting (the service not running, the database failing or locked).
EXIT_USAGE = 2
EXIT_FAILED = 3
#: A cell of `log list` holds at most this much (then "...(+N chars)"): senders choose MSH-3/4/10; `log show` has it all.
LIST_CELL_CHARS = 80
#: SQLite's INTEGER range, for ids and counts given on the command line.
INT64_MAX = 2**63 - 1


class CliError(Exception):
    """A user error: printed as ``hl7bridge: <message>``, exit status 2."""


class CouldNotAct(CliError):
    """A runtime failure, not the input's: printed the same way, exit status 3."""


def whole_number(minimum: int, maximum: int = INT64_MAX) -> Any:
    """An argparse ``type`` for an id or count: a bad or huge value is a usage error, not an OverflowError."""

    def parse(text: str) -> int:
        value = text.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 19 and minimum <= int(value) <= maximum):
            raise argparse.ArgumentTypeError(f"expected a whole number from {minimum} to {maximum}, got {text[:40]!r}")
        return int(value)

    return parse


def seconds_arg(text: str) -> float:
    """An argparse ``type`` for a timeout: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0 to 86400, got {text[:40]!r}")
    return value


def _sha256(text: str) -> str:
    value = text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"expected a SHA-256 hash (64 hex digits), got {text[:70]!r}")
    return value


def actor(args: argparse.Namespace) -> str:
    """Who acts: ``--by``, else the OS user (the audit log's actor)."""
    if getattr(args, "by", None):
        return str(args.by)
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("HL7BRIDGE_CONFIG")
    cfg = load(path)
    return cfg.with_overrides(getattr(args, "listen", None), getattr(args, "database", None),
                              getattr(args, "api_url", None))  # fmt: skip


# --- serve ---------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from hl7bridge.core import logs

    logs.configure(cfg.service.log_level, cfg.service.log_format, cfg.service.log_phi)
    from twisted.internet import reactor

    from hl7bridge.app.service import Service, StartupError
    from hl7bridge.ops import control
    from hl7bridge.ops import systemd as sd

    if args.sandbox and args.api_url:
        raise CliError("--sandbox and --api-url exclude each other (the sandbox is the API then)")
    if args.api_url:
        logging.getLogger("hl7bridge.service").warning(
            "--api-url: dispatching to %s instead of api.base_url, with the configured API token", args.api_url
        )
    service = Service(cfg, reactor, with_sandbox=args.sandbox, sandbox_listen=args.sandbox_listen)
    watchdog = sd.Watchdog(reactor, lambda: not service.watchdog_problems(),
                           describe=lambda: "; ".join(service.watchdog_problems()))  # fmt: skip
    outcome: dict[str, Any] = {}

    def started(_: object) -> None:
        # Handlers first: until then SIGHUP/SIGUSR1 would end the process, and the pid file invites them.
        signal.signal(control.RELOAD, lambda _sig, _frame: reactor.callFromThread(reload))
        signal.signal(control.DISPATCH_NOW, lambda _sig, _frame: reactor.callFromThread(service.dispatch_now))
        pid_file = _write_pid(cfg)
        line = (f"hl7bridge {__version__}: MLLP listening on {', '.join(service.addresses())}; "
                f"log in {_safe_url(cfg.service.database)}")  # fmt: skip
        if service.sandbox is not None:
            line += f"; sandbox Journeys API on {service.sandbox.url} (see {service.sandbox.url}/_sandbox/instances)"
        if service.console_url():
            line += f"; console on {service.console_url()}"
        if service.dispatcher is not None:
            line += f"; dispatching to {service.config.api.base_url}" + (" (--api-url)" if args.api_url else "")
        print(line, flush=True)

        def before_shutdown() -> None:
            watchdog.stop()
            sd.stopping("Stopping: answering what was received, flushing the log")
            if pid_file is not None:
                control.remove_pid(pid_file)

        # Triggers run in the order added: stop the keep-alives first, then drain the service.
        reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
        reactor.addSystemEventTrigger("before", "shutdown", service.stop)
        sd.ready(line)
        watchdog.start()

    def reload() -> None:
        """SIGHUP: reread the file; one check-config refuses (``journey_check.verdict``) is not installed."""
        from hl7bridge.app.journey_check import verdict

        judged = verdict(lambda: _config(args))
        if judged.config is None or judged.problems:
            for problem in judged.problems:
                logging.getLogger("hl7bridge.service").error("reload refused, keeping the running config: %s", problem)
            sd.status(f"Reload refused: {judged.problems[0]}; running configuration kept")
            service.reload_refused(judged.problems[0])
            return

        def applied(pending: list[str]) -> None:
            note = f"; needs a restart to change: {', '.join(pending)}" if pending else ""
            logging.getLogger("hl7bridge.service").info("configuration reloaded (routes and mappings)%s", note)
            sd.status("Configuration reloaded" + note)

        def failed(failure: Any) -> None:
            logging.getLogger("hl7bridge.service").error(
                "reload not applied, keeping the running config: cannot record it in the log: %s", failure.value
            )

        service.reload(judged.config).addCallbacks(applied, failed)

    def failed(failure: Any) -> None:
        outcome["error"] = failure.value
        reactor.stop()

    reactor.callWhenRunning(lambda: service.start().addCallbacks(started, failed))
    reactor.run()
    error = outcome.get("error")
    if error is not None:
        if isinstance(error, StartupError):
            raise CliError(str(error))
        raise CliError(f"start-up failed: {error.__class__.__name__}: {error}")
    return 0


def _write_pid(cfg: Config) -> Path | None:
    """The pid file ``reload`` and ``dispatch now`` find the service by; None (and a warning) when none can be kept."""
    from hl7bridge.ops import control

    try:
        path = control.pid_path(cfg.service.database, cfg.service.pid_file)
        control.write_pid(path)
    except (control.ControlError, OSError) as exc:
        logging.getLogger("hl7bridge.service").warning("no pid file, so 'hl7bridge reload' and 'dispatch now' "
                                                       "cannot reach this service: %s", exc)  # fmt: skip
        return None
    return path


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_sandbox(args: argparse.Namespace) -> int:
    cfg = _config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from twisted.internet import reactor

    from hl7bridge.testing.sandbox import Sandbox

    if not cfg.sandbox.tokens:
        raise CliError("the sandbox needs [[sandbox.tokens]] in the configuration (see the example config)")
    sandbox = Sandbox.from_config(reactor, cfg.sandbox, cfg.api.org_id, args.sandbox_listen)
    state = sandbox.state
    outcome: dict[str, Any] = {}

    def started(_: object) -> None:
        print(f"hl7bridge sandbox: Journeys API for org {state.org_id} on {sandbox.url} "
              f"(journeys: {', '.join(state.journeys) or 'none'}; see {sandbox.url}/_sandbox/calls)", flush=True)  # fmt: skip

    def failed(failure: Any) -> None:
        outcome["error"] = failure.value
        reactor.stop()

    reactor.callWhenRunning(lambda: sandbox.start().addCallbacks(started, failed))
    reactor.addSystemEventTrigger("before", "shutdown", sandbox.stop)
    reactor.run()
    if "error" in outcome:
        from hl7bridge.app.service import why_not_bound

        why = why_not_bound(outcome["error"], "sandbox.listen (or sandbox --listen)")
        raise CliError(f"the sandbox cannot start on {sandbox.listen_description}: {why}")
    return 0


# --- check-config / check -------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from hl7bridge.store import loose_directory

    judged = _verdict(args)
    if judged.config is None:
        for problem in judged.problems:
            print(f"hl7bridge: {problem}", file=sys.stderr)
        return EXIT_USAGE
    cfg, fit = judged.config, judged.fit
    print(f"{cfg.source}: OK")
    print(f"  database: {_safe_url(cfg.service.database)}")
    loose = loose_directory(cfg.service.database)
    if loose:
        print(f"  warning: {loose}")
    for listener in cfg.listeners:
        print(f"  listener {listener.name}: {listener.endpoint} (ack_mode={listener.ack_mode}, "
              f"time_zone={listener.time_zone}, validation={listener.validation})")  # fmt: skip
    if cfg.console.listen:
        print(f"  console: {cfg.console.listen} (JSON API at /api/v1, max_connections={cfg.console.max_connections})")
        if warning := cfg.console.cleartext_warning():
            print(f"  warning: {warning}")
    if cfg.routes and not cfg.sandbox.journeys:
        print("  journeys: not checked (no [[sandbox.journeys]] declares them)")
    for line in fit.fitting:
        print(f"  journeys: {line}")
    for warning in fit.warnings:
        print(f"  warning: {warning}")
    for problem in judged.problems:
        print(f"hl7bridge: {problem}", file=sys.stderr)
    return 1 if judged.problems else 0


def _verdict(args: argparse.Namespace) -> Any:
    """check-config's verdict on the file ``args`` name (``journey_check.verdict``), shared with reload."""
    from hl7bridge.app.journey_check import verdict

    return verdict(lambda: _config(args))


def cmd_check(args: argparse.Namespace) -> int:
    from hl7bridge.app.diagnose import explain

    cfg = _config(args)
    listener = cfg.listeners[0]
    worst = 0
    for path in _expand(args.files):
        report, ok = explain(path.read_bytes(), cfg, listener)
        print(f"== {escape(str(path))}")
        print(report)
        worst = max(worst, 0 if ok else 1)
    return worst


# --- send -----------------------------------------------------------------------------------------


def _expand(items: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".hl7", ".er7", ".txt")))
        elif p.is_file():
            out.append(p)
        else:
            raise CliError(f"{item}: no such file or directory")
    if not out:
        raise CliError("no message files found (give .hl7 files or folders holding them)")
    return out


def cmd_send(args: argparse.Namespace) -> int:
    from twisted.internet import task

    from hl7bridge.mllp.sender import client_endpoint_string, fresh_suffix, send_all, with_fresh_control_id

    try:
        endpoint = client_endpoint_string(args.to, args.endpoint, args.connect_timeout)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    files = _expand(args.files)
    messages = [(str(p), p.read_bytes()) for p in files]
    if args.fresh_ids:
        suffix = fresh_suffix(time.time())
        messages = [(name, with_fresh_control_id(payload, suffix)) for name, payload in messages]
    result: dict[str, Any] = {}

    def report(reply: Any) -> None:
        print(escape(f"{reply.code:3} {reply.name}: {reply.text}"), flush=True)

    def main(reactor: Any) -> Any:
        d = send_all(reactor, endpoint, messages, args.read_timeout, report)

        def keep(replies: Any) -> None:
            result["replies"] = replies

        def fail(failure: Any) -> None:
            result["error"] = failure.value

        return d.addCallbacks(keep, fail)

    try:
        task.react(main)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    if "error" in result:
        raise CliError(f"cannot send to {endpoint}: {_first_line(result['error'])}")
    replies = result.get("replies", [])
    good = sum(1 for r in replies if r.code in ("AA", "CA"))
    print(f"{good} of {len(messages)} message(s) accepted", file=sys.stderr)
    return 0 if good == len(messages) else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


# --- log ------------------------------------------------------------------------------------------


def _engine(args: argparse.Namespace) -> Any:
    """The existing log: a command never creates one (from another directory it would be a second, empty log)."""
    from hl7bridge.store import StoreError, open_engine

    cfg = _config(args)
    args.database_url = cfg.service.database
    try:
        return open_engine(cfg.service.database, cfg.service.sqlite_synchronous, create=False)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _database_problem(args: argparse.Namespace, exc: BaseException) -> str | None:
    """One line for a database error met while a command reads or writes the log (None: not one)."""
    import sqlite3

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from hl7bridge.store import DAMAGED_HINT, damaged

    url = getattr(args, "database_url", None)
    if url is None or not isinstance(exc, (SQLAlchemyError, sqlite3.Error)):
        return None
    hint = f"; {DAMAGED_HINT.format(path=make_url(url).database)}" if damaged(exc) else ""
    return f"the database {_safe_url(url)} failed: {_first_line(exc)}{hint}"


def cmd_log_list(args: argparse.Namespace) -> int:
    from hl7bridge.app.cli_search import filters_from, more_line
    from hl7bridge.workflow.search import SearchError, search, unindexed_note

    try:
        page = search(_engine(args), filters_from(args), args.before, args.limit)
    except SearchError as exc:
        raise CliError(str(exc)) from None
    if note := unindexed_note(page.unindexed):
        print(note, file=sys.stderr)
    rows = page.rows
    if args.json:
        for r in rows:
            r["received_at"] = when(r["received_at"])
        print(json.dumps(page.as_json(), indent=2, ensure_ascii=False))
        return 0
    header = ("ID", "RECEIVED", "LISTENER", "PEER", "SENDER", "CONTROL ID", "EVENT", "VER", "ACK", "STATUS", "DETAIL")
    table = []
    for r in rows:
        kind = f"{r['message_type'] or '?'}^{r['event'] or ''}".rstrip("^")
        detail = ""
        if r["dead_letters"]:
            detail = f"{r['dead_letters']} dead letter(s): see 'hl7bridge dead-letters list'"
        elif r["duplicate_of"]:
            detail = f"duplicate of {r['duplicate_of']}"
        elif r["error"]:
            detail = f"{r['error_location'] + ': ' if r['error_location'] else ''}{r['error']}"
        elif r["action"]:
            detail = r["action"]
        table.append(tuple(escape(cap(cell, LIST_CELL_CHARS)) for cell in (
            str(r["id"]), when(r["received_at"]), r["listener"], r["peer"],
            f"{r['sending_application'] or ''}/{r['sending_facility'] or ''}", r["control_id"] or "",
            kind, r["version"] or "", r["ack_code"] or "-", CommandStatus.DEAD.value if r["dead_letters"] else r["status"], detail,
        )))  # fmt: skip
    print_table(header, table)
    if len(rows) == 0:
        print("(no messages match)", file=sys.stderr)
    if page.more:
        print(more_line(page.next_before), file=sys.stderr)
    return 0


def cmd_log_show(args: argparse.Namespace) -> int:
    from hl7bridge.app.cli_timeline import print_timeline
    from hl7bridge.workflow.timeline import Unmask, UnmaskError, timeline

    if args.reason is not None and not args.phi:
        raise CliError("--reason goes with --phi (the reason for seeing the patient data)")
    unmask = Unmask(actor(args), "log show" if args.reason is None else args.reason, "cli") if args.phi else None
    try:
        shown = timeline(_engine(args), args.id, unmask=unmask)
    except UnmaskError as exc:
        raise CliError(f"--reason: {exc}") from None
    if shown is None:
        raise CliError(f"no message with id {args.id} (see 'hl7bridge log list')")
    if args.json:
        print(json.dumps(shown.to_json(), indent=2, ensure_ascii=False, default=str))
    else:
        print_timeline(shown, args.raw)
    return 0


# --- upgrade --------------------------------------------------------------------------------------


def cmd_upgrade(args: argparse.Namespace) -> int:
    """The explicit upgrade of an existing log (other commands refuse an older schema: upgrading is ``serve``'s)."""
    from hl7bridge.store import StoreError, upgrade_log

    cfg = _config(args)
    try:
        old, new = upgrade_log(cfg.service.database, cfg.service.sqlite_synchronous)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    print(f"upgraded the log from schema {old} to {new}" if old != new else f"the log is at schema {new}, current")
    return 0


# --- stats / purge --------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    from hl7bridge.store import stats

    data = stats(_engine(args), args.since)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(
        f"messages{' since ' + when(args.since) if args.since else ''}: "
        + (", ".join(f"{k} {v}" for k, v in sorted(data["messages"].items())) or "none")
    )
    if data["last_message_at"]:
        print(f"last message received: {when(data['last_message_at'])}")
    for row in data["messages_by_event"]:
        print(f"  {escape(str(row['event'])):6} {row['ack']:3} {row['count']}")
    print("commands: " + (", ".join(f"{k} {v}" for k, v in sorted(data["commands"].items())) or "none"))
    print(outbox_line(data["outbox"]["depth"], data["outbox"]["oldest_age_s"]))
    oldest_dead = f", the oldest since {when(data['dead_letters_since'])}" if data["dead_letters_since"] else ""
    print(f"open dead letters: {data['dead_letters']}{oldest_dead}"
          + (" (see 'hl7bridge dead-letters list')" if oldest_dead else ""))  # fmt: skip
    if data["api_calls"]:
        print("API calls:")
        for row in data["api_calls"]:
            print(
                f"  {row['operation']:8} {row['status']!s:6} {row['count']:7}  avg {row['avg_ms']:.0f} ms, max {row['max_ms']:.0f} ms"
            )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hl7bridge.app.cli_status import run
    from hl7bridge.workflow.status import LogFacts, log_facts

    def from_log() -> tuple[LogFacts | None, str]:
        try:
            return log_facts(_engine(args)), _safe_url(args.database_url)
        except CliError as exc:
            return None, str(exc)

    return run(args, _config(args), from_log)


def cmd_purge(args: argparse.Namespace) -> int:
    from hl7bridge.store import AuditEntry, due_for_purge, purge

    cfg = _config(args)
    age = args.older_than or (f"{cfg.service.retention_days}d" if cfg.service.retention_days else None)
    if not age:
        raise CliError("say how old: --older-than 30d (or set service.retention_days)")
    try:
        cutoff = time.time() - parse_duration(age)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    engine = _engine(args)
    if args.dry_run:
        with engine.connect() as conn:
            due = due_for_purge(conn, cutoff)
        print(
            f"would clear patient data older than {age}: {due.messages} message(s), {due.commands} command(s), "
            f"{due.attempts} attempt response(s), {due.appointments} appointment memory(ies)"
        )
        return 0
    audited = AuditEntry(actor(args), "cli", "purge", "log", details={"older_than": age})
    done = purge(engine, cutoff, audited=audited)
    print(
        f"cleared patient data older than {age}: {done.messages} message(s), {done.commands} command(s), "
        f"{done.attempts} attempt response(s), {done.appointments} appointment memory(ies); outcomes kept"
    )
    return 0


def cmd_log_export(args: argparse.Namespace) -> int:
    from hl7bridge.app.cli_search import ExportRefused, export, filters_from
    from hl7bridge.workflow.search import SearchError

    if not args.since:
        raise CliError("say which window to export: --since 7d (with any of log list's filters)")
    filters = filters_from(args)
    try:
        return export(args, _engine(args), actor(args), filters)
    except (SearchError, ExportRefused) as exc:
        raise CliError(str(exc)) from None


# --- replay -------------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from hl7bridge.app import cli_replay

    if not args.ids and not args.status:
        raise CliError("name message ids, or choose with --status dead|rejected|failed [--since 2h] [--event S12]")
    if args.ids and (args.status or args.since or args.event):
        raise CliError("give message ids or a selection (--status/--since/--event), not both")
    if args.edit and len(args.ids) != 1:
        raise CliError("--edit replays one message: name its id (hl7bridge replay ID --edit)")
    try:
        return cli_replay.run(args, _config(args), _engine(args), actor(args), args.since)
    except cli_replay.ReplayRefused as exc:
        raise CliError(str(exc)) from None


# --- dead-letters -------------------------------------------------------------------------------


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from hl7bridge.app import cli_deadletters

    if args.dl_command == "retry" and bool(args.ids) == bool(args.all):
        raise CliError(
            "name the dead letters to retry (command ids, see 'hl7bridge dead-letters list') or --all, not both"
        )
    if args.dl_command == "discard" and not (args.reason or "").strip():
        raise CliError("say why: --reason TEXT (kept with the command and in the audit log)")
    return cli_deadletters.run(args, _engine(args), actor(args), getattr(args, "since", None))


# --- audit --------------------------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    from hl7bridge.app import cli_audit

    return cli_audit.run(args, _engine(args), getattr(args, "since", None), when)


# --- user ---------------------------------------------------------------------------------------


def cmd_user(args: argparse.Namespace) -> int:
    from hl7bridge.app import cli_users
    from hl7bridge.workflow.accounts import AccountError

    try:
        return cli_users.run(args, _engine(args), actor(args))
    except AccountError as exc:
        raise CliError(str(exc)) from None


# --- reconcile ----------------------------------------------------------------------------------


def cmd_reconcile(args: argparse.Namespace) -> int:
    from hl7bridge.app.cli_reconcile import run

    if args.dry_run and not args.repair:
        raise CliError("--dry-run goes with --repair (reconcile alone changes nothing)")
    cfg = _config(args)
    if args.route is not None and args.route not in {r.name for r in cfg.routes}:
        raise CliError(f"no route named {args.route!r} (configured: {', '.join(r.name for r in cfg.routes) or 'none'})")
    return run(cfg, _engine(args), args.since, args, actor(args))


def cmd_config_diff(args: argparse.Namespace) -> int:
    from hl7bridge.app import cli_config_diff

    path = args.config or os.environ.get("HL7BRIDGE_CONFIG")
    if not path:
        raise CliError("config diff: give --config NEW (the configuration to try)")
    try:
        return cli_config_diff.run(args, path, _engine(args), actor(args))
    except cli_config_diff.DiffRefused as exc:
        raise CliError(str(exc)) from None


# --- reload / dispatch now: reaching the running service -----------------------------------------


def _service_pid(cfg: Config) -> tuple[Path, int]:
    from hl7bridge.ops import control

    try:
        path = control.pid_path(cfg.service.database, cfg.service.pid_file)
        return path, control.service_pid(path)
    except control.ControlError as exc:
        raise CouldNotAct(str(exc)) from None


def _signal(pid: int, signum: Any) -> int:
    from hl7bridge.ops import control

    try:
        return control.send(pid, signum)
    except control.ControlError as exc:
        raise CouldNotAct(str(exc)) from None


def cmd_reload(args: argparse.Namespace) -> int:
    """check-config's verdict on the file, then SIGHUP to the service (``--pid``, else its pid file): a file
    that fails is refused here and the service keeps its configuration; the service judges the file again
    itself (the same verdict), so one changed in between is refused there too."""
    from hl7bridge.app.config_digest import identity
    from hl7bridge.ops import control
    from hl7bridge.workflow.service import record_reload

    judged = _verdict(args)
    if judged.config is None or judged.problems:
        for problem in judged.problems:
            print(f"hl7bridge: {problem}", file=sys.stderr)
        print("hl7bridge: reload refused; the running service keeps its configuration", file=sys.stderr)
        return EXIT_USAGE
    cfg = judged.config
    if args.pid is not None:
        try:
            control.check_service(args.pid)
        except control.ControlError as exc:
            raise CliError(str(exc)) from None
        pid = args.pid
    else:
        _path, pid = _service_pid(cfg)
    engine = _engine(args)
    record_reload(engine, actor(args), "cli", pid, cfg.source)
    sent = time.time()
    _signal(pid, control.RELOAD)
    outcome = _reload_outcome(engine, sent)
    if outcome is None:
        raise CouldNotAct(f"reload sent to the service (pid {pid}), but it has not said within {RELOAD_WAIT:g} s "
                          "whether it applied it; see the service log")  # fmt: skip
    verdict, row = outcome
    if verdict == "refused":
        print(f"hl7bridge: the service refused the reload and keeps its configuration: {row}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{cfg.source}: OK; reload sent to the service (pid {pid}), which runs it now (digest {row['digest'][:12]}). "
          "Routes, mappings and dispatch settings apply to the next message; the service log says what needs a "
          "restart.")  # fmt: skip
    checked = identity(cfg)
    # Paths too: the digest leaves out dispatch settings, which a reload applies all the same.
    if row["digest"] != checked.digest or row["path"] != checked.path:
        print(f"hl7bridge: note: the service reread the file it was started with, {escape(row['path'])} (digest "
              f"{row['digest'][:12]}), not {escape(checked.path)} (digest {checked.short})", file=sys.stderr)  # fmt: skip
    return 0


#: How long ``reload`` waits for the service to record whether it applied the configuration.
RELOAD_WAIT = 10.0


def _reload_outcome(engine: Any, sent: float) -> tuple[str, Any] | None:
    """The service's verdict on the reload signalled at ``sent``: ``("applied", its configs row)`` or
    ``("refused", reason)``; None when it records none in time."""
    from hl7bridge.store.configs import config_row, reload_outcome

    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            found = reload_outcome(conn)
            if found is not None and found[1] >= sent:
                verdict, _at, rest = found
                if verdict != "applied":
                    return verdict, rest
                row = config_row(conn, int(rest)) if rest.isdigit() else None
                if row is not None:
                    return verdict, row
        time.sleep(0.1)
    return None


def cmd_dispatch_now(args: argparse.Namespace) -> int:
    from hl7bridge.ops import control
    from hl7bridge.workflow.service import dispatch_now

    cfg = _config(args)
    _path, pid = _service_pid(cfg)
    done = dispatch_now(_engine(args), actor(args), "cli")
    _signal(pid, control.DISPATCH_NOW)
    leads = (f"the dispatcher of instance {escape(done.leader)} dispatches now" if done.leader else
             "no dispatcher leads yet: they are sent once one does")  # fmt: skip
    print(f"{done.commands_due} waiting command(s) made due; {leads} (follow with 'hl7bridge stats')")
    return 0


# --- parser ---------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr saying what to fix, exit 2, as every other input error; the usage
    is ``--help``'s. Subcommands' parsers are of this class too (argparse makes them of their parent's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hl7bridge", description="HL7 v2 SIU over MLLP to MedChat journeys")
    parser.add_argument("--version", action="version", version=f"hl7bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        config = p.add_argument(
            "--config", metavar="PATH", help="TOML settings (default: $HL7BRIDGE_CONFIG or built-in)"
        )
        config.complete = shtab.FILE  # type: ignore[attr-defined]
        p.add_argument("--database", metavar="URL", help="SQLAlchemy URL of the message log (overrides the file)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the MLLP listener(s)"))
    serve.add_argument("--listen", metavar="ENDPOINT", action="append",
                       help="endpoint string, e.g. tcp:2575:interface=127.0.0.1 (repeatable; overrides the file)")  # fmt: skip
    serve.add_argument("--sandbox", action="store_true",
                       help="start the built-in Journeys API sandbox and dispatch to it")  # fmt: skip
    serve.add_argument("--sandbox-listen", metavar="ENDPOINT",
                       help="where the sandbox listens (default: sandbox.listen, 127.0.0.1:8080; loopback unless "
                            "sandbox.allow_remote)")  # fmt: skip
    serve.add_argument("--api-url", metavar="URL", help="dispatch to this Journeys API base URL instead")
    serve.set_defaults(func=cmd_serve)

    sandbox = with_config(sub.add_parser("sandbox", help="run the Journeys API sandbox on its own"))
    sandbox.add_argument("--listen", dest="sandbox_listen", metavar="ENDPOINT",
                         help="default: sandbox.listen, 127.0.0.1:8080; loopback unless sandbox.allow_remote")  # fmt: skip
    sandbox.set_defaults(func=cmd_sandbox)

    check_config = with_config(sub.add_parser("check-config", help="validate the settings and exit"))
    check_config.set_defaults(func=cmd_check_config)

    check = with_config(sub.add_parser("check", help="explain a message field by field and how it would be answered"))
    check.add_argument("files", nargs="+", metavar="FILE").complete = shtab.FILE  # type: ignore[attr-defined]
    check.set_defaults(func=cmd_check)

    send = sub.add_parser("send", help="send message files over MLLP and print each ACK")
    target = send.add_mutually_exclusive_group()
    target.add_argument("--to", metavar="HOST:PORT", help="default 127.0.0.1:2575")
    target.add_argument("--endpoint", metavar="STR",
                        help="Twisted client endpoint, e.g. tls:host=h:port=2575:trustRoots=ca_dir")  # fmt: skip
    send.add_argument("--connect-timeout", type=seconds_arg, default=10.0, metavar="S")
    send.add_argument("--read-timeout", type=seconds_arg, default=30.0, metavar="S")
    send.add_argument("--fresh-ids", action="store_true",
                      help="give each message a new control id (MSH-10 + '-' + a suffix for this run), so files sent "
                           "before are new messages again rather than duplicates (e.g. to rerun fixtures/demo)")  # fmt: skip
    send.add_argument("files", nargs="+", metavar="FILE|DIR").complete = shtab.FILE  # type: ignore[attr-defined]
    send.set_defaults(func=cmd_send)

    upgrade_p = with_config(sub.add_parser("upgrade", help="upgrade the log's schema in place (as `serve` does)"))
    upgrade_p.set_defaults(func=cmd_upgrade)
    db_p = sub.add_parser("db", help="the message log's schema")
    db_sub = db_p.add_subparsers(dest="db_command", required=True)
    db_upgrade = with_config(db_sub.add_parser("upgrade", help="upgrade the log's schema in place (SQLite or "
                                               "PostgreSQL, with every instance stopped); same as `upgrade`"))  # fmt: skip
    db_upgrade.set_defaults(func=cmd_upgrade)

    stats_p = with_config(sub.add_parser("stats", help="counts, outbox and API calls, from the database"))
    stats_p.add_argument("--since", type=since_arg, metavar="DURATION", help="e.g. 24h (default: everything)")
    stats_p.add_argument("--json", action="store_true")
    stats_p.set_defaults(func=cmd_stats)

    status_p = with_config(sub.add_parser("status", help="the running service's status (ok, degraded, failing) "
                                          "and why; exit 0, 1, 3, or 4 when it does not answer"))  # fmt: skip
    status_p.add_argument("--json", action="store_true")
    status_p.set_defaults(func=cmd_status)

    purge_p = with_config(sub.add_parser("purge", help="clear patient data older than a duration (retention)"))
    purge_p.add_argument("--older-than", metavar="DURATION", help="e.g. 30d (default: service.retention_days)")
    purge_p.add_argument("--dry-run", action="store_true", help="only count what would be cleared")
    add_by(purge_p, "purges")
    purge_p.set_defaults(func=cmd_purge)

    from hl7bridge.app.cli_replay import add_replay_options
    from hl7bridge.app.cli_search import add_export_parser, add_filters

    replay = with_config(sub.add_parser("replay", help="run logged messages again through mapping and dispatch"))
    replay.add_argument("ids", nargs="*", type=whole_number(1), metavar="ID")
    replay.add_argument("--status", choices=(CommandStatus.DEAD.value, MessageStatus.REJECTED.value, CommandStatus.FAILED.value),
                        help="messages that were rejected, or whose commands were dead-lettered or failed")  # fmt: skip
    replay.add_argument("--since", type=since_arg, metavar="DURATION", help="only messages received within, e.g. 2h")
    replay.add_argument("--event", metavar="S12")
    replay.add_argument(
        "--dry-run", action="store_true", help="print the exact API calls instead (patient data masked)"
    )
    add_replay_options(replay, cmd_replay)

    dead = sub.add_parser(
        "dead-letters", help="commands the API refused or that were given up on: list, retry, discard"
    )
    dead_sub = dead.add_subparsers(dest="dl_command", required=True)
    dl_list = with_config(dead_sub.add_parser("list", help="open dead letters, oldest first"))
    dl_list.add_argument("--since", type=since_arg, metavar="DURATION", help="dead within, e.g. 12h")
    dl_list.add_argument("--route", metavar="NAME")
    dl_list.add_argument("--after", type=whole_number(1), metavar="ID",
                         help="the page after the one ending at this command id")  # fmt: skip
    dl_list.add_argument("--limit", type=whole_number(1, 100_000), default=100)
    dl_retry = with_config(dead_sub.add_parser("retry", help="back into the outbox, through the running dispatcher"))
    dl_retry.add_argument("ids", nargs="*", type=whole_number(1), metavar="ID", help="command ids")
    dl_retry.add_argument("--all", action="store_true", help="every open dead letter")
    dl_retry.add_argument("--dry-run", action="store_true", help="say what would be queued, change nothing")
    dl_retry.add_argument("--reason", metavar="TEXT", help="why, for the audit log (e.g. the fix made)")
    dl_discard = with_config(dead_sub.add_parser("discard", help="settle dead letters for good, unsent"))
    dl_discard.add_argument("ids", nargs="+", type=whole_number(1), metavar="ID", help="command ids")
    dl_discard.add_argument("--reason", metavar="TEXT", help="why (required)")
    for p in (dl_list, dl_retry, dl_discard):
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_dead_letters)
    for p in (dl_retry, dl_discard):
        add_by(p, "acts")
    audit_p = sub.add_parser("audit", help="the operators' audit log: who did what, when and why")
    audit_sub = audit_p.add_subparsers(dest="audit_command", required=True)
    audit_list = with_config(audit_sub.add_parser("list", help="entries, newest first"))
    audit_list.add_argument("--since", type=since_arg, metavar="DURATION", help="e.g. 7d")
    audit_list.add_argument("--action", metavar="ACTION", help="e.g. retry, discard, replay, purge, repair, export")
    audit_list.add_argument("--before", type=whole_number(1), metavar="ID", help="the next page: entries older than ID")
    audit_list.add_argument("--limit", type=whole_number(1, 10000), default=50)
    audit_verify = with_config(
        audit_sub.add_parser("verify", help="recompute the hash chain: exit 1 if an entry was edited or deleted")
    )
    audit_verify.add_argument("--expect", type=_sha256, metavar="HASH",
                              help="a head hash printed by an earlier verify and kept elsewhere: it must still be in the chain")  # fmt: skip
    for p in (audit_list, audit_verify):
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_audit)

    from hl7bridge.app.cli_users import add_parser as add_user_parser

    add_user_parser(sub, with_config, cmd_user)

    rec = with_config(sub.add_parser(
        "reconcile", help="compare the log with the Journeys API; exit 1 on drift",
        epilog="exit status: 0 no drift, 1 drift found (repairs queued with --repair), 2 bad input, "
               "3 could not finish (the API's answer, or reconcile.max_calls)"))  # fmt: skip
    rec.add_argument("--since", type=since_arg, metavar="DURATION", default="7d",
                     help="appointments whose state changed within, e.g. 7d (the default)")  # fmt: skip
    rec.add_argument("--route", metavar="NAME", help="only this route's appointments")
    rec.add_argument("--repair", action="store_true", help="queue the commands that fix the drift (outbox)")
    rec.add_argument("--dry-run", action="store_true", help="with --repair: show what would be queued")
    rec.add_argument("--json", action="store_true")
    add_by(rec, "repairs")
    rec.add_argument("--api-url", dest="reconcile_api_url", metavar="URL",
                     help="the API to search; needed when the service dispatches elsewhere than api.base_url "
                          "(serve --api-url/--sandbox): give that URL")  # fmt: skip
    rec.set_defaults(func=cmd_reconcile)

    log = sub.add_parser("log", help="look into the message log")
    log_sub = log.add_subparsers(dest="log_command", required=True)
    lst = with_config(log_sub.add_parser("list", help="recent messages, newest first"))
    add_filters(lst)
    lst.add_argument("--before", type=whole_number(1), metavar="ID", help="the page after the one ending at this id")
    lst.add_argument("--limit", type=whole_number(1, 100_000), default=50)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_log_list)
    add_export_parser(log_sub, with_config, cmd_log_export)
    show = with_config(log_sub.add_parser("show", help="one message in full"))
    show.add_argument("id", type=whole_number(1))
    show.add_argument("--raw", action="store_true", help="include the raw message (masked unless --phi)")
    show.add_argument("--phi", action="store_true", help="show patient data unmasked (recorded in the audit log)")
    show.add_argument("--reason", metavar="TEXT", help="why you need the patient data (with --phi; default 'log show')")
    show.add_argument("--json", action="store_true", help="the whole timeline as JSON (raw segments included)")
    add_by(show, "looks (with --phi)")
    show.set_defaults(func=cmd_log_show)

    acted = "exit status: 0 done, 2 bad input (arguments, the configuration), 3 could not act (no running service, the database)"
    from hl7bridge.app.cli_config_diff import add_parser as add_config_parser

    add_config_parser(sub, with_config, cmd_config_diff)
    reload_p = with_config(sub.add_parser("reload", help="reread the running service's configuration (SIGHUP)",
                                          epilog=acted))  # fmt: skip
    add_by(reload_p, "asks")
    reload_p.add_argument("--pid", type=whole_number(1, 2**22), metavar="PID",
                          help="the service's pid instead of its pid file (systemd: --pid $MAINPID)")  # fmt: skip
    reload_p.set_defaults(func=cmd_reload)

    dispatch = sub.add_parser("dispatch", help="act on the running service's dispatcher")
    dispatch_sub = dispatch.add_subparsers(dest="dispatch_command", required=True)
    now = with_config(
        dispatch_sub.add_parser("now", help="end the backoff: send what waits now (SIGUSR1)", epilog=acted)
    )
    add_by(now, "asks")
    now.set_defaults(func=cmd_dispatch_now)

    completion = sub.add_parser("completion", help="print the shell completion script (see the README to install it)")
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(func=lambda args: print(shtab.complete(parser, shell=args.shell)) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"hl7bridge: config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"hl7bridge: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, CouldNotAct) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); not an error worth a traceback.
        sys.stderr.close()
        return 0
    except Exception as exc:
        problem = _database_problem(args, exc)
        if problem is None:
            raise
        print(f"hl7bridge: {problem}", file=sys.stderr)
        return EXIT_FAILED
