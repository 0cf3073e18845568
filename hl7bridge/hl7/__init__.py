"""Reading and answering HL7 v2: ER7, charsets, timestamps, hl7apy's tables, the SIU event, the ACK."""
