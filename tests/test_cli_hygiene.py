"""What every command shares: ``--by`` and ``--since`` checked alike, bad input one line and exit 2, a failure
to act exit 3, and ``hl7bridge status`` asking the local service only (no proxy, a bounded answer)."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hl7bridge.app import cli_status
from hl7bridge.app.cli import build_parser
from hl7bridge.app.cli_format import operator_name
from hl7bridge.store import open_engine

from .conftest import free_port

#: One command line for each command that records who acted.
WITH_BY = [
    ["purge", "--older-than", "30d"],
    ["replay", "1"],
    ["dead-letters", "retry", "1"],
    ["dead-letters", "discard", "1", "--reason", "x"],
    ["reconcile"],
    ["log", "export", "--since", "1h"],
    ["log", "show", "1"],
    ["reload"],
    ["dispatch", "now"],
    ["config", "diff", "--since", "7d", "--phi"],
    ["user", "add", "ana", "--role", "viewer", "--password-stdin"],
    ["user", "passwd", "ana", "--password-stdin"],
    ["user", "role", "ana", "viewer"],
    ["user", "token", "ana"],
    ["user", "revoke", "ana"],
    ["user", "remove", "ana"],
]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7bridge", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**os.environ, **(env or {})})  # fmt: skip


def by_options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from by_options(sub)
        elif "--by" in action.option_strings:
            yield parser.prog, action


def test_every_by_is_checked_as_a_name() -> None:
    found = dict(by_options(build_parser()))
    assert {prog.removeprefix("hl7bridge ") for prog in found} == {_name(argv) for argv in WITH_BY}
    assert all(action.type is operator_name for action in found.values()), found


def _name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("dead-letters", "log", "dispatch", "user", "config") else argv[0]


@pytest.mark.parametrize("argv", WITH_BY, ids=_name)
@pytest.mark.parametrize("by", ["", "   ", "x" * 10_000, "ana\x1b[2J", "ana\nbob"], ids=["empty", "blank", "10kB",
                                                                                   "escape", "newline"])  # fmt: skip
def test_a_bad_by_is_one_line_and_exit_2(argv: list[str], by: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*argv, "--by", by])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--by" in err and "printable characters" in err
    assert len(err) < 300 and "\x1b" not in err


def test_since_is_epoch_seconds_that_long_ago_and_a_bad_one_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    args = build_parser().parse_args(["dead-letters", "list", "--since", "2h"])
    assert before - 7200 <= args.since <= time.time() - 7200
    assert build_parser().parse_args(["reconcile"]).since <= time.time() - 7 * 86400  # the default, 7d
    for bad in ("soon", "5y", "1000000w"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["log", "list", "--since", bad])
        assert exited.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


# ---- exit 3: could not act -----------------------------------------------------------------------------


@pytest.fixture
def log_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    open_engine(url).dispose()
    return url


@pytest.mark.parametrize("argv", [["reload"], ["dispatch", "now"]], ids=" ".join)
def test_no_running_service_is_exit_3(argv: list[str], log_url: str, tmp_path: Path) -> None:
    result = run_cli(*argv, "--database", log_url, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "no running service" in result.stderr


def test_a_locked_database_is_exit_3(log_url: str, tmp_path: Path) -> None:
    holder = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        result = run_cli("dead-letters", "discard", "1", "--reason", "typo", "--database", log_url, cwd=tmp_path)
    finally:
        holder.close()
    assert result.returncode == 3, result.stderr
    assert "database is locked" in result.stderr and "Traceback" not in result.stderr


# ---- status: the local service, never a proxy; a bounded answer ---------------------------------------

STATUS = {"state": "ok", "at": None, "reasons": [], "dispatch": None, "outbox": {"depth": 2, "oldest_age_s": 7},
          "dead_letters": {"open": 0, "oldest_since": None}, "listeners": [], "api_token": {}}  # fmt: skip


def serve(answer: Callable[[http.server.BaseHTTPRequestHandler], None]) -> tuple[str, Callable[[], None]]:
    """A real HTTP server on loopback answering every GET with ``answer``; its /status URL and its stop."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                answer(self)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}/status", stop


def answer_json(body: bytes) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


@pytest.fixture
def no_proxy_exemption(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_status_asks_the_service_even_with_a_proxy_in_the_environment(tmp_path: Path, no_proxy_exemption: None) -> None:
    url, stop = serve(answer_json(json.dumps(STATUS).encode()))
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "c.toml"
    config.write_text(f'[health]\nlisten = "tcp:{url.split(":")[2].split("/")[0]}:interface=127.0.0.1"\n')
    try:
        result = run_cli("status", "--config", str(config), "--database", f"sqlite:///{tmp_path / 'none.db'}",
                         cwd=tmp_path, env={"HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy})  # fmt: skip
    finally:
        stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"hl7bridge is OK (from {url} at -)")
    assert "outbox: 2 waiting, the oldest for 7 s" in result.stdout


def test_status_reads_at_most_max_body(no_proxy_exemption: None) -> None:
    body = json.dumps({**STATUS, "padding": "x" * (cli_status.MAX_BODY + 10)}).encode()
    url, stop = serve(answer_json(body))
    try:
        answer, problem = cli_status.ask(url)
    finally:
        stop()
    assert answer is None and f"more than {cli_status.MAX_BODY} bytes" in problem


def test_status_gives_up_at_the_deadline_on_a_trickle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_status, "ASK_TIMEOUT", 1.0)
    stopped = threading.Event()

    def trickle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(cli_status.MAX_BODY))
        handler.end_headers()
        while not stopped.wait(0.1):
            handler.wfile.write(b" ")
            handler.wfile.flush()

    url, stop = serve(trickle)
    try:
        answer, problem = cli_status.ask(url)
    finally:
        stopped.set()
        stop()
    assert answer is None and "not within 1 s" in problem
