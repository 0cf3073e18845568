"""Connection-policy figures: how fast each hostile connection shape is closed or refused, and what another
peer's ACKs cost meanwhile. Real service subprocess, real loopback sockets:

    python bench/connection_policy.py [--messages 200]

Shapes: a CR outside any frame every 0.25 s (idle_timeout 2 s); a fresh start block every 0.25 s
(frame_timeout 2 s); one peer opening 3 x max_connections_per_peer connections and holding them; the
descriptor table exhausted (RLIMIT_NOFILE 100, 150 connections). The figures go to docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hl7bridge.testing.client import BlockingClient  # noqa: E402

PER_PEER = 20
MESSAGE = (
    "MSH|^~\\&|BENCH|FAC|HL7BRIDGE|X|20270101120000||SIU^S12|{control}|P|2.5.1\r"
    "SCH|{control}|{control}|||||||30|MIN|^^30^20270101130000\r"
    "PID|1||{control}^^^H^MR||DOE^JANE\r"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(
    workdir: Path, fd_limit: int | None = None, most: int = 3 * PER_PEER, idle: float = 2.0
) -> tuple[subprocess.Popen, int, int]:
    port, health = free_port(), free_port()
    config = workdir / "bench.toml"
    config.write_text(
        f'[health]\nlisten = "tcp:{health}:interface=127.0.0.1"\n\n'
        f'[listeners.main]\nendpoint = "tcp:{port}:interface=127.0.0.1"\nidle_timeout = {idle}\nframe_timeout = 2\n'
        f"max_connections = {most}\nmax_connections_per_peer = {PER_PEER}\n"
    )

    def limit() -> None:
        if fd_limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    process = subprocess.Popen(
        [sys.executable, "-m", "hl7bridge", "serve", "--config", str(config), "--database",
         f"sqlite:///{workdir}/log.db"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir, preexec_fn=limit,
    )  # fmt: skip
    if "listening" not in (process.stdout.readline() if process.stdout else ""):
        raise SystemExit("the service did not start")
    return process, port, health


def peer(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def closed_after(port: int, poke: bytes, limit: float = 15.0) -> float | None:
    """Seconds until the service closes a connection that sends ``poke`` every 0.25 s."""
    with peer(port) as sock:
        sock.settimeout(0.25)
        began = time.monotonic()
        while time.monotonic() - began < limit:
            try:
                sock.send(poke)
                if sock.recv(65536) == b"":
                    return round(time.monotonic() - began, 2)
            except TimeoutError:
                continue
            except OSError:
                return round(time.monotonic() - began, 2)
    return None


def ack_latencies(port: int, count: int) -> list[float]:
    out = []
    with BlockingClient("127.0.0.1", port, timeout=10) as client:
        for _ in range(count):
            control = f"B{uuid.uuid4().hex[:12].upper()}"
            sent = time.perf_counter()
            client.request(MESSAGE.format(control=control).encode())
            out.append((time.perf_counter() - sent) * 1000)
    return out


def refused(socks: list[socket.socket]) -> int:
    """How many the service has closed (0.3 s after the last opened; well inside idle_timeout)."""
    time.sleep(0.3)
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            count += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        process, port, _health = serve(Path(tmp))
        try:
            figures["junk_cr_every_0.25s_closed_after_s"] = closed_after(port, b"\r")
            figures["start_block_every_0.25s_closed_after_s"] = closed_after(port, b"\x0bMSH|")
        finally:
            process.terminate()
            process.wait(20)
    with tempfile.TemporaryDirectory() as tmp:
        process, port, _health = serve(Path(tmp), idle=30)  # idle connections are held for the whole phase
        try:
            # While dribblers of both kinds run and one peer holds its share, another peer's ACKs.
            stop = threading.Event()

            def dribble(poke: bytes) -> None:
                while not stop.is_set():
                    closed_after(port, poke)

            dribblers = [threading.Thread(target=dribble, args=(p,), daemon=True) for p in (b"\r", b"\x0bMSH|")]
            for thread in dribblers:
                thread.start()
            flood = [peer(port, "127.0.0.2") for _ in range(3 * PER_PEER)]
            figures["flood_opened"] = len(flood)
            figures["flood_refused_at_once"] = refused(flood)
            latencies = sorted(ack_latencies(port, args.messages))
            figures["other_peer_acks"] = len(latencies)
            figures["other_peer_ack_ms_p50"] = round(latencies[len(latencies) // 2], 2)
            figures["other_peer_ack_ms_max"] = round(latencies[-1], 2)
            stop.set()
            for sock in flood:
                sock.close()
        finally:
            process.terminate()
            process.wait(20)
    with tempfile.TemporaryDirectory() as tmp:
        process, port, health = serve(Path(tmp), fd_limit=100, most=200, idle=30)
        held: list[socket.socket] = []
        try:
            for i in range(150):
                held.append(peer(port, f"127.0.1.{i % 50 + 1}"))
            reply = requests.get(f"http://127.0.0.1:{health}/healthz", timeout=5)
            figures["fd_limit_100_connections"] = len(held)
            figures["fd_limit_100_refused"] = refused(held)
            figures["fd_limit_100_healthz"] = [reply.status_code, reply.json()["checks"]["descriptors"]["detail"]]
            for sock in held:
                sock.close()
            began = time.monotonic()
            while time.monotonic() - began < 30:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"http://127.0.0.1:{health}/healthz", timeout=5).status_code == 200:
                        break
                time.sleep(0.1)
            figures["fd_healthz_200_again_after_s"] = round(time.monotonic() - began, 1)
        finally:
            for sock in held:
                sock.close()
            process.terminate()
            process.wait(20)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
