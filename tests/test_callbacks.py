"""Callbacks in-process: status_url tokens, and the callback listener on 127.0.0.1 applying what
the API POSTs to a real ledger in tmp_path (SPEC 3 `redial`, 6, 7).

The lanes are played by the test: it queues a request, marks each send with a fresh token and
records the placed answer as a lane does, then POSTs callbacks the way the API would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from dialerd.callbacks import MAX_BODY, CallbackListener, StatusUrls, load_secret
from dialerd.config import MAX_CONNECTIONS, Listen, RedialPolicy, build_config
from dialerd.ledger import Ledger, postgres
from dialerd.metrics import Metrics
from dialerd.request import build_request

PUBLIC_URL = "https://dialer.example.com/hooks"  # a path of its own: the listener serves under it
REDIAL = {"busy": RedialPolicy(attempts=3, delay_s=0.5), "timeout": RedialPolicy(2, 0.5)}
WAIT_S = 30.0
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, unpadded URL-safe base64


# -- the bench -------------------------------------------------------------------------------


class Bench:
    """A ledger, its status_urls and a running callback listener; the test plays the lanes."""

    def __init__(self, tmp_path: Path, new_ledger: Callable[..., Ledger]):
        self.state_dir = tmp_path / "state"
        self.config = build_config(
            {
                "api": {"key_env": "VGAI_KEY"},
                "agents": {"agent-a": {"region": "eu", "rate": 5}},
                "state_dir": str(self.state_dir),
            }
        )
        self.ledger = new_ledger(self.state_dir)
        self.metrics = Metrics()
        self.applied: list[tuple[str, str | None]] = []
        self.redial = dict(REDIAL)
        self.max_connections = MAX_CONNECTIONS
        self.sent: dict[str, tuple[int, int]] = {}  # status_url: (seq, attempt) of its send
        self.urls: StatusUrls
        self.base = ""
        self.http: aiohttp.ClientSession

    async def start(self) -> None:
        await asyncio.to_thread(self.ledger.open)
        self.urls = StatusUrls(PUBLIC_URL, await self._secret())
        self.listener = CallbackListener(
            Listen("127.0.0.1", 0),
            self.urls,
            self.ledger,
            lambda: self.redial,
            lambda effect, agent: self.applied.append((effect, agent)),
            self.metrics,
            max_connections=self.max_connections,
        )
        self.base = await self.listener.start()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def stop(self) -> None:
        await self.http.close()
        await self.listener.stop()
        await asyncio.to_thread(self.ledger.close)

    async def _secret(self) -> bytes:
        """The status_urls' key as the daemon has it: the state_dir's, or (cluster mode) the
        one every daemon shares in the ledger."""
        if self.ledger.cluster is None:
            return load_secret(self.state_dir)
        return await self.ledger.shared_secret("callbacks", secrets.token_bytes(32))

    async def queue(self, id_: str, to: str = "447700900123") -> int:
        request = build_request({"id": id_, "to": to, "meta": {"k": id_}}, self.config, "test:1")
        intake = await self.ledger.add([request], [], None, 0)
        assert intake.accepted == 1
        return self.row(id_)["seq"]

    async def send(self, seq: int, attempt: int) -> tuple[str, str]:
        """Mark a send as a lane does: a fresh token in the ledger; (token, status_url)."""
        token, url = self.urls.new()
        await self.ledger.mark_sending(seq, token, attempt)
        self.sent[url] = (seq, attempt)
        return token, url

    async def placed(self, seq: int, token: str, attempt: int, wait_s: float = WAIT_S):
        """Record the API's 2xx for that send; the effect of a callback that came before it."""
        return await self.ledger.placed(
            seq,
            token,
            time.time() + wait_s,
            self.redial,
            attempts=attempt,
            http_status=200,
            conversation_uuid=f"CON-{seq}-{attempt}",
            response='{"status": "started"}',
        )

    async def place(self, seq: int, attempt: int, wait_s: float = WAIT_S) -> tuple[str, str]:
        token, url = await self.send(seq, attempt)
        assert await self.placed(seq, token, attempt, wait_s) == (None, [])
        return token, url

    async def post(
        self, url: str, body: object = None, *, raw: bytes | None = None, method: str = "POST"
    ) -> tuple[int, dict | None]:
        """Send to the listener at the path of `url` (a status_url or any other path)."""
        path = urlsplit(url).path if url.startswith("http") else url
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with self.http.request(method, self.base + path, data=data) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, None

    def body(self, url: str, status: str, **extra) -> dict:
        """The API's callback for the send of `url`: its conversation_uuid, callee and agent."""
        seq, attempt = self.sent[url]
        return callback_body(status, **{"conversation_uuid": f"CON-{seq}-{attempt}", **extra})

    async def callback(self, url: str, status: str, **extra) -> tuple[int, dict | None]:
        return await self.post(url, self.body(url, status, **extra))

    # -- what the ledger holds, read on a connection of its own as `dialerd status` does ------

    def _reader(self) -> Any:
        if self.ledger.cluster is None:
            return sqlite3.connect(f"file:{self.ledger.path}?mode=ro", uri=True)
        return postgres.connect(self.ledger.cluster.url)

    def _query(self, sql: str, params: tuple = ()) -> list[dict]:
        conn = self._reader()
        try:
            cursor = conn.execute(sql, params)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            conn.close()

    def row(self, id_: str) -> dict:
        (row,) = self._query("SELECT * FROM requests WHERE id = ?", (id_,))
        return row

    def callbacks(self) -> list[dict]:
        return self._query("SELECT token, status, effect FROM callbacks ORDER BY seq")

    def results(self) -> list[dict]:
        return [json.loads(r["line"]) for r in self._query("SELECT line FROM outbox ORDER BY seq")]

    def snapshot(self) -> tuple:
        """Everything a callback could change."""
        return (
            self._query("SELECT * FROM requests ORDER BY seq"),
            self._query("SELECT * FROM calls ORDER BY token"),
            self._query("SELECT * FROM callbacks ORDER BY seq"),
            self._query("SELECT * FROM outbox ORDER BY seq"),
        )

    def counted(self, status: str, effect: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "dialerd_callbacks_total", {"status": status, "effect": effect}
        )
        return value or 0.0


