"""Hostile input: a seeded generator sends malformed frames and messages (random bytes, broken MSH, wrong
delimiters, huge fields, expensive structures, junk, abandoned frames, endless frames without an end block,
slow-drip bytes, many idle connections, more connections than allowed).

Checks: the service never crashes (process alive, /healthz 200, no traceback in its log); every complete
frame that is not an incoming ACK gets exactly one answer, in order, and never AA for a malformed message;
frames and connections that break the rules are closed as the framing rules say (frame_timeout,
idle_timeout, max_connections); memory stays bounded and descriptors return; the next valid message is
answered AA and starts its journey.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.testing.client import BlockingClient
from tests.conftest import RunningSandbox, segments
from tests.dispatch_support import siu

from .hostile import AA, CRAFTED, NAK, Hostile, Item, crafted, framed, may_stay_silent, trips_short_header_bug
from .support import (
    Bridge,
    Outgoing,
    bridge_for,
    bridge_running,
    descriptor_problems,
    finish_scenario,
    knob,
    mb,
    pick,
    raw_socket,
    scenario_processes,
    threads_running,
    wait_for,
)

FRAMES = int(knob("hostile_frames", 10_000, 100_000))  # malformed items, at least
WORKERS = 4
BATCH = 50
SEED = int(knob("seed", 20261123, 20261123))
MAX_BYTES = 16_384
FRAME_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
IDLE_CONNECTIONS = int(pick(100, 250))
PER_PEER = IDLE_CONNECTIONS + 20  # the framing rules open all their connections from 127.0.0.1 at once
MAX_CONNECTIONS = 2 * PER_PEER
CROWD_PEERS = ("127.0.0.3", "127.0.0.4", "127.0.0.5")  # each stays under PER_PEER: only the total limit bites
FLOOD_PEER = "127.0.0.2"
LISTENER = f"""max_message_bytes = {MAX_BYTES}
frame_timeout = {FRAME_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
max_connections = {MAX_CONNECTIONS}
max_connections_per_peer = {PER_PEER}
"""
CRAFTED_SIZES = pick((262_144, 1_000_000), (65_536, 262_144, 524_288, 1_000_000))
CRAFTED_OTHERS = 3  # connections sending valid messages while the crafted ones are read
FLOOD = "21,000 empty frames in one send"
START = (datetime.now() + timedelta(days=40)).strftime("%Y%m%d093000")
NAK_CODES = {"AR", "AE", "CR", "CE"}
pytestmark = pytest.mark.timeout(pick(300, 3600))  # the module fixture runs the whole scenario


def msa(payload: bytes) -> tuple[str, str]:
    fields = segments(payload).get("MSA", [])
    return (fields[1] if len(fields) > 1 else "", fields[2] if len(fields) > 2 else "")


class Tally:
    """Counts shared by the worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = Counter()  # items by kind
        self.owed = 0
        self.answered = 0
        self.missing = 0
        self.extra = 0
        self.wrong: list[str] = []
        self.unexpected_closes: list[str] = []
        self.codes = Counter()
        self.bookings: list[Outgoing] = []
        self.errors: list[str] = []
        self.redrawn: Counter = Counter()


def judge(item: Item, answer: bytes) -> str | None:
    """Why an answer is wrong for an item, or None."""
    code, echoed = msa(answer)
    if item.answer == AA and (code != "AA" or echoed != item.control):
        return f"{item.kind}: expected AA for {item.control}, got {code} for {echoed!r}"
    if item.answer == NAK:
        if code not in NAK_CODES:
            return f"{item.kind}: malformed, answered {code!r}: {item.data[:120]!r}"
        if item.control and echoed != item.control:
            return f"{item.kind}: answer for {echoed!r}, not {item.control}"
    if not code:
        return f"{item.kind}: an answer without MSA-1: {answer[:200]!r}"
    return None


def assemble(gen: Hostile, size: int) -> list[Item]:
    items: list[Item] = []
    while len(items) < size:
        item = gen.item()
        if items and items[-1].kind == "abandoned frame" and not item.data.startswith(b"\x0b"):
            item = gen.valid_item()  # bytes after an abandoned frame would join it: start a frame instead
        items.append(item)
    return items


def fuzz_worker(port: int, worker: int, batches: int, tally: Tally, deadline: float) -> None:
    """Send ``batches`` batches on one connection (a new one if the service closes it); compare the answers."""
    gen = Hostile(SEED * 31 + worker, f"HX{worker}", START, MAX_BYTES)
    rng = random.Random(SEED * 17 + worker)
    client: BlockingClient | None = None
    try:
        for batch in range(batches):
            if time.monotonic() > deadline:
                tally.errors.append(f"worker {worker}: out of time after {batch} batches")
                return
            if client is None:
                client = BlockingClient("127.0.0.1", port, timeout=30)
            items = assemble(gen, BATCH)
            sentinel_payload, sentinel = gen.valid()
            items.append(Item("sentinel", framed(sentinel_payload), AA, sentinel, malformed=False))
            data = b"".join(i.data for i in items)
            cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 6))))
            for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                client.sock.sendall(data[a:b])
            owed = [i for i in items if i.answer]
            answers: list[bytes] = []
            closed = None
            try:
                while len(answers) <= len(owed) + 5:
                    answers.append(client.receive())
                    if msa(answers[-1]) == ("AA", sentinel):
                        break
            except (OSError, ConnectionError) as exc:
                closed = (f"worker {worker} batch {batch}: {exc.__class__.__name__} after {len(answers)} of "
                          f"{len(owed)} answers; kinds {[i.kind for i in items]}")  # fmt: skip
                client.close()
                client = None
            with tally.lock:
                for item in items:
                    tally.sent[item.kind] += 1
                tally.owed += len(owed)
                tally.answered += len(answers)
                tally.codes.update(msa(a)[0] for a in answers)
                if closed:
                    tally.unexpected_closes.append(closed)
                    tally.missing += max(0, len(owed) - len(answers))
                elif len(answers) != len(owed):
                    tally.missing += max(0, len(owed) - len(answers))
                    tally.extra += max(0, len(answers) - len(owed))
                    tally.wrong.append(f"worker {worker} batch {batch}: {len(answers)} answers for {len(owed)} "
                                       f"frames: {[i.kind for i in items]}")  # fmt: skip
                else:
                    for item, answer in zip(owed, answers, strict=True):
                        why = judge(item, answer)
                        if why:
                            tally.wrong.append(why)
                        elif item.appointment:
                            tally.bookings.append(Outgoing(item.appointment, "S12", item.control or "", b"", None))
        with tally.lock:
            tally.redrawn.update(gen.redrawn)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        tally.errors.append(f"worker {worker}: {exc.__class__.__name__}: {exc}")
    finally:
        if client is not None:
            client.close()


