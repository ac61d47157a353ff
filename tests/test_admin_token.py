"""The admin listener of the real `dialerd run` process (SPEC 7): a warning for an address that
is not loopback, the address bound named in the log, and admin.token_file's Bearer token (read at
start, rotated by a reload, checked by `dialerd check`, never logged)."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import run_dialerd, wait_for, write_config

TOKEN = "Adm1nT0k3nQx8Rw2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    """(status, headers) of a GET; never raises for an HTTP error status."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def log_lines(stderr: str, event: str) -> list[dict]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == event]


def assert_no_token(text: str, token: str = TOKEN) -> None:
    assert not [token[i : i + 4] for i in range(len(token) - 3) if token[i : i + 4] in text], text


def test_an_admin_listener_on_every_address_is_warned_of_and_logged_as_bound(tmp_path, daemons):
    port = free_port()  # free on 127.0.0.1; bound on 0.0.0.0, reached only through 127.0.0.1
    config = write_config(tmp_path, admin={"listen": f"0.0.0.0:{port}"})

    daemon = daemons("-c", str(config))
    daemon.wait_running()
    health = get(f"http://127.0.0.1:{port}/healthz")
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    assert health[0] == 200
    [bound] = log_lines(daemon.stderr, "admin listener")
    assert bound["urls"] == [f"http://0.0.0.0:{port}"]
    [warning] = log_lines(
        daemon.stderr, "the admin listener is not on loopback: other hosts can reach it"
    )
    assert (warning["level"], warning["urls"]) == ("warning", [f"http://0.0.0.0:{port}"])
    assert warning["token_required"] is False
    assert f"127.0.0.1:{port}" not in daemon.stderr


def test_an_admin_listener_on_loopback_is_not_warned_of(tmp_path, daemons):
    port = free_port()
    config = write_config(tmp_path, admin={"listen": f"127.0.0.1:{port}"})

    daemon = daemons("-c", str(config))
    daemon.wait_running()
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    [bound] = log_lines(daemon.stderr, "admin listener")
    assert bound["urls"] == [f"http://127.0.0.1:{port}"]
    assert "not on loopback" not in daemon.stderr


def test_the_admin_token_is_required_rotated_by_a_reload_and_never_logged(tmp_path, daemons):
    port = free_port()
    token_file = tmp_path / "admin-token"
    token_file.write_text(f"{TOKEN}\n")
    config = write_config(
        tmp_path, admin={"listen": f"127.0.0.1:{port}", "token_file": str(token_file)}
    )
    healthz = f"http://127.0.0.1:{port}/healthz"
    daemon = daemons("-c", str(config))
    daemon.wait_running()

    without, wrong, right = get(healthz), get(healthz, "not-the-token"), get(healthz, TOKEN)
    metrics = get(f"http://127.0.0.1:{port}/metrics", TOKEN)[0]

    rotated = "R0tat3dZq9Wx7Pm"
    token_file.write_text(rotated)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"event": "reloaded"' in daemon.stderr, 10, "the reload")
    after_rotation = get(healthz, TOKEN)[0], get(healthz, rotated)[0]

    token_file.write_text(f"{rotated}\nsecond\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.stderr, 10, "the bad token file to be refused")
    after_refusal = get(healthz, rotated)[0]
    code, _ = daemon.stop()

    assert code == 0, daemon.stderr
    assert without[0] == wrong[0] == 401
    assert without[1]["WWW-Authenticate"] == "Bearer"
    assert (right[0], metrics) == (200, 200)
    assert after_rotation == (401, 200)
    assert after_refusal == 200  # the token of the running config is kept
    [refused] = log_lines(daemon.stderr, "reload refused; the running config is kept")
    assert refused["problems"][0].startswith(f"admin.token_file: {token_file} holds a line break")
    assert_no_token(daemon.stderr + daemon.stdout)
    assert_no_token(daemon.stderr + daemon.stdout, rotated)


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    ("content", "found"),
    [(None, "cannot read"), ("\n", "is empty"), (f"{TOKEN}\t\n", "holds a tab at character 17")],
)
def test_a_bad_admin_token_file_stops_check_and_run(tmp_path, command, content, found):
    token_file = tmp_path / "admin-token"
    if content is not None:
        token_file.write_text(content)
    config = write_config(
        tmp_path, admin={"listen": f"127.0.0.1:{free_port()}", "token_file": str(token_file)}
    )

    done = run_dialerd(command, "-c", str(config), timeout=30)

    stderr = done.stderr.decode()
    assert done.returncode == 78, stderr
    assert stderr.startswith("dialerd: bad config: admin.token_file: "), stderr
    assert found in stderr and str(token_file) in stderr
    assert_no_token(stderr)
    assert not Path(tmp_path / "state").exists()
