"""The operator's workflow: dead letters, status, search, reconciliation.

Plain functions over the log (and the Journeys API) returning data, never printing: the CLI formats
them, and the JSON API calls the same functions unchanged.
"""
