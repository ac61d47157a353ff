"""Shared fixtures: config files, a simulator on 127.0.0.1, and the real dialerd process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from dialerd.simulator import Faults, Simulator

TEST_KEY = "test-key-not-secret"


def write_config(tmp_path: Path, agents: dict[str, dict] | None = None, **top: Any) -> Path:
    """A config in tmp_path: the given agents (default one EU agent at rate 5) and top keys."""
    document = {
        "api": {"key_env": "VGAI_KEY", "timeout_s": 5},
        "agents": agents or {"agent-a": {"region": "eu", "rate": 5}},
        "state_dir": str(tmp_path / "state"),
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    return lambda agents=None, **top: write_config(tmp_path, agents, **top)


@pytest.fixture
async def simulator_factory():
    """Start simulators on 127.0.0.1; all are stopped at the end of the test."""
    started: list[Simulator] = []

    async def start(agents: dict[str, int], faults: Faults | None = None, **kwargs) -> Simulator:
        simulator = Simulator(agents, faults=faults or Faults(), seed=1, **kwargs)
        await simulator.start()
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        await simulator.stop()


def dialerd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALERD_", "VGAI_"))}
    env.update({"VGAI_KEY": TEST_KEY, "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def dialerd(*args: str, **popen: Any) -> subprocess.Popen:
    """Start the real dialerd process (`python -m dialerd ARGS`)."""
    popen.setdefault("env", dialerd_env())
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "dialerd", *args], **popen)


def run_dialerd(
    *args: str, input: bytes | None = None, timeout: float = 60, **popen: Any
) -> subprocess.CompletedProcess:
    """Run dialerd to its end; stdin is `input` (or /dev/null)."""
    popen.setdefault("env", dialerd_env())
    return subprocess.run(
        [sys.executable, "-m", "dialerd", *args],
        input=input if input is not None else None,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        **popen,
    )


def result_lines(text: bytes | str) -> list[dict]:
    if isinstance(text, bytes):
        text = text.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
