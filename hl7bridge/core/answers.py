"""What the pipeline hands the listener for each frame: the bytes to send back, ``None`` (send nothing), or
``CLOSE``. It lives below both, as the listener knows no HL7 and the pipeline no sockets."""

from __future__ import annotations

from typing import Final


class Close:
    """Send nothing for this frame or any after it, and close the connection once the answers before it are out:
    what a message gets when its commit's outcome is unknown (the sender resends, and the resend is deduplicated)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLOSE"


CLOSE: Final = Close()
Answer = bytes | Close | None
