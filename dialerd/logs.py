"""Logging: structlog to stderr, JSON lines unless stderr is a terminal."""

from __future__ import annotations

import logging
import os
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


# sd-daemon(3) priority prefixes: journald reads "<N>" at the start of a line as its level.
JOURNAL_PRIORITY = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}


def _journal_priority(_logger, method: str, line: str) -> str:
    return f"<{JOURNAL_PRIORITY.get(method, 6)}>{line}"


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected ($JOURNAL_STREAM = dev:inode)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{status.st_dev}:{status.st_ino}" == f"{device}:{inode}"


def configure(level: str = "info", json_lines: bool | None = None) -> None:
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    journal = [_journal_priority] if json_lines and stderr_is_journal() else []
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
            *journal,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=True,
    )


log = structlog.get_logger("dialerd")
