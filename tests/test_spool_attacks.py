"""Careless and hostile submitters against the real `dialerd run`: names that are not UTF-8,
linked spool directories, links, FIFOs and devices in incoming/, entries swapped while the
daemon takes them; then, in this process, what the spool source does with an entry it cannot
move, a file gone before its move, a name used many times, and files written under dot names.
(The maildrop's permissions between real users: test_spool_users.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import stat
import threading
import time
from collections import Counter
from pathlib import Path

from conftest import read_results, sim_config, wait_for
from test_faults import log_events
from test_request import CONFIG

from dialerd import spool as spool_module
from dialerd import spooldir
from dialerd.ledger import Ledger, read_status
from dialerd.sources import Intake
from dialerd.spool import SpoolSource

SHUTDOWN_TIMEOUT_S = 5.0
RSS_LIMIT_KIB = 200 * 1024  # far below what reading /dev/zero to the 64 MiB limit, or past it,
# would take; the daemon runs in about 60 MiB


def spool_config(tmp_path: Path, sim) -> Path:
    return sim_config(
        tmp_path,
        sim,
        spool={"dir": str(tmp_path / "spool")},
        shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
    )


def line(id_: str, number: int) -> bytes:
    return json.dumps({"id": id_, "to": f"447700900{number:03d}"}).encode() + b"\n"


def drop(spool: Path, name: str | bytes, data: bytes) -> None:
    """Write aside on the spool's file system, then rename into incoming/ as a writer must."""
    aside = spool / f".aside-{time.monotonic_ns()}"
    aside.write_bytes(data)
    target = os.fsencode(spool / "incoming") + b"/" + os.fsencode(name)
    os.rename(aside, target)


def results_by_id(tmp_path: Path, count: int, timeout: float = 20) -> dict[str, dict]:
    results = wait_for(
        lambda: len(r := read_results(tmp_path / "state" / "results.jsonl")) >= count and r,
        timeout,
        f"{count} results",
    )
    return {result["id"]: result for result in results}


def rss_kib(pid: int) -> int:
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1])
    raise AssertionError("no VmRSS")


def started(tmp_path: Path, simulator, daemons):
    sim = simulator()
    config = spool_config(tmp_path, sim)
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    return sim, config, daemon, tmp_path / "spool"


def stopped_in_time(daemon) -> None:
    code, elapsed = daemon.stop(timeout=SHUTDOWN_TIMEOUT_S + 10)
    assert code == 0, daemon.stderr
    assert elapsed < SHUTDOWN_TIMEOUT_S, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in daemon.stderr, daemon.stderr


def test_names_not_utf8_or_with_control_characters_are_rejected_unread(
    tmp_path, simulator, daemons
):
    """The name that stopped the daemon with exit 70 at every start, and its kin."""
    sim, config, daemon, spool = started(tmp_path, simulator, daemons)
    long_name = "l" * (255 - len(".jsonl")) + ".jsonl"  # its note's name would be too long
    drop(spool, "good-1.jsonl", line("good-1", 1))
    drop(spool, b"bad-\xff\xfe.jsonl", line("bad-1", 11))
    drop(spool, b"tab\tname.jsonl", line("bad-2", 12))
    drop(spool, b"new\nline.jsonl", line("bad-3", 13))
    drop(spool, "\u0085next-line.jsonl", line("bad-4", 14))  # a C1 control
    drop(spool, long_name, line("long", 3) + b"not JSON\n")
    drop(spool, "good-2.jsonl", line("good-2", 2))

    results = results_by_id(tmp_path, 4)

    assert {name: r["outcome"] for name, r in results.items()} == {
        "good-1": "dialed", "good-2": "dialed", "long": "dialed", None: "invalid",
    }  # fmt: skip
    assert sim.placed() == Counter(["447700900001", "447700900002", "447700900003"])
    rejected = spool / "rejected"
    escaped = {
        "bad-%FF%FE.jsonl": "not valid UTF-8",
        "tab%09name.jsonl": "control characters",
        "new%0Aline.jsonl": "control characters",
        "%C2%85next-line.jsonl": "control characters",
    }
    assert sorted(os.listdir(rejected)) == sorted([*escaped, *(f"{n}.error" for n in escaped)])
    for name, why in escaped.items():
        assert (rejected / name).read_bytes().startswith(b'{"id": "bad-'), name  # untouched
        note = (rejected / f"{name}.error").read_text()
        assert note.startswith(f"{name}: ") and why in note, note
    done = sorted(os.listdir(spool / "done"))
    assert len(done) == 4 and all(len(name.encode()) <= 255 for name in done), done
    # NAME.errors would be too long a name: the file and its note are shortened alike.
    (long_note,) = (name for name in done if name.endswith(".errors"))
    assert long_note.removesuffix(".errors") in done and long_note.startswith("l" * 200)
    assert "not JSON" in (spool / "done" / long_note).read_text()
    assert os.listdir(spool / "incoming") == []
    assert daemon.proc.poll() is None, daemon.stderr
    stopped_in_time(daemon)

    again = daemons("-c", str(config))  # no crash loop: the next start runs as well
    again.wait_running()
    drop(spool, "good-3.jsonl", line("good-3", 4))
    assert results_by_id(tmp_path, 5)["good-3"]["outcome"] == "dialed"
    stopped_in_time(again)


