"""PostgreSQL for the tests: the always-running shared server (one fresh schema per test) and
ThrowawayPostgres, a server of the suite's own that a test may stop, kill and restart under a
running daemon.

A plain module, not a pytest plugin: conftest.py and the test files import it by name, as they
import conftest. It does not import conftest, so conftest can import it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

CONNECT_TIMEOUT_S = 3
SERVER_TIMEOUT_S = 30  # pg_ctl -t, and the bound of every wait on a server
POLL_S = 0.05
LOG_TAIL_LINES = 20
# sizeof(sockaddr_un.sun_path) is 108 on Linux, one byte of it for the NUL
MAX_SOCKET_PATH = 107
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
NO_BINARIES = (
    "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in pg_config --bindir, "
    "/usr/lib/postgresql/*/bin or PATH"
)

_schema_numbers = itertools.count(1)


# -- the shared server ---------------------------------------------------------------------


def shared_server_dsn() -> str:
    """The always-running server; $DIALERD_TEST_PG points the suite at another one."""
    return os.environ.get("DIALERD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def unreachable_reason(dsn: str) -> str | None:
    """None when a connection to `dsn` succeeds, else one line that says why and names the DSN
    (without its password), fit for a skip or fail message."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "not a valid PostgreSQL DSN (not shown, as it may hold a password)"
    try:
        with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S):
            return None
    except psycopg.Error as error:
        params.pop("password", None)
        return f"PostgreSQL at {make_conninfo(**params)} is unreachable: {_one_line(str(error))}"


def skip_or_fail(reason: str) -> None:
    """The project's rule for a missing server: the PostgreSQL tests fail in CI, where a server
    is part of the setup, and are reported as skipped, with the reason, everywhere else."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A new, uniquely named schema on the server of `dsn`; yields a DSN whose connections work
    in it, and drops it (CASCADE) afterwards, also when the block raised.

    One schema per test keeps tests on the shared server apart, and even apart from a parallel
    run of the suite, at the price of two short connections (CREATE DATABASE would take
    hundreds of milliseconds)."""
    schema = f"t_{os.getpid()}_{next(_schema_numbers)}_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield _with_search_path(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            # a connection the test leaked inside a transaction would make the DROP wait forever
            conn.execute("SET lock_timeout = '30s'")
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def _with_search_path(dsn: str, schema: str) -> str:
    """`dsn` with search_path=`schema` added to its libpq options (a conninfo string, with the
    DSN's other parameters and options kept); the last -c wins, so this one does."""
    options = conninfo_to_dict(dsn).get("options")
    return make_conninfo(dsn, options=" ".join(filter(None, [options, f"-csearch_path={schema}"])))


# -- a server of the suite's own -----------------------------------------------------------


class PostgresServerError(RuntimeError):
    """A throwaway server did not do what was asked; the message ends with its log's tail."""


