"""Fixtures of the reliability suite, and a table of every scenario's figures at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningSandbox

from .support import MODE, RESULTS, mb, sandbox_process


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[RunningSandbox]:
    """A Journeys API sandbox of its own: a separate process that outlives every kill of the service."""
    workdir = tmp_path / "sandbox"
    workdir.mkdir()
    running = sandbox_process(workdir)
    yield running
    running.stop()


@pytest.fixture
def bridge_dir(tmp_path: Path) -> Path:
    workdir = tmp_path / "bridge"
    workdir.mkdir()
    return workdir


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"reliability figures ({MODE})")
    write("| scenario | messages | lost | duplicated | wrong ACKs | RSS before → after (MB) | fds before → after | s |")
    write("|---|---:|---:|---:|---:|---|---|---:|")
    for r in RESULTS:
        write(
            f"| {r['scenario']} | {r.get('messages')} | {r.get('lost')} | {r.get('duplicated')} | "
            f"{r.get('wrong_acks')} | {mb(r.get('rss_before_kb'))} → {mb(r.get('rss_after_kb'))} | "
            f"{r.get('fds_before')} → {r.get('fds_after')} | {r.get('duration_s')} |"
        )
    for r in RESULTS:
        write(f"{r['scenario']}: {r['results_file']}")
