"""`dmp lookup --workers 2`: two processes on one port (SO_REUSEPORT), metrics merged."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict

from dmp.config import Settings
from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, bytes]:
    # A new connection each time, so the kernel spreads them over the workers.
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status, response.read()


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "dmp lookup --workers exited early"
        try:
            status, _ = await asyncio.to_thread(_get, url)
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout}s")


def _served(multiproc: Path) -> set[int]:
    """The workers whose own histogram file holds a request to the segments route.

    A file alone says little: a worker makes it with its metrics, before it listens.
    """
    served = set()
    for path in multiproc.glob("histogram_*.db"):
        pid = re.search(r"_(\d+)\.db$", path.name)
        if pid is None:
            continue
        rows = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        for key, value, *_ in rows:
            _, sample, labels, _ = json.loads(key)
            # The files hold each bucket's own count (a scrape makes them cumulative).
            if (
                sample == "dmp_lookup_request_duration_seconds_bucket"
                and labels.get("endpoint") == "/v1/users/{uid}/segments"
                and value > 0
            ):
                served.add(int(pid.group(1)))
    return served


def _worker_pids(parent: int) -> list[int]:
    out = subprocess.run(
        ["ps", "--ppid", str(parent), "-o", "pid="], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


async def test_two_workers_share_the_port_and_the_metrics(
    settings: Settings, tmp_path: Path
) -> None:
    port = _free_port()
    multiproc = tmp_path / "metrics"
    env = {
        **os.environ,
        "DMP_REDIS_URL": settings.redis.url,
        "DMP_REDIS_KEY_PREFIX": settings.redis.key_prefix,
        "DMP_KAFKA_TOPIC": settings.kafka.topic,
        "DMP_RULES_PATH": str(settings.rules_path),
        "DMP_LOOKUP_HOST": "127.0.0.1",
        "DMP_LOOKUP_PORT": str(port),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
    }
    # A real process tree (supervisor + workers) is the point; Popen returns at once.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "dmp.cli", "lookup", "--workers", "2"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(f"{base}/readyz", proc, 60)
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        # /readyz answered from one worker; the other may still be loading and not yet
        # listening. Ask until both have served (new connections spread over the workers
        # listening), at least 60 times, for up to 60 s.
        requests = 0
        served: set[int] = set()
        deadline = time.monotonic() + 60
        while requests < 60 or (served != set(workers) and time.monotonic() < deadline):
            status, _ = await asyncio.to_thread(_get, f"{base}/v1/users/c{requests}/segments")
            assert status == 200
            requests += 1
            served = _served(multiproc)
        assert served == set(workers)
        _, body = await asyncio.to_thread(_get, f"{base}/metrics")
        counts = re.findall(
            rb'dmp_lookup_request_duration_seconds_count\{endpoint="/v1/users/\{uid\}/segments"'
            rb'[^}]*status="200"[^}]*\} ([0-9.]+)',
            body,
        )
        assert sum(float(c) for c in counts) == requests
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("dmp lookup --workers did not stop within 30 s of SIGTERM")
    assert code == 0
    assert _worker_pids(proc.pid) == []


def test_workers_refuse_to_start_without_a_metrics_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-m", "dmp.cli", "lookup", "--workers", "2"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert b"PROMETHEUS_MULTIPROC_DIR" in done.stderr
