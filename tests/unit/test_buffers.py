"""dcp_cloud.buffers: the accounting that keeps uploads and downloads within their memory."""

from __future__ import annotations

import io
import mmap
import threading
import time

import pytest

from dcp_cloud.buffers import BufferPool, ByteBudget, ReadBuffers, ViewReader


def test_buffer_pool_reuses_its_buffers() -> None:
    pool = BufferPool(16, 2)
    a, b = pool.get(), pool.get()
    assert len(a) == len(b) == 16 and a is not b
    pool.put(a)
    assert pool.get() is a


def test_buffer_pool_blocks_while_every_buffer_is_out() -> None:
    pool = BufferPool(8, 1)
    held = pool.get()
    got: list[mmap.mmap] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get()))
    waiter.start()
    time.sleep(0.1)
    assert got == [] and waiter.is_alive()
    pool.put(held)
    waiter.join(5)
    assert got == [held]


def test_buffer_pool_never_allocates_more_than_its_count() -> None:
    pool = BufferPool(4, 3)
    out = [pool.get() for _ in range(3)]
    for buffer in out:
        pool.put(buffer)
    again = [pool.get() for _ in range(3)]
    assert {id(b) for b in again} == {id(b) for b in out}


def test_buffer_pool_needs_a_buffer() -> None:
    with pytest.raises(ValueError):
        BufferPool(4, 0)


def test_byte_budget_admits_up_to_its_limit() -> None:
    budget = ByteBudget(100)
    assert budget.try_acquire(60) and budget.try_acquire(40)
    assert budget.used == 100 and not budget.try_acquire(1)
    budget.release(40)
    assert not budget.try_acquire(41) and budget.try_acquire(40)
    budget.release(100)
    assert budget.used == 0


def test_byte_budget_admits_one_oversized_request_alone() -> None:
    budget = ByteBudget(100)
    assert budget.try_acquire(500) and budget.used == 500
    assert not budget.try_acquire(1)
    budget.release(500)
    assert budget.try_acquire(1) and not budget.try_acquire(500)


def test_read_buffers_round_capacity_up_to_the_granule() -> None:
    buffers = ReadBuffers(granule=4096, limit=1 << 20)
    assert buffers.capacity(1) == 4096 and buffers.capacity(0) == 4096
    assert buffers.capacity(4096) == 4096 and buffers.capacity(4097) == 8192


def test_read_buffers_hand_out_exact_views_and_reuse_by_capacity() -> None:
    buffers = ReadBuffers(granule=4096, limit=1 << 20)
    buffer, view = buffers.get(5000)
    assert len(view) == 5000 and len(buffer) == 8192
    view[:3] = b"abc"
    buffers.put(buffer)
    again, view2 = buffers.get(7000)  # same capacity: the same map
    assert again is buffer and len(view2) == 7000 and bytes(view2[:3]) == b"abc"
    other, _ = buffers.get(100)  # another capacity: a new map
    assert other is not buffer and len(other) == 4096


def test_read_buffers_drop_free_buffers_to_stay_within_the_limit() -> None:
    buffers = ReadBuffers(granule=4096, limit=3 * 4096)
    small, _ = buffers.get(4096)
    buffers.put(small)
    large, _ = buffers.get(3 * 4096)  # would exceed the limit with the free small one kept
    assert buffers.get(4096)[0] is not small  # it was dropped, not kept for reuse
    buffers.put(large)
    kept = ReadBuffers(granule=4096, limit=4 * 4096)
    small, _ = kept.get(4096)
    kept.put(small)
    kept.get(3 * 4096)  # fits beside the free small one
    assert kept.get(4096)[0] is small


def test_read_buffers_give_a_range_larger_than_the_limit_its_buffer() -> None:
    buffers = ReadBuffers(granule=4096, limit=4096)
    buffer, view = buffers.get(5 * 4096)
    assert len(view) == 5 * 4096 and len(buffer) == 5 * 4096


def test_view_reader_reads_seeks_and_tells_over_a_view() -> None:
    data = bytearray(b"0123456789")
    reader = ViewReader(memoryview(data))
    assert len(reader) == 10 and reader.readable() and reader.seekable()
    assert reader.read(3) == b"012" and reader.tell() == 3
    assert reader.seek(-2, io.SEEK_END) == 8 and reader.read() == b"89"
    assert reader.read(5) == b""
    reader.seek(1)
    reader.seek(2, io.SEEK_CUR)
    out = bytearray(4)
    assert reader.readinto(out) == 4 and out == b"3456"
    data[7] = ord("x")  # a view, not a copy
    assert reader.read(1) == b"x"


def test_buffer_pool_buffers_cost_only_the_pages_written() -> None:
    """A pool buffer takes resident memory only where bytes were written into it: a part that
    copies a few KiB of records into a 64 MiB buffer does not hold 64 MiB."""
    import psutil

    process = psutil.Process()
    pool = BufferPool(64 * 1024 * 1024, 4)
    before = process.memory_info().rss
    buffers = [pool.get() for _ in range(4)]
    for buffer in buffers:
        buffer[:4096] = b"r" * 4096
    grown = process.memory_info().rss - before
    assert grown < 16 * 1024 * 1024, grown  # four 64 MiB buffers, a page written in each
    assert all(bytes(buffer[:4096]) == b"r" * 4096 and buffer[4096] == 0 for buffer in buffers)
