"""MLLP load generator worker for bench/ingest.py (standard library only).

One process drives many connections from a single ``selectors`` loop with
non-blocking sockets. Every connection has at most one message in flight (send,
wait for the ACK, send the next), as real HL7 senders do. Payloads are pre-framed
templates per fixture; only MSH-10 is spliced in per message (a unique control id)
so the receiver sees a new message every time.

Modes:
  closed  each connection sends its next message as soon as the previous ACK arrives;
          throughput and latency are counted for ACKs that arrive inside the window.
  open    messages are scheduled at a fixed rate (open loop) and handed to whichever
          connection is idle; latency runs from the *scheduled* time, so queueing
          behind a slow ACK is counted (no coordinated omission).
  count   closed loop until ``count`` ACKs arrived (memory run), no warm-up window.

``reconnect`` opens a new TCP connection per message (for servers that answer one
message per connection and close it); the latency then includes the TCP connect.

Invoked as ``python bench/loadgen.py '<json spec>'``; prints ``progress N`` lines and,
last, one JSON line with the results. Latencies (seconds) go to ``spec["lat_file"]``
as a raw array of doubles.
"""

from __future__ import annotations

import array
import errno
import json
import resource
import selectors
import socket
import sys
import time
from collections import deque
from pathlib import Path

START, END = b"\x0b", b"\x1c"


def templates(paths: list[str]) -> list[tuple[bytes, bytes]]:
    """(framed prefix up to MSH-10, rest of the message + MLLP trailer) per fixture."""
    out = []
    for path in paths:
        raw = Path(path).read_bytes()
        cut = min(i for i in (raw.find(b"\r"), raw.find(b"\n"), len(raw)) if i >= 0)
        sep = raw[3:4]
        fields = raw[:cut].split(sep)
        if len(fields) < 10:
            raise SystemExit(f"{path}: MSH has no MSH-10")
        start = len(sep.join(fields[:9])) + 1
        out.append((START + raw[:start], raw[start + len(fields[9]) :] + b"\x1c\r"))
    return out