def watch_closes(socks: dict[str, list[socket.socket]], since: dict[socket.socket, float],
                 limit: float) -> dict[str, list]:  # fmt: skip
    """Read every socket until the service closes it (or ``limit`` seconds pass); per group, (bytes read,
    seconds from the socket's own start in ``since`` to the close, or None)."""
    began = time.monotonic()
    selector = selectors.DefaultSelector()
    data: dict[socket.socket, bytearray] = {}
    closed: dict[socket.socket, float] = {}
    for sockets in socks.values():
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            data[sock] = bytearray()
    while selector.get_map() and time.monotonic() - began < limit:
        for key, _events in selector.select(timeout=0.05):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                data[sock] += chunk
            else:
                closed[sock] = round(time.monotonic() - since[sock], 2)
                selector.unregister(sock)
    selector.close()
    return {name: [(bytes(data[s]), closed.get(s)) for s in sockets] for name, sockets in socks.items()}


def answers_in(data: bytes) -> list[tuple[str, str]]:
    return [msa(part) for part in data.split(b"\x1c") if b"MSA" in part]


def listener_connections(bridge: Bridge) -> int | None:
    detail = bridge.healthz()[1].get("checks", {}).get("listeners", {}).get("detail", "")
    found = re.search(r"\((\d+) connection", detail)
    return int(found[1]) if found else None


def peer_socket(port: int, source: str) -> socket.socket:
    """A connection from another loopback address: another peer, as the listener sees it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def keep_alive(socks: list[socket.socket]) -> float:
    """An empty frame on each connection: a complete frame (answered AR) is progress and resets the idle
    timer; bytes outside a frame would not."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.send(b"\x0b\x1c\x0d")
    return time.monotonic()


