"""How a CLI process reaches the running service: a pid file (0600) and two signals.

``hl7bridge reload`` sends SIGHUP (reread the configuration), ``hl7bridge dispatch now`` SIGUSR1 (the
dispatcher tries what waits at once). systemd's ``ExecReload`` runs ``hl7bridge reload --pid $MAINPID``: the
same check and signal, with the pid systemd knows (a service without a pid file is reached too). Signals rather than a control socket: they
need no listener of their own, carry no data that could be forged, and only the service's own user (or root)
may send them.

The pid file holds the pid and the process's start time (``/proc/PID/stat`` field 22): a pid reused by another
process after a crash is not signalled. The pid file lies beside the SQLite log (``var/hl7bridge.db`` → ``var/hl7bridge.pid``) unless
``service.pid_file`` names one, so the CLI finds it from the same ``--config``/``--database`` as every command.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from sqlalchemy.engine import make_url

RELOAD = signal.SIGHUP
DISPATCH_NOW = signal.SIGUSR1


class ControlError(RuntimeError):
    """The service cannot be reached; the message says why and what to do."""


def pid_path(database: str, configured: str = "") -> Path:
    """Where the service keeps its pid: ``configured``, else beside its SQLite log file."""
    if configured:
        return Path(configured)
    url = make_url(database)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        raise ControlError(f"the log {url.render_as_string(hide_password=True)} is no file to keep the pid "
                           "beside; set service.pid_file")  # fmt: skip
    return Path(url.database).with_suffix(".pid")


#: A pid file is "PID STARTTIME\n": a few dozen bytes; more is not ours.
PID_FILE_MAX = 64


def start_time(pid: int) -> str:
    """When process ``pid`` started (``/proc/PID/stat`` field 22, clock ticks since boot); "" when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    fields = stat[stat.rfind(b")") + 2 :].split()  # the name (field 2) may hold spaces and parentheses
    return fields[19].decode() if len(fields) > 19 else ""


def write_pid(path: Path) -> None:
    """Record this process's pid and start time (0600, replaced atomically: a reader never sees half a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # left by a crashed process with this pid
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{os.getpid()} {start_time(os.getpid())}\n")
    os.replace(temporary, path)


def _read(path: Path) -> str:
    with path.open("rb") as f:
        return f.read(PID_FILE_MAX).decode("ascii", errors="replace").strip()


def remove_pid(path: Path) -> None:
    """Remove the pid file if it is still this process's (a successor may have written its own)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        if int(_read(path).split()[0]) == os.getpid():
            path.unlink()


def service_pid(path: Path) -> int:
    """The running service's pid, from its pid file, checked to be that live ``hl7bridge serve``."""
    try:
        text = _read(path)
    except FileNotFoundError:
        raise ControlError(f"no running service: {path} does not exist (start it with 'hl7bridge serve', or give "
                           "the --config/--database it runs with)") from None  # fmt: skip
    except OSError as exc:
        raise ControlError(f"cannot read {path}: {exc.strerror} (run as the service's user)") from None
    words = text.split()
    if not 1 <= len(words) <= 2 or not all(w.isascii() and w.isdigit() for w in words):
        raise ControlError(f"{path} holds no pid")
    pid = int(words[0])
    where = f"process {pid} named in {path}"
    check_service(pid, where)
    if len(words) == 2 and start_time(pid) != words[1]:
        raise ControlError(f"no running service: {where} is not the process that wrote it (it started later)")
    return pid


def check_service(pid: int, where: str = "") -> None:
    """Refuse ``pid`` unless it is a live ``hl7bridge serve``: the program (or ``-m`` module) ``hl7bridge``
    with ``serve`` as its subcommand."""
    where = where or f"process {pid}"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        raise ControlError(f"no running service: {where} is gone") from None
    program = next((i for i, part in enumerate(command) if os.path.basename(part) == b"hl7bridge"), None)
    if program is None or command[program + 1 : program + 2] != [b"serve"]:
        raise ControlError(f"no running service: {where} is not 'hl7bridge serve'")


def send(pid: int, signum: signal.Signals) -> int:
    """Send ``signum`` to the service ``pid`` (checked by ``service_pid`` or ``check_service``); its pid."""
    try:
        os.kill(pid, signum)
    except PermissionError:
        raise ControlError(f"not allowed to signal process {pid}: run as the service's user (or root)") from None
    except ProcessLookupError:
        raise ControlError(f"no running service: process {pid} ended") from None
    return pid
