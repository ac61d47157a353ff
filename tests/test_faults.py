"""Resource faults, through the real `dialerd run` process and `dialerd simulate` servers
(SPEC §5, §8): a state_dir that cannot be written at start, a full disk while running, the spool
directory removed, and the API unreachable for a while.

What each fault may cost, and nothing more: a clear error in the log (or, at start, one sentence
on stderr and exit 73), and time. The daemon stays up, nothing is corrupted, work resumes once the
fault clears, every request gets exactly one result and no call is placed twice.

A full disk comes two ways: a small tmpfs mounted by the test and filled up (where mount is
permitted: root), and a file size limit (RLIMIT_FSIZE 0) put on the running daemon, under which
no write of its to any regular file goes through (EFBIG), which works anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, dialerd, run_dialerd, sim_config, wait_for

EX_CANTCREAT = 73
EX_CONFIG = 78
PICKUP_S = 3.0  # a file renamed into incoming/ is taken within this
RECOVERY_S = 20.0  # the ledger retries a storage fault at least every 5 s
LEDGER_FAULT = "the ledger cannot write"


# -- helpers ------------------------------------------------------------------------------------


def request(id_: str, number: int, **fields: Any) -> dict:
    return {"id": id_, "to": f"447700900{number:03d}", **fields}


def jsonl(lines: list[dict | str]) -> str:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def write_aside(spool: Path, name: str, text: str) -> Path:
    """A finished file on the spool's filesystem, outside incoming/, ready to be renamed in."""
    spool.mkdir(parents=True, exist_ok=True)
    aside = spool / f"writing-{name}"
    aside.write_text(text)
    return aside


def drop(spool: Path, name: str, text: str) -> Path:
    """Write aside on the same filesystem, then rename into incoming/ as a writer must."""
    aside = write_aside(spool, name, text)
    (spool / "incoming").mkdir(parents=True, exist_ok=True)
    os.rename(aside, spool / "incoming" / name)
    return spool / "incoming" / name


def wait_taken(spool: Path, name: str, where: str = "done", timeout: float = PICKUP_S) -> None:
    wait_for(
        lambda: (spool / where / name).exists() and not (spool / "incoming" / name).exists(),
        timeout,
        f"{name} to move from incoming/ to {where}/",
    )


def complete_results(path: Path) -> list[dict]:
    """The whole lines of a results file so far (one may be half written at this moment, or
    written in part on a full disk before it is cut back): judged by whole_lines at the end."""
    if not path.exists():
        return []
    results = []
    for text in path.read_text().split("\n")[:-1]:
        with contextlib.suppress(ValueError):
            results.append(json.loads(text))
    return results


def wait_results(path: Path, count: int, timeout: float) -> list[dict]:
    return wait_for(
        lambda: len(r := complete_results(path)) >= count and r,
        timeout,
        f"{count} results in {path}",
    )


def log_events(stderr: str) -> list[dict]:
    """The daemon's JSON log lines (anything else on stderr is skipped)."""
    events = []
    for text in stderr.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(text)
            if isinstance(event, dict) and "event" in event:
                events.append(event)
    return events


def whole_lines(path: Path) -> list[dict]:
    """Every line of a results file, each of which must be a whole JSON object."""
    text = path.read_text()
    assert text.endswith("\n"), f"the results file ends in a torn line: {text[-300:]!r}"
    results = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            results.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"results line {number} is torn: {line!r}") from None
    return results