def state_listing(state: Path) -> set[str]:
    return set(os.listdir(state))


def test_a_linked_spool_directory_is_never_worked_through(tmp_path, simulator, daemons):
    """incoming/ (then done/, then rejected/) replaced by a link to the state directory, as a
    submitter could do when the spool root was theirs to write: nothing of the state directory
    is read or moved, the error is logged once, and intake goes on once the link is gone."""
    sim, config, daemon, spool = started(tmp_path, simulator, daemons)
    state = tmp_path / "state"
    drop(spool, "first.jsonl", line("first", 1))
    results_by_id(tmp_path, 1)
    before = state_listing(state)
    assert {"ledger.sqlite3", "results.jsonl"} <= before

    for count, linked in enumerate(("incoming", "done"), 2):
        real = spool / f"{linked}.real"
        os.rename(spool / linked, real)
        os.symlink(state, spool / linked)
        if linked == "done":  # a file waits, and must not be taken into the state directory
            drop(spool, "done.jsonl", line("done", count))
        wait_for(lambda d=linked: linked_logged(daemon, d) >= 1, 5, f"the linked {linked}/ logged")
        time.sleep(2.5)  # a few scans more, each of which would have worked through the link
        assert linked_logged(daemon, linked) == 1, "logged once, not at every scan"
        os.unlink(spool / linked)
        os.rename(real, spool / linked)
        if linked == "incoming":
            drop(spool, f"{linked}.jsonl", line(linked, count))
        # Scans come one after another: once this file is taken, every scan made while the
        # link was there is over.
        assert results_by_id(tmp_path, count)[linked]["outcome"] == "dialed"

    assert state_listing(state) >= before
    assert {r["outcome"] for r in read_results(state / "results.jsonl")} == {"dialed"}
    assert sorted(os.listdir(spool / "done")) == ["done.jsonl", "first.jsonl", "incoming.jsonl"]
    assert "the spool can be used again" in daemon.stderr
    stopped_in_time(daemon)


def linked_logged(daemon, directory: str) -> int:
    return sum(
        1
        for event in log_events(daemon.stderr)
        if event["event"].startswith("cannot use the spool")
        and f"{directory}/ is a symbolic link" in event.get("error", "")
    )


def test_a_linked_rejected_directory_keeps_bad_files_in_incoming_and_takes_good_ones(
    tmp_path, simulator, daemons
):
    sim, config, daemon, spool = started(tmp_path, simulator, daemons)
    state = tmp_path / "state"
    os.rename(spool / "rejected", spool / "rejected.real")
    os.symlink(state, spool / "rejected")
    # A scan under way when the link came keeps the directory it opened: wait for one after.
    wait_for(lambda: linked_logged(daemon, "rejected") >= 1, 5, "the linked rejected/ logged")
    before = state_listing(state)

    drop(spool, "bad.jsonl", b"not JSON at all\n")
    drop(spool, "good.jsonl", line("good", 1))

    assert results_by_id(tmp_path, 1)["good"]["outcome"] == "dialed"
    wait_for(lambda: "spool entry left in incoming/" in daemon.stderr, 5, "the bad file left")
    assert os.listdir(spool / "incoming") == ["bad.jsonl"]
    assert state_listing(state) == before
    os.unlink(spool / "rejected")
    os.rename(spool / "rejected.real", spool / "rejected")
    wait_for(lambda: (spool / "rejected" / "bad.jsonl").exists(), 5, "the bad file rejected")
    stopped_in_time(daemon)


def special_entries(spool: Path, tmp_path: Path) -> tuple[dict[str, str], socket.socket]:
    """Entries of every kind but a regular file in incoming/; what each is."""
    incoming = spool / "incoming"
    target = tmp_path / "outside.jsonl"  # a file elsewhere, which a link would have read
    target.write_bytes(line("outside", 99))
    os.symlink(target, incoming / "link.jsonl")
    os.symlink("/dev/zero", incoming / "zero.jsonl")
    os.symlink(tmp_path / "state" / "ledger.sqlite3", incoming / "ledger.jsonl")
    os.mkfifo(incoming / "fifo.jsonl")
    os.mkdir(incoming / "dir.jsonl")
    os.mknod(incoming / "null.jsonl", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(incoming / "sock.jsonl"))
    kinds = {
        "link.jsonl": "symbolic link",
        "zero.jsonl": "symbolic link",
        "ledger.jsonl": "symbolic link",
        "fifo.jsonl": "FIFO",
        "dir.jsonl": "directory",
        "null.jsonl": "character device",
        "sock.jsonl": "socket",
    }
    return kinds, server


