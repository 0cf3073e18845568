"""How ``schema_v9.db.gz`` was made: a real schema-9 log, written by the release before the search index left the
log (main at 17898c0), kept so that the upgrade to a separate index file is tested on what that release wrote.

Run with that release's code: ``PYTHONPATH=/path/to/17898c0 python tests/data/schema_v9.py OUT.db``.
``schema_v12.db.gz`` is the same script run with the last release at schema 12 (main at 4bbd114, the index still in
the log; step 13 moves it out, step 10 being empty). It logs 40
messages (two patients' names and ids, appointments, senders), indexes the first 30 (the rest is the unindexed
tail), purges the 5 oldest (retention's trigger removed their patient keys and words) and decides one ACK later.
"""

from __future__ import annotations

import sys
import time

from hl7bridge.hl7.ack import Ack
from hl7bridge.store import index_step, messages, open_engine, purge, record_ack, search_terms


def main(out: str) -> None:
    engine = open_engine(f"sqlite:///{out}")
    now = time.time()
    rows = []
    for n in range(40):
        patient = ("MRN-OLD", "ORCHARD") if n < 5 else ("MRN-A", "APPLEBY") if n % 2 else ("MRN-B", "BRAMBLE")
        summary = {"placer_appointment_id": f"PL-{n}", "filler_appointment_id": f"FI-{n % 7}",
                   "patient_ids": [{"value": patient[0]}], "names": [{"family": patient[1], "given": "Ann"}],
                   "reason": "Check up" if n % 3 else "Post-op review"}  # fmt: skip
        terms, words = search_terms(f"C-{n}", "EPIC", "NORTH" if n % 2 else "SOUTH", summary)
        rows.append({"received_at": now - 40 * 86400 + n * 60 if n < 5 else now - 3600 + n * 60, "listener": "main",
                     "peer": "p", "status": "accepted", "ack_code": "AA", "control_id": f"C-{n}",
                     "sending_application": "EPIC", "sending_facility": "NORTH" if n % 2 else "SOUTH",
                     "summary": "{}", "search_terms": terms, "search_text": words})  # fmt: skip
    with engine.begin() as conn:
        conn.execute(messages.insert(), rows)
        index_step(conn, 30)
    with engine.begin() as conn:
        record_ack(conn, 12, Ack("AE", "refused", b"MSA|AE"), "accepted", None)
    purge(engine, now - 30 * 86400)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1])
