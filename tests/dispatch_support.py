"""Configuration and message builders shared by the dispatch tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest

from .conftest import RunningSandbox, RunningService, segments, start_sandbox, wait_until

TOKEN = {"TEST_API_TOKEN": "test-token"}
OPEN = ("pending", "in_flight")

SANDBOX_TOML = """
[api]
org_id = "test-org"

[sandbox]
[[sandbox.tokens]]
token = "test-token"
scopes = ["create.journey_instances", "read.journey_instances"]

[[sandbox.tokens]]
token = "read-only-token"
scopes = ["read.journey_instances"]

[[sandbox.journeys]]
chat_bot_id = "reminders"
name = "Reminders"
parameters = ["patientId", "patientName", "appointmentId", "appointmentDateTime", "phoneNumber"]
datetime_parameters = ["appointmentDateTime"]
instance_identifiers = ["appointmentId"]
subflows = ["moved", "noshow"]

[[sandbox.journeys]]
chat_bot_id = "dental"
name = "Dental"
parameters = ["patientId", "appointmentId", "appointmentDateTime", "clinic"]
datetime_parameters = ["appointmentDateTime"]
instance_identifiers = ["appointmentId"]
"""

ROUTE_PARAMETERS = """
[routes.parameters.patientId]
source = ["PID-3.1", "patient_id"]
where = { "PID-3.5" = "MR" }
required = true

[routes.parameters.patientName]
template = "{PID-5.2} {PID-5.1}"
required = true

[routes.parameters.appointmentId]
source = ["SCH-2.1", "SCH-1.1"]
required = true

[routes.parameters.appointmentDateTime]
source = ["start"]
type = "datetime"
required = true

[routes.parameters.phoneNumber]
source = ["PID-13.1"]
where = { "PID-13.3" = "CP" }
type = "phone"
"""


def service_toml(api_url: str, *, route_extra: str = "", listener_extra: str = "", dispatch_extra: str = "",
                 token_env: str = "TEST_API_TOKEN", extra_routes: str = "") -> str:  # fmt: skip
    """A service configuration with fast dispatch timings and one "reminders" route."""
    return f"""
[listeners.main]
time_zone = "America/Chicago"
{listener_extra}

[api]
base_url = "{api_url}"
org_id = "test-org"
token_env = "{token_env}"
token_credential = ""
connect_timeout = 1
read_timeout = 2

[dispatch]
batch_size = 100
batch_window_ms = 100
retry_initial = 0.2
retry_max = 1.0
auth_probe_interval = 0.5
{dispatch_extra}

{extra_routes}

[[routes]]
name = "reminders"
chat_bot_id = "reminders"
time_zone = "America/Chicago"
instance_identifiers = ["appointmentId"]
{route_extra}
{ROUTE_PARAMETERS}
"""


def future(days: float = 30, hour: int = 9, minute: int = 30) -> str:
    when = (datetime.now() + timedelta(days=days)).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return when.strftime("%Y%m%d%H%M%S")


def siu(
    event: str,
    control: str,
    appointment: str,
    start: str | None = None,
    *,
    patient: str = "MRN100",
    family: str = "TESTPATIENT",
    given: str = "ALICE",
    phone: str | None = "555-0101",
    status: str = "",
    facility: str = "MAIN",
    department: str = "",
    appointment_type: str = "ROUTINE",
) -> bytes:
    """A v2.5.1 SIU message with the fields the test route maps."""
    sch = ["SCH", f"P{appointment}", appointment, "", "", "", "CHECKUP^Checkup", "", appointment_type, "30", "min"]
    sch += [""] * (25 - len(sch) + 1)
    sch[25] = status
    segments = [
        f"MSH|^~\\&|EPIC|{facility}|BRIDGE|X|20270101120000||SIU^{event}^SIU_S12|{control}|P|2.5.1",
        "|".join(sch),
    ]
    if start:
        segments.append(f"TQ1|||||||{start}")
    pid13 = f"{phone}^PRN^CP" if phone else ""
    segments.append(f"PID|1||{patient}^^^HOSP^MR||{family}^{given}||19800101|F|||||{pid13}")
    if department:
        segments.append(f"AIL|1||ROOM1^^^{facility}||{department}")
    return ("\r".join(segments) + "\r").encode()


def iso(hl7: str) -> str:
    """An HL7 timestamp as the API's parameters spell it (``YYYY-MM-DD hh:mm:ss``)."""
    return f"{hl7[:4]}-{hl7[4:6]}-{hl7[6:8]} {hl7[8:10]}:{hl7[10:12]}:{hl7[12:14]}"


