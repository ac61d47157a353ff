"""What `run` needs of the machine at start, checked by `check` and by `run` itself: a config
that `check` accepts starts (SPEC §3), and one that cannot start says why by its key, exit 78,
not later as a fault a restart would repeat every few seconds."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .config import Config, ConfigError


def preflight(config: Config) -> None:
    """ConfigError naming each key whose path the daemon could not use as it is."""
    cluster = config.cluster
    checks: list[tuple[str, Callable[[], str | None]]] = [
        ("state_dir", lambda: _directory_problem(config.state_dir)),
        ("spool.dir", lambda: _directory_problem(config.spool_dir)),
        ("dnc_file", lambda: _unreadable(config.dnc_file)),
        ("results", lambda: _results_problem(config)),
        ("ledger_password_file", lambda: _unreadable(cluster and cluster.password_file)),
    ]
    problems = []
    for key, check in checks:
        try:
            problem = check()
        except OSError as error:  # a directory on the way that this user may not look into
            problem = f"cannot be checked: {error.strerror or error} ({error.filename})"
        if problem is not None:
            problems.append(f"{key}: {problem}")
    if problems:
        raise ConfigError(problems)


def _directory_problem(path: Path | None) -> str | None:
    """Whether the daemon could make `path` (and what it makes in it) or write in it as it is."""
    if path is None:
        return None
    existing = path.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent  # made at start, with its parents: the nearest one decides
    made = "" if existing == path.absolute() else f"{path} cannot be made: "
    if not existing.is_dir():
        return f"{made}{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{made}{existing} is not writable by this user"
    return None


def _unreadable(path: Path | None) -> str | None:
    """Whether a file the daemon reads at start can be read (the do-not-call list's lines are
    judged, and reported, as the daemon reads it: a bad line is skipped, not a reason not to
    start)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as error:
        return f"cannot read it: {error.strerror or error} ({path})"
    return None


def ledger_problem(config: Config) -> str | None:
    """`check` in cluster mode: whether the database answers, and holds a ledger this dialerd
    can run on (none yet is fine: the first daemon makes it). Not for `run`: a database that is
    down at boot is a reason to try again later, not a config error."""
    if config.cluster is None:
        return None
    from .ledger import postgres  # psycopg takes 0.1 s to import: only in cluster mode

    try:
        conn = postgres.connect(config.cluster.url, config.cluster.password_file, "dialerd check")
    except OSError as error:
        return str(error)
    try:
        version = postgres.schema_version(conn)
    finally:
        conn.close()
    if version > postgres.VERSION:
        return (
            f"the ledger has schema version {version}, newer than this dialerd knows"
            f" ({postgres.VERSION})"
        )
    return None


def _results_problem(config: Config) -> str | None:
    """`results` when it names a file: one the daemon may append to, or may make in a directory
    that is there (it makes state_dir, where the default file is, but no other directory)."""
    if config.results in (None, "-"):
        return None
    path = Path(config.results).absolute()
    if path.exists():
        if not path.is_file():
            return f"{config.results} is not a regular file"
        if not os.access(path, os.W_OK):
            return f"{config.results} cannot be written by this user"
        return None
    if path.parent == config.state_dir.absolute():
        return None  # made at start; checked as state_dir
    if not path.parent.is_dir():
        return f"{path.parent} is not a directory"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{config.results} cannot be made by this user"
    return None
