"""Chunk splitting and reassembly: order, duplicates, integrity, timeouts, memory bound."""

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helora.shared.chunking import (
    CHUNK_COUNT,
    CHUNK_INDEX,
    CHUNK_SHA256,
    Complete,
    Failed,
    Pending,
    Reassembler,
    chunk_header,
    split,
)
from helora.shared.errors import DecodeError


def feed(r, pairs, order, t=0.0, first_tag=0):
    out = None
    for tag, i in enumerate(order, start=first_tag):
        headers, part = pairs[i]
        out = r.add(chunk_header(headers), part, tag, t)
    return out


def test_small_bodies_are_not_chunked():
    assert split(b"abc", "m", 10) == [({}, b"abc")]
    assert chunk_header({}) is None and chunk_header(None) is None


@settings(max_examples=50, deadline=None)
@given(body=st.binary(min_size=2, max_size=3000), size=st.integers(1, 700), seed=st.randoms())
def test_any_arrival_order_reassembles_exactly(body, size, seed):
    pairs = split(body, "m1", size)
    if len(pairs) == 1:
        return
    order = list(range(len(pairs)))
    seed.shuffle(order)
    done = feed(Reassembler(), pairs, order)
    assert isinstance(done, Complete) and done.body == body
    assert sorted(done.tags) == list(range(len(pairs)))


def test_duplicate_chunks_are_acked_separately_and_ignored():
    pairs = split(b"x" * 100, "m", 30)
    r = Reassembler()
    assert r.add(chunk_header(pairs[0][0]), pairs[0][1], 1, 0) == Pending()
    assert r.add(chunk_header(pairs[0][0]), pairs[0][1], 2, 0) == Pending(duplicate=True)
    done = feed(r, pairs, range(1, len(pairs)), first_tag=10)
    assert isinstance(done, Complete) and done.body == b"x" * 100
    assert 2 not in done.tags and sorted(done.tags) == [1, 10, 11, 12]


def test_a_corrupted_chunk_fails_the_set_on_completion():
    pairs = split(bytes(range(200)), "m", 64)
    pairs[1] = (pairs[1][0], b"\xff" + pairs[1][1][1:])
    failed = feed(Reassembler(), pairs, range(len(pairs)))
    assert isinstance(failed, Failed) and failed.reason == "corrupt_chunks"
    assert len(failed.tags) == len(pairs)


def test_inconsistent_headers_fail_the_set():
    pairs = split(b"y" * 100, "m", 40)
    r = Reassembler()
    r.add(chunk_header(pairs[0][0]), pairs[0][1], 0, 0)
    bad = dict(pairs[1][0])
    bad[CHUNK_SHA256] = hashlib.sha256(b"other").hexdigest()
    failed = r.add(chunk_header(bad), pairs[1][1], 1, 0)
    assert isinstance(failed, Failed) and failed.tags == (0, 1) and r.open_sets() == 0


def test_incomplete_sets_expire_with_their_tags():
    pairs = split(b"z" * 100, "m", 40)
    r = Reassembler(timeout=10)
    r.add(chunk_header(pairs[0][0]), pairs[0][1], 7, now=100.0)
    assert r.expired(now=105.0) == []
    (failed,) = r.expired(now=110.0)
    assert failed.reason == "incomplete_chunks" and failed.tags == (7,)
    assert r.open_sets() == 0 and r.held_bytes == 0


def test_memory_bound_fails_the_set_that_would_exceed_it():
    r = Reassembler(max_bytes=100)
    a, b = split(b"a" * 160, "a", 80), split(b"b" * 160, "b", 80)
    assert r.add(chunk_header(a[0][0]), a[0][1], 0, 0) == Pending()
    failed = r.add(chunk_header(b[0][0]), b[0][1], 1, 0)
    assert isinstance(failed, Failed) and failed.reason == "reassembly_full"
    assert r.held_bytes == 80


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.pop(CHUNK_COUNT),
        lambda h: h.__setitem__(CHUNK_INDEX, 99),
        lambda h: h.__setitem__(CHUNK_COUNT, 1),
        lambda h: h.__setitem__(CHUNK_INDEX, "0"),
        lambda h: h.__setitem__(CHUNK_SHA256, "short"),
        lambda h: h.__setitem__(CHUNK_INDEX, True),
    ],
)
def test_malformed_chunk_headers_are_decode_errors(mutate):
    headers = dict(split(b"q" * 10, "m", 4)[0][0])
    mutate(headers)
    with pytest.raises(DecodeError) as err:
        chunk_header(headers)
    assert err.value.reason == "corrupt_chunks"
