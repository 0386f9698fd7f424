"""Failpoints for crash tests: SIGKILL the process the Nth time a named point is reached.

Configured with the aggregator setting ``failpoint`` ("after_checkpoint:3"); empty (the
default) disables them. tests/e2e/test_crash.py uses them to kill the aggregator at the exact
moments that matter for exactly-once delivery.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

import structlog

log = structlog.get_logger(__name__)
POINTS = ("after_decode", "after_buffer", "after_checkpoint", "after_publish")


class Failpoints:
    def __init__(self, spec: str) -> None:
        point, _, nth = spec.partition(":")
        if point and point not in POINTS:
            raise ValueError(f"unknown failpoint {point!r}; one of {POINTS}")
        self.point = point
        self.nth = int(nth or 1)
        self._hits: Counter[str] = Counter()

    def reached(self, name: str) -> None:
        if name != self.point:
            return
        self._hits[name] += 1
        if self._hits[name] >= self.nth:
            log.warning("failpoint_kill", point=name)
            os.kill(os.getpid(), signal.SIGKILL)
