"""How a CLI process reaches the running service: a pid file (0600) and two signals.

``hl7bridge reload`` sends SIGHUP (reread the configuration), ``hl7bridge dispatch now`` SIGUSR1 (the
dispatcher tries what waits at once). systemd's ``ExecReload`` runs ``hl7bridge reload`` too, so a service
started by hand and one under systemd are reached the same way. Signals rather than a control socket: they
need no listener of their own, carry no data that could be forged, and only the service's own user (or root)
may send them.

The pid file lies beside the SQLite log (``var/hl7bridge.db`` → ``var/hl7bridge.pid``) unless
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


def write_pid(path: Path) -> None:
    """Record this process's pid (0600, replaced atomically: a reader never sees half a number)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{os.getpid()}\n")
    os.replace(temporary, path)


def remove_pid(path: Path) -> None:
    """Remove the pid file if it is still this process's (a successor may have written its own)."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def service_pid(path: Path) -> int:
    """The running service's pid, checked to be a live ``hl7bridge serve`` (a stale file's pid may be reused)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ControlError(f"no running service: {path} does not exist (start it with 'hl7bridge serve', or give "
                           "the --config/--database it runs with)") from None  # fmt: skip
    except OSError as exc:
        raise ControlError(f"cannot read {path}: {exc.strerror} (run as the service's user)") from None
    if not text.isdigit():
        raise ControlError(f"{path} holds no pid")
    pid = int(text)
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        raise ControlError(f"no running service: process {pid} named in {path} is gone") from None
    if not any(part.endswith(b"hl7bridge") for part in command) or b"serve" not in command:
        raise ControlError(f"no running service: process {pid} named in {path} is not 'hl7bridge serve'")
    return pid


def send(path: Path, signum: signal.Signals) -> int:
    """Send ``signum`` to the service whose pid file is ``path``; its pid."""
    pid = service_pid(path)
    try:
        os.kill(pid, signum)
    except PermissionError:
        raise ControlError(f"not allowed to signal process {pid}: run as the service's user (or root)") from None
    except ProcessLookupError:
        raise ControlError(f"no running service: process {pid} ended") from None
    return pid
