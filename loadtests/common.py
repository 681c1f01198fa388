"""What every load test shares: results (JSON, PNG, table), medians, pinned processes.

Every number a load test reports is a ratio against a baseline measured in the same run,
or a median of several runs interleaved with the baseline's, because this 2-core machine is
shared with other work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtests" / "results"
TAXONOMY = REPO.parent / "shared" / "data" / "taxonomy" / "audience-taxonomy-1.1.tsv"
SERVER_CORE = 0
CLIENT_CORE = 1


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers a load test started are stopped too."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def env_with(**overrides: str) -> dict[str, str]:
    """The environment for a child process: ours plus ``overrides``."""
    return {**os.environ, **overrides}


def stack_urls() -> tuple[str, str]:
    """(Redis URL, Kafka bootstrap) the load tests use, as the services read them."""
    from dmp.config import Settings

    settings = Settings.from_env(os.environ)
    return settings.redis.url, settings.kafka.bootstrap


@contextlib.contextmanager
def on_core(core: int) -> Iterator[None]:
    """This process (a load generator) runs on ``core`` inside the block, when it exists.

    Processes started inside keep their own pinning (``pinned``); threads started inside
    inherit this one.
    """
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) <= core:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pinned(core: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run on one core with taskset, when taskset exists and a core is given."""
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) <= core:
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


@dataclass
class Process:
    """A child process stopped with SIGTERM (then SIGKILL after ``grace`` seconds)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, grace: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running(
    name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path
) -> Iterator[Process]:
    """Run ``argv`` for the ``with`` block; its output goes to ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            list(argv), env=dict(env), stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    proc = Process(name, popen, log_path)
    try:
        yield proc
    finally:
        proc.stop()


class CpuWatch:
    """CPU seconds the rest of the machine used while we measured (other people's work).

    Busy time of the whole machine (/proc/stat) minus the watched processes' own time and
    our finished children's (the load generators): a run with much "other" load is suspect.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.other_cores = float("nan")

    def __enter__(self) -> CpuWatch:
        self._t0 = time.monotonic()
        self._busy0 = _machine_busy()
        self._own0 = _own_cpu(self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        other = (_machine_busy() - self._busy0) - (_own_cpu(self.pids) - self._own0)
        self.other_cores = max(0.0, other / wall) if wall > 0 else float("nan")


def _clk_tck() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _machine_busy() -> float:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _clk_tck()


def _own_cpu(pids: Sequence[int]) -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / _clk_tck()
        except (OSError, IndexError, ValueError):
            pass
    return total


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def wait_http(url: str, proc: Process, timeout: float, want: int = 200) -> float:
    """Seconds until ``url`` answers ``want``; raises if the process dies or time runs out."""
    started = time.monotonic()
    while True:
        if http_status(url, timeout=1.0) == want:
            return time.monotonic() - started
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{proc.name}: {url} not {want} after {timeout}s\n{proc.tail()}")
        time.sleep(0.05)


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def dmp_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmp.cli", *args]


def write_result(
    name: str,
    doc: Mapping[str, Any],
    chart: Callable[[Path], None] | None = None,
    results: Path = RESULTS,
) -> Path:
    """``results/name.json`` (and ``name.png`` drawn by ``chart``); returns the JSON path."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    if chart is not None:
        chart(results / f"{name}.png")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, numbers right-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
