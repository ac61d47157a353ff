"""Exit codes (sysexits) and the one-sentence failure a command ends with."""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69  # a service it needs (the ledger's database) does not answer
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78


class Failure(Exception):
    """A clear one-sentence error for stderr, with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
