"""The HTTP side on ``[console] listen``: the JSON API (``/api/v1``) and the console's pages."""
