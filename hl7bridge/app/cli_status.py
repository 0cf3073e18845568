"""``hl7bridge status``: the running service's ``/status`` in a terminal, or what the log alone tells.

The exit status lets a script test the picture: 0 ok, 1 degraded, 3 failing, 4 the service did not answer
(not running, or no health listener configured); 2 stays a usage error, as for every command. ``cli.py``
parses the arguments and opens the log; this module only asks, judges the answer and prints.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import requests

from hl7bridge.app.cli_format import outbox_line, when
from hl7bridge.app.config import Config
from hl7bridge.core.logs import escape
from hl7bridge.core.status import ServiceState
from hl7bridge.mllp.tls import endpoint_arguments, endpoint_fields, endpoint_port
from hl7bridge.workflow.status import LogFacts

#: The log's facts and the log's (safe) URL, or None and why the log cannot tell.
LogReader = Callable[[], tuple[LogFacts | None, str]]

EXIT_CODES = {ServiceState.OK: 0, ServiceState.DEGRADED: 1, ServiceState.FAILING: 3}
EXIT_NOT_RUNNING = 4
#: An address to ask for one the health listener binds on every interface.
_ANY = {"0.0.0.0": "127.0.0.1", "::": "::1"}
_DEFAULT_INTERFACE = {"tcp": "127.0.0.1", "tcp6": "::1"}
#: The whole question, connecting to the last byte; and the most of an answer read (``/status`` is a few kB).
ASK_TIMEOUT = 5.0
MAX_BODY = 1 << 20


def status_url(listen: str) -> str | None:
    """Where ``health.listen`` answers ``/status`` (None: not set, or not a tcp:/tcp6: endpoint)."""
    fields, dangling = endpoint_fields(listen)
    if dangling or not fields or fields[0] not in ("tcp", "tcp6"):
        return None
    args, options = endpoint_arguments(fields)
    port = endpoint_port(fields)
    host = options.get("interface") or (args[2] if len(args) > 2 else "") or _DEFAULT_INTERFACE[fields[0]]
    host = _ANY.get(host, host)
    return f"http://[{host}]:{port}/status" if ":" in host else f"http://{host}:{port}/status"


def ask(url: str) -> tuple[dict[str, Any] | None, str]:
    """The service's ``/status`` body, or None and why there is none.

    The service is local: a proxy from the operator's environment (HTTP_PROXY, .netrc) is never asked in its
    place, and whatever answers on the port gets ``MAX_BODY`` bytes and ``ASK_TIMEOUT`` seconds in all."""
    deadline = time.monotonic() + ASK_TIMEOUT
    with requests.Session() as session:
        session.trust_env = False
        try:
            with session.get(url, timeout=ASK_TIMEOUT, stream=True) as response:
                content = _capped(response, deadline)
                status_code = response.status_code
        except requests.ConnectionError:
            return None, f"nothing answers at {url}"
        except requests.RequestException as exc:
            return None, f"{url} did not answer: {exc.__class__.__name__}"
    if content is None:
        return None, f"{url} answered more than {MAX_BODY} bytes, or not within {ASK_TIMEOUT:.0f} s"
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("state") not in set(ServiceState):
        return None, f"{url} answered HTTP {status_code} without a status (is it this hl7bridge version?)"
    return body, ""


def _capped(response: requests.Response, deadline: float) -> bytes | None:
    """The body, or None once it passes ``MAX_BODY`` bytes or the deadline. ``read1`` returns what has come
    (``iter_content`` waits for a whole chunk, so a trickle would never reach the deadline check)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := response.raw.read1(64 * 1024, decode_content=True):
        size += len(chunk)
        if size > MAX_BODY or time.monotonic() > deadline:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def run(args: argparse.Namespace, cfg: Config, read_log: LogReader) -> int:
    url = status_url(cfg.health.listen)
    if url is None:
        why = ("health.listen is not set" if not cfg.health.listen
               else f"health.listen {cfg.health.listen!r} is not a tcp: endpoint")  # fmt: skip
        body, problem = None, f"cannot ask the service whether it runs: {why}"
    else:
        body, problem = ask(url)
    if body is not None:
        state = ServiceState(body["state"])
        if args.json:
            print(json.dumps({"running": True, "url": url, **body}, indent=2))
        else:
            print_status(body, url or "")
        return EXIT_CODES[state]
    facts, where = read_log()
    if facts is None:
        problem = f"{problem}; the log cannot tell either: {where}"
    if args.json:
        print(json.dumps({"running": False, "problem": problem, **(facts.to_json() if facts else {})}, indent=2))
        return EXIT_NOT_RUNNING
    print(f"hl7bridge status: {problem}." if url is None else f"hl7bridge is not running, or not reachable: {problem}.")
    if facts is not None:
        print(f"From the log alone ({where}):")
        print(outbox_line(facts.outbox_depth, facts.outbox_oldest_age))
        print(_dead_line(facts.dead_letters_open, when(facts.dead_letters_since) if facts.dead_letters_since else "-"))
        for line in instance_lines(facts.to_json()["instances"]):
            print(line)
    return EXIT_NOT_RUNNING