def callback_body(status: str, **extra) -> dict:
    return {
        "agent_id": "agent-a",
        "to": "447700900123",
        "conversation_uuid": "CON-x",
        "status": status,
        "timestamp": "2026-11-24T12:00:00Z",
        **extra,
    }


@pytest.fixture
async def bench(tmp_path: Path, new_ledger):
    """Each test of callbacks applied to the ledger runs on SQLite and on PostgreSQL."""
    bench = Bench(tmp_path, new_ledger)
    await bench.start()
    yield bench
    await bench.stop()


def secret_in(directory: Path) -> bytes:
    directory.mkdir(parents=True, exist_ok=True)  # a state_dir exists before the secret
    return load_secret(directory)


def only_result(bench: Bench) -> dict:
    (result,) = bench.results()
    return result


def fate(result: dict) -> tuple:
    return result["outcome"], result["status"], result["attempts"]


def _reencode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# -- tokens and the secret -------------------------------------------------------------------


def test_each_status_url_is_new_and_carries_only_a_verifiable_token(tmp_path):
    urls = StatusUrls(PUBLIC_URL + "/", load_secret(tmp_path))
    made = [urls.new() for _ in range(2000)]

    assert len({token for token, _ in made}) == len(made)
    assert len({url for _, url in made}) == len(made)
    for token, url in made:
        assert TOKEN.fullmatch(token), token
        assert url == f"{PUBLIC_URL}/callbacks/{token}"
        assert urls.genuine(token)
    assert urls.prefix == "/hooks/callbacks/"


def test_forged_tokens_are_not_genuine(tmp_path):
    urls = StatusUrls(PUBLIC_URL, secret_in(tmp_path / "ours"))
    theirs = StatusUrls(PUBLIC_URL, secret_in(tmp_path / "theirs"))
    token, _ = urls.new()
    raw = base64.urlsafe_b64decode(token + "=")
    wrong_mac = _reencode(raw[:-1] + bytes([raw[-1] ^ 1]))
    wrong_nonce = _reencode(bytes([raw[0] ^ 1]) + raw[1:])
    forged = [
        wrong_mac,
        wrong_nonce,
        theirs.new()[0],  # genuine format under another secret
        *(_reencode(secrets.token_bytes(32)) for _ in range(50)),  # random, of the right length
        token[:-2],
        token + "AAAA",
        "",
        "A",
        "é" * 43,
        "../" + token,
        "%" * 43,
    ]

    assert urls.genuine(token)
    for fake in forged:
        assert not urls.genuine(fake), fake


