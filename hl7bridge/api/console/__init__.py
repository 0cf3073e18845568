"""The operators' console: server-rendered pages over the same workflow functions as the CLI and the JSON API."""
