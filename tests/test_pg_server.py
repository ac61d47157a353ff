"""The PostgreSQL helpers of the tests (tests/pg_server.py): the shared server, one fresh schema
per test on it, and the throwaway server that tests stop, kill and restart."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pg_server import (
    PostgresServerError,
    ThrowawayPostgres,
    fresh_schema,
    shared_server_dsn,
    skip_or_fail,
    unreachable_reason,
)
from psycopg.conninfo import make_conninfo


@pytest.fixture
def shared_dsn() -> str:
    dsn = shared_server_dsn()
    reason = unreachable_reason(dsn)
    if reason:
        skip_or_fail(reason)
    return dsn


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThrowawayPostgres]:
    """A throwaway server, made but not started."""
    reason = ThrowawayPostgres.available()
    if reason:
        skip_or_fail(reason)
    server = ThrowawayPostgres(tmp_path)
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def query(dsn: str, statement: str, *params: object) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        return conn.execute(statement, params or None).fetchall()


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        for statement in statements:
            conn.execute(statement)


def schema_exists(dsn: str, schema: str) -> bool:
    return bool(query(dsn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", schema))


# -- the shared server ---------------------------------------------------------------------


def test_the_shared_server_answers(shared_dsn):
    assert query(shared_dsn, "SELECT 1") == [(1,)]


def test_the_shared_dsn_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DIALERD_TEST_PG", raising=False)
    assert shared_server_dsn() == "postgresql://postgres@127.0.0.1:5432/test"
    monkeypatch.setenv("DIALERD_TEST_PG", "postgresql://someone@127.0.0.1:6543/other")
    assert shared_server_dsn() == "postgresql://someone@127.0.0.1:6543/other"


def test_a_port_nobody_listens_on_is_unreachable_with_a_reason():
    port = free_port()
    reason = unreachable_reason(f"postgresql://postgres:secret-pw@127.0.0.1:{port}/test")
    assert reason is not None
    assert f"port={port}" in reason and "unreachable" in reason
    assert "secret-pw" not in reason and "\n" not in reason


def test_an_invalid_dsn_is_a_reason_and_is_not_shown():
    reason = unreachable_reason("host=127.0.0.1 password=secret-pw nonsense")
    assert reason is not None and "secret-pw" not in reason


@pytest.mark.parametrize(
    "ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_no_server_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="the reason"):
        skip_or_fail("the reason")


# -- fresh_schema -------------------------------------------------------------------------


def test_fresh_schemas_are_apart_and_dropped_after(shared_dsn):
    with fresh_schema(shared_dsn) as one, fresh_schema(shared_dsn) as other:
        [(schema_one,)] = query(one, "SELECT current_schema()")
        [(schema_other,)] = query(other, "SELECT current_schema()")
        assert schema_one.startswith("t_") and schema_one != schema_other
        execute(one, "CREATE TABLE calls (id int)")
        assert query(one, "SELECT to_regclass('calls') IS NOT NULL") == [(True,)]
        assert query(other, "SELECT to_regclass('calls') IS NOT NULL") == [(False,)]
    assert not schema_exists(shared_dsn, schema_one)
    assert not schema_exists(shared_dsn, schema_other)


def test_a_fresh_schema_is_dropped_when_the_block_raises(shared_dsn):
    with pytest.raises(RuntimeError, match="the test failed"), fresh_schema(shared_dsn) as dsn:
        [(schema,)] = query(dsn, "SELECT current_schema()")
        execute(dsn, "CREATE TABLE calls (id int)")
        raise RuntimeError("the test failed")
    assert not schema_exists(shared_dsn, schema)


def test_a_fresh_schema_keeps_the_dsn_parameters_and_options(shared_dsn):
    dsn = make_conninfo(
        shared_dsn, application_name="pg server test", options="-c statement_timeout=4321"
    )
    with fresh_schema(dsn) as inside:
        [(name, timeout, schema)] = query(
            inside,
            "SELECT current_setting('application_name'), current_setting('statement_timeout'),"
            " current_schema()",
        )
    assert (name, timeout) == ("pg server test", "4321ms")
    assert schema.startswith("t_")


# -- ThrowawayPostgres -------------------------------------------------------------------


def test_a_throwaway_server_starts_on_127_0_0_1_and_its_own_socket(server):
    server.start()
    settings = query(
        server.dsn,
        "SELECT name, setting FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
        ["fsync", "listen_addresses", "max_connections", "port", "shared_buffers"],
    )
    assert dict(settings) == {
        "fsync": "off",
        "listen_addresses": "127.0.0.1",
        "max_connections": "100",
        "port": str(server.port),
        "shared_buffers": "4096",  # in 8 kB pages: 32MB
    }
    by_socket = make_conninfo(host=str(server.home), port=server.port, user="postgres")
    assert query(by_socket, "SELECT current_user") == [("postgres",)]
    assert (server.home / f".s.PGSQL.{server.port}").is_socket()


def test_a_restart_keeps_the_data_and_the_port(server):
    server.start()
    port = server.port
    execute(server.dsn, "CREATE TABLE calls (id int)", "INSERT INTO calls VALUES (1)")
    server.stop()
    assert unreachable_reason(server.dsn) is not None
    server.start()
    server.restart(mode="immediate")
    assert server.port == port
    assert query(server.dsn, "SELECT id FROM calls") == [(1,)]


def test_a_killed_server_recovers_on_start(server):
    server.start()
    execute(server.dsn, "CREATE TABLE calls (id int)", "INSERT INTO calls VALUES (1)")
    server.kill()
    assert unreachable_reason(server.dsn) is not None
    server.start()
    assert query(server.dsn, "SELECT id FROM calls") == [(1,)]
    assert "database system was not properly shut down" in server.log_path.read_text()


def test_close_removes_the_cluster_and_may_be_called_again(server):
    server.start()
    assert (server.data_dir / "PG_VERSION").exists()
    server.close()
    assert not server.home.exists()
    assert unreachable_reason(server.dsn) is not None
    server.close()


def test_a_server_that_cannot_start_says_why_with_its_log(server):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        with pytest.raises(PostgresServerError, match="could not create any TCP/IP sockets"):
            server.start()


def test_kill_and_stop_need_a_running_server(server):
    with pytest.raises(PostgresServerError, match="not running"):
        server.kill()
    with pytest.raises(PostgresServerError, match="not running"):
        server.stop()