def test_the_secret_is_created_0600_once_and_tokens_verify_after_a_reload(tmp_path):
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        secret = load_secret(tmp_path)
    finally:
        os.umask(old_umask)
    path = tmp_path / "callback.secret"

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 32
    issued = [StatusUrls(PUBLIC_URL, secret).new()[0] for _ in range(20)]
    # A restart reads the same secret; a new StatusUrls verifies the tokens issued before.
    reloaded = StatusUrls(PUBLIC_URL, load_secret(tmp_path))
    assert path.read_bytes() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(reloaded.genuine(token) for token in issued)
    # Another state_dir has a secret of its own.
    assert secret_in(tmp_path / "other") != secret


# -- callbacks applied: redial by policy, or the end -----------------------------------------


async def test_busy_redials_after_its_delay_then_ends_unanswered_when_attempts_run_out(bench):
    seq = await bench.queue("r1")
    urls = []
    for attempt in (1, 2):
        _token, url = await bench.place(seq, attempt)
        urls.append(url)
        before = time.time()

        assert await bench.callback(url, "busy") == (200, {"result": "redial"})

        after = time.time()
        row = bench.row("r1")
        assert (row["state"], row["attempts"], row["status"]) == ("queued", attempt, "busy")
        assert before + 0.5 <= row["due_at"] <= after + 0.5  # delay_s after the callback
        assert bench.results() == []
        assert bench.applied[-1] == ("redial", "agent-a")
    _token, url = await bench.place(seq, 3)
    urls.append(url)

    assert await bench.callback(url, "busy") == (200, {"result": "unanswered"})

    assert len(set(urls)) == 3
    result = only_result(bench)
    assert {k: result[k] for k in ("id", "outcome", "status", "attempts", "conversation_uuid")} == {
        "id": "r1",
        "outcome": "unanswered",
        "status": "busy",
        "attempts": 3,
        "conversation_uuid": f"CON-{seq}-3",  # the last call's
    }
    assert result["meta"] == {"k": "r1"} and result["http_status"] == 200
    assert bench.row("r1")["state"] == "final"
    assert bench.applied == [("redial", "agent-a")] * 2 + [("unanswered", "agent-a")]
    assert bench.counted("busy", "redial") == 2
    assert bench.counted("busy", "unanswered") == 1


async def test_attempts_count_every_call_whatever_the_earlier_statuses_were(bench):
    """busy (3 attempts) then timeout (2 attempts): the second call is the timeout policy's last."""
    seq = await bench.queue("r1")
    _token, first = await bench.place(seq, 1)
    assert await bench.callback(first, "busy") == (200, {"result": "redial"})
    _token, second = await bench.place(seq, 2)

    assert await bench.callback(second, "timeout") == (200, {"result": "unanswered"})

    result = only_result(bench)
    assert fate(result) == ("unanswered", "timeout", 2)
    assert result["conversation_uuid"] == f"CON-{seq}-2"


async def test_the_timeout_policy_redials_once_then_ends_unanswered(bench):
    seq = await bench.queue("r1")
    _token, first = await bench.place(seq, 1)
    assert await bench.callback(first, "timeout") == (200, {"result": "redial"})
    _token, second = await bench.place(seq, 2)

    assert await bench.callback(second, "timeout") == (200, {"result": "unanswered"})

    result = only_result(bench)
    assert fate(result) == ("unanswered", "timeout", 2)


@pytest.mark.parametrize("status", ["rejected", "cancelled", "failed"])
async def test_a_status_with_no_policy_ends_unanswered_at_once(bench, status):
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)

    assert await bench.callback(url, status) == (200, {"result": "unanswered"})

    result = only_result(bench)
    assert fate(result) == ("unanswered", status, 1)
    assert bench.counted(status, "unanswered") == 1


async def test_a_policy_is_read_when_the_callback_comes(bench):
    """The redial policies are asked for at each callback (a SIGHUP reload applies to the next)."""
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)
    bench.redial = {"rejected": RedialPolicy(attempts=2, delay_s=0.5)}

    assert await bench.callback(url, "rejected") == (200, {"result": "redial"})


async def test_no_callback_ends_dialed_only_once_the_wait_is_over(bench):
    seq = await bench.queue("silent")
    before = time.time()
    await bench.place(seq, 1, wait_s=2.0)
    after = time.time()

    assert await bench.ledger.settle_placed(before + 1.99) == (0, pytest.approx(before + 2, abs=1))
    assert bench.results() == []
    assert bench.row("silent")["state"] == "placed"
    settled, next_end = await bench.ledger.settle_placed(after + 2.0)

    assert (settled, next_end) == (1, None)
    result = only_result(bench)
    assert fate(result) == ("dialed", None, 1)
    assert result["conversation_uuid"] == f"CON-{seq}-1"


