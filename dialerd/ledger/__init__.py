"""The ledger: every request and its fate in SQLite (or, in cluster mode, PostgreSQL), written
from one thread in group commits.

- `schema`: the tables, the migrations from older versions, opening the file;
- `lock`: one daemon per state_dir;
- `writer`: the thread that runs every call in group commits;
- `states`: a request's states, and the one table of moves between them;
- `intake`: requests recorded (queued, or final at once), spool files, submit's foresight;
- `sends`: a request's way out (due, marked, retried, held, finished);
- `placed`: placed calls and what their callbacks do;
- `status`, `requeue`: what operators read and do, whether or not a daemon runs;
- `dialect`, `postgres`: what differs on PostgreSQL (cluster mode), and its tables;
- `leases`: which daemon sends for each agent, in cluster mode;
- `store`: the `Ledger` the daemon's tasks call.
"""

from ..results import Outcome
from .intake import Intake, SpoolChunk, SpoolRecord, foresee_intake
from .lock import LedgerLocked
from .requeue import requeue
from .schema import MIGRATIONS, SCHEMA, LedgerTooNew, connect, create_schema
from .sends import EXPIRED_ERROR, RESPONSE_KEPT, LeaseLost, Pending
from .states import State
from .status import HELD_REASONS, empty_agent_status, read_status, status_report
from .store import Ledger

__all__ = [
    "EXPIRED_ERROR",
    "HELD_REASONS",
    "MIGRATIONS",
    "RESPONSE_KEPT",
    "SCHEMA",
    "Intake",
    "LeaseLost",
    "Ledger",
    "LedgerLocked",
    "LedgerTooNew",
    "Outcome",
    "Pending",
    "SpoolChunk",
    "SpoolRecord",
    "State",
    "connect",
    "create_schema",
    "empty_agent_status",
    "foresee_intake",
    "read_status",
    "requeue",
    "status_report",
]
