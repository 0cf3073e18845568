"""``hl7bridge replay``: selection, ``--edit`` in the operator's editor, progress and the summary line.
The work is ``hl7bridge.workflow.replay.Replayer``'s; ``cli.py`` checks the arguments and passes the config and the
log in, as for the other ``cli_*`` modules (no import cycle)."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import add_by
from hl7bridge.app.config import Config
from hl7bridge.core.logs import escape
from hl7bridge.workflow.unmask import record_unmask


class ReplayRefused(ValueError):
    """A replay that cannot be run as asked; the message says what to change."""


def add_replay_options(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    parser.add_argument("--edit", action="store_true",
                        help="open the message in $EDITOR and replay the edited copy (one ID; the original stays)")  # fmt: skip
    parser.add_argument("--phi", action="store_true", help="show patient data in --dry-run's calls")
    add_by(parser, "replays")
    parser.set_defaults(func=handler)


def run(args: argparse.Namespace, cfg: Config, engine: Engine, actor: str, since: float | None) -> int:
    from hl7bridge.app.wiring import replayer_for
    from hl7bridge.store import messages_for_replay

    originals = messages_for_replay(engine, args.ids or None, args.status, since, args.event)
    if args.ids:
        missing = sorted(set(args.ids) - {m["id"] for m in originals})
        if missing:
            raise ReplayRefused(f"no message with id {', '.join(map(str, missing))} (see 'hl7bridge log list')")
    if not originals:
        print("nothing to replay: no message matches", file=sys.stderr)
        return 0
    edited = _edit(originals[0]) if args.edit else None
    if args.edit and edited is None:
        return 0
    replayer = replayer_for(engine, cfg, actor=actor, phi=args.phi)
    if args.dry_run and args.phi:
        record_unmask(engine, actor, [m["id"] for m in originals], "replay dry run", edited=edited is not None)
    if args.dry_run:
        print(f"calls as they would go to {escape(replayer.target.describe())}:")
    progress = Progress(len(originals), sys.stderr.isatty())
    for number, original in enumerate(originals, 1):
        result = replayer.replay(original, args.dry_run, edited)
        prefix = escape(
            f"[{number}/{progress.total}] message {original['id']} ({original['event'] or '?'} {original['control_id']})"
        )
        if result.problem:
            progress.print(f"{prefix}: {escape(result.problem)}")
            progress.count("skipped" if result.skipped else "failed")
        elif args.dry_run:
            progress.print(f"{prefix}: would make:\n" + "\n".join(f"    {escape(str(call))}" for call in result.calls))
            progress.count("checked")
        else:
            progress.queued += result.commands
            progress.print(f"{prefix}: replayed as message {result.new_message_id} ({result.commands} command(s) queued)"
                           + (" from the edited copy" if edited is not None else ""))  # fmt: skip
            progress.count("replayed")
    progress.done(args.dry_run)
    failed = progress.counts["failed"]
    return 1 if failed and failed == progress.total - progress.counts["skipped"] else 0


class Progress:
    """On a terminal, one line on stderr rewritten as messages go by; a summary line at the end in any case."""

    def __init__(self, total: int, terminal: bool) -> None:
        self.total = total
        self.terminal = terminal
        self.queued = 0
        self.counts = {"replayed": 0, "checked": 0, "skipped": 0, "failed": 0}

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.terminal:
            print(f"\r{self._tally()}", end="", file=sys.stderr, flush=True)

    def print(self, text: str) -> None:
        if self.terminal:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
        print(text, flush=True)

    def done(self, dry_run: bool) -> None:
        if self.terminal:
            print("\r\x1b[K", end="", file=sys.stderr)
        tail = "" if dry_run else "; the running service dispatches them (follow with 'hl7bridge log show ID')"
        print(f"{self._tally()}{tail}", file=sys.stderr, flush=True)

    def _tally(self) -> str:
        c = self.counts
        done = sum(c.values())
        head = (
            f"{c['checked']} would be replayed"
            if c["checked"]
            else f"{c['replayed']} replayed ({self.queued} command(s) queued)"
        )
        return f"[{done}/{self.total}] {head}, {c['skipped']} superseded, {c['failed']} not replayable"


def _edit(original: dict[str, Any]) -> bytes | None:
    """The operator's edited copy of the message (None, said why, when there is nothing to replay).

    The copy is a 0600 temporary file, one segment a line, removed afterwards whatever happens."""
    if original["raw"] is None:
        raise ReplayRefused(f"message {original['id']}'s raw message was purged by retention; there is nothing to edit")
    editor = os.environ.get("EDITOR", "").strip()
    if not editor:
        raise ReplayRefused("set EDITOR to the editor to use (e.g. EDITOR=nano hl7bridge replay ID --edit)")
    charset = original["charset"] or "utf-8"
    before = _segments(original["raw"].decode(charset, errors="replace"))
    fd, path = tempfile.mkstemp(prefix=f"hl7bridge-{original['id']}-", suffix=".hl7")
    try:
        with os.fdopen(fd, "w", encoding=charset, errors="replace") as handle:
            handle.write("\n".join(before) + "\n")
        try:
            ran = subprocess.run([*shlex.split(editor), path], check=False)
        except OSError as exc:
            raise ReplayRefused(f"cannot run the editor {editor!r}: {exc.strerror}") from None
        if ran.returncode != 0:
            raise ReplayRefused(f"the editor exited with status {ran.returncode}; nothing done")
        with open(path, encoding=charset, errors="replace", newline="") as handle:
            after = _segments(handle.read())
    finally:
        os.unlink(path)
    if not after:
        print(f"nothing done: the edited copy of message {original['id']} is empty", file=sys.stderr)
        return None
    if after == before:
        print(f"nothing done: message {original['id']} was left unchanged", file=sys.stderr)
        return None
    try:
        return ("\r".join(after) + "\r").encode(charset)
    except UnicodeEncodeError:
        raise ReplayRefused(
            f"the edited copy holds characters that {charset} (the message's charset) cannot hold"
        ) from None


def _segments(text: str) -> list[str]:
    return [line for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if line.strip()]
