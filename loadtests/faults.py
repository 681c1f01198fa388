"""The full-size fault runs: 200,000 events and 10 SIGKILLs, and the other faults scaled up.

    .venv/bin/python -m loadtests.faults            # every fault test, full size
    .venv/bin/python -m loadtests.faults -k kill    # extra arguments go to pytest

CI runs the same tests (tests/faults/) at the sizes in tests/faults/README.md; this sets
the environment variables that scale them and a longer per-test timeout. The tests start
their own private Kafka and Redis through deploy/ (no shared service is touched).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

FULL = {
    "DMP_FAULTS_EVENTS": "200000",
    "DMP_FAULTS_KILLS": "10",
    "DMP_FAULTS_STOP_EVENTS": "200000",
    "DMP_FAULTS_KAFKA_EVENTS": "200000",
    "DMP_FAULTS_REDIS_EVENTS": "100000",
    "DMP_FAULTS_REBALANCE_EVENTS": "200000",
    "DMP_FAULTS_REPLICA_EVENTS": "60000",
    "DMP_FAULTS_POISON_PURE": "20000",
    "DMP_FAULTS_POISON_STREAM": "5000",
}


def main(argv: Sequence[str]) -> int:
    env = {**FULL, **os.environ}  # a size set by hand wins
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-s",
        "--timeout=1800",
        "tests/faults",
        *argv,
    ]
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