def local_time(text: str | None) -> str:
    """An ISO time from ``/status`` in the terminal's zone."""
    return when(datetime.fromisoformat(text).timestamp()) if text else "-"


def instance_lines(instances: list[dict[str, Any]]) -> list[str]:
    """One line per instance on the log: its role (leader, standby, DOWN), heartbeat age, the leader's in-flight
    commands, its last message; the one that answered marked "this instance" (its dispatch and listener lines)."""
    lines = []
    for i in instances:
        role = "DOWN" if i["role"] == "down" else i["role"]
        flight = f", {i['in_flight']} command(s) in flight" if i["in_flight"] is not None else ""
        last = local_time(i["last_message_at"]) if i["last_message_at"] else "none yet"
        this = "; this instance" if i.get("this") else ""
        lines.append(f"instance {escape(str(i['name']))} ({escape(str(i['host']))}, pid {i['pid']}{this}): {role}"
                     f"{lease_text(i.get('lease'))}, heartbeat {i['heartbeat_age_s']:.0f} s ago{flight}, "
                     f"last message {last}")  # fmt: skip
    return lines


def lease_text(lease: dict[str, Any] | None) -> str:
    """The leader's lease, and how long ago it was renewed: near the lease, a standby is about to take over."""
    if not lease:
        return ""
    renewed = lease.get("renewed_age_s")
    return f" (lease {lease['seconds']:g} s" + (f", renewed {renewed:.1f} s ago)" if renewed is not None else ")")


def print_status(body: dict[str, Any], url: str) -> None:
    print(f"hl7bridge is {body['state'].upper()} (from {url} at {local_time(body.get('at'))})")
    for reason in body.get("reasons", []):
        print(f"  - {escape(str(reason))}")
    dispatch = body.get("dispatch")
    if dispatch is None:
        print("dispatch: none (no routes)")
    elif not dispatch["running"]:
        print(f"dispatch: NOT RUNNING ({escape(str(dispatch['down_reason']))})")
    elif dispatch["auth_paused"]:
        print(f"dispatch: PAUSED since {local_time(dispatch['paused_since'])}, the API refused the token; next try "
              f"{local_time(dispatch['paused_until'])}")  # fmt: skip
    elif dispatch["held"]:
        print(f"dispatch: HELD since {local_time(dispatch['held_since'])}, the Journeys API does not answer")
    elif dispatch.get("role") == "standby":
        print("dispatch: standby (another instance's dispatcher leads)")
    else:
        print("dispatch: flowing")
    outbox, dead = body["outbox"], body["dead_letters"]
    print(outbox_line(outbox["depth"], outbox["oldest_age_s"]))
    print(_dead_line(dead["open"], local_time(dead["oldest_since"])))
    for lst in body.get("listeners", []):
        last = local_time(lst["last_message_at"]) if lst["last_message_at"] else "none yet"
        print(f"listener {escape(str(lst['name']))}: {lst['connections']} connection(s), last message {last}")
    for line in instance_lines(body.get("instances", [])):
        print(line)
    token = body.get("api_token") or {}
    if token.get("expires"):
        print(f"API token: expires {local_time(token['expires'])} (in {token['days_left']:.0f} day(s))")
    else:
        print("API token: no expiry set (api.token_expires)")


def _dead_line(count: int, since: str) -> str:
    return f"dead letters: {count} open" + (f", the oldest since {since}" if count else "")
