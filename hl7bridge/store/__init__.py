"""The message log: the only package that touches the database.

``schema`` defines the tables and opens (and upgrades) the database, ``writer``
is the single writer thread, ``outbox`` holds the dispatcher's queries and
updates, ``queries`` serves operators, ``retention`` purges old patient data.
"""

from .outbox import (
    AppointmentRow,
    CommandRow,
    CommandUpdate,
    apply_updates,
    appointment,
    appointments_for,
    command_values,
    due_heads,
    mark_in_flight,
    next_due,
    open_cancels,
    outbox_depth,
    record_ack,
)
from .queries import (
    LIST_COLUMNS,
    appointment_state,
    attempts_for_commands,
    commands_for_messages,
    count_messages,
    get_message,
    list_messages,
    messages_for_replay,
    record_replay,
)
from .schema import (
    OPEN_STATUSES,
    SCHEMA_VERSION,
    StoreError,
    appointments,
    attempts,
    commands,
    messages,
    meta,
    metadata,
    open_engine,
)
from .writer import Job, Writer, WriteRequest, WriteResult

__all__ = [
    "LIST_COLUMNS",
    "OPEN_STATUSES",
    "SCHEMA_VERSION",
    "AppointmentRow",
    "CommandRow",
    "CommandUpdate",
    "Job",
    "StoreError",
    "WriteRequest",
    "WriteResult",
    "Writer",
    "apply_updates",
    "appointment",
    "appointment_state",
    "appointments",
    "appointments_for",
    "attempts",
    "attempts_for_commands",
    "command_values",
    "commands",
    "commands_for_messages",
    "count_messages",
    "due_heads",
    "get_message",
    "list_messages",
    "mark_in_flight",
    "messages",
    "messages_for_replay",
    "meta",
    "metadata",
    "next_due",
    "open_cancels",
    "open_engine",
    "outbox_depth",
    "record_ack",
    "record_replay",
]