def integrity(ledger: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def ledger_rows(ledger: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def status_json(config: Path) -> dict:
    status = run_dialerd("status", "-c", str(config), "--json", timeout=20)
    assert status.returncode == 0, status.stderr.decode()
    return json.loads(status.stdout)


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


class Tmpfs:
    """A tmpfs of its own at `root`, made full by a filler file that takes every free page."""

    def __init__(self, root: Path, size: str = "8m"):
        root.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(root)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if mounted.returncode:
            raise OSError(f"mount is not permitted here: {mounted.stderr.strip()}")
        self.root = root
        self._filler = root / "filler"

    def fill(self) -> None:
        """Take every free byte (again: the daemon may have freed some meanwhile)."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
                for _ in range(100_000):  # bounded; a full tmpfs says ENOSPC long before
                    try:
                        os.write(fd, chunk)
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        assert shutil.disk_usage(self.root).free < 4096, shutil.disk_usage(self.root)

    def attach(self, pid: int) -> None:
        pass  # the whole filesystem is full, whoever writes to it

    def hold(self, seconds: float) -> None:
        """Keep it full for `seconds`: space the daemon frees (a cut-back write) is taken too."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.fill()
            time.sleep(0.1)

    def lift(self) -> None:
        self._filler.unlink()

    def close(self) -> None:
        for command in (["umount", str(self.root)], ["umount", "-l", str(self.root)]):
            if subprocess.run(command, capture_output=True, timeout=20).returncode == 0:
                return


class FileSizeLimit:
    """RLIMIT_FSIZE 0 on the daemon: every write to a regular file fails (EFBIG), as on a full
    disk; its stderr must then be a pipe (see PipedDaemon)."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._pid: int | None = None
        self._before: tuple[int, int] | None = None

    def attach(self, pid: int) -> None:
        self._pid = pid

    def fill(self) -> None:
        self._before = resource.prlimit(self._pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self._pid, resource.RLIMIT_FSIZE, (0, self._before[1]))

    def hold(self, seconds: float) -> None:
        time.sleep(seconds)

    def lift(self) -> None:
        resource.prlimit(self._pid, resource.RLIMIT_FSIZE, self._before)

    def close(self) -> None:
        pass


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class PipedDaemon(Daemon):
    """`dialerd run` (stdin /dev/null) with its stderr copied through a pipe to a file by this
    process: a file size limit on the daemon would stop its own writes to a file."""

    def __init__(self, directory: Path, *args: str):
        stamp = time.monotonic_ns()
        self.stdout_path = directory / f"dialerd-{stamp}.stdout"
        self.stderr_path = directory / f"dialerd-{stamp}.stderr"
        self.stdout_path.touch()
        self.stderr_path.touch()
        self.proc = dialerd(
            "run",
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_ignore_sigxfsz,
        )
        self._copier = threading.Thread(target=self._copy, daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        with open(self.stderr_path, "ab") as out:
            for text in self.proc.stderr:
                out.write(text)
                out.flush()

    def kill(self) -> None:
        super().kill()
        self._copier.join(timeout=5)


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[Callable[..., PipedDaemon]]:
    started: list[PipedDaemon] = []

    def start(*args: str) -> PipedDaemon:
        daemon = PipedDaemon(tmp_path, *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture(params=["tmpfs", "fsize"])
def disk(request, tmp_path: Path) -> Iterator[Tmpfs | FileSizeLimit]:
    """A place for state_dir and spool, and a way to make it full: fill(), lift()."""
    root = tmp_path / "disk"
    if request.param == "fsize":
        yield FileSizeLimit(root)
        return
    if not can_mount():
        pytest.skip("a tmpfs needs mount (root); the fsize variant stands in")
    try:
        fault = Tmpfs(root)
    except OSError as error:
        pytest.skip(str(error))
    try:
        yield fault
    finally:
        fault.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A 1 MiB tmpfs for one thing alone (the spool, the results file); state_dir is elsewhere."""
    if not can_mount():
        pytest.skip("a disk of its own needs mount (root)")
    try:
        fault = Tmpfs(tmp_path / "spool-disk", size="1m")
    except OSError as error:
        pytest.skip(str(error))
    try:
        yield fault
    finally:
        fault.close()


@pytest.fixture
def unwritable() -> Iterator[Callable[[Path], None]]:
    """Make a path unwritable: chattr +i as root (modes do not stop root), else by its mode.
    Undone at the end, so that tmp_path can be cleaned up."""
    undo: list[Callable[[], Any]] = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            mode = path.stat().st_mode
            path.chmod(0o555 if path.is_dir() else 0o444)
            undo.append(lambda: path.chmod(mode))
            return
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("chattr is needed to make a path unwritable for root")
        done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
        undo.append(lambda: subprocess.run([chattr, "-i", str(path)], capture_output=True))

    yield make
    for step in reversed(undo):
        step()


# -- 1. state_dir unwritable at start -----------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "under a regular file",
        "directory unwritable, ledger from an earlier run",
        "ledger read-only",
    ],
)
def test_an_unwritable_state_dir_stops_the_start_with_one_sentence(
    tmp_path, simulator, unwritable, case
):
    sim = simulator()
    if case == "under a regular file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a directory\n")
        state = blocker / "state"
    else:
        state = tmp_path / "state"
    config = sim_config(tmp_path, sim, state_dir=str(state))
    if case != "under a regular file":
        earlier = run_dialerd("run", "-c", str(config), input=b"", timeout=30)
        assert earlier.returncode == 0, earlier.stderr.decode()
        assert (state / "ledger.sqlite3").exists()
        unwritable(state if case.startswith("directory") else state / "ledger.sqlite3")

    run = run_dialerd(
        "run", "-c", str(config), input=json.dumps(request("u1", 101)).encode(), timeout=30
    )

    message = run.stderr.decode()
    if case == "ledger read-only":
        assert run.returncode == EX_CANTCREAT, message
    else:  # what `check` checks too: the config's fault, by key, which no restart mends
        assert run.returncode == EX_CONFIG, message
        assert message.startswith("dialerd: bad config: state_dir: "), message
    assert "Traceback" not in message, message
    assert len(message.strip().splitlines()) == 1, message
    assert message.startswith("dialerd: ") and str(state) in message, message
    assert run.stdout == b""
    assert sim.arrivals() == []  # nothing was sent
    if case == "under a regular file":
        assert blocker.read_text() == "a file, not a directory\n"