def test_links_fifos_devices_and_sockets_are_moved_aside_unread(tmp_path, simulator, daemons):
    sim, config, daemon, spool = started(tmp_path, simulator, daemons)
    drop(spool, "before.jsonl", line("before", 1))
    results_by_id(tmp_path, 1)
    kinds, server = special_entries(spool, tmp_path)
    try:
        drop(spool, "after.jsonl", line("after", 2))
        results = results_by_id(tmp_path, 2)
        wait_for(lambda: len(os.listdir(spool / "rejected")) == 2 * len(kinds), 5, "rejects")
    finally:
        server.close()

    assert {r["id"]: r["outcome"] for r in results.values()} == {
        "before": "dialed",
        "after": "dialed",
    }
    assert sim.placed() == Counter(["447700900001", "447700900002"])  # never 447700900099
    rejected = spool / "rejected"
    for name, kind in kinds.items():
        moved = os.lstat(rejected / name)
        assert not stat.S_ISREG(moved.st_mode), name  # the entry itself, not what it links to
        assert kind in (rejected / f"{name}.error").read_text(), name
    assert os.readlink(rejected / "zero.jsonl") == "/dev/zero"
    assert (tmp_path / "outside.jsonl").read_bytes() == line("outside", 99)
    assert (tmp_path / "state" / "ledger.sqlite3").exists()
    assert os.listdir(spool / "incoming") == []
    assert rss_kib(daemon.proc.pid) < RSS_LIMIT_KIB
    stopped_in_time(daemon)


SWAPS = 400  # each a regular file put in place, then a FIFO or a link to /dev/zero over it
SWAP_FOR_S = 4.0


def test_entries_swapped_while_being_taken_never_block_nor_are_read(tmp_path, simulator, daemons):
    """A submitter replacing a file by a FIFO or by a link to /dev/zero over and over, so that
    some swaps fall between the daemon's listing and its reading: intake goes on, the daemon's
    memory stays small, and SIGTERM still ends it in time."""
    sim, config, daemon, spool = started(tmp_path, simulator, daemons)
    incoming = spool / "incoming"
    stop = threading.Event()

    def swap() -> None:
        deadline = time.monotonic() + SWAP_FOR_S
        for index in range(SWAPS):
            if stop.is_set() or time.monotonic() > deadline:
                return
            aside = spool / f".swap-{index}"
            aside.write_bytes(line(f"swap-{index}", 100 + index))
            os.rename(aside, incoming / "swap.jsonl")
            special = spool / f".special-{index}"
            if index % 2:
                os.mkfifo(special)
            else:
                os.symlink("/dev/zero", special)
            os.rename(special, incoming / "swap.jsonl")
            time.sleep(0.005)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for number in range(1, 6):
            drop(spool, f"good-{number}.jsonl", line(f"good-{number}", number))
            time.sleep(0.3)
    finally:
        stop.set()
        swapper.join(timeout=SWAP_FOR_S + 5)

    goods = {f"good-{n}" for n in range(1, 6)}
    wait_for(
        lambda: goods <= {r["id"] for r in read_results(tmp_path / "state" / "results.jsonl")},
        20,
        "every good file's result",
    )
    wait_for(lambda: not os.path.lexists(incoming / "swap.jsonl"), 5, "the last swap taken away")
    assert daemon.proc.poll() is None, daemon.stderr
    assert rss_kib(daemon.proc.pid) < RSS_LIMIT_KIB
    assert all(r["outcome"] == "dialed" for r in read_results(tmp_path / "state" / "results.jsonl"))
    placed = sim.placed()
    assert all(count == 1 for count in placed.values()), placed  # nothing taken twice
    stopped_in_time(daemon)


# -- in this process: the spool source on a real ledger, its file system calls watched -----------