# ---- the service and the sandbox, as the dispatch tests see them ---------------------------------------


def sandbox_for_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    """The body of a module-scoped sandbox fixture: one sandbox process per test module, stopped after it."""
    running = start_sandbox(tmp_path_factory.mktemp("sandbox"), SANDBOX_TOML)
    yield running
    running.stop()


def ack(service: RunningService, payload: bytes) -> list[str]:
    """The MSA segment of the service's answer, the field most tests check."""
    return segments(service.request(payload))["MSA"]


def query(service: RunningService, sql: str, *args: object) -> list[dict]:
    """Rows of the service's log as dicts, read straight from the database rather than through the service (its
    SQLite file, or its PostgreSQL database: ``?`` placeholders either way)."""
    if service.database_url:
        return pg_rows(service.database_url, sql, *args)
    with sqlite3.connect(service.database) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, args)]


def pg_rows(database_url: str, sql: str, *args: object) -> list[dict]:
    """Rows of one statement on a PostgreSQL log as dicts (``?`` placeholders), on a connection of its own."""
    import psycopg
    from psycopg.rows import dict_row
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                         row_factory=dict_row) as conn:  # fmt: skip
        return [dict(r) for r in conn.execute(sql.replace("%", "%%").replace("?", "%s"), args)]


def commands_of(service: RunningService, control_id: str) -> list[dict]:
    """The commands derived from a message, read straight from the service's SQLite file."""
    return query(
        service,
        "SELECT c.* FROM commands c JOIN messages m ON m.id = c.message_id WHERE m.control_id = ? ORDER BY c.id",
        control_id,
    )


def commands_of_message(service: RunningService, message_id: int) -> list[dict]:
    """The commands of one logged message, for when its control id is shared (replays log it again)."""
    return query(service, "SELECT * FROM commands WHERE message_id = ? ORDER BY id", message_id)


def attempts_of(service: RunningService, command_id: int) -> list[dict]:
    """The API calls logged for a command, in order: what the dispatcher really sent."""
    return query(service, "SELECT * FROM attempts WHERE command_id = ? ORDER BY id", command_id)


def message_rows(service: RunningService, control_id: str) -> list[dict]:
    """Every message logged under a control id, oldest first: resends and replays log it again."""
    return query(service, "SELECT * FROM messages WHERE control_id = ? ORDER BY id", control_id)


def message_row(service: RunningService, control_id: str) -> dict:
    """The latest message logged under a control id, the one a resend was answered from."""
    return message_rows(service, control_id)[-1]


def settled_commands(fetch: Callable[[], list[dict]], what: str, timeout: float = 15.0) -> list[dict]:
    """Wait until every command that ``fetch`` reads reached a final state, since dispatch is asynchronous."""

    def check() -> list[dict] | None:
        cmds = fetch()
        return cmds if cmds and all(c["status"] not in OPEN for c in cmds) else None

    return wait_until(check, timeout=timeout, message=f"commands of {what} to settle")


def settled(service: RunningService, control_id: str, timeout: float = 15.0) -> list[dict]:
    """Wait until every command of the message reached a final state."""
    return settled_commands(lambda: commands_of(service, control_id), control_id, timeout)


def settled_message(service: RunningService, message_id: int) -> list[dict]:
    """Wait until every command of one logged message reached a final state."""
    return settled_commands(lambda: commands_of_message(service, message_id), f"message {message_id}")
