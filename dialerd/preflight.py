"""What `run` needs of the machine at start, checked by `check` and by `run` itself: a config
that `check` accepts starts (SPEC §3), and one that cannot start says why by its key, exit 78,
not later as a fault a restart would repeat every few seconds."""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config, ConfigError
from .dnc import read_list


def preflight(config: Config) -> None:
    """ConfigError naming each key whose path the daemon could not use as it is."""
    problems = [
        problem
        for problem in (
            _directory_problem("state_dir", config.state_dir),
            _directory_problem("spool.dir", config.spool_dir),
            _dnc_problem(config),
            _results_problem(config),
        )
        if problem is not None
    ]
    if problems:
        raise ConfigError(problems)


def _directory_problem(key: str, path: Path | None) -> str | None:
    """Whether the daemon could make `path` (and what it makes in it) or write in it as it is."""
    if path is None:
        return None
    existing = path
    while not existing.exists():  # made at start, with its parents: the nearest one decides
        if existing.parent == existing:
            break
        existing = existing.parent
    made = "" if existing == path else f"{path} cannot be made: "
    if not existing.is_dir():
        return f"{key}: {made}{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}: {made}{existing} is not writable by this user"
    return None


def _dnc_problem(config: Config) -> str | None:
    if config.dnc_file is None:
        return None
    try:
        read_list(config.dnc_file, config.default_country)
    except OSError as error:
        return f"dnc_file: cannot read it: {error.strerror or error} ({config.dnc_file})"
    return None


def _results_problem(config: Config) -> str | None:
    """`results` when it names a file: its directory must be there to append in (the daemon
    makes state_dir, where the default file is, but no other directory)."""
    if config.results in (None, "-"):
        return None
    directory = Path(config.results).parent
    if directory == config.state_dir:
        return None  # made at start; checked as state_dir
    if not directory.is_dir():
        return f"results: {directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK) and not os.access(config.results, os.W_OK):
        return f"results: {config.results} cannot be written by this user"
    return None
