"""The do-not-call list: numbers never to dial, checked right before each send.

One number per line, written as `to` may be (normalised the same way); blank lines and `#`
comments are ignored; a bad line is reported and skipped. Bare digits that are a national number
of default_country and another country's number as well block both. The file is read again when
it changes (checked every second) and on SIGHUP.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from .logs import log
from .numbers import NotANumber, normalise, other_reading

CHECK_EVERY_S = 1.0
PROBLEMS_LOGGED = 20  # lines to fix logged one by one each time the list is read; then a count


def read_list(path: Path, default_country: str | None) -> tuple[frozenset[str], list[str]]:
    """The numbers of a do-not-call file, and a problem per bad line ("line N: ..."), or per
    line of bare digits that read two ways (both are blocked: no one is called by mistake)."""
    numbers, problems = set(), []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                number = normalise(entry, default_country)
            except NotANumber as error:
                problems.append(f"line {line_number}: {error}; skipped")
                continue
            numbers.add(number)
            if other := other_reading(entry, number, default_country):
                numbers.add(other)
                problems.append(
                    f"line {line_number}: {entry!r} reads as +{number} (a national number of "
                    f"{default_country}) and as +{other}: both are blocked; write it with +"
                )
    return frozenset(numbers), problems


class DoNotCall:
    """The list in force; empty without a dnc_file."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.country: str | None = None  # default_country, for lines in national format
        self.numbers: frozenset[str] = frozenset()
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime) last read
        self._fault: str | None = None  # why the file cannot be read, while that lasts

    def reason(self, to: str) -> str | None:
        """Why `to` must not be called, or None."""
        if to in self.numbers:
            return f"{to} is on the do-not-call list ({self.path})"
        return None

    def use(self, path: Path | None, country: str | None) -> None:
        """Take the list from `path` (None: no list), read now; OSError if it cannot be read,
        since dialing without the list the config names would call people who must not be."""
        if path is not None:
            status = os.stat(path)
            numbers, problems = read_list(path, country)
            self._report(path, numbers, problems)
            self.numbers, self._seen = numbers, _identity(status)
        else:
            self.numbers, self._seen = frozenset(), None
        self.path, self.country = path, country

    def refresh(self) -> None:
        """Read the file again if it changed; a file that cannot be read keeps the list in force."""
        if self.path is None:
            self.numbers = frozenset()
            return
        try:
            seen = _identity(os.stat(self.path))
            if seen == self._seen:
                return
            numbers, problems = read_list(self.path, self.country)
        except OSError as error:
            if str(error) != self._fault:
                self._fault = str(error)
                log.error("cannot read the do-not-call list; keeping the one in force",
                          path=str(self.path), error=self._fault)  # fmt: skip
            return
        self._fault = None
        self._report(self.path, numbers, problems)
        self.numbers, self._seen = numbers, seen

    @staticmethod
    def _report(path: Path, numbers: frozenset[str], problems: list[str]) -> None:
        for problem in problems[:PROBLEMS_LOGGED]:
            log.warning("do-not-call list: a line to fix", path=str(path), problem=problem)
        if len(problems) > PROBLEMS_LOGGED:
            log.warning("do-not-call list: more lines to fix", path=str(path),
                        more=len(problems) - PROBLEMS_LOGGED)  # fmt: skip
        log.info("do-not-call list read", path=str(path), numbers=len(numbers))

    async def watch(self) -> None:
        """Read the file again whenever it changes, until cancelled."""
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            await asyncio.to_thread(self.refresh)


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    """What tells a changed file: a new inode (renamed in), a new size or a new mtime."""
    return status.st_ino, status.st_size, status.st_mtime_ns