# -- 2. the disk full while running -------------------------------------------------------------


def test_a_full_disk_holds_work_back_and_loses_nothing(tmp_path, disk, simulator, piped):
    sim = simulator("--latency", "0.2-0.4")  # slow answers: sends are in flight at the fault
    state, spool = disk.root / "state", disk.root / "spool"
    config = sim_config(tmp_path, sim, state_dir=str(state), spool={"dir": str(spool)})
    results_file = state / "results.jsonl"
    daemon = piped("-c", str(config))
    daemon.wait_running()
    disk.attach(daemon.proc.pid)
    before = [
        request(f"before-{n}", 100 + n, agent_id=("agent-a", "agent-b")[n % 2]) for n in range(12)
    ]
    during = [request(f"during-{n}", 200 + n, meta={"n": n}) for n in range(4)]
    during_text = jsonl([during[0], during[1], '{"to": ', during[2], during[3]])
    aside = write_aside(spool, "during.jsonl", during_text)  # while there is room to write it

    drop(spool, "before.jsonl", jsonl(before))
    wait_for(lambda: len(sim.arrivals()) >= 3, 10, "the first sends")
    disk.fill()
    os.rename(aside, spool / "incoming" / "during.jsonl")
    wait_for(lambda: LEDGER_FAULT in daemon.stderr, 10, "the ledger's error in the log")
    disk.hold(1.0)  # sends marked before the fault go out and are answered
    placed_in_fault = sim.placed()
    disk.hold(2.0)

    assert daemon.proc.poll() is None, daemon.stderr
    assert sim.placed() == placed_in_fault, "a send went out that the ledger could not record"
    assert sum(placed_in_fault.values()) < len(before), "the fault came too late to hold work"
    assert (spool / "incoming" / "during.jsonl").exists(), "left incoming/ before it was recorded"
    fault = next(e for e in log_events(daemon.stderr) if e["event"].startswith(LEDGER_FAULT))
    assert fault["level"] == "error" and fault["error"], fault
    assert fault["ledger"] == str(state / "ledger.sqlite3"), fault

    disk.lift()
    wait_results(results_file, len(before) + len(during) + 1, RECOVERY_S)
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    assert "Traceback" not in daemon.stderr, daemon.stderr
    assert integrity(state / "ledger.sqlite3") == ["ok"]
    results = whole_lines(results_file)
    assert len(results) == len(before) + len(during) + 1, results
    by_id = {result["id"]: result for result in results}
    good = before + during
    assert set(by_id) == {r["id"] for r in good} | {None}, "one result per request"
    for item in good:
        result = by_id[item["id"]]
        assert (result["outcome"], result["attempts"], result["http_status"]) == (
            "dialed", 1, 200,
        ), result  # fmt: skip
        assert result["to"] == item["to"]
    invalid = by_id[None]
    assert (invalid["outcome"], invalid["source"]) == ("invalid", "spool:during.jsonl:3")
    assert sim.placed() == Counter(r["to"] for r in good), "each placed exactly once"
    assert sorted(os.listdir(spool / "done")) == [
        "before.jsonl", "during.jsonl", "during.jsonl.errors",
    ]  # fmt: skip
    assert "during.jsonl:3" in (spool / "done" / "during.jsonl.errors").read_text()
    assert os.listdir(spool / "incoming") == []
    status = status_json(config)
    assert status["outcomes"] == {"dialed": len(good), "invalid": 1}, status
    assert status["results_unwritten"] == 0 and status["agents"] == {}, status


