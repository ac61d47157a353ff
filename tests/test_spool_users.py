"""The spool as Postfix's maildrop, between real users: the daemon as a user of its own, two
submitters of the submitters' group, the spool laid out as systemd/tmpfiles.d/dialerd.conf has
it. What one submitter may do to another's files, and what the daemon makes of theirs."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import site
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Daemon, dialerd_env, read_results, sim_config, wait_for

# The test's own names for the unit's user and groups (dialerd, dialerd-submit).
DAEMON_USER = "dlrdtest-daemon"
SUBMIT_GROUP = "dlrdtest-submit"
SUBMITTERS = ("dlrdtest-sub1", "dlrdtest-sub2")
UNIT_NAMES = {"dialerd": DAEMON_USER, "dialerd-submit": SUBMIT_GROUP}
TMPFILES = REPO / "systemd" / "tmpfiles.d" / "dialerd.conf"
SPOOL = "/var/spool/dialerd"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def popen(self, **extra) -> dict:
        """subprocess options to run as this user, with Python as `python_for_users` has it."""
        env = {**dialerd_env(), **USERS_PYTHON["env"], **extra.pop("env", {})}
        return {
            "user": self.uid,
            "group": self.gid,
            "extra_groups": list(self.groups),
            "executable": USERS_PYTHON["executable"],
            "env": env,
            "cwd": USERS_PYTHON["cwd"],
            **extra,
        }


USERS_PYTHON: dict = {"executable": sys.executable, "env": {}, "cwd": None}


def python_for_users(user: User, scratch: Path) -> None:
    """A Python that `user` may run and that imports dialerd. This one may live in a home
    directory that only its owner enters: then the system's Python of the same version, with
    this environment's packages and the repository on its path; and if the checkout itself is
    where others may not go, with a copy of the package and its dependencies in `scratch`."""
    USERS_PYTHON["cwd"] = str(scratch)
    if _imports_dialerd(user):
        return
    system = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin"
    )
    assert system, "no interpreter that another user may run"
    packages = site.getsitepackages()
    USERS_PYTHON.update(
        executable=system, env={"PYTHONPATH": os.pathsep.join([str(REPO), *packages])}
    )
    if _imports_dialerd(user):
        return
    copy = scratch / "site"
    shutil.copytree(REPO / "dialerd", copy / "dialerd")
    unneeded = shutil.ignore_patterns("pip*", "setuptools*", "_pytest", "hypothesis*", "pygments*")
    for directory in packages:
        shutil.copytree(directory, copy, ignore=unneeded, dirs_exist_ok=True)
    USERS_PYTHON["env"] = {"PYTHONPATH": str(copy)}
    assert _imports_dialerd(user), "another user cannot import dialerd, even from a copy"


def _imports_dialerd(user: User) -> bool:
    try:
        run = subprocess.run(
            [sys.executable, "-c", "import dialerd.cli, aiohttp"],
            capture_output=True, timeout=60, **user.popen(),
        )  # fmt: skip
    except OSError:
        return False
    return run.returncode == 0


def _ensure_user(name: str, groups: tuple[str, ...]) -> User:
    with_groups = ["-G", ",".join(groups)] if groups else []
    if not _exists(pwd.getpwnam, name):
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell",
             "/usr/sbin/nologin", *with_groups, name],
            check=True, capture_output=True,
        )  # fmt: skip
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid, tuple(grp.getgrnam(g).gr_gid for g in groups))


def _exists(lookup, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, User]]:
    """The daemon's user and two submitters, made for this module and removed after it."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.fail("these tests make users of their own: they run as root, with useradd")
    if not _exists(grp.getgrnam, SUBMIT_GROUP):
        subprocess.run(["groupadd", "--system", SUBMIT_GROUP], check=True, capture_output=True)
    made = {DAEMON_USER: _ensure_user(DAEMON_USER, ())}
    for name in SUBMITTERS:
        made[name] = _ensure_user(name, (SUBMIT_GROUP,))
    scratch = Path(tempfile.mkdtemp(prefix="dialerd-users-python-"))
    scratch.chmod(0o755)
    try:
        python_for_users(made[DAEMON_USER], scratch)
        yield made
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", SUBMIT_GROUP], capture_output=True)
        shutil.rmtree(scratch)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every test user can pass through (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="dialerd-users-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def lay_out_spool(spool: Path) -> None:
    """The spool's directories with the owners and modes tmpfiles.d gives them."""
    for text in TMPFILES.read_text().splitlines():
        fields = text.split()
        if not fields or fields[0] != "d":
            continue
        path, mode, user, group = fields[1], int(fields[2], 8), fields[3], fields[4]
        directory = spool / path.removeprefix(SPOOL).lstrip("/")
        directory.mkdir(exist_ok=True)
        os.chown(directory, pwd.getpwnam(UNIT_NAMES[user]).pw_uid, _group_id(group))
        directory.chmod(mode)


def _group_id(name: str) -> int:
    if name == "dialerd":  # the daemon's own group: its user's primary one
        return pwd.getpwnam(DAEMON_USER).pw_gid
    return grp.getgrnam(UNIT_NAMES[name]).gr_gid


def as_user(user: User, code: str) -> subprocess.CompletedProcess:
    """Run a Python snippet as `user`; it prints one JSON value."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=30, **user.popen(),
    )  # fmt: skip


ATTEMPTS = """
    import errno, json, os, sys
    incoming, done, rejected, root, target = sys.argv[1:6]

    def attempt(action):
        try:
            action()
        except OSError as error:
            return errno.errorcode[error.errno]
        return "done"

    def replace_with_own():
        path = os.path.join(incoming, ".mine.part")
        with open(path, "w") as file:
            file.write("{}")
        os.rename(path, os.path.join(incoming, target))

    def write_in(directory):
        with open(os.path.join(directory, "intruder.jsonl"), "w") as file:
            file.write("{}")

    print(json.dumps({
        "list incoming": attempt(lambda: os.listdir(incoming)),
        "read another's": attempt(lambda: open(os.path.join(incoming, target)).read()),
        "remove another's": attempt(lambda: os.unlink(os.path.join(incoming, target))),
        "replace another's": attempt(replace_with_own),
        "list done": attempt(lambda: os.listdir(done)),
        "write in done": attempt(lambda: write_in(done)),
        "list rejected": attempt(lambda: os.listdir(rejected)),
        "write in the root": attempt(lambda: write_in(root)),
        "replace incoming": attempt(lambda: os.rename(incoming, incoming + ".old")),
        "link in the root": attempt(lambda: os.symlink("/", os.path.join(root, "x"))),
    }))
"""


def attempts(user: User, spool: Path, target: str) -> dict[str, str]:
    code = "import sys; sys.argv[1:] = " + repr(
        [str(spool / "incoming"), str(spool / "done"), str(spool / "rejected"), str(spool), target]
    )
    run = as_user(user, code + "\n" + textwrap.dedent(ATTEMPTS))
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def submit_as(user: User, config: Path, requests: list[dict], directory: Path) -> str:
    """`dialerd submit` run by `user`; the name of the file it dropped."""
    source = directory / f"{user.name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in requests))
    source.chmod(0o644)
    run = subprocess.run(
        [sys.executable, "-m", "dialerd", "submit", "-c", str(config), str(source)],
        capture_output=True, text=True, timeout=30, **user.popen(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stderr.split(" as ")[1].split(";")[0].strip()


def test_submitters_cannot_touch_each_other_nor_the_daemon_their_spool(users, base, simulator):
    sim = simulator()
    spool = base / "spool"
    spool.mkdir()
    lay_out_spool(spool)
    state = base / "state"
    state.mkdir(mode=0o750)
    os.chown(state, users[DAEMON_USER].uid, users[DAEMON_USER].gid)
    config = sim_config(base, sim, spool={"dir": str(spool)})
    config.chmod(0o644)
    sub1, sub2 = (users[name] for name in SUBMITTERS)

    # Before the daemon runs, so that sub1's file waits in incoming/.
    name = submit_as(sub1, config, [{"id": "one", "to": "447700900001"}], base)
    waiting = spool / "incoming" / name
    assert stat.S_IMODE(waiting.stat().st_mode) == 0o604
    assert waiting.stat().st_gid == grp.getgrnam(SUBMIT_GROUP).gr_gid
    submitted = waiting.read_bytes()
    assert attempts(sub2, spool, name) == {
        "list incoming": "EACCES",
        "read another's": "EACCES",  # of its group, and the group may not read
        "remove another's": "EPERM",  # the sticky bit
        "replace another's": "EPERM",
        "list done": "EACCES",
        "write in done": "EACCES",
        "list rejected": "EACCES",
        "write in the root": "EACCES",
        "replace incoming": "EACCES",
        "link in the root": "EACCES",
    }
    assert waiting.read_bytes() == submitted

    # sub2 writes a file of its own by hand, with a bad line: its note appears in done/.
    wrote = as_user(
        sub2,
        f"""
        import os
        part = {str(spool / "incoming" / ".by-hand.jsonl.part")!r}
        with open(part, "w") as file:
            file.write('{{"id": "two", "to": "447700900002"}}\\nnot JSON\\n')
        os.rename(part, part.removesuffix(".part").replace("/.by-hand", "/by-hand"))
        """,
    )
    assert wrote.returncode == 0, wrote.stderr

    popen = users[DAEMON_USER].popen()
    # The daemon as its own user, of neither submitter's group.
    daemon = Daemon(base, "-c", str(config), env=popen.pop("env"), **popen)
    try:
        results_file = state / "results.jsonl"
        wait_for(lambda: len(read_results(results_file)) >= 3, 20, "both files' results")
        code, _ = daemon.stop()
    finally:
        daemon.kill()
    assert code == 0, daemon.stderr

    outcomes = sorted((str(r["id"]), r["outcome"]) for r in read_results(results_file))
    assert outcomes == [("None", "invalid"), ("one", "dialed"), ("two", "dialed")], outcomes
    assert sorted(os.listdir(spool / "done")) == sorted(
        [name, "by-hand.jsonl", "by-hand.jsonl.errors"]
    )
    note = spool / "done" / "by-hand.jsonl.errors"
    assert note.stat().st_uid == users[DAEMON_USER].uid
    assert stat.S_IMODE(note.stat().st_mode) & 0o027 == 0  # 0640 or tighter
    appended = as_user(
        sub1, f"open({str(note)!r}, 'a').write('forged'); print('null')"
    )  # another's note, through done/, which is not theirs to enter
    assert appended.returncode != 0 and "PermissionError" in appended.stderr
    read = as_user(sub2, f"print(open({str(spool / 'done' / name)!r}).read())")
    assert read.returncode != 0 and "PermissionError" in read.stderr
    assert "Traceback" not in daemon.stderr
