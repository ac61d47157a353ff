"""Keys and files through the real `dialerd` process (SPEC 3, 8): a key with white space or
control characters is a config error named by its key at check, run and reload, never shown; the
daemon's files are its user's and group's whatever the umask; a ledger of a newer schema is
refused untouched."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AGENTS, read_results, result_lines, run_dialerd, wait_for, write_config

from dialerd.ledger import MIGRATIONS, Ledger

KEY = "Zq7x8Kp2Lm9Nb4Vc6Xd1Wf3R"  # no piece of it in a path or a log word
BAD_KEY_FILES = {
    "two lines": f"{KEY}\nsecond-line\n",
    "a tab inside": f"{KEY[:5]}\t{KEY[5:]}\n",
    "a leading blank line": f"\n{KEY}\n",
    "a trailing blank line": f"{KEY}\n\n",
}


def key_config(tmp_path: Path, key_file: Path, endpoints: dict | None = None, **top) -> Path:
    api = {"key_file": str(key_file), "timeout_s": 5}
    if endpoints is not None:
        api["endpoints"] = endpoints
    return write_config(tmp_path, AGENTS, api=api, default_agent="agent-a", **top)


def assert_no_part_of_the_key(text: str) -> None:
    pieces = [KEY[i : i + 4] for i in range(len(KEY) - 3)]
    assert not [piece for piece in pieces if piece in text], text
    assert "second-line" not in text


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The umask the daemon started in this block inherits."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def drop(spool: Path, name: str, requests: list[dict]) -> None:
    incoming = spool / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    aside = spool / f".{name}"
    aside.write_text("".join(json.dumps(r) + "\n" for r in requests))
    os.rename(aside, incoming / name)


# -- the key -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("content", BAD_KEY_FILES.values(), ids=BAD_KEY_FILES)
def test_a_key_file_with_white_space_is_refused_by_check_and_run(tmp_path, command, content):
    key_file = tmp_path / "vgai-key"
    key_file.write_text(content)
    config = key_config(tmp_path, key_file)

    done = run_dialerd(command, "-c", str(config), timeout=30)

    stderr = done.stderr.decode()
    assert done.returncode == 78, stderr
    assert stderr.startswith(f"dialerd: bad config: api.key_file: {key_file} holds a "), stderr
    assert "line break" in stderr or "tab" in stderr
    assert_no_part_of_the_key(stderr + done.stdout.decode())
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_a_key_in_the_environment_with_a_line_break_is_refused(tmp_path):
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALERD_", "VGAI_"))}

    done = run_dialerd("check", "-c", str(config), env={**env, "VGAI_KEY": f"{KEY}\n"})

    stderr = done.stderr.decode()
    assert done.returncode == 78, stderr
    assert stderr.startswith("dialerd: bad config: api.key_env: the environment variable VGAI_KEY")
    assert "line break" in stderr
    assert_no_part_of_the_key(stderr)


def test_a_key_file_with_one_trailing_newline_sends(tmp_path, simulator):
    sim = simulator()
    key_file = tmp_path / "vgai-key"
    key_file.write_text(f"{KEY}\n")
    config = key_config(tmp_path, key_file, sim.endpoints())
    assert run_dialerd("check", "-c", str(config)).returncode == 0

    done = run_dialerd("run", "-c", str(config), input=b'{"id": "k1", "to": "447700900001"}\n')

    assert done.returncode == 0, done.stderr.decode()
    [result] = result_lines(done.stdout)
    assert (result["id"], result["outcome"]) == ("k1", "dialed")
    assert_no_part_of_the_key(done.stderr.decode())


def test_a_bad_key_file_on_reload_is_refused_and_the_old_key_sends_on(tmp_path, simulator, daemons):
    sim = simulator()
    key_file = tmp_path / "vgai-key"
    key_file.write_text(f"{KEY}\n")
    spool = tmp_path / "spool"
    config = key_config(tmp_path, key_file, sim.endpoints(), spool={"dir": str(spool)})
    results = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    drop(spool, "one.jsonl", [{"id": "before", "to": "447700900011"}])
    wait_for(lambda: len(read_results(results)) == 1, 10, "the first request to be dialed")

    key_file.write_text(f"{KEY}\nsecond-line\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.stderr, 10, "the reload to be refused")
    drop(spool, "two.jsonl", [{"id": "after", "to": "447700900012"}])
    wait_for(lambda: len(read_results(results)) == 2, 10, "the second request to be dialed")
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    refused = next(line for line in daemon.stderr.splitlines() if "reload refused" in line)
    assert f"api.key_file: {key_file} holds a line break" in refused
    assert_no_part_of_the_key(daemon.stderr)
    assert [(r["id"], r["outcome"]) for r in read_results(results)] == [
        ("before", "dialed"), ("after", "dialed"),
    ]  # fmt: skip
    assert sorted(a["to"] for a in sim.arrivals() if a["placed"]) == [
        "447700900011",
        "447700900012",
    ]


# -- the modes of the daemon's files ---------------------------------------------------------------

DAEMON_FILES = (
    "results.jsonl", "ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm", "dialerd.lock",
)  # fmt: skip


def modes(state: Path) -> dict[str, int]:
    return {name: stat.S_IMODE((state / name).stat().st_mode) for name in DAEMON_FILES}


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_the_daemons_files_are_made_0640_whatever_the_umask(tmp_path, simulator, daemons, mask):
    sim = simulator()
    spool = tmp_path / "spool"
    config = write_config(
        tmp_path,
        AGENTS,
        api={"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": sim.endpoints()},
        default_agent="agent-a",
        spool={"dir": str(spool)},
    )
    state = tmp_path / "state"
    with umask(mask):
        daemon = daemons("-c", str(config))
    daemon.wait_running()
    drop(spool, "one.jsonl", [{"id": "m1", "to": "447700900021"}])
    wait_for(lambda: read_results(state / "results.jsonl"), 10, "the result line")

    made = modes(state)  # the -wal and -shm exist while the daemon runs
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    assert made == dict.fromkeys(DAEMON_FILES, 0o640), {k: f"{v:04o}" for k, v in made.items()}


def test_files_an_earlier_dialerd_made_0644_are_tightened_at_start(tmp_path, simulator, daemons):
    sim = simulator()
    state = tmp_path / "state"
    ledger = Ledger(state)
    ledger.open()
    ledger.close()
    (state / "results.jsonl").write_text("")
    for name in ("results.jsonl", "ledger.sqlite3", "dialerd.lock"):
        (state / name).chmod(0o644)
    (state / "results.jsonl").chmod(0o666)
    config = write_config(
        tmp_path,
        AGENTS,
        api={"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": sim.endpoints()},
        spool={"dir": str(tmp_path / "spool")},
    )

    daemon = daemons("-c", str(config))
    daemon.wait_running()
    made = {name: stat.S_IMODE((state / name).stat().st_mode) for name in DAEMON_FILES}
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    assert made == dict.fromkeys(DAEMON_FILES, 0o640), {k: f"{v:04o}" for k, v in made.items()}
    tightened = [json.loads(line) for line in daemon.stderr.splitlines() if "tightened" in line]
    assert sorted((t["file"], t["was"]) for t in tightened) == [
        (str(state / "dialerd.lock"), "0644"),
        (str(state / "ledger.sqlite3"), "0644"),
        (str(state / "results.jsonl"), "0666"),
    ]


def test_a_mode_narrower_than_0640_is_left_alone(tmp_path):
    state = tmp_path / "state"
    ledger = Ledger(state)
    ledger.open()
    ledger.close()
    (state / "ledger.sqlite3").chmod(0o600)
    ledger.open()
    ledger.close()
    assert stat.S_IMODE((state / "ledger.sqlite3").stat().st_mode) == 0o600


# -- a ledger of a newer schema ------------------------------------------------------------------


@pytest.fixture
def newer_ledger(tmp_path: Path) -> tuple[Path, Path, str]:
    """A config, and its ledger as a newer dialerd would leave it (user_version 99); its digest."""
    state = tmp_path / "state"
    ledger = Ledger(state)
    ledger.open()
    ledger.close()
    conn = sqlite3.connect(state / "ledger.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    path = state / "ledger.sqlite3"
    return write_config(tmp_path), path, hashlib.sha256(path.read_bytes()).hexdigest()


def newer_message(path: Path) -> str:
    return (
        f"the ledger {path} has schema version 99, newer than this dialerd knows "
        f"({len(MIGRATIONS)}): run the dialerd that wrote it, or a newer one"
    )


def test_run_refuses_a_ledger_of_a_newer_schema_and_leaves_it_untouched(newer_ledger):
    config, path, digest = newer_ledger

    done = run_dialerd("run", "-c", str(config), timeout=30)

    assert done.returncode == 73, done.stderr.decode()
    assert done.stderr.decode() == f"dialerd: cannot run: {newer_message(path)}\n"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1  # the one of the fixture
    conn.close()


@pytest.mark.parametrize(
    ("command", "code", "verb"),
    [
        (("status",), 65, "read"),
        (("report",), 65, "read"),
        (("requeue", "--in-doubt"), 73, "requeue"),
    ],
)
def test_status_report_and_requeue_refuse_a_newer_ledger_in_one_sentence(
    newer_ledger, command, code, verb
):
    config, path, digest = newer_ledger

    done = run_dialerd(*command, "-c", str(config))

    assert done.returncode == code, done.stderr.decode()
    assert done.stderr.decode() == f"dialerd: cannot {verb}: {newer_message(path)}\n"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