async def test_a_redialed_call_that_gets_no_callback_ends_dialed_with_no_status(bench):
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)
    assert await bench.callback(url, "busy") == (200, {"result": "redial"})
    await bench.place(seq, 2, wait_s=0.0)

    assert (await bench.ledger.settle_placed(time.time()))[0] == 1

    result = only_result(bench)
    assert fate(result) == ("dialed", None, 2)
    assert result["conversation_uuid"] == f"CON-{seq}-2"


async def test_a_callback_before_the_placed_answer_is_applied_when_the_answer_is_recorded(bench):
    seq = await bench.queue("r1")
    token, url = await bench.send(seq, 1)

    assert await bench.callback(url, "busy") == (200, {"result": "early"})
    assert bench.row("r1")["state"] == "sending"
    assert await bench.placed(seq, token, 1) == ("redial", [])

    row = bench.row("r1")
    assert (row["state"], row["attempts"], row["status"]) == ("queued", 1, "busy")
    assert bench.callbacks() == [{"token": token, "status": "busy", "effect": "redial"}]
    # The same again for the last attempt: it ends the request once the answer is recorded.
    token, url = await bench.send(seq, 2)
    assert await bench.callback(url, "rejected") == (200, {"result": "early"})
    assert bench.results() == []
    assert await bench.placed(seq, token, 2) == ("unanswered", [])
    result = only_result(bench)
    assert fate(result) == ("unanswered", "rejected", 2)


# -- what the listener refuses ----------------------------------------------------------------


async def test_forged_tokens_other_paths_and_other_methods_get_404_and_change_nothing(
    bench, tmp_path
):
    seq = await bench.queue("r1")
    token, url = await bench.place(seq, 1)
    raw = base64.urlsafe_b64decode(token + "=")
    prefix = "/hooks/callbacks/"
    never_issued, _ = bench.urls.new()  # genuine, but no send carried it
    another_secret = StatusUrls(PUBLIC_URL, secret_in(tmp_path / "elsewhere")).new()[0]
    forged_paths = [
        prefix + _reencode(secrets.token_bytes(32)),
        prefix + _reencode(raw[:-1] + bytes([raw[-1] ^ 0x80])),  # wrong MAC
        prefix + _reencode(bytes([raw[0] ^ 1]) + raw[1:]),  # nonce changed under the MAC
        prefix + another_secret,
        prefix + never_issued,
        prefix + token[:21] + "." + token[21:],  # decodes to the same bytes
        prefix + token + "/",
        prefix + token + "/extra",
        prefix + token[:-1],
        prefix,
        "/hooks/callbacks",
        "/callbacks/" + token,  # without the public_url's path
        "/hooks/" + token,
        "/" + token,
        "/",
        "/healthz",
        "/metrics",
        "/status",
    ]
    before = bench.snapshot()

    for path in forged_paths:
        answer = await bench.post(path, callback_body("busy"))
        assert answer[0] == 404, (path, answer)
    for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        body = None if method in ("GET", "HEAD") else callback_body("busy")
        status, _ = await bench.post(url, body, method=method)
        assert status == 404, method

    assert bench.snapshot() == before
    assert bench.applied == []
    assert bench.counted("busy", "redial") == 0
    # Nothing was used up: the genuine callback still applies.
    assert await bench.callback(url, "busy") == (200, {"result": "redial"})


BAD_BODIES = {
    "not JSON": b'{"status": "busy"',
    "empty": b"",
    "not UTF-8": b'{"status": "b\xffsy"}',
    "an array": json.dumps([callback_body("busy")]).encode(),
    "a string": b'"busy"',
    "null": b"null",
    "unknown status": json.dumps(callback_body("answered")).encode(),
    "status in capitals": json.dumps(callback_body("BUSY")).encode(),
    "status not a string": json.dumps(callback_body(["busy"])).encode(),  # type: ignore[arg-type]
    "nested too deep": b"[" * 60_000,  # valid-looking JSON a recursive parser gives up on
    **{
        f"missing {name}": json.dumps(
            {k: v for k, v in callback_body("busy").items() if k != name}
        ).encode()
        for name in ("agent_id", "to", "conversation_uuid", "status", "timestamp")
    },
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_a_malformed_callback_gets_400_and_changes_nothing(bench, body):
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)
    before = bench.snapshot()

    status, answer = await bench.post(url, raw=body)

    assert status == 400, answer
    assert answer is not None and answer.get("error"), answer
    assert bench.snapshot() == before
    assert bench.applied == []
    # The token was not used up by the bad body.
    assert await bench.callback(url, "busy") == (200, {"result": "redial"})


