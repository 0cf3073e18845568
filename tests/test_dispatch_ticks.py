"""The dispatcher serves a storm of wakes with few outbox reads.

Every committed command and every finished API call wakes the dispatcher. Each tick reads the outbox
(four queries through SQLAlchemy), so ticking once per wake made those reads the dispatcher's main cost
and took the GIL from the listener. Real writer, real SQLite file; the outbox is empty, so no call is made.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from hl7bridge.dispatch.dispatcher import Dispatcher
from hl7bridge.dispatch.journeys import ApiSettings, JourneysClient, TokenSource
from hl7bridge.dispatch.rules import DispatchSettings
from hl7bridge.store import Writer, open_engine


class CountingDispatcher(Dispatcher):
    ticks = 0

    def _tick(self) -> float:
        self.ticks += 1
        return super()._tick()


def test_wakes_within_the_tick_gap_are_served_by_one_tick(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    client = JourneysClient(ApiSettings("http://127.0.0.1:9", "org"), TokenSource(env="HL7BRIDGE_TEST_NO_TOKEN"))
    settings = DispatchSettings(tick_gap=0.05, poll_interval=1.0)
    dispatcher = CountingDispatcher(engine, writer, client, settings)
    dispatcher.start()
    try:
        time.sleep(0.2)  # the first tick, on start
        before, began = dispatcher.ticks, time.monotonic()
        wakes = 300  # a count, not a duration: a loaded machine makes the loop slower, never the bound wrong
        for _ in range(wakes):
            dispatcher.wake()
            time.sleep(0.0005)
        threading.Event().wait(0.1)
        ticks = dispatcher.ticks - before
        elapsed = time.monotonic() - began
    finally:
        dispatcher.stop()
        writer.stop()
        engine.dispose()
    # At most one tick per tick_gap of the time the wakes really took (a tick per wake would be 300).
    assert 1 <= ticks <= elapsed / settings.tick_gap + 1, (ticks, wakes, elapsed)
