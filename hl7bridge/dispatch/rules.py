"""The dispatch rules: what to send, in which order, coalesced how, and what each answer means.

Per appointment, only the oldest open command is eligible, so commands run in arrival order. Triggers for
the same (chatBotId, flowId, timeZone) are coalesced into one bulk call; a 400 is bisected so only the
offending instances are dead-lettered. When the API stops answering, dispatching holds: one command at a
time, on that command's backoff, until the API answers again. Every result is committed through the
service's writer (as ``OutboxWrite`` data, which can cross processes). The threads that run these rules
are ``dispatch.dispatcher``'s.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from hl7bridge import store
from hl7bridge.core.logs import masked
from hl7bridge.core.observer import NullObserver, Observer
from hl7bridge.core.status import FINAL_STATUSES, CommandStatus
from hl7bridge.dispatch.journeys import ACTIVE_STATUSES, LATE, ApiResult, Verdict, holds
from hl7bridge.mapping.routing import BOOK, CANCEL, MODIFY, RESCHEDULE, SUBFLOW
from hl7bridge.store import CommandRow, CommandUpdate, Job
from hl7bridge.store.cluster import dispatch_now_asked

log = logging.getLogger("hl7bridge.dispatcher")

#: The outcomes that end in what the API said (``ApiResult.reason``: its messages, which may quote the
#: parameters sent, such as a patient's name or phone; else our own error text), as the failure paths below
#: write them.
_API_TEXT = re.compile(
    r"(rejected by the API \(\d+\): |API refused the token: |paused: |given up after \d+ such attempts: "
    r"|API unavailable: |retrying; the attempt at [0-9:]+ failed: )(.*)\Z",
    re.DOTALL,
)
#: How our own error texts (``journeys.py``) begin: they carry no patient data, and on-call needs them.
_OWN_ERRORS = ("timeout: ", "connection error: ", "request error: ", LATE, "internal error (", "HTTP ",
               "expected ", "an interim ", "redirected (", "not sent: ", "an instance whose ", "no API token",
               "the API token ")  # fmt: skip


def masked_outcome(outcome: str | None) -> str | None:
    """A command's outcome with the API's own words masked (each message, ``core.logs.masked``), for views
    without patient data; our part of it (what happened, the status code) stays readable."""
    if not outcome:
        return outcome
    found = _API_TEXT.match(outcome)
    if found is None:
        return outcome
    said = found[2]
    if said.startswith(_OWN_ERRORS):
        return outcome
    return found[1] + "; ".join(masked(m) for m in said.split("; "))


#: A command whose calls met this many answers of the wrong shape, or unexpected errors here, is
#: dead-lettered: retrying it further would be an endless loop.
STRANGE_LIMIT = 5
#: Seconds between looks at a lapsed lease (the leader renews it every second).
RENEW_WAIT = 0.5


@dataclass(frozen=True)
class DispatchSettings:
    """The ``[dispatch]`` section (``batch_window_ms`` and ``auth_probe_interval`` there are ``batch_window``
    and ``probe_interval`` here), and the tunables no config file sets."""

    batch_size: int = 100
    batch_window: float = 0.2
    workers: int = 4
    retry_initial: float = 2.0
    retry_max: float = 300.0
    probe_interval: float = 15.0
    poll_interval: float = 1.0
    #: Calls in a row that the API left unanswered or answered 5xx, 408 or 429 before dispatching holds.
    unavailable_after: int = 3
    #: Ticks are at least this far apart: wakes within it are served together.
    tick_gap: float = 0.02
    #: A call's outcomes reach the log in writes of at most this many commands. The service's writer runs
    #: a write whole before the next message, so a bulk call's hundred outcomes in one write made a
    #: message wait some 10 ms (more on a slow machine); each command's outcome stays whole.
    updates_per_write: int = 16
    #: A message no route takes: "ignore" (AA, nothing sent) or "reject" (AE).
    unrouted: str = "ignore"
    #: "process": the dispatcher runs in a child process of its own; "thread": in the service's.
    run_in: str = "process"


class Journeys(Protocol):
    """The Journeys API as the dispatcher calls it: ``JourneysClient``, or ``testing.journeys.FakeJourneys``."""

    def trigger(
        self, chat_bot_id: str, flow_id: str | None, time_zone: str, instances: list[dict[str, str]]
    ) -> ApiResult: ...

    def search(self, chat_bot_id: str, parameters: dict[str, str]) -> ApiResult: ...

    def cancel(self, chat_bot_id: str, instance_id: str) -> ApiResult: ...


class JobSink(Protocol):
    """Where the dispatcher's writes go: the service's ``Writer``, or, from the dispatcher's own process,
    the pipe to the service (``dispatch.child.ServiceWrites``)."""

    def submit_job(self, job: Job) -> None: ...


class LogUnwritable(Exception):
    """The log did not take a write of the dispatcher's (locked, full, read-only): the store's trouble, not the
    command's. The command is left as the log has it and tried again once the log takes writes; it never counts
    towards a dead letter."""


class LeaseLapsed(LogUnwritable):
    """This dispatcher's lease is not fresh (``dispatch.leader``): a standby may lead by now, so no call starts.
    Like a refused write, the command stays as the log has it (one in flight is searched before it is resent)."""


@dataclass
class Bucket:
    """Triggers gathering for one bulk call. It leaves once full, once no trigger has joined for one
    window, or two windows after its first trigger, whichever comes first."""

    first_at: float
    last_at: float
    commands: list[CommandRow] = field(default_factory=list)

    def due(self, window: float) -> float:
        return min(self.last_at + window, self.first_at + 2 * window)


@dataclass
class DispatchStats:
    api_calls: int = 0
    triggered: int = 0
    cancelled: int = 0
    dead: int = 0
    retries: int = 0
    annihilated: int = 0


class DispatchRules:
    """The decisions and their records; ``Dispatcher`` adds the threads that run them (``_submit``)."""

    def __init__(
        self,
        engine: Engine,
        writer: JobSink,
        client: Journeys,
        settings: DispatchSettings = DispatchSettings(),
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
        may_send: Callable[[], bool] = lambda: True,
    ) -> None:
        self.engine = engine
        #: Whether an API call may start now (the elected dispatcher's lease is fresh).
        self.may_send = may_send
        #: The leadership epoch (``dispatch.leader``) every write carries, so a deposed dispatcher's are refused.
        self.epoch: int | None = None
        self.writer = writer
        self.client = client
        self.settings = settings
        self.clock = clock
        self.stats = DispatchStats()
        self.observer = observer or NullObserver()
        self.paused_reason: str | None = None
        #: Why dispatching holds to one command at a time (the API is down); health leaves this to the
        #: outbox's age, so a short outage does not turn the service red.
        self.unavailable_reason: str | None = None
        #: Since when the hold (``unavailable_reason``) and the pause (``paused_reason``) last (epoch seconds).
        self.held_since: float | None = None
        self.paused_since: float | None = None
        self._failed_calls = 0
        self._probe_at = 0.0
        #: The last ``dispatch now`` seen in the log (None: not read yet).
        self._now_seen: float | None = None
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._buckets: dict[tuple[str, str | None, str], Bucket] = {}
        self._waiters: dict[int, Callable[[CommandUpdate], None]] = {}
        #: Per open command: answers of the wrong shape and unexpected errors so far (``STRANGE_LIMIT``).
        self._strange: dict[int, int] = {}
        self._prepare()

    def _prepare(self) -> None:
        """What a runner adds once the rules are set up (``Dispatcher``: its threads)."""

    @property
    def paused(self) -> bool:
        return self.paused_reason is not None

    @property
    def holding(self) -> bool:
        """Sending one command at a time as a probe: the token was refused, or the API is not answering.

        Hammering a down API with every queued command would waste both sides' work and meet its recovery
        with a stampede; an interface engine's queue retries its head and lets the rest wait."""
        return self.paused_reason is not None or self.unavailable_reason is not None

    def _submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run ``fn(arg)`` (an API call) away from the tick: the dispatcher's pool."""
        raise NotImplementedError

    def _asked_now(self) -> bool:
        """Whether ``hl7bridge dispatch now`` was asked since this dispatcher last looked, on any instance of the
        log (its signal reaches only the service on the operator's machine, which may be a standby)."""
        with self.engine.connect() as conn:
            asked = dispatch_now_asked(conn)
        seen, self._now_seen = self._now_seen, asked
        return seen is not None and asked > seen

    # -- what to send ------------------------------------------------------------------------------
    def _tick(self) -> float:
        if not self.may_send():
            return min(RENEW_WAIT, self.settings.poll_interval)
        now = self.clock()
        # A sender waiting for a verdict (ack_mode = "dispatched") lifts the hold: its message is tried now.
        holding = self.holding and not self._waiters
        if holding and now < self._probe_at:
            if not self._asked_now():
                return min(self._probe_at - now, self.settings.poll_interval)
            log.info("dispatch now: the held queue's probe goes at once")
            self._probe_at = 0.0
        with self._lock:
            busy = set(self._busy)
        limit = 1 if holding else self.settings.batch_size * 4
        with self.engine.connect() as conn:
            # Holding, the probe is the oldest open command, due or not: it alone is retried, on its own
            # backoff, and the queue behind it waits, as an interface engine's queue does.
            heads = store.due_heads(conn, math.inf if holding else now, limit, busy)
            if holding and heads and heads[0].next_attempt_at > now:
                return heads[0].next_attempt_at - now
            keys = [cmd.appointment_key for cmd in heads]
            memory = store.appointments_for(conn, keys)
            cancels = store.open_cancels(conn, keys)
            next_due = store.next_due(conn)
        plans = []
        for cmd in heads:
            cancel_id = cancels.get(cmd.appointment_key)
            plans.append((cmd, memory.get(cmd.appointment_key), cancel_id if cancel_id != cmd.id else None))
        if holding and plans:
            # No second probe while this one is out: its failure sets the next (its own retry time). Set
            # before the call is submitted, which may fail before this thread runs on.
            self._probe_at = now + (self.settings.probe_interval if self.paused else self.settings.retry_max)
        quick: list[CommandUpdate] = []
        settled: list[CommandRow] = []
        for cmd, appt, cancel_id in plans:
            with self._lock:
                self._busy.add(cmd.appointment_key)
            update = self._decide(cmd, appt, cancel_id, now)
            if update is not None:
                quick.append(update)
                settled.append(cmd)
        if holding and plans and len(settled) == len(plans):
            self._probe_at = now  # settled without a call: that was no probe
        if quick:
            try:
                self._apply(quick)
            finally:
                self._release(settled)
        timeout = self._flush_buckets()
        if next_due is not None and next_due > now:
            timeout = min(timeout, next_due - now)
        return max(0.01, min(timeout, self.settings.poll_interval))

    def _decide(self, cmd: CommandRow, appt: store.AppointmentRow | None, cancel_id: int | None,
                now: float) -> CommandUpdate | None:  # fmt: skip
        """Settle what needs no API call at once; queue the rest. Returns an immediate update or None."""
        active = appt is not None and appt.state == "active"
        if cmd.kind == CANCEL:
            if appt is not None and appt.state == CommandStatus.ANNIHILATED:
                return self._final(cmd, CommandStatus.ANNIHILATED, "its trigger was never sent; nothing to cancel",
                                   remember=(cmd, CommandStatus.ANNIHILATED, None))  # fmt: skip
            if appt is not None and appt.state == "cancelled":
                return self._final(cmd, CommandStatus.DONE, "already cancelled")
            self._submit(self._run_cancel, cmd)
            return None
        creates = cmd.kind in (BOOK, RESCHEDULE, MODIFY) or (cmd.kind == SUBFLOW and cmd.start_at is not None)
        if creates and cmd.start_at is not None and cmd.start_at <= now:
            return self._final(cmd, CommandStatus.DEAD, "the appointment started before it could be sent")
        if cancel_id is not None and cmd.kind in (BOOK, RESCHEDULE, MODIFY):
            quiet = appt is None or appt.state in ("cancelled", CommandStatus.ANNIHILATED)
            if not cmd.uncertain and cmd.status == CommandStatus.PENDING and quiet:
                # Never sent and nothing running: the trigger and its cancel annihilate, with no API call.
                state = appt.state if appt is not None else CommandStatus.ANNIHILATED
                return self._final(cmd, CommandStatus.ANNIHILATED, f"cancelled by command {cancel_id} before it was sent",
                                   remember=(cmd, state, None))  # fmt: skip
            # A journey may be running (an earlier trigger, or this one's uncertain attempt): the cancel searches.
            maybe = cmd.uncertain or cmd.status == CommandStatus.IN_FLIGHT
            return self._final(cmd, CommandStatus.ANNIHILATED, f"superseded by cancel command {cancel_id}; not sent again",
                               remember=(cmd, "uncertain", None) if maybe else None)  # fmt: skip
        if active and appt.parameters == cmd.parameters and cmd.kind in (BOOK, RESCHEDULE, MODIFY, SUBFLOW):
            reason = "already triggered with these parameters" if cmd.kind == BOOK else "no change"
            return self._final(cmd, CommandStatus.DONE, reason)
        if (cmd.kind in (RESCHEDULE, MODIFY) and cmd.step != "cancelled") or (cmd.kind == BOOK and active):
            self._submit(self._run_cancel, cmd)
            return None
        self._bucket(cmd, now)
        return None

    def _final(self, cmd: CommandRow, status: str, outcome: str,
               remember: tuple[CommandRow, str, dict | None] | None = None) -> CommandUpdate:  # fmt: skip
        if status == CommandStatus.ANNIHILATED:
            self.stats.annihilated += 1
        if status == CommandStatus.DEAD:
            self.stats.dead += 1
        memo = None
        if remember is not None:
            c, state, params = remember
            memo = (c.appointment_key, c.route, c.chat_bot_id, state, params)
        return CommandUpdate(cmd.id, status, outcome, remember=memo, message_id=cmd.message_id)

    # -- triggers ----------------------------------------------------------------------------------
    def _bucket(self, cmd: CommandRow, now: float) -> None:
        key = (cmd.chat_bot_id, cmd.flow_id, cmd.time_zone)
        bucket = self._buckets.setdefault(key, Bucket(now, now))
        bucket.commands.append(cmd)
        bucket.last_at = now

    def _flush_buckets(self) -> float:
        now = self.clock()
        wait = self.settings.poll_interval
        for key in list(self._buckets):
            bucket = self._buckets[key]
            due = bucket.due(self.settings.batch_window)
            urgent = any(c.sync for c in bucket.commands) or self.holding
            while len(bucket.commands) >= self.settings.batch_size:
                chunk, bucket.commands = (bucket.commands[: self.settings.batch_size],
                                          bucket.commands[self.settings.batch_size :])  # fmt: skip
                self._submit(self._run_trigger, chunk)
                # What is left starts a window of its own, so a burst leaves in full batches.
                bucket.first_at = bucket.last_at = now
                due = bucket.due(self.settings.batch_window)
            if bucket.commands and (urgent or now >= due):
                self._submit(self._run_trigger, bucket.commands)
                del self._buckets[key]
            elif not bucket.commands:
                del self._buckets[key]
            else:
                wait = min(wait, due - now)
        return max(wait, 0.0)

    def _run_trigger(self, cmds: list[CommandRow]) -> None:
        now = self.clock()
        self._commit(store.OutboxWrite(now, in_flight=[c.id for c in cmds]))
        to_send = []
        settled: list[CommandUpdate] = []
        checks: dict[int, dict] = {}
        for cmd in cmds:
            if cmd.kind != SUBFLOW and (cmd.status == CommandStatus.IN_FLIGHT or cmd.uncertain):
                # An earlier call may have reached the API (a crash mid-call, a timeout, a 5xx).
                found, attempt = self._already_there(cmd)
                if found is not None:
                    settled.append(found)
                    continue
                checks[cmd.id] = attempt
            to_send.append(cmd)
        if settled:
            self._apply(settled)
        if to_send:
            updates = self._send(to_send)
            for update in updates:
                if update.command_id in checks:
                    update.attempts.insert(0, checks[update.command_id])
            self._apply(updates)

    def _already_there(self, cmd: CommandRow) -> tuple[CommandUpdate | None, dict]:
        """Whether an earlier call went through: an active instance with these parameters says so.

        Returns the command's update when there is nothing to send (found, or the search itself failed:
        then it is retried later, still uncertain, rather than risking a second journey), and the
        search's attempt for the log."""
        result = self._call(self.client.search, cmd.chat_bot_id, cmd.identifiers)
        attempt = _attempt(result, str(uuid.uuid4()))
        if not result.ok:
            update = self._failure(cmd, result)
            update.uncertain = True
            update.attempts.append(attempt)
            return update, attempt
        for instance in result.data:
            if instance.get("status") in ACTIVE_STATUSES and instance.get("parameters") == cmd.parameters:
                what = (
                    "found after restart"
                    if cmd.status == CommandStatus.IN_FLIGHT
                    else "an earlier attempt went through"
                )
                update = self._done_trigger(cmd, f"{what}; not sent again")
                update.attempts.append(attempt)
                return update, attempt
        return None, attempt

    def _send(self, cmds: list[CommandRow]) -> list[CommandUpdate]:
        first = cmds[0]
        result = self._call(self.client.trigger, first.chat_bot_id, first.flow_id, first.time_zone,
                            [c.parameters for c in cmds])  # fmt: skip
        call_id = str(uuid.uuid4())
        attempt = _attempt(result, call_id)
        if result.verdict is Verdict.REJECTED and result.status == 400 and len(cmds) > 1:
            middle = len(cmds) // 2
            updates = self._send(cmds[:middle]) + self._send(cmds[middle:])
            bisected = dict(attempt, request_summary=attempt["request_summary"] + " [400: bisected]")
            for u in updates:
                u.attempts.insert(0, dict(bisected))
            return updates
        updates = []
        for cmd in cmds:
            if result.ok:
                what = "triggered" if cmd.kind != SUBFLOW else f"subflow {cmd.flow_id} triggered"
                update = self._done_trigger(cmd, what)
                self.stats.triggered += 1
            else:
                update = self._failure(cmd, result)
            update.attempts.append(dict(attempt))
            updates.append(update)
        return updates

    def _done_trigger(self, cmd: CommandRow, outcome: str) -> CommandUpdate:
        remember = (cmd.appointment_key, cmd.route, cmd.chat_bot_id, "active", cmd.parameters)
        if cmd.kind == SUBFLOW and set(cmd.parameters) <= set(cmd.identifiers):
            # A no-show subflow carries only the identifiers: the instance's parameters are unchanged.
            remember = None
        return CommandUpdate(cmd.id, CommandStatus.DONE, outcome, count_attempt=True, remember=remember)

    # -- cancels ---------------------------------------------------------------------------------
    def _run_cancel(self, cmd: CommandRow) -> None:
        """Search by the instance identifiers, cancel every active instance."""
        call_id = str(uuid.uuid4())
        found = self._call(self.client.search, cmd.chat_bot_id, cmd.identifiers)
        attempts = [_attempt(found, call_id)]
        if not found.ok:
            update = self._failure(cmd, found)
            update.attempts = attempts
            self._apply([update])
            return
        active = [i for i in found.data if i.get("status") in ACTIVE_STATUSES and i.get("id")]
        # Only instances of this appointment: an API that ignores the filter must not cancel others' journeys.
        targets = [i for i in active if holds(i, cmd.identifiers)]
        cancelled = 0
        for instance in targets:
            result = self._call(self.client.cancel, cmd.chat_bot_id, instance["id"])
            attempts.append(_attempt(result, call_id))
            if not result.ok:
                update = self._failure(cmd, result)
                update.attempts = attempts
                self._apply([update])
                return
            cancelled += 1
        self.stats.cancelled += cancelled
        what = f"cancelled {cancelled} instance(s)" if cancelled else "nothing active to cancel"
        if len(active) > len(targets):
            what += f"; {len(active) - len(targets)} active instance(s) found with other identifiers left alone"
        if cmd.kind == CANCEL:
            remember = (cmd.appointment_key, cmd.route, cmd.chat_bot_id, "cancelled", None)
            update = CommandUpdate(
                cmd.id, CommandStatus.DONE, what, count_attempt=True, remember=remember, attempts=attempts
            )
        else:
            # The first half of a re-trigger: the trigger follows on the next cycle.
            remember = (cmd.appointment_key, cmd.route, cmd.chat_bot_id, "cancelled", None)
            update = CommandUpdate(cmd.id, CommandStatus.PENDING, what, step="cancelled", next_attempt_at=self.clock(),
                                   remember=remember, attempts=attempts)  # fmt: skip
        self._apply([update])

    def _call(self, operation: Callable[..., ApiResult], *args: Any) -> ApiResult:
        """One API call; a refused token pauses dispatching, any other answer from the API resumes it."""
        if not self.may_send():
            raise LeaseLapsed("this dispatcher's lease has lapsed; no call starts until it is renewed")
        result = operation(*args)
        self.stats.api_calls += 1
        self.observer.api_call(result.operation, result.status, result.duration_ms / 1000.0)
        if result.verdict is Verdict.AUTH:
            if not self.paused:
                log.error("the Journeys API refused the token (%s); dispatching paused", result.status or "no token")
                self.paused_since = self.clock()
            self.paused_reason = f"the API refused the token ({result.status or 'no token'}): {result.reason}"
            self._probe_at = self.clock() + self.settings.probe_interval
        elif result.status is not None and self.paused:
            log.info("the Journeys API accepts the token again; dispatching resumed")
            self.paused_reason = None
        self._note_availability(result)
        return result

    def _note_availability(self, result: ApiResult) -> None:
        """Hold after ``unavailable_after`` failed calls in a row; the first call the API answers ends it."""
        with self._lock:
            # A request refused here, never sent, says nothing of the API.
            if result.verdict is Verdict.RETRYABLE or (result.verdict is Verdict.MALFORMED and result.reached):
                self._failed_calls += 1
                if self._failed_calls < self.settings.unavailable_after or self.unavailable_reason is not None:
                    return
                self.held_since = self.clock()
                self.unavailable_reason = f"the Journeys API is unavailable ({result.reason})"
                log.warning("%s after %d calls in a row; dispatching holds to one command at a time until it "
                            "answers", self.unavailable_reason, self._failed_calls)  # fmt: skip
            elif result.status is not None:
                self._failed_calls = 0
                if self.unavailable_reason is not None:
                    self.unavailable_reason = None
                    log.info("the Journeys API answers again; dispatching resumed")

    # -- failures ----------------------------------------------------------------------------------
    def _failure(self, cmd: CommandRow, result: ApiResult) -> CommandUpdate:
        messages = result.reason
        if result.verdict is Verdict.MALFORMED:
            return self._strange_failure(cmd, result, messages) or self._retry(cmd, result, messages)
        if result.verdict is Verdict.REJECTED:
            self.stats.dead += 1
            return CommandUpdate(cmd.id, CommandStatus.DEAD, f"rejected by the API ({result.status}): {messages}",
                                 count_attempt=True, message_id=cmd.message_id)  # fmt: skip
        if result.verdict is Verdict.AUTH:
            if cmd.sync:
                return CommandUpdate(
                    cmd.id, CommandStatus.FAILED, f"API refused the token: {messages}", count_attempt=True
                )
            return CommandUpdate(cmd.id, CommandStatus.PENDING, f"paused: {messages}", next_attempt_at=self.clock())
        return self._retry(cmd, result, messages)

    def _strange_failure(self, cmd: CommandRow, result: ApiResult | None, messages: str) -> CommandUpdate | None:
        """The dead letter of a command met by ``STRANGE_LIMIT`` wrong answers or internal errors, else None."""
        with self._lock:
            count = self._strange[cmd.id] = self._strange.get(cmd.id, 0) + 1
        if count < STRANGE_LIMIT:
            return None
        self.stats.dead += 1
        return CommandUpdate(cmd.id, CommandStatus.DEAD, f"given up after {count} such attempts: {messages}", count_attempt=True,
                             uncertain=cmd.uncertain or result is None or result.maybe_processed,
                             message_id=cmd.message_id)  # fmt: skip

    def _retry(self, cmd: CommandRow, result: ApiResult | None, messages: str) -> CommandUpdate:
        if cmd.sync:
            return CommandUpdate(cmd.id, CommandStatus.FAILED, f"API unavailable: {messages}", count_attempt=True)
        self.stats.retries += 1
        self.observer.retry()
        base = min(self.settings.retry_max, self.settings.retry_initial * 2 ** min(cmd.attempts, 20))
        delay = base * random.uniform(0.5, 1.0)
        if result is not None and result.retry_after is not None:
            delay = max(delay, min(result.retry_after, self.settings.retry_max))
        # A refused connection, 408, 429 or 503 changed nothing; a timeout after sending might have.
        uncertain = cmd.uncertain or result is None or result.maybe_processed
        if self.unavailable_reason is not None:
            # Held, this command is the one probe of a down API: a call every probe_interval does not hammer it,
            # while its backoff grown toward retry_max kept the backlog waiting long after the API was back.
            delay = min(delay, max(self.settings.probe_interval, result.retry_after or 0.0 if result else 0.0))
        now = self.clock()
        retry_at = now + delay
        if self.unavailable_reason is not None:
            self._probe_at = retry_at  # the held queue's next probe: this command, when its backoff ends
        # A time, not "in 3.0 s": the outcome is read long after it is written ('log show' says when it is due).
        failed_at = time.strftime("%H:%M:%S", time.localtime(now))
        return CommandUpdate(cmd.id, CommandStatus.PENDING, f"retrying; the attempt at {failed_at} failed: {messages}",
                             next_attempt_at=retry_at, count_attempt=True, uncertain=uncertain)  # fmt: skip

    # -- recording -----------------------------------------------------------------------------
    def _apply(self, updates: list[CommandUpdate]) -> None:
        if not updates:
            return
        for dead in (u for u in updates if u.status == CommandStatus.DEAD):
            self.observer.dead_letter()
            log.warning("command dead-lettered; 'hl7bridge log show %s' has the reason", dead.message_id,
                        extra={"message_id": dead.message_id, "command_id": dead.command_id})  # fmt: skip
        now = self.clock()
        size = self.settings.updates_per_write
        self._commit(*(store.OutboxWrite(now, updates=updates[i : i + size]) for i in range(0, len(updates), size)))
        with self._lock:
            waiters = [(self._waiters.pop(u.command_id, None), u) for u in updates if u.status in FINAL_STATUSES]
            for _waiter, update in waiters:
                self._strange.pop(update.command_id, None)
        for waiter, update in waiters:
            if waiter is not None:
                waiter(update)

    def _commit(self, *writes: store.OutboxWrite) -> None:
        """Run writes through the single writer, in order, and wait until all are committed."""
        done = threading.Semaphore(0)
        failure: list[BaseException] = []

        def finished(_result: Any, error: BaseException | None) -> None:
            if error is not None:
                failure.append(error)
            done.release()

        for write in writes:
            self.writer.submit_job(Job(replace(write, epoch=self.epoch), finished))
        for _ in writes:
            done.acquire()
        if failure:
            raise LogUnwritable(str(failure[0])) from failure[0]

    def _release(self, cmds: list[CommandRow]) -> None:
        with self._lock:
            for cmd in cmds:
                self._busy.discard(cmd.appointment_key)


def _attempt(result: ApiResult, call_id: str) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "at": time.time(),
        "operation": result.operation,
        "request_summary": result.request_summary,
        "status_code": result.status,
        "verdict": result.verdict.value,
        "response_body": result.response_body[:4000],
        "error": result.error or None,
        "duration_ms": round(result.duration_ms, 2),
    }