async def test_a_body_over_64_KiB_gets_413_and_one_of_exactly_64_KiB_is_served(bench):
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)
    exact = json.dumps(bench.body(url, "busy")).encode()
    exact += b" " * (MAX_BODY - len(exact))
    before = bench.snapshot()

    for size in (MAX_BODY + 1, 4 * MAX_BODY):
        status, _ = await bench.post(url, raw=exact + b" " * (size - MAX_BODY))
        assert status == 413, size

    # Sent chunked, with no Content-Length to judge by.
    async def chunks():
        for _ in range(5):
            yield exact[: MAX_BODY // 4]
            await asyncio.sleep(0)

    async with bench.http.post(bench.base + urlsplit(url).path, data=chunks()) as response:
        assert response.status == 413
    assert bench.snapshot() == before
    assert len(exact) == MAX_BODY

    assert await bench.post(url, raw=exact) == (200, {"result": "redial"})


async def test_a_repeated_callback_is_answered_and_changes_nothing(bench):
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)
    assert await bench.callback(url, "busy") == (200, {"result": "redial"})
    after_first = bench.snapshot()[:2]  # requests and calls
    due_at = bench.row("r1")["due_at"]
    await asyncio.sleep(0.05)

    assert await bench.callback(url, "busy") == (200, {"result": "repeat"})
    assert await bench.callback(url, "rejected") == (200, {"result": "repeat"})

    assert bench.snapshot()[:2] == after_first
    assert bench.row("r1")["due_at"] == due_at  # not pushed back by the repeat
    assert [c["effect"] for c in bench.callbacks()] == ["redial"]
    assert bench.results() == []
    assert bench.counted("busy", "redial") == 1
    assert bench.counted("busy", "repeat") == 1
    assert bench.counted("rejected", "repeat") == 1
    assert bench.applied == [("redial", "agent-a"), ("repeat", "agent-a"), ("repeat", "agent-a")]


async def test_the_same_callback_many_times_at_once_redials_once(bench):
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)

    answers = await asyncio.gather(*(bench.callback(url, "busy") for _ in range(20)))

    effects = sorted(answer["result"] for status, answer in answers if status == 200)
    assert effects == ["redial"] + ["repeat"] * 19
    assert [c["effect"] for c in bench.callbacks()] == ["redial"]
    assert bench.row("r1")["state"] == "queued"


async def test_a_callback_for_an_earlier_attempt_is_recorded_and_changes_nothing(bench):
    seq = await bench.queue("r1")
    # The first send was refused (say a 503) and queued again: its token carried no call.
    refused, refused_url = await bench.send(seq, 1)
    await bench.ledger.retry_later(seq, time.time(), True, "503")
    _token, first = await bench.place(seq, 1)
    assert await bench.callback(first, "busy") == (200, {"result": "redial"})
    second_token, second = await bench.place(seq, 2)
    before = bench.snapshot()

    assert await bench.callback(refused_url, "timeout") == (200, {"result": "stale"})
    assert await bench.callback(first, "rejected") == (200, {"result": "repeat"})

    after = bench.snapshot()
    assert after[:2] == before[:2] and after[3] == before[3]  # requests, calls, results
    assert bench.callbacks()[-1] == {"token": refused, "status": "timeout", "effect": "stale"}
    assert len(bench.callbacks()) == 2
    assert bench.counted("timeout", "stale") == 1
    # The current attempt's callback still applies.
    assert await bench.callback(second, "busy") == (200, {"result": "redial"})
    assert bench.callbacks()[-1]["token"] == second_token


async def test_a_callback_after_the_request_ended_dialed_is_recorded_and_changes_nothing(bench):
    seq = await bench.queue("r1")
    token, url = await bench.place(seq, 1, wait_s=0.0)
    assert (await bench.ledger.settle_placed(time.time()))[0] == 1
    before = bench.snapshot()

    assert await bench.callback(url, "busy") == (200, {"result": "stale"})

    after = bench.snapshot()
    assert after[:2] == before[:2] and after[3] == before[3]
    assert bench.callbacks() == [{"token": token, "status": "busy", "effect": "stale"}]
    assert only_result(bench)["outcome"] == "dialed"


