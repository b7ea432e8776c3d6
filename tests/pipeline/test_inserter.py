"""The writer's insert thread: tasks in order, one batch at a time, its errors raised in the loop."""

from __future__ import annotations

import threading

import pytest

from sensorhub.pipeline.inserter import InsertThread


def test_tasks_run_in_order_and_a_second_batch_waits_for_the_first() -> None:
    beats: list[int] = []
    t = InsertThread("test", lambda: beats.append(1))
    done: list[str] = []
    gate = threading.Event()
    t.submit_batch(lambda: (gate.wait(5), done.append("batch-1")))
    t.submit(lambda: done.append("export"))  # does not wait for the batch
    assert t.busy()
    assert not t.wait_batch(0.6)  # the first batch is held
    assert beats  # the loop's watchdog went on ticking while it waited
    waiter = threading.Thread(target=lambda: t.submit_batch(lambda: done.append("batch-2")))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and done == []  # the second batch waits for the first
    gate.set()
    waiter.join(5)
    t.drain()
    assert done == ["batch-1", "export", "batch-2"] and not t.busy()
    t.close()


def test_an_error_in_the_thread_is_raised_in_the_loop_and_drops_what_was_queued() -> None:
    t = InsertThread("test", lambda: None)
    ran: list[str] = []
    gate = threading.Event()

    def fail() -> None:
        gate.wait(5)
        raise InterruptedError("INSERT into ClickHouse")

    t.submit_batch(fail)
    t.submit(lambda: ran.append("after"))
    gate.set()
    with pytest.raises(InterruptedError, match="INSERT into ClickHouse"):
        t.drain()
    assert ran == [] and not t.busy()
    t.submit(lambda: ran.append("again"))  # raised once; the thread goes on
    t.drain()
    assert ran == ["again"]
    t.close()


def test_a_batch_queued_behind_a_failing_task_is_dropped_and_not_left_in_flight() -> None:
    t = InsertThread("test", lambda: None)
    gate = threading.Event()

    def broken_export() -> None:
        gate.wait(5)
        raise RuntimeError("export bug")

    ran: list[str] = []
    t.submit(broken_export)
    t.submit_batch(lambda: ran.append("batch"))  # no batch in flight: queued behind the export
    assert t.busy()
    gate.set()
    with pytest.raises(RuntimeError, match="export bug"):
        t.drain()
    assert ran == [] and not t.busy()
    assert t.wait_batch(0.1)  # nothing left to wait for
    t.close()
