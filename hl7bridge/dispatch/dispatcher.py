"""The dispatcher's threads: its loop (wake-ups, ticks paced ``tick_gap`` apart) and the small pool the
API calls run in. What each tick sends and how each answer is recorded are the rules in ``dispatch.rules``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hl7bridge.core.logs import MonotonicClock, RefusalLog
from hl7bridge.dispatch.leader import Leadership
from hl7bridge.dispatch.pipe import DispatchState
from hl7bridge.dispatch.rules import DispatchRules, LogUnwritable
from hl7bridge.store import CommandUpdate
from hl7bridge.store.outbox import final_updates

log = logging.getLogger("hl7bridge.dispatcher")

#: Seconds between a standby's looks at the commands its service waits for.
STANDBY_LOOK = 0.5


class Dispatcher(DispatchRules):
    """``DispatchRules`` run by threads: a loop that ticks and a small pool for the API calls."""

    def __init__(self, *args: Any, leadership: Leadership | None = None, **kwargs: Any) -> None:
        """``leadership``: the log's election (``dispatch.leader``). The loop first waits to lead (a standby
        meanwhile, sending nothing), then starts calls only while the lease is fresh, and every write carries its
        epoch; the process (``dispatch.child``) and the service's own thread (``run_in = "thread"``) alike."""
        self.leadership = leadership
        if leadership is not None:
            kwargs["may_send"] = leadership.fresh
        super().__init__(*args, **kwargs)

    def _prepare(self) -> None:
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="hl7bridge-api")
        self._running: set[Future] = set()
        #: ``time.monotonic()`` before which no tick starts: the log refused a write (see ``LogUnwritable``).
        self._log_wait_until = 0.0
        #: ``time.monotonic()`` of a standby's last look at the commands its service waits for.
        self._looked = 0.0
        #: A log out of reach fails every look (twice a second): a line a minute.
        self._standby_failures = RefusalLog(log, MonotonicClock())
        self._thread = threading.Thread(target=self._loop, name="hl7bridge-dispatcher", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def dispatch_now(self) -> None:
        """``hl7bridge dispatch now``: a held or paused queue's probe goes at once, and what that command made due
        in the log is sent on this pass."""
        self._probe_at = 0.0
        self.wake()

    def stop(self, deadline: float = 10.0) -> None:
        """Stop taking work, let calls under way finish (up to ``deadline`` s); the rest stays queued."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(deadline)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.leadership is not None:
            self.leadership.release()

    @property
    def alive(self) -> bool:
        """Whether the loop thread runs (or has stopped as asked): a dead one would stop dispatch silently."""
        return self._thread.is_alive() or self._stopping.is_set()

    def state(self) -> DispatchState:
        """What ``/status`` and the gauges report of dispatching; the child sends it whenever it changes."""
        if not self.alive:
            return DispatchState(down_reason=self.paused_reason or "the dispatcher's thread has died")
        held, paused = self.unavailable_reason, self.paused_reason
        return DispatchState(held, self.held_since if held else None, paused, self.paused_since if paused else None,
                             self._probe_at if paused else None)  # fmt: skip

    def wait_for(self, command_id: int, callback: Callable[[CommandUpdate], None]) -> None:
        """Call back (in a dispatcher thread) once the command reaches a final state."""
        with self._lock:
            self._waiters[command_id] = callback
        self.wake()

    def forget(self, command_id: int) -> None:
        with self._lock:
            self._waiters.pop(command_id, None)

    # -- the loop --------------------------------------------------------------------------------
    def _lead(self) -> bool:
        """Wait until this dispatcher leads the log (False: stopped first); then renew the lease meanwhile."""
        if self.leadership is None:
            return True
        if not self.leadership.acquire(self._standing_by):
            return False
        self.epoch = self.leadership.epoch
        self.leadership.keep(self.wake)
        return True

    def _standing_by(self) -> bool:
        """Whether to stop waiting to lead (the dispatcher stops). Meanwhile the verdicts its service waits for
        (``ack_mode = "dispatched"``: the leader elsewhere sends the command) are answered from the log once final,
        every ``STANDBY_LOOK`` s."""
        if self._stopping.is_set():
            return True
        if self._waiters and time.monotonic() - self._looked >= STANDBY_LOOK:
            self._looked = time.monotonic()
            with self._lock:
                waiting = list(self._waiters)
            try:
                with self.engine.connect() as conn:
                    final = final_updates(conn, waiting)
            except Exception as exc:  # noqa: BLE001 - the log may be back at the next look
                self._standby_failures.warn(("standby",), "a standby cannot read the commands the service waits "
                                            "for: %s", exc.__class__.__name__)  # fmt: skip
                return False
            for update in final:
                with self._lock:
                    waiter = self._waiters.pop(update.command_id, None)
                if waiter is not None:
                    waiter(update)
        return False

    def _loop(self) -> None:
        if not self._lead():
            return
        last = -self.settings.tick_gap
        while not self._stopping.is_set():
            # Wakes come with every committed command and every finished call; ticking on each one made
            # the outbox queries the dispatcher's main cost and took the GIL from the listener.
            gap = max(last + self.settings.tick_gap, self._log_wait_until) - time.monotonic()
            if gap > 0 and self._stopping.wait(gap):
                break
            last = time.monotonic()
            self._wake.clear()
            try:
                timeout = self._tick()
            except Exception:
                log.exception("dispatcher cycle failed; retrying shortly")
                timeout = self.settings.poll_interval
            except BaseException:
                # Nothing would be dispatched again: say so where /healthz looks, rather than "not paused".
                self.paused_reason = "the dispatcher's thread has died; restart the service"
                log.critical("the dispatcher's thread has died; nothing is dispatched until a restart", exc_info=True)
                raise
            self._wake.wait(timeout)
        # Commands still gathering in a bucket were never sent: they stay pending in the log.
        with self._lock:
            for bucket in self._buckets.values():
                for cmd in bucket.commands:
                    self._busy.discard(cmd.appointment_key)
        self._buckets.clear()

    def _submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._stopping.is_set():
            self._release(arg if isinstance(arg, list) else [arg])
            return
        future = self._pool.submit(self._guarded, fn, arg)
        self._running.add(future)
        future.add_done_callback(self._running.discard)

    def _guarded(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run one job; an unexpected error ends in a logged attempt and a bounded retry, never a lost command."""
        cmds = arg if isinstance(arg, list) else [arg]
        try:
            fn(arg)
        except LogUnwritable as exc:
            # Nothing is recorded (the log would refuse that too) and nothing is counted against the commands:
            # they stay as the log has them (an in-flight one is searched for before it is sent again).
            self._log_wait_until = time.monotonic() + self.settings.poll_interval
            log.warning("the log refused a write for command_id(s) %s; tried again once it takes writes: %s",
                        [c.id for c in cmds], exc)  # fmt: skip
        except Exception as exc:
            log.exception("dispatch of command_id(s) %s (message_id(s) %s) failed unexpectedly", [c.id for c in cmds],
                          sorted({c.message_id for c in cmds}))  # fmt: skip
            error = f"internal error ({exc.__class__.__name__}); see the service log"
            attempt = {"call_id": str(uuid.uuid4()), "at": time.time(), "operation": "dispatch", "request_summary": "",
                       "status_code": None, "verdict": "internal", "response_body": "", "error": error,
                       "duration_ms": 0.0}  # fmt: skip
            updates = []
            for cmd in cmds:
                update = self._strange_failure(cmd, None, error) or self._retry(cmd, None, error)
                update.attempts.append(dict(attempt))
                updates.append(update)
            try:
                self._apply(updates)
            except Exception:
                log.exception("the outcome of command_id(s) %s (message_id(s) %s) could not be written",
                              [c.id for c in cmds], sorted({c.message_id for c in cmds}))  # fmt: skip
        finally:
            self._release(cmds)
            self.wake()