def test_a_full_results_disk_keeps_lines_in_the_ledger_until_there_is_room(
    tmp_path, small_tmpfs, simulator, daemons
):
    """The results file alone on a full disk: lines wait in the ledger, none is torn or lost."""
    sim = simulator()
    spool = tmp_path / "spool"
    results_file = small_tmpfs.root / "results.jsonl"
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)}, results=str(results_file))
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    drop(spool, "first.json", json.dumps(request("first", 300)))
    wait_results(results_file, 1, 10)
    small_tmpfs.fill()  # the results file's last page still has room for a line or so
    batch = [
        request(f"r-{n}", 301 + n, agent_id=("agent-a", "agent-b")[n % 2], meta={"pad": "x" * 200})
        for n in range(20)
    ]

    drop(spool, "batch.jsonl", jsonl(batch))
    wait_for(lambda: sum(sim.placed().values()) == 21, 15, "every send")
    wait_for(lambda: "cannot write results" in daemon.stderr, 10, "the results error in the log")
    small_tmpfs.hold(1.0)
    unwritten = status_json(config)["results_unwritten"]

    assert daemon.proc.poll() is None, daemon.stderr
    assert unwritten > 0, "every line was written though the disk was full"
    assert len(complete_results(results_file)) < 21

    small_tmpfs.lift()
    wait_results(results_file, 21, 10)
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    results = whole_lines(results_file)
    assert sorted(r["id"] for r in results) == sorted(["first", *(r["id"] for r in batch)])
    assert {(r["outcome"], r["attempts"]) for r in results} == {("dialed", 1)}
    assert sim.placed() == Counter(["447700900300", *(r["to"] for r in batch)])
    assert status_json(config)["results_unwritten"] == 0


# -- the spool's own disk full ------------------------------------------------------------------


def test_a_full_spool_disk_keeps_the_errors_note_of_a_file(
    tmp_path, small_tmpfs, simulator, daemons
):
    """Recorded, but NAME.errors cannot be written: the file waits, and the note is not lost."""
    sim = simulator()
    spool = small_tmpfs.root / "spool"
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)})
    results_file = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    mixed = jsonl([request("m1", 401), "not JSON", request("m3", 403)])
    aside = write_aside(spool, "mixed.jsonl", mixed)
    small_tmpfs.fill()

    os.rename(aside, spool / "incoming" / "mixed.jsonl")
    wait_results(results_file, 3, 10)  # recorded in the ledger, which has room
    wait_for(lambda: "cannot use the spool" in daemon.stderr, 5, "the spool's error in the log")
    time.sleep(1.5)  # a rescan or two while the disk is still full
    assert daemon.proc.poll() is None, daemon.stderr
    small_tmpfs.lift()
    wait_for(lambda: not (spool / "incoming" / "mixed.jsonl").exists(), 5, "the file to leave")
    time.sleep(1.5)  # room for a wrong second take
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    done = {name: (spool / "done" / name).read_text() for name in os.listdir(spool / "done")}
    assert sorted(done) == ["mixed.jsonl", "mixed.jsonl.errors"], done
    assert "mixed.jsonl:2" in done["mixed.jsonl.errors"], done
    results = whole_lines(results_file)
    assert sorted((r["source"], r["outcome"]) for r in results) == [
        ("spool:mixed.jsonl:1", "dialed"), ("spool:mixed.jsonl:2", "invalid"),
        ("spool:mixed.jsonl:3", "dialed"),
    ]  # fmt: skip
    assert sim.placed() == Counter({"447700900401": 1, "447700900403": 1})