class Conn:
    __slots__ = ("buf", "busy", "cursor", "payload", "scheduled", "sent_at", "sock")

    def __init__(self, cursor: int) -> None:
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.busy = False
        self.scheduled = 0.0  # when the message was due (open loop) or sent (closed loop): latency origin
        self.sent_at = 0.0  # when it actually went out: origin of the per-message timeout
        self.cursor = cursor
        self.payload = b""


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(spec: dict) -> dict:
    host, port = spec["host"], spec["port"]
    mode = spec["mode"]
    reconnect = spec.get("reconnect", False)
    timeout = spec.get("timeout", 10.0)
    tmpl = templates(spec["fixtures"])
    ntmpl = len(tmpl)
    tag = spec["tag"]
    conns = [Conn((i * 7) % ntmpl) for i in spec["connections"]]
    sel = selectors.EpollSelector()
    lat = array.array("d")
    lag = array.array("d")  # open loop: how late the generator noticed a message was due (timer granularity)
    codes: dict[str, int] = {}
    stats = {"sent": 0, "acked": 0, "closed_without_ack": 0, "timeouts": 0, "connects": 0}
    seq = 0
    idle: deque[Conn] = deque()
    pending: deque[float] = deque()  # open loop: scheduled times waiting for an idle connection
    max_pending = 0

    start_at = spec["start_at"]
    warmup = spec.get("warmup", 0.0)
    t0 = start_at + warmup
    t1 = t0 + spec.get("duration", 0.0)
    count = spec.get("count", 0)
    rate = spec.get("rate", 0.0)
    interval = 1.0 / rate if rate else 0.0
    next_due = start_at if mode == "open" else 0.0  # open loop: the warm-up runs at the offered rate too
    drain_until = None
    window_open = mode == "count"
    cpu0 = cpu() if window_open else 0.0
    wall0 = time.monotonic()
    in_window = 0  # answers counted in the latency figures
    done_in_window = 0  # answers that arrived inside the window (throughput)
    scheduled_in_window = 0

    def open_socket(conn: Conn) -> None:
        """Reconnect mode: start a non-blocking connect; the message goes out once it is writable."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect to {host}:{port} failed")
        conn.sock = s
        conn.buf.clear()
        stats["connects"] += 1
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def drop(conn: Conn) -> None:
        if conn.sock is not None:
            sel.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def send(conn: Conn, scheduled: float) -> None:
        nonlocal seq
        prefix, suffix = tmpl[conn.cursor]
        conn.cursor = (conn.cursor + 1) % ntmpl
        seq += 1
        payload = prefix + f"{tag}{seq}".encode() + suffix
        conn.scheduled = scheduled
        conn.sent_at = time.monotonic()
        conn.busy = True
        if reconnect:
            conn.payload = payload
            open_socket(conn)
            return
        sent = conn.sock.send(payload)
        if sent != len(payload):  # socket buffer full: finish the write blocking (never seen with ~1 KB messages)
            conn.sock.setblocking(True)
            conn.sock.sendall(payload[sent:])
            conn.sock.setblocking(False)
        stats["sent"] += 1

    if reconnect:
        idle.extend(conns)
    else:
        for conn in conns:
            s = socket.create_connection((host, port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            conn.sock = s
            stats["connects"] += 1
            sel.register(s, selectors.EVENT_READ, conn)
            idle.append(conn)

    # wait for the common start time (all workers start together)
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)

    max_seconds = spec.get("max_seconds", 0.0)
    stopped_by_time = False

    def stopping(now: float) -> bool:
        nonlocal stopped_by_time
        if mode == "count":
            if max_seconds and now >= start_at + max_seconds:
                stopped_by_time = True
                return True
            return stats["acked"] >= count
        return now >= t1

    last_check = time.monotonic()
    last_progress = last_check
    cpu_window = wall_window = None

    while True:
        now = time.monotonic()
        if not window_open and now >= t0:
            window_open = True
            cpu0, wall0 = cpu(), now
        if window_open and cpu_window is None and stopping(now):
            cpu_window, wall_window = cpu() - cpu0, now - wall0
            drain_until = now + timeout
        # hand out work
        if drain_until is None:
            if mode == "open":
                while next_due <= now:
                    if next_due >= t0:
                        lag.append(now - next_due)
                        scheduled_in_window += 1
                    pending.append(next_due)
                    next_due += interval
                if len(pending) > max_pending:
                    max_pending = len(pending)
                while pending and idle:
                    send(idle.popleft(), pending.popleft())
            else:
                while idle:
                    send(idle.popleft(), time.monotonic())
        else:
            # open loop: messages due inside the window still go out (no new ones are scheduled)
            while pending and idle:
                send(idle.popleft(), pending.popleft())
            if (not pending and not any(c.busy for c in conns)) or now >= drain_until:
                break
        # wait
        if mode == "open" and drain_until is None:
            wait = max(0.0, min(next_due - now, 0.05))
        else:
            wait = 0.05 if window_open else max(0.0, min(t0 - now, 0.05))
        for key, events in sel.select(wait):
            conn = key.data
            sock = conn.sock
            if events & selectors.EVENT_WRITE:  # reconnect mode: the connect finished
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "connect failed")
                sel.modify(sock, selectors.EVENT_READ, conn)
                sock.send(conn.payload)
                stats["sent"] += 1
                continue
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                if conn.busy:
                    stats["closed_without_ack"] += 1
                drop(conn)
                conn.busy = False
                if not reconnect:
                    _reopen(conn, host, port, sel, stats)
                if drain_until is None or mode == "open":
                    idle.append(conn)
                continue
            buf = conn.buf
            buf += data
            end = buf.find(END)
            if end < 0:
                continue
            t = time.monotonic()
            i = buf.find(b"\rMSA", 0, end)
            code = bytes(buf[i + 5 : i + 7]).decode("ascii", "replace") if i >= 0 else "??"
            codes[code] = codes.get(code, 0) + 1
            del buf[: end + 2]
            conn.busy = False
            stats["acked"] += 1
            counted = conn.scheduled >= t0 if mode == "open" else window_open and cpu_window is None
            if counted:
                lat.append(t - conn.scheduled)
                in_window += 1
            if window_open and cpu_window is None:
                done_in_window += 1
            if reconnect:
                drop(conn)
            if drain_until is None or mode == "open":
                idle.append(conn)
        if now - last_check > 0.5:
            last_check = now
            for conn in conns:
                if conn.busy and now - conn.sent_at > timeout and conn.sock is not None:
                    stats["timeouts"] += 1
                    drop(conn)
                    conn.busy = False
                    if not reconnect:
                        _reopen(conn, host, port, sel, stats)
                    idle.append(conn)
            if now - last_progress >= 1.0:
                last_progress = now
                print(f"progress {stats['acked']}", flush=True)

    # open loop: messages due in the window but not answered by the end count with the time waited so far
    unfinished = 0
    end = time.monotonic()
    if mode == "open":
        for due in [*pending, *(c.scheduled for c in conns if c.busy)]:
            if due >= t0:
                lat.append(end - due)
                unfinished += 1
    for conn in conns:
        drop(conn)
    with open(spec["lat_file"], "wb") as f:
        lat.tofile(f)
    if cpu_window is None:  # never reached the end of the window (should not happen)
        cpu_window, wall_window = cpu() - cpu0, time.monotonic() - wall0
    lags = sorted(lag)
    return {
        **stats,
        "send_lag_ms": {
            "p50": round(lags[len(lags) // 2] * 1e3, 3) if lags else None,
            "p99": round(lags[int(len(lags) * 0.99)] * 1e3, 3) if lags else None,
            "max": round(lags[-1] * 1e3, 3) if lags else None,
        },
        "in_window": in_window,
        "done_in_window": done_in_window,
        "unfinished": unfinished,
        "stopped_by_time": stopped_by_time,
        "scheduled_in_window": scheduled_in_window,
        "max_pending": max_pending,
        "codes": codes,
        "window_s": wall_window,
        "cpu_s": cpu_window,
        "cpu_total_s": cpu(),
    }


def _reopen(conn: Conn, host: str, port: int, sel: selectors.BaseSelector, stats: dict) -> None:
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    conn.sock = s
    conn.buf.clear()
    stats["connects"] += 1
    sel.register(s, selectors.EVENT_READ, conn)


if __name__ == "__main__":
    result = run(json.loads(sys.argv[1]))
    print(json.dumps(result), flush=True)