class ThrowawayPostgres:
    """A PostgreSQL cluster made with initdb for the tests that stop, kill or restart the
    database under a running daemon, which the shared server must never suffer.

    Only on 127.0.0.1, on a port picked when made and kept across restarts, and on a unix socket
    in `home`, the cluster's directory (`data_dir` is in it). The log (initdb's, pg_ctl's and the
    server's output) is `log_path`, in `directory`. initdb and postgres refuse to run as root: as
    root they run as the postgres OS user, and `home` is a directory of that user's under /tmp,
    since pytest's directories are root's own (mode 0700). `home` is there too when `directory`
    is too long for a unix socket's path.
    """

    def __init__(self, directory: Path):
        bindir = _bindir()
        if bindir is None:
            raise PostgresServerError(NO_BINARIES)
        self._bindir = bindir
        self._as_server_user = _server_user()
        self.port = _free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "postgres.log"
        self.home = directory / "pg"
        socket_path = self.home / f".s.PGSQL.{self.port}"
        if os.geteuid() == 0 or len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            self.home = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
            if self._as_server_user:
                os.chown(self.home, self._as_server_user["user"], self._as_server_user["group"])
        else:
            self.home.mkdir()
        self.data_dir = self.home / "data"
        self._running = False

    @staticmethod
    def available() -> str | None:
        """None when initdb, pg_ctl and postgres are found and run (as the postgres OS user when
        root), else why not."""
        bindir = _bindir()
        if bindir is None:
            return NO_BINARIES
        try:
            as_user = _server_user()
        except KeyError:
            return "running as root, and there is no 'postgres' OS user to run initdb/postgres as"
        for name in SERVER_BINARIES:
            try:
                subprocess.run(
                    [bindir / name, "--version"],
                    capture_output=True,
                    cwd="/",
                    timeout=SERVER_TIMEOUT_S,
                    check=True,
                    **as_user,
                )
            except (OSError, subprocess.SubprocessError) as error:
                user = " as the postgres user" if as_user else ""
                return f"cannot run {bindir / name}{user}: {_describe(error)}"
        return None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server (made with initdb the first time) and return once it takes
        connections on 127.0.0.1; after kill(), this is where the crash recovery runs."""
        if self._running:
            raise PostgresServerError(self._failure("start(): the server is already running"))
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        self._pg_ctl("start")
        self._running = True
        # pg_ctl -w trusts postmaster.pid; the tests connect over TCP, so wait for that
        while (reason := unreachable_reason(self.dsn)) is not None:
            if time.monotonic() > deadline:
                raise PostgresServerError(self._failure(f"the server started, but {reason}"))
            time.sleep(POLL_S)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server the way `pg_ctl stop -m MODE` does: smart, fast or immediate."""
        if not self._running:
            raise PostgresServerError(self._failure("stop(): the server is not running"))
        self._pg_ctl("stop", "-m", mode)
        self._running = False

    def restart(self, mode: str = "fast") -> None:
        """stop(mode), then start(): the same port, the same data."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would, and return once it is gone; its backends
        see it die and exit by themselves. start() recovers the cluster."""
        if not self._running:
            raise PostgresServerError(self._failure("kill(): the server is not running"))
        pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        self._running = False
        # Until the dead postmaster is reaped, its pid in postmaster.pid looks alive and the next
        # start() refuses to run; some inits (this machine's) reap orphans only every second or so.
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while not _reaped(pid):
            if time.monotonic() > deadline:
                raise PostgresServerError(self._failure(f"the killed postmaster {pid} lingers"))
            time.sleep(POLL_S)

    def close(self) -> None:
        """Stop the server if it runs, and remove `home` with the cluster; safe to call again."""
        try:
            if self._running:
                self.stop("immediate")
        finally:
            if self.home.exists():
                shutil.rmtree(self.home)

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            self.data_dir,
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "'{}'".format(str(self.home).replace("'", "''")),
            "fsync": "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
        }
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("".join(f"{name} = {value}\n" for name, value in settings.items()))

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", action, "-D", self.data_dir, "-w", "-t", str(SERVER_TIMEOUT_S), *args)

    def _run(self, binary: str, *args: str | Path) -> None:
        """Run a server binary (as the postgres user when root) with its output in the log.

        pg_ctl gets no -l: the server inherits this log file as its output instead, so the log
        can be in a directory that the postgres user cannot enter."""
        command = [str(self._bindir / binary), *map(str, args)]
        with open(self.log_path, "ab") as log:
            try:
                subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.home,
                    timeout=SERVER_TIMEOUT_S + 10,
                    check=True,
                    **self._as_server_user,
                )
            except (OSError, subprocess.SubprocessError) as error:
                what = f"{' '.join(command)}: {_describe(error)}"
                raise PostgresServerError(self._failure(what)) from None

    def _failure(self, what: str) -> str:
        """`what`, then the last lines of the log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except FileNotFoundError:
            lines = ["(no log yet)"]
        return "\n".join([what, f"-- the last lines of {self.log_path}:", *lines])


def _reaped(pid: int) -> bool:
    """Whether process `pid` has exited and been reaped. Reaps it when it is our child: when the
    test runner is PID 1 (of a container), orphans are its children."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_user() -> dict[str, Any]:
    """subprocess.run options that run the server binaries as the postgres OS user when root (it
    refuses to run as root), else none; KeyError when root and there is no such user."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@functools.cache
def _bindir() -> Path | None:
    """The directory of initdb, pg_ctl and postgres: pg_config --bindir, else the newest
    /usr/lib/postgresql/*/bin (Debian's layout, not on PATH), else initdb's on PATH."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(found.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    return next((path for path in candidates if _has_server_binaries(path)), None)


def _version(bindir: Path) -> list[int]:
    """The version in /usr/lib/postgresql/VERSION/bin, as numbers ("9.6" < "15")."""
    return [int(part) if part.isdigit() else -1 for part in bindir.parent.name.split(".")]


def _has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in SERVER_BINARIES)


def _describe(error: OSError | subprocess.SubprocessError) -> str:
    """An error of subprocess.run, on one line, with what the process said when captured."""
    if isinstance(error, subprocess.CalledProcessError):
        said = error.stderr or error.stdout or b""
        return _one_line(f"exit status {error.returncode}: {said.decode(errors='replace')}")
    if isinstance(error, subprocess.TimeoutExpired):
        return f"still running after {error.timeout} s"
    return _one_line(str(error))


def _one_line(text: str) -> str:
    return " ".join(text.split())
