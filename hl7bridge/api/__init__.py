"""The JSON API (``/api/v1``) and the operators' console, served on the console listener (``[console] listen``)."""
