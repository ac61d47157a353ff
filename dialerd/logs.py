"""Logging: structlog to stderr, JSON lines unless stderr is a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

# Never logged, whatever a caller passes: the API key travels only in the request header.
SECRET_KEYS = frozenset({"key", "api_key", "x-vgai-key", "headers", "secret", "token"})


def _drop_secrets(_logger, _method, event: dict) -> dict:
    for name in SECRET_KEYS.intersection(event):
        event[name] = "[hidden]"
    return event


class _CurrentStderr:
    """Whatever sys.stderr is at the time of writing (it is replaced under test runners)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info", json_lines: bool | None = None) -> None:
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=True,
    )


log = structlog.get_logger("dialerd")
