"""The aggregator's chunk gate: holds chunk deliveries until their message is whole.

Chunks stay unacked while their set is open (a crash means redelivery); a complete set becomes
one message whose acknowledgement covers every chunk's delivery tag; a failed or expired set has
every chunk dead-lettered with the reason, so nothing is silently dropped and nothing partial is
ever applied. Broker calls are injected (``ack``, ``reject``), so this module does no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from helora.broker.consumer import Delivery
from helora.shared.chunking import Complete, Failed, Pending, Reassembler, chunk_header
from helora.shared.errors import DecodeError


@dataclass(frozen=True)
class Whole:
    delivery: Delivery  # the whole message (body reassembled when it came in chunks)
    tags: tuple[int, ...]  # every delivery tag to ack (or dead-letter) with it


class ChunkGate:
    def __init__(
        self,
        reassembler: Reassembler,
        *,
        ack: Callable[[int], None],
        reject: Callable[[Delivery, str, str], None],
    ) -> None:
        self.reassembler = reassembler
        self._ack = ack
        self._reject = reject
        self._held: dict[int, Delivery] = {}  # chunk deliveries of open sets, by tag

    def offer(self, d: Delivery, now: float) -> Whole | None:
        """The whole message if ``d`` completes one (or is not chunked), else None."""
        try:
            header = chunk_header(d.headers)
        except DecodeError as exc:
            self._reject(d, exc.reason, exc.detail)
            return None
        if header is None:
            return Whole(d, (d.tag,))
        result = self.reassembler.add(header, d.body, d.tag, now)
        if isinstance(result, Pending):
            if result.duplicate:
                self._ack(d.tag)
            else:
                self._held[d.tag] = d
            return None
        self._held[d.tag] = d
        if isinstance(result, Failed):
            self._fail(result)
            return None
        assert isinstance(result, Complete)
        first = self._held[result.tags[0]]
        for tag in result.tags:
            self._held.pop(tag, None)
        headers = {k: v for k, v in first.headers.items() if not k.startswith("x-helora-chunk-")}
        whole = dataclasses.replace(
            first, body=result.body, headers=headers, message_id=result.message_id
        )
        return Whole(whole, result.tags)

    def expire(self, now: float) -> None:
        for failed in self.reassembler.expired(now):
            self._fail(failed)

    def clear(self) -> None:
        self.reassembler.clear()
        self._held.clear()

    def _fail(self, failed: Failed) -> None:
        for tag in failed.tags:
            self._reject(self._held.pop(tag), failed.reason, failed.detail)
