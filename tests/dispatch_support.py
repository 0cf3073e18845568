"""Configuration and message builders shared by the dispatch tests."""

from __future__ import annotations

from datetime import datetime, timedelta

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