def test_a_full_spool_disk_does_not_stop_the_daemon_on_an_unreadable_file(
    tmp_path, small_tmpfs, simulator, daemons
):
    """A file to reject, and rejected/NAME.error cannot be written: it waits in incoming/."""
    sim = simulator()
    spool = small_tmpfs.root / "spool"
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)})
    results_file = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    aside = write_aside(spool, "garbage.txt", "this is not JSON\n")
    small_tmpfs.fill()

    os.rename(aside, spool / "incoming" / "garbage.txt")
    time.sleep(1.5)  # a take or two while the disk is full
    alive = daemon.proc.poll() is None
    small_tmpfs.lift()
    if alive:
        wait_taken(spool, "garbage.txt", "rejected")
        drop(spool, "after.json", json.dumps(request("after", 501)))
        wait_results(results_file, 1, 10)

    assert alive, f"the daemon stopped ({daemon.proc.returncode}): {daemon.stderr[-2000:]}"
    code, _ = daemon.stop()
    assert code == 0, daemon.stderr
    assert (spool / "rejected" / "garbage.txt.error").read_text().strip()
    assert [r["id"] for r in whole_lines(results_file)] == ["after"]
    assert sim.placed() == Counter({"447700900501": 1})


# -- 3. the spool directory removed -------------------------------------------------------------


def remove_tree(path: Path) -> None:
    """rmtree, again if the daemon made a directory in it meanwhile (bounded)."""
    for _ in range(20):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"could not remove {path}")


def replace_with_file(path: Path) -> None:
    """A regular file where the directory `path` was (the daemon may make it again meanwhile)."""
    aside = path.with_name(f"{path.name}.file")
    for _ in range(20):
        aside.write_text("not a directory\n")
        remove_tree(path)
        try:
            os.rename(aside, path)  # fails if the daemon made the directory again meanwhile
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"could not put a file in place of {path}")


def spool_dirs_exist(spool: Path) -> bool:
    return all((spool / name).is_dir() for name in ("incoming", "done", "rejected"))


def test_a_removed_spool_is_made_again_and_taken_from(tmp_path, simulator, daemons):
    sim = simulator()
    spool = tmp_path / "spool"
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)})
    results_file = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    drop(spool, "first.json", json.dumps(request("first", 601)))
    wait_taken(spool, "first.json")
    logged_before = len(daemon.stderr)

    remove_tree(spool)
    wait_for(lambda: spool_dirs_exist(spool), 5, "the spool directories to be made again")
    wait_for(lambda: str(spool) in daemon.stderr[logged_before:], 5, "the removal in the log")
    drop(spool, "second.json", json.dumps(request("second", 602)))
    wait_taken(spool, "second.json")
    wait_results(results_file, 2, 10)

    # The spool's path taken by a file: an error, once; the daemon waits until it is gone.
    logged_before = len(daemon.stderr)
    replace_with_file(spool)
    wait_for(lambda: "cannot use the spool" in daemon.stderr[logged_before:], 5, "the error")
    time.sleep(1.5)
    assert daemon.proc.poll() is None, daemon.stderr
    errors = [
        e for e in log_events(daemon.stderr[logged_before:]) if e["event"].startswith("cannot use")
    ]
    # Logged as each new error comes, not once per scan (a race with the daemon's own mkdir may
    # give one more error first: the spool briefly missing as the file was put in its place).
    assert 1 <= len(errors) <= 2 and {e["level"] for e in errors} == {"error"}, errors
    assert len({e["error"] for e in errors}) == len(errors), errors
    spool.unlink()
    wait_for(lambda: spool_dirs_exist(spool), 5, "the spool directories to be made again")
    drop(spool, "third.json", json.dumps(request("third", 603)))
    wait_taken(spool, "third.json")
    wait_results(results_file, 3, 10)
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    assert "the spool can be used again" in daemon.stderr[logged_before:]
    assert "Traceback" not in daemon.stderr
    results = whole_lines(results_file)
    assert sorted((r["id"], r["outcome"], r["attempts"]) for r in results) == [
        ("first", "dialed", 1), ("second", "dialed", 1), ("third", "dialed", 1),
    ]  # fmt: skip
    assert sim.placed() == Counter(["447700900601", "447700900602", "447700900603"])


