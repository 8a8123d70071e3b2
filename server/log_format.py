"""``--log-format json``: one JSON object per log line, for log collectors that parse lines.

Every record becomes ``{"time", "level", "logger", "message", ...}`` plus the fields its call
site passes with ``extra=`` (``model`` and ``version`` where a line is about a model, the access
log's method, code, ms and peer), so messages stay exactly as the text format writes them and a
field added at a call site shows up here with no change to this module. Imports nothing heavy: the
command line sets it up before the server loads.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")

# What every LogRecord carries; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``fields`` are added to every line (a worker's number)."""

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})

    def with_fields(self, **fields: Any) -> JsonFormatter:
        return JsonFormatter({**self.fields, **fields})

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc)
        entry: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        # default=str: an unexpected field type must never cost the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


def model_fields(model: Any) -> dict[str, Any]:
    """``{"model": NAME, "version": N}`` of a ``Recommender`` or ``ServingModel``, for
    ``extra=``; empty for ``None``. Duck-typed so that this module stays free of torch."""
    if model is None:
        return {}
    recommender = getattr(model, "recommender", model)
    artifact = getattr(recommender, "artifact", None)
    if artifact is None:
        return {}
    return {"model": artifact.name or "unnamed", "version": artifact.version}


def json_handler(stream: Any) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    return handler