def open_crowd(port: int, count: int, peers: tuple[str, ...]) -> tuple[list[socket.socket], int, float]:
    """``count`` connections from ``peers`` in turn, kept from their idle timeout while they open (that can
    outlast it on a slow machine); then how many the service closed at once, and the opening time."""
    crowd: list[socket.socket] = []
    began = poked = time.monotonic()
    for i in range(count):
        crowd.append(peer_socket(port, peers[i % len(peers)]))
        if time.monotonic() - poked > 0.5:
            poked = keep_alive(crowd)
    opening = round(time.monotonic() - began, 2)
    keep_alive(crowd)
    seen = watch_closes({"crowd": crowd}, dict.fromkeys(crowd, time.monotonic()), 1.0)["crowd"]
    return crowd, sum(1 for _d, t in seen if t is not None), opening


def framing_rules(bridge: Bridge, gen: Hostile) -> dict[str, Any]:
    """Endless frames, trickles, slow drips and idle connections at once; then more connections than allowed."""
    rules: dict[str, Any] = {}
    groups: dict[str, list[socket.socket]] = {k: [] for k in ("endless", "trickle", "drip_ok", "drip_slow", "idle")}
    since: dict[socket.socket, float] = {}  # when each socket's timer starts: its frame, or its connection

    def opened(group: str, first: bytes = b"") -> socket.socket:
        sock = raw_socket(bridge.port)
        if first:
            sock.sendall(first)
        since[sock] = time.monotonic()
        groups[group].append(sock)
        return sock

    for _ in range(IDLE_CONNECTIONS):  # first, as opening them all may take a while on a busy machine
        opened("idle")
    for _ in range(5):  # a complete frame, then a frame that never ends
        opened("endless", framed(gen.valid()[0]) + b"\x0b" + gen.valid()[0][:200])
    for _ in range(3):  # a frame that never ends although data keeps coming
        opened("trickle", b"\x0b")
    for _ in range(5):  # a whole frame in small pieces, well within the frame timeout
        opened("drip_ok")
    for _ in range(3):  # a frame dripped too slowly to end within the frame timeout
        opened("drip_slow", b"\x0b")

    def drip(sock: socket.socket, payload: bytes, chunk: int, pause: float, limit: float, started: bool) -> None:
        data = framed(payload)[1:] if started else framed(payload)
        until = time.monotonic() + limit
        for at in range(0, len(data), chunk):
            if time.monotonic() > until:
                return
            try:
                sock.send(data[at : at + chunk])
            except OSError:
                return
            time.sleep(pause)

    def trickle(sock: socket.socket) -> None:
        for _ in range(int((FRAME_TIMEOUT + 4) / 0.2)):
            try:
                sock.send(b"X" * 512)
            except OSError:
                return
            time.sleep(0.2)

    drip_payloads = [gen.valid() for _ in groups["drip_ok"]]
    workers = [functools.partial(drip, s, p, 16, 0.02, 10, False)
               for s, (p, _c) in zip(groups["drip_ok"], drip_payloads, strict=True)]  # fmt: skip
    workers += [
        functools.partial(drip, s, gen.valid()[0], 4, 0.3, FRAME_TIMEOUT + 4, True) for s in groups["drip_slow"]
    ]
    workers += [functools.partial(trickle, s) for s in groups["trickle"]]
    valid_payload, valid_control = gen.valid()
    with threads_running(workers):
        # While all of that is open, a valid message on a fresh connection is answered AA.
        with BlockingClient("127.0.0.1", bridge.port, timeout=10) as client:
            rules["valid_meanwhile"] = msa(client.request(valid_payload)) == ("AA", valid_control)
        seen = watch_closes(groups, since, IDLE_TIMEOUT + 8)
    rules["endless_answers"] = [len(answers_in(d)) for d, _t in seen["endless"]]
    rules["endless_closed_after_s"] = [t for _d, t in seen["endless"]]
    rules["trickle_closed_after_s"] = [t for _d, t in seen["trickle"]]
    rules["drip_ok_answers"] = [answers_in(d) for d, _t in seen["drip_ok"]]
    rules["drip_ok_expected"] = [[("AA", c)] for _p, c in drip_payloads]
    rules["drip_slow"] = [(len(answers_in(d)), t) for d, t in seen["drip_slow"]]
    idle_closed = [t for _d, t in seen["idle"] if t is not None]
    rules["idle_connections"] = len(groups["idle"])
    rules["idle_closed"] = len(idle_closed)
    rules["idle_closed_after_s"] = [min(idle_closed, default=None), max(idle_closed, default=None)]
    for sockets in groups.values():
        for sock in sockets:
            sock.close()

    # More connections than allowed, all at once (from three peers): the ones beyond the limit are closed at once.
    wait_for(lambda: listener_connections(bridge) == 0, 30, "every connection to be closed")
    crowd, rules["over_limit_closed_at_once"], rules["over_limit_opening_s"] = open_crowd(
        bridge.port, MAX_CONNECTIONS + 10, CROWD_PEERS
    )
    rules["over_limit_opened"] = len(crowd)
    rules["over_limit_open_on_the_service"] = listener_connections(bridge)
    for sock in crowd:
        sock.close()
    wait_for(lambda: listener_connections(bridge) == 0, 30, "every connection to be closed")
    rules.update(peer_flood(bridge, gen))
    return rules