# -- 4. the API unreachable for a while ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_api_is_waited_out_without_spending_retries(tmp_path, simulator, daemons):
    port = free_port()
    first = simulator("--port", str(port))  # the later --port wins over the helper's 0
    assert first.url.endswith(f":{port}"), first.url
    spool = tmp_path / "spool"
    config = sim_config(tmp_path, sim=first, spool={"dir": str(spool)})
    results_file = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    drop(spool, "warm.json", json.dumps(request("warm", 700)))
    wait_results(results_file, 1, 10)
    outage = [request(f"o-{n}", 701 + n, agent_id=("agent-a", "agent-b")[n % 2]) for n in range(6)]

    first.stop()
    drop(spool, "outage.jsonl", jsonl(outage))
    wait_taken(spool, "outage.jsonl")
    time.sleep(5.0)  # the outage
    refused = [
        e
        for e in log_events(daemon.stderr)
        if e["event"] == "send" and e.get("verdict") == "retry" and e.get("http_status") is None
    ]
    results_in_outage = complete_results(results_file)
    second = simulator("--port", str(port))
    wait_results(results_file, 1 + len(outage), 45)  # backoff capped at 60 s, with full jitter
    code, _ = daemon.stop()

    assert [r["id"] for r in results_in_outage] == ["warm"], "a result came during the outage"
    assert {e["agent"] for e in refused} == {"agent-a", "agent-b"}, refused
    assert all(e["error"].startswith("not sent") for e in refused), refused
    assert code == 0, daemon.stderr
    results = whole_lines(results_file)
    assert sorted((r["id"], r["outcome"], r["attempts"]) for r in results) == sorted(
        [("warm", "dialed", 1), *((r["id"], "dialed", 1) for r in outage)]
    )
    assert first.placed() == Counter({"447700900700": 1})
    assert second.placed() == Counter(r["to"] for r in outage), "each placed exactly once"
    retries = dict(
        ledger_rows(tmp_path / "state" / "ledger.sqlite3", "SELECT id, retries FROM requests")
    )
    assert retries == {"warm": 0, **{r["id"]: 0 for r in outage}}, "the outage spent retries"


# -- a stop during a fault ----------------------------------------------------------------------


@pytest.mark.parametrize("freed", [True, False], ids=["freed-while-stopping", "full-throughout"])
def test_sigterm_while_the_disk_is_full_exits_in_time_and_sends_nothing_after(
    tmp_path, disk, simulator, piped, freed
):
    """The lanes wait on the ledger's retries when the stop comes. Freed while the daemon
    stops, a lane whose mark now went through would send: none may. Full throughout, nothing
    can be recorded: the stop still ends in time."""
    shutdown_timeout_s = 4.0
    sim = simulator("--latency", "0.01-0.02")
    state, spool = disk.root / "state", disk.root / "spool"
    config = sim_config(
        tmp_path,
        sim,
        state_dir=str(state),
        spool={"dir": str(spool)},
        shutdown_timeout_s=shutdown_timeout_s,
    )
    daemon = piped("-c", str(config))
    daemon.wait_running()
    disk.attach(daemon.proc.pid)
    drop(spool, "work.jsonl", jsonl([request(f"r-{n}", 400 + n) for n in range(40)]))
    wait_for(lambda: len(sim.arrivals()) >= 3, 10, "the first sends")
    disk.fill()
    wait_for(lambda: LEDGER_FAULT in daemon.stderr, 10, "the ledger's error in the log")
    disk.hold(1.0)

    stop_at = time.time()
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    disk.hold(1.0)
    if freed:
        disk.lift()
    try:
        code = daemon.proc.wait(timeout=shutdown_timeout_s + 5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit after SIGTERM: {daemon.stderr[-3000:]}") from None
    took = time.monotonic() - started

    assert took <= shutdown_timeout_s + 0.5, f"the stop took {took:.1f} s"
    assert code == 0, daemon.stderr
    late = [a for a in sim.arrivals() if a["wall"] > stop_at + 0.1]
    assert late == [], f"{len(late)} sends after the stop began"
    assert "Traceback" not in daemon.stderr, daemon.stderr
    assert integrity(state / "ledger.sqlite3") == ["ok"]
