"""Wiring: configuration, the service that connects the stages, the command line. Only this package wires."""