def peer_flood(bridge: Bridge, gen: Hostile) -> dict[str, Any]:
    """One peer opens more connections than the listener allows in all and holds them; another peer's
    messages must still be answered, and quickly."""
    rules: dict[str, Any] = {}
    flood, rules["flood_closed_at_once"], rules["flood_opening_s"] = open_crowd(
        bridge.port, MAX_CONNECTIONS + 20, (FLOOD_PEER,)
    )
    rules["flood_opened"] = len(flood)
    answers, worst = [], 0.0
    with BlockingClient("127.0.0.1", bridge.port, timeout=10) as client:
        for _ in range(20):
            payload, control = gen.valid()
            sent = time.monotonic()
            answers.append(msa(client.request(payload)) == ("AA", control))
            worst = max(worst, time.monotonic() - sent)
    rules["flood_other_peer_aa"] = f"{sum(answers)} of {len(answers)}"
    rules["flood_other_peer_worst_ack_ms"] = round(worst * 1000, 1)
    for sock in flood:
        sock.close()
    wait_for(lambda: listener_connections(bridge) == 0, 30, "every connection to be closed")
    return rules


def crafted_shapes(bridge: Bridge) -> dict[str, Any]:
    """Large crafted messages (default max_message_bytes, 1 MiB) on one connection, one at a time, while other
    connections send valid messages back to back: each crafted one's answer and answer time, and the other
    connections' worst ACK latency while it was in the service."""
    latencies: list[tuple[float, float]] = []  # (sent at, latency) of the other connections' messages
    wrong: list[str] = []
    stop = threading.Event()

    def other(worker: int) -> None:
        with BlockingClient("127.0.0.1", bridge.port, timeout=60) as client:
            n = 0
            while not stop.is_set():
                n += 1
                payload, control = siu("S23", f"HO{worker}-{n}", f"HO{worker}-SLOT{n}", START), f"HO{worker}-{n}"
                sent = time.monotonic()
                answer = msa(client.request(payload))
                latencies.append((sent, time.monotonic() - sent))
                if answer != ("AA", control):
                    wrong.append(f"{control}: {answer}")
                time.sleep(0.005)

    def worst(began: float, ended: float) -> float:
        return max((lat for sent, lat in list(latencies) if sent <= ended and sent + lat >= began), default=0.0)

    rows: list[dict[str, Any]] = []
    flood_codes: Counter = Counter()
    batch = "".join(f"MSH|^~\\&|A|B|||20270101||SIU^S23|HB{i}|P|2.5\r" for i in range(20_000))
    cases = [(shape, size) for shape in CRAFTED for size in CRAFTED_SIZES] + [("batch of 20,000", 0), (FLOOD, 0)]
    with threads_running([functools.partial(other, w) for w in range(CRAFTED_OTHERS)], stop.set):
        time.sleep(0.5)
        with BlockingClient("127.0.0.1", bridge.port, timeout=120) as client:
            for n, (shape, size) in enumerate(cases):
                control = f"HC-{n}"
                if size:
                    payload = crafted(shape, size, control, START)
                elif shape == FLOOD:
                    payload, control = b"\x0b\x1c\r" * 21_000, ""
                else:
                    payload, control = f"BHS|^~\\&|A|B\r{batch}BTS|20000\r".encode(), ""
                began = time.monotonic()
                if shape == FLOOD:  # one send of 21,000 empty frames, each answered AR
                    client.sock.sendall(payload)
                    answers = [msa(client.receive()) for _ in range(21_000)]
                    answer = client.request(siu("S12", control := f"HC-{n}", f"HC-SLOT{n}", START))
                    flood_codes.update(code for code, _ in answers)
                else:
                    answer = client.request(payload)
                ended = time.monotonic()
                time.sleep(0.1)  # the other connections' messages in flight at the end are answered
                err = segments(answer).get("ERR", [])
                erl = [*(err[2].split("^") if len(err) > 2 else []), "", "", ""]
                rows.append({"shape": shape, "bytes": len(payload), "control": control, "answer": msa(answer),
                             "err": "-".join(p for p in (erl[0], erl[2]) if p), "answer_ms": round((ended - began) * 1000),
                             "others_worst_ms": round(worst(began, ended) * 1000)})  # fmt: skip
    logged = dict(bridge.query("SELECT control_id, status FROM messages WHERE control_id LIKE 'HC-%'"))
    return {
        "rows": rows,
        "flood_codes": dict(flood_codes),
        "logged": logged,
        "others_answered": len(latencies),
        "others_wrong": wrong[:20],
        "others_worst_ack_ms": round(max((lat for _s, lat in latencies), default=0.0) * 1000),
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    with scenario_processes(tmp_path_factory, listener_extra=LISTENER, log_level="warning") as (bridge, sandbox):
        bridge.start()
        tally = Tally()
        # Warm-up, so that "before" is taken once the service has met every kind of input.
        fuzz_worker(bridge.port, 99, 4, tally, time.monotonic() + 60)
        time.sleep(1)
        rss_before, fds_before, fd_kinds_before = bridge.rss_kb(), bridge.fds(), bridge.fd_kinds()
        peak = [rss_before or 0]
        batches = int(-(-FRAMES // (WORKERS * BATCH * 0.85)))  # about 87 % of the items are malformed
        deadline = time.monotonic() + pick(200, 1800)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak.append(bridge.rss_kb() or 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        fuzz_began = time.monotonic()
        with threads_running([functools.partial(fuzz_worker, bridge.port, w, batches, tally, deadline)
                              for w in range(WORKERS)]):  # fmt: skip
            pass
        fuzz_s = round(time.monotonic() - fuzz_began, 1)
        rules = framing_rules(bridge, Hostile(SEED * 7, "HR", START, MAX_BYTES))
        # The crafted shapes need the default 1 MiB frame limit: a bridge of their own on the same sandbox.
        crafted_bridge = bridge_for(sandbox, tmp_path_factory.mktemp("crafted"))
        crafted_bridge.start()
        try:
            shapes = crafted_shapes(crafted_bridge)
            shapes["alive"], shapes["tracebacks_in_log"] = (
                crafted_bridge.alive(),
                crafted_bridge.logs().count("Traceback"),
            )
        finally:
            crafted_bridge.stop()
        done.set()
        sampler.join(5)
        time.sleep(1)
        rss_after, fds_after, fd_kinds_after = bridge.rss_kb(), bridge.fds(), bridge.fd_kinds()
        health = bridge.healthz()
        with BlockingClient("127.0.0.1", bridge.port, timeout=10) as client:
            next_answer = msa(client.request(siu("S12", "HX-NEXT-1", "HX-NEXT-APPT", START)))
        bridge.wait_drained(60)
        running = {i["parameters"].get("appointmentId") for i in sandbox.get("/_sandbox/instances")
                   if i["status"] == "InProgress"}  # fmt: skip
        without_journey = [b.appointment for b in tally.bookings if b.appointment not in running]
        logs = bridge.logs()
        malformed = sum(n for kind, n in tally.sent.items()
                        if kind not in ("valid", "valid booking", "sentinel", "incoming ACK"))  # fmt: skip
        figures = {
            "scenario": "hostile_input",
            "injected": f"{malformed} malformed frames/messages (seeded generator, {WORKERS} connections, "
                        f"max_message_bytes {MAX_BYTES}), endless frames, slow drips, {IDLE_CONNECTIONS} idle "
                        f"connections, {MAX_CONNECTIONS + 10} connections at once (limit {MAX_CONNECTIONS}), "
                        f"{MAX_CONNECTIONS + 20} from one peer (limit {PER_PEER} per peer)",
            "messages": sum(tally.sent.values()),
            "malformed": malformed,
            "lost": len(without_journey) + (next_answer != ("AA", "HX-NEXT-1")),
            "duplicated": tally.extra,
            "wrong_acks": len(tally.wrong) + tally.missing,
            "rss_before_kb": rss_before,
            "rss_after_kb": rss_after,
            "rss_peak_kb": max(peak),
            "fds_before": fds_before,
            "fds_after": fds_after,
            "fd_kinds_before": fd_kinds_before,
            "fd_kinds_after": fd_kinds_after,
            "sent_by_kind": dict(tally.sent),
            "redrawn_for_their_own_tests": dict(tally.redrawn),
            "answers_owed": tally.owed,
            "answers_received": tally.answered,
            "answers_missing": tally.missing,
            "answers_extra": tally.extra,
            "answer_codes": dict(tally.codes),
            "wrong_examples": tally.wrong[:20],
            "unexpected_closes": tally.unexpected_closes[:20],
            "worker_errors": tally.errors,
            "fuzz_seconds": fuzz_s,
            "rules": rules,
            "crafted": shapes,
            "crafted_others_worst_ack_ms": shapes["others_worst_ack_ms"],
            "health_after": health[0],
            "next_valid_answer": next_answer,
            "bookings_acked": len(tally.bookings),
            "bookings_without_journey": without_journey[:20],
            "next_booking_has_journey": "HX-NEXT-APPT" in running,
            "alive": bridge.alive(),
            "tracebacks_in_log": logs.count("Traceback"),
            "log_excerpt": logs[logs.find("Traceback") - 200 :][:3000] if "Traceback" in logs else "",
        }  # fmt: skip
        yield finish_scenario(figures, bridge, began)


def test_enough_malformed_input_was_sent(hostile: dict[str, Any]) -> None:
    assert hostile["malformed"] >= FRAMES, hostile["sent_by_kind"]
    assert not hostile["worker_errors"], hostile["worker_errors"]


def test_the_service_never_crashed(hostile: dict[str, Any]) -> None:
    assert hostile["alive"] and hostile["health_after"] == 200
    assert hostile["exit_status"] == 0
    assert hostile["tracebacks_in_log"] == 0, hostile["log_excerpt"]


def test_every_complete_frame_got_one_right_answer(hostile: dict[str, Any]) -> None:
    assert hostile["unexpected_closes"] == [], hostile["unexpected_closes"]
    assert hostile["answers_missing"] == 0 and hostile["answers_extra"] == 0, hostile["wrong_examples"]
    assert hostile["wrong_examples"] == [], hostile["wrong_examples"]


def test_frames_that_never_end_are_closed_by_the_frame_timeout(hostile: dict[str, Any]) -> None:
    rules = hostile["rules"]
    assert rules["endless_answers"] == [1] * 5, rules
    for closed in rules["endless_closed_after_s"] + rules["trickle_closed_after_s"]:
        assert closed is not None and FRAME_TIMEOUT - 0.5 <= closed <= FRAME_TIMEOUT + 2, rules
    for answered, closed in rules["drip_slow"]:
        assert answered == 0 and closed is not None and closed <= FRAME_TIMEOUT + 2, rules


def test_slow_drips_within_the_frame_timeout_are_answered(hostile: dict[str, Any]) -> None:
    rules = hostile["rules"]
    assert [[tuple(a) for a in got] for got in rules["drip_ok_answers"]] == [
        [tuple(a) for a in want] for want in rules["drip_ok_expected"]
    ], rules


def test_idle_connections_are_closed_and_the_limit_holds(hostile: dict[str, Any]) -> None:
    rules = hostile["rules"]
    assert rules["valid_meanwhile"], rules
    assert rules["idle_closed"] == rules["idle_connections"], rules
    first, last = rules["idle_closed_after_s"]
    assert IDLE_TIMEOUT - 0.5 <= first and last <= IDLE_TIMEOUT + 3, rules
    assert rules["over_limit_open_on_the_service"] <= MAX_CONNECTIONS, rules
    assert rules["over_limit_closed_at_once"] == rules["over_limit_opened"] - MAX_CONNECTIONS, rules


def test_one_peer_holding_connections_does_not_lock_out_another(hostile: dict[str, Any]) -> None:
    rules = hostile["rules"]
    assert rules["flood_closed_at_once"] == rules["flood_opened"] - PER_PEER, rules
    assert rules["flood_other_peer_aa"] == "20 of 20", rules


def test_memory_stays_bounded_and_descriptors_return(hostile: dict[str, Any]) -> None:
    growth_mb = mb(hostile["rss_after_kb"] - hostile["rss_before_kb"])
    assert growth_mb <= pick(40, 60), (mb(hostile["rss_before_kb"]), mb(hostile["rss_after_kb"]))
    # Every MLLP connection is closed by then: pipes and files come back, the database pool and the API client's
    # kept-alive connections stay within their bounds.
    assert descriptor_problems(hostile["fd_kinds_before"], hostile["fd_kinds_after"]) == [], hostile["fd_kinds_after"]


def test_the_next_valid_message_is_processed(hostile: dict[str, Any]) -> None:
    assert hostile["next_valid_answer"] == ("AA", "HX-NEXT-1")
    assert hostile["next_booking_has_journey"]
    assert hostile["bookings_without_journey"] == [], hostile["bookings_without_journey"]


def test_crafted_shapes_are_answered_and_never_hold_up_other_connections(hostile: dict[str, Any]) -> None:
    """Issue 16 §1. Targets: the crafted message answered within 1 s, the others within 0.5 s (the figures, in
    the results file, go to docs/reliability.md); the bounds here are generous, for a loaded test machine."""
    shapes = hostile["crafted"]
    assert shapes["alive"] and shapes["tracebacks_in_log"] == 0
    assert shapes["others_answered"] > 0 and shapes["others_wrong"] == [], shapes["others_wrong"]
    assert shapes["flood_codes"] == {"AR": 21_000}, shapes["flood_codes"]
    for row in shapes["rows"]:
        bounded = CRAFTED[row["shape"]][1] if row["shape"] in CRAFTED else "BHS" if row["shape"] != FLOOD else None
        if bounded:  # past the default limits: AR naming the field or segment, and logged as rejected
            assert row["answer"][0] == "AR" and row["err"] == bounded, row
            assert not row["control"] or shapes["logged"][row["control"]] == "rejected", row
        else:  # inside them: read whole, and accepted
            assert row["answer"] == ("AA", row["control"]) and shapes["logged"][row["control"]] == "accepted", row
        assert row["answer_ms"] < 10_000 and row["others_worst_ms"] < 2_000, row


# ---- what the fuzzer found -------------------------------------------------------------------------------


def test_a_header_cut_short_is_answered_and_the_connection_kept(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """Found by this suite: "MSH" followed by a line break raised IndexError in charsets.declared_charset, and the
    connection was dropped with the answers still owed on it (fixed in 0f8d2ee)."""
    with bridge_running(sandbox, tmp_path / "bridge") as bridge:
        gen = Hostile(SEED, "HB", START, MAX_BYTES)
        before, before_control = gen.valid()
        after, after_control = gen.valid()
        for short in (b"MSH\rSCH|1\rPID|1\r", b"MSH\nEVN|S12|x\r", b"ZZZ|MSH\r12345678"):
            assert trips_short_header_bug(short)
            with BlockingClient("127.0.0.1", bridge.port, timeout=10) as client:
                client.sock.sendall(framed(before) + framed(short) + framed(after))
                answers = [msa(client.receive()) for _ in range(3)]
            assert answers[0] == ("AA", before_control)
            assert answers[1][0] == "AR"
            assert answers[2] == ("AA", after_control)


def test_a_garbled_ack_type_still_gets_an_answer(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """Found by this suite: MSH-15/16 values outside table 0155 (a shifted or garbled MSH) silenced the answer
    (fixed in 7e9294e: answered like AL)."""
    with bridge_running(sandbox, tmp_path / "bridge") as bridge:
        gen = Hostile(SEED, "HG", START, MAX_BYTES)
        valid, _control = gen.valid()
        head, rest = valid.split(b"\r", 1)
        shifted = head.replace(b"^", b"|") + b"\r" + rest  # as the fuzzer sent it: MSH-15 = "2.5.1"
        garbled = valid.replace(b"|P|2.5.1", b"|P|2.5.1|||XX|YY", 1)  # MSH-15 = XX, MSH-16 = YY
        for payload in (shifted, garbled):
            assert not may_stay_silent(payload)
            after, after_control = gen.valid()
            with BlockingClient("127.0.0.1", bridge.port, timeout=3) as client:
                client.sock.sendall(framed(payload) + framed(after))
                answers = [msa(client.receive()) for _ in range(2)]
            # Answered at all (CR for the shifted header, CA for the otherwise valid one), and in order.
            assert answers[0][0] in {"CA", "CE", "CR", "AA", "AE", "AR"} and answers[1] == ("AA", after_control), (
                answers
            )
