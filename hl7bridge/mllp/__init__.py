"""MLLP transport, blind to HL7: framing, the listener with its connection policy, TLS, the sender."""
