# The reliability suite (tests/reliability): crash, API outage, auth failure, hostile input, load and soak,
# disk full and database locked, and several instances on PostgreSQL behind HAProxy (test_cluster.py).
# docs/reliability.md describes each scenario and holds the measured figures.
#
# Include it from the top-level Makefile, after BIN is defined:
#     include tests/reliability/reliability.mk
#
#   make reliability-short   the CI versions (a few minutes; they also run with the normal `pytest`)
#   make reliability         the long versions (about 1.5 hours: the soak alone runs one hour)
#
# Knobs (environment): HL7BRIDGE_SOAK_SECONDS (long soak length, default 3600), HL7BRIDGE_SOAK_RATE (msg/s,
# default 200), HL7BRIDGE_CRASH_CYCLES, HL7BRIDGE_HOSTILE_FRAMES, HL7BRIDGE_CLUSTER_KILL_CYCLES (3 / 20),
# HL7BRIDGE_CLUSTER_PAIRS (200 / 1000), HL7BRIDGE_SEED, and
# HL7BRIDGE_RELIABILITY_RESULTS (where each scenario's JSON goes; default $TMPDIR/hl7bridge-reliability).
# RELIABILITY_ARGS adds pytest arguments, e.g. RELIABILITY_ARGS="-k crash".
# The disk-full scenario mounts a small tmpfs and is skipped (with the reason) when not run as root.

BIN ?= .venv/bin
RELIABILITY_DIR := tests/reliability
RELIABILITY_ARGS ?=

.PHONY: reliability reliability-short

reliability-short: $(BIN)/.installed
	HL7BRIDGE_RELIABILITY=short $(BIN)/pytest $(RELIABILITY_DIR) -rxXs -p no:cacheprovider $(RELIABILITY_ARGS)

reliability: $(BIN)/.installed
	HL7BRIDGE_RELIABILITY=long $(BIN)/pytest $(RELIABILITY_DIR) -rxXs -p no:cacheprovider $(RELIABILITY_ARGS)
