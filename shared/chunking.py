"""Large messages in chunks: splitting, and reassembly with integrity checks (pure, no I/O).

A message longer than the chunk size travels as N AMQP messages with the same body split in
order; each carries these headers (docs/PROTOCOL.md, "Chunked messages"):

    x-helora-chunk-of      the message id (the update id), shared by all chunks
    x-helora-chunk-index   0..count-1
    x-helora-chunk-count   N >= 2
    x-helora-chunk-total   the whole message's length in bytes
    x-helora-chunk-sha256  hex SHA-256 of the whole message

Reassembly rules: every chunk of a set must agree on count, total and digest; a repeated index
is a duplicate (the first copy wins); a set is complete when all N indices arrived, and is then
accepted only if the concatenation has the declared length and digest. Sets that are not
complete ``timeout`` seconds after their first chunk expire. The bytes held across all open
sets are bounded; a chunk that would exceed the bound fails its set. A failed set is reported
with a reason (``corrupt_chunks``, ``incomplete_chunks``, ``reassembly_full``) and the delivery
tags of all its chunks, so the caller can dead-letter them: it is never applied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from helora.shared.errors import DecodeError

CHUNK_OF = "x-helora-chunk-of"
CHUNK_INDEX = "x-helora-chunk-index"
CHUNK_COUNT = "x-helora-chunk-count"
CHUNK_TOTAL = "x-helora-chunk-total"
CHUNK_SHA256 = "x-helora-chunk-sha256"
MAX_CHUNKS = 4096


@dataclass(frozen=True)
class ChunkHeader:
    message_id: str
    index: int
    count: int
    total: int
    sha256: str


def split(body: bytes, message_id: str, chunk_size: int) -> list[tuple[dict[str, Any], bytes]]:
    """(headers, chunk) pairs for a body longer than ``chunk_size``; one plain pair otherwise."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if len(body) <= chunk_size:
        return [({}, body)]
    digest = hashlib.sha256(body).hexdigest()
    parts = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    return [
        (
            {
                CHUNK_OF: message_id,
                CHUNK_INDEX: i,
                CHUNK_COUNT: len(parts),
                CHUNK_TOTAL: len(body),
                CHUNK_SHA256: digest,
            },
            part,
        )
        for i, part in enumerate(parts)
    ]


def chunk_header(headers: dict[str, Any] | None) -> ChunkHeader | None:
    """The chunk header of a delivery, None for an unchunked message; malformed -> DecodeError."""
    if not headers or CHUNK_OF not in headers:
        return None
    try:
        h = ChunkHeader(
            message_id=_text(headers[CHUNK_OF]),
            index=_int(headers[CHUNK_INDEX]),
            count=_int(headers[CHUNK_COUNT]),
            total=_int(headers[CHUNK_TOTAL]),
            sha256=_text(headers[CHUNK_SHA256]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError("corrupt_chunks", f"bad chunk headers: {exc!r}") from exc
    if not (2 <= h.count <= MAX_CHUNKS and 0 <= h.index < h.count and h.total >= h.count):
        raise DecodeError("corrupt_chunks", f"chunk {h.index}/{h.count} of {h.total} bytes")
    if len(h.sha256) != 64 or len(h.message_id) > 256:
        raise DecodeError("corrupt_chunks", "bad digest or message id")
    return h


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an int, got {type(v).__name__}")
    return v


@dataclass
class _Set:
    header: ChunkHeader
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    tags: list[int] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(len(p) for p in self.parts.values())


@dataclass(frozen=True)
class Pending:
    duplicate: bool = False  # this chunk repeated an index already held: ack it at once


@dataclass(frozen=True)
class Complete:
    message_id: str
    body: bytes
    tags: tuple[int, ...]


@dataclass(frozen=True)
class Failed:
    message_id: str
    reason: str
    detail: str
    tags: tuple[int, ...]


class Reassembler:
    def __init__(self, *, timeout: float = 120.0, max_bytes: int = 1 << 30) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._sets: dict[str, _Set] = {}

    @property
    def held_bytes(self) -> int:
        return sum(s.held for s in self._sets.values())

    def open_sets(self) -> int:
        return len(self._sets)

    def add(
        self, h: ChunkHeader, chunk: bytes, tag: int, now: float
    ) -> Pending | Complete | Failed:
        s = self._sets.get(h.message_id)
        if s is None:
            s = self._sets[h.message_id] = _Set(h, now)
        s.tags.append(tag)
        if (h.count, h.total, h.sha256) != (s.header.count, s.header.total, s.header.sha256):
            return self._fail(s, "corrupt_chunks", f"chunk {h.index} disagrees with its set")
        if h.index in s.parts:
            s.tags.pop()
            return Pending(duplicate=True)
        if self.held_bytes + len(chunk) > self.max_bytes:
            return self._fail(s, "reassembly_full", f"more than {self.max_bytes} bytes held")
        s.parts[h.index] = chunk
        if len(s.parts) < h.count:
            return Pending()
        del self._sets[h.message_id]
        body = b"".join(s.parts[i] for i in range(h.count))
        if len(body) != h.total or hashlib.sha256(body).hexdigest() != h.sha256:
            return Failed(
                h.message_id, "corrupt_chunks", "length or digest mismatch", tuple(s.tags)
            )
        return Complete(h.message_id, body, tuple(s.tags))

    def expired(self, now: float) -> list[Failed]:
        """Sets still incomplete ``timeout`` seconds after their first chunk (removed)."""
        out = []
        for mid, s in list(self._sets.items()):
            if now - s.started >= self.timeout:
                del self._sets[mid]
                detail = f"{len(s.parts)} of {s.header.count} chunks after {self.timeout:g} s"
                out.append(Failed(mid, "incomplete_chunks", detail, tuple(s.tags)))
        return out

    def clear(self) -> None:
        """Forget everything (the connection was lost: the chunks will be redelivered)."""
        self._sets.clear()

    def _fail(self, s: _Set, reason: str, detail: str) -> Failed:
        del self._sets[s.header.message_id]
        return Failed(s.header.message_id, reason, detail, tuple(s.tags))
