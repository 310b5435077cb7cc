"""The HTTP layer: routes validate, call one `app.service` function (blocking work in a threadpool) and shape
the reply. Errors are mapped to HTTP in `errors.py` only."""