class Scans:
    """Counts the spool's listings of incoming/ (one per scan)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = spool_module.list_incoming

        def counted(dirs):
            self.count += 1
            return real(dirs)

        monkeypatch.setattr(spool_module, "list_incoming", counted)


async def spool_running(spool: Path, state: Path, until, timeout: float = 20) -> Ledger:
    """The real spool source and ledger until `until()` holds; the ledger, closed."""
    ledger = Ledger(state)
    await asyncio.to_thread(ledger.open)
    try:
        intake = Intake(ledger, lambda: CONFIG, lambda _agents: None, lambda: None)
        source = SpoolSource(spool, intake, ledger)
        await source.prepare()
        task = asyncio.create_task(source.run())
        async with asyncio.timeout(timeout):
            while not until():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.01)
        source.stop()
        await task
    finally:
        await asyncio.to_thread(ledger.close)
    return ledger


def in_spool(spool: Path, name: str, data: bytes) -> None:
    aside = spool / f".{name}"
    aside.write_bytes(data)
    os.rename(aside, spool / "incoming" / name)


def make_spool(tmp_path: Path) -> Path:
    spool = tmp_path / "spool"
    for name in ("incoming", "done", "rejected"):
        (spool / name).mkdir(parents=True)
    return spool


async def test_an_entry_that_cannot_be_moved_is_left_once_with_no_note(tmp_path, monkeypatch):
    """A submitter's directory the daemon may not rename (as when it runs as its own user): it
    stays, and no .error note is written for it at every scan."""
    spool = make_spool(tmp_path)
    (spool / "incoming" / "stuck").mkdir()
    real_rename = os.rename

    def refusing(source, target, *args, **kwargs):
        if source == "stuck":
            raise PermissionError(13, "Permission denied")
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(spooldir.os, "rename", refusing)
    scans = Scans(monkeypatch)
    monkeypatch.setattr(spool_module, "SPOOL_RESCAN_S", 0.05)
    await spool_running(spool, tmp_path / "state", lambda: scans.count >= 5)

    assert os.listdir(spool / "incoming") == ["stuck"]
    assert os.listdir(spool / "rejected") == []  # no note beside no file, at any scan


async def test_a_recorded_file_gone_before_its_move_is_forgotten(tmp_path, monkeypatch):
    """Its writer takes it away after it was read: a later file of its name and bytes is a new
    file, with results of its own, not one taken for it."""
    spool = make_spool(tmp_path)
    data = line("gone", 1).replace(b'"id": "gone", ', b"")  # no id: its bytes make one
    real_read = spool_module.read_batch
    removed = []

    def read_then_removed(*args):
        reads = real_read(*args)
        if not removed:
            os.unlink(spool / "incoming" / "same.jsonl")  # its writer, meanwhile
            removed.append(True)
        return reads

    monkeypatch.setattr(spool_module, "read_batch", read_then_removed)
    in_spool(spool, "same.jsonl", data)
    state = tmp_path / "state"
    await spool_running(spool, state, lambda: bool(removed))
    in_spool(spool, "same.jsonl", data)
    await spool_running(spool, state, lambda: os.listdir(spool / "done") == ["same.jsonl"])

    status = read_status(state)
    queued = sum(agent["queued"] for agent in status["agents"].values())
    taken = queued + sum(status["outcomes"].values())  # final ones: dialed, or a duplicate
    with sqlite3.connect(state / "ledger.sqlite3") as conn:  # the spool's own bookkeeping
        recorded = conn.execute("SELECT count(*) FROM spool_files").fetchone()[0]
    assert taken == 2 and recorded == 0  # the second file's request recorded too


def test_a_name_used_many_times_costs_a_few_look_ups_not_one_per_earlier_file(
    tmp_path, monkeypatch
):
    done = tmp_path / "done"
    done.mkdir()
    for index in range(300):
        (done / ("calls.jsonl" + (f".{index}" if index else ""))).write_text("")
    looked = []
    real = spooldir.entry_exists
    monkeypatch.setattr(
        spooldir, "entry_exists", lambda fd, name: looked.append(name) or real(fd, name)
    )
    fd = os.open(done, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name = spooldir._free_name(fd, "calls.jsonl", ".errors", 4242)
    finally:
        os.close(fd)
    assert name == "calls.jsonl.4242"
    assert len(looked) <= 4, looked


async def test_files_being_written_under_dot_names_do_not_wake_scans(tmp_path, monkeypatch):
    """A submitter touching a .part file again and again: each write is an inotify event, and
    none makes the spool list incoming/ again (a scan comes for a rename, and once a second)."""
    spool = make_spool(tmp_path)
    scans = Scans(monkeypatch)
    writes = []

    def until() -> bool:
        if len(writes) < 200:
            (spool / "incoming" / ".busy.part").write_text(str(len(writes)))
            writes.append(True)
            return False
        return True

    started = time.monotonic()
    await spool_running(spool, tmp_path / "state", until)
    elapsed = time.monotonic() - started
    assert scans.count <= 2 + elapsed / spool_module.SPOOL_RESCAN_S, (scans.count, elapsed)