# -- callbacks tied to their call -------------------------------------------------------------

OTHER_CALL = {
    "to": {"to": "447700900999"},
    "agent_id": {"agent_id": "agent-b"},
    "conversation_uuid": {"conversation_uuid": "CON-of-another-call"},
    "to given as a number": {"to": 447700900123},
    "to that is no number": {"to": "sip:"},
}


@pytest.mark.parametrize("forged", OTHER_CALL.values(), ids=OTHER_CALL.keys())
async def test_a_callback_about_another_call_is_recorded_as_a_mismatch_and_changes_nothing(
    bench, forged
):
    seq = await bench.queue("r1")
    token, url = await bench.place(seq, 1)
    before = bench.snapshot()

    assert await bench.post(url, bench.body(url, "busy", **forged)) == (200, {"result": "mismatch"})

    after = bench.snapshot()
    assert after[:2] == before[:2] and after[3] == before[3]  # requests, calls, results
    assert bench.row("r1")["state"] == "placed"
    assert bench.callbacks() == [{"token": token, "status": "busy", "effect": "mismatch"}]
    assert bench.counted("busy", "mismatch") == 1
    assert bench.counted("busy", "redial") == 0
    # It used nothing up: the call's own callback still applies.
    assert await bench.callback(url, "busy") == (200, {"result": "redial"})


@pytest.mark.parametrize("written", ["+44 7700 900123", "+44 (0)7700 900123", "44-7700-900123"])
async def test_a_callee_written_otherwise_but_the_same_once_normalised_matches(bench, written):
    seq = await bench.queue("r1")
    _token, url = await bench.place(seq, 1)

    assert await bench.callback(url, "busy", to=written) == (200, {"result": "redial"})


async def test_without_a_conversation_uuid_in_the_answer_only_callee_and_agent_are_compared(
    bench,
):
    seq = await bench.queue("r1")
    token, url = await bench.send(seq, 1)
    await bench.ledger.placed(
        seq, token, time.time() + WAIT_S, bench.redial, attempts=1, http_status=200
    )

    assert await bench.callback(url, "busy", agent_id="agent-b") == (200, {"result": "mismatch"})
    assert await bench.callback(url, "busy", conversation_uuid="CON-any") == (
        200, {"result": "redial"},
    )  # fmt: skip


async def test_an_early_callback_about_another_call_is_found_out_once_the_answer_is_recorded(
    bench,
):
    seq = await bench.queue("r1")
    token, url = await bench.send(seq, 1)
    # Its callee and agent are right; only the answer, not in yet, can tell its conversation.
    forged = bench.body(url, "busy", conversation_uuid="CON-of-another-call")
    assert await bench.post(url, forged) == (200, {"result": "early"})

    assert await bench.placed(seq, token, 1) == (None, ["busy"])

    assert bench.row("r1")["state"] == "placed"
    assert bench.callbacks() == [{"token": token, "status": "busy", "effect": "mismatch"}]
    assert bench.results() == []
    assert await bench.callback(url, "rejected") == (200, {"result": "unanswered"})
    assert fate(only_result(bench)) == ("unanswered", "rejected", 1)


async def test_an_early_callback_with_another_callee_is_a_mismatch_at_once(bench):
    seq = await bench.queue("r1")
    token, url = await bench.send(seq, 1)

    assert await bench.callback(url, "busy", to="447700900999") == (200, {"result": "mismatch"})

    assert await bench.placed(seq, token, 1) == (None, [])
    assert bench.row("r1")["state"] == "placed"
    assert bench.counted("busy", "mismatch") == 1


async def test_of_early_callbacks_the_call_s_own_applies_whatever_came_before_it(bench):
    seq = await bench.queue("r1")
    token, url = await bench.send(seq, 1)
    forged = bench.body(url, "rejected", conversation_uuid="CON-of-another-call")
    assert await bench.post(url, forged) == (200, {"result": "early"})
    assert await bench.callback(url, "busy") == (200, {"result": "early"})
    assert await bench.callback(url, "busy") == (200, {"result": "early"})

    assert await bench.placed(seq, token, 1) == ("redial", ["rejected"])

    assert [c["effect"] for c in bench.callbacks()] == ["mismatch", "redial", "repeat"]
    row = bench.row("r1")
    assert (row["state"], row["status"]) == ("queued", "busy")
    assert await bench.callback(url, "busy") == (200, {"result": "repeat"})
