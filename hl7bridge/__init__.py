"""hl7bridge: HL7 v2 SIU appointment feeds over MLLP to MedChat journeys."""

__version__ = "0.1.0"
