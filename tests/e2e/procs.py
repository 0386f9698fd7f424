"""Helpers for tests that run helora as processes: start, read JSON log lines, stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

# the smallest real training configuration (SST-2, packaged MiniLM)
TINY = ["--max-train", "240", "--steps", "3", "--batch-size", "8", "--max-length", "32"]


def spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "helora", *args],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
