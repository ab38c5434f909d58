"""Two run-store calls made to race: one held between its reads and its write while the other runs, on PostgreSQL
(READ COMMITTED: the held write meets a row changed since its read) and SQLite (the held call has the write lock)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from app.runs.store import RunStore
from tests.support.waiting import wait_until

HELD, OTHER = "flowgate-test-held", "flowgate-test-other"


@dataclass
class Race:
    """What the two calls returned, and whether the other call ended while the held one waited to write (on
    PostgreSQL it does: the held call holds no lock the other needs; on SQLite it holds the write lock)."""

    held: Any
    other: Any
    other_ended_first: bool


def race(store: RunStore, held: Callable[[], Any], other: Callable[[], Any], table: str = "runs",
         verb: str = "UPDATE") -> Race:
    """Run `held` until it is about to send its first UPDATE of `table` (its reads done; or `verb`: INSERT INTO),
    then `other` until it ends or waits for a lock `held` has, then let `held` write."""
    at_write, go = threading.Event(), threading.Event()
    other_began_writing, other_pids = threading.Event(), set()
    results: dict[str, Any] = {}

    def hook(connection, cursor, statement, parameters, context, executemany) -> None:
        name = threading.current_thread().name
        if name == HELD and statement.lstrip().upper().startswith(f"{verb} {table.upper()} ") \
                and not at_write.is_set():
            at_write.set()
            assert go.wait(30), "the test never let the held call write"
        elif name == OTHER and not store.is_sqlite:
            other_pids.add(connection.connection.dbapi_connection.info.backend_pid)

    def run(name: str, fn: Callable[[], Any]) -> threading.Thread:
        def body() -> None:
            try:
                results[name] = fn()
            except BaseException as exc:  # re-raised in the test's thread
                results[name] = exc
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    take_write_turn = store.db._take_write_turn

    def taking_write_turn(*args: Any) -> None:
        if threading.current_thread().name == OTHER:
            other_began_writing.set()
        take_write_turn(*args)

    def other_waits_for_a_lock() -> bool:
        if store.is_sqlite:  # its write waits for the process's write turn, which the held call has
            return other_began_writing.is_set()
        if not other_pids:
            return False
        with store.engine.connect() as connection:
            return connection.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids) AND wait_event_type = 'Lock'"),
                {"pids": list(other_pids)}).scalar_one() > 0

    event.listen(store.engine, "before_cursor_execute", hook)
    store.db._take_write_turn = taking_write_turn  # observed, not replaced: it still waits for the turn
    try:
        held_thread = run(HELD, held)
        wait_until(lambda: at_write.is_set() or not held_thread.is_alive(), what="the held call at its write")
        other_thread = run(OTHER, other)
        wait_until(lambda: not other_thread.is_alive() or other_waits_for_a_lock(), every=0.01,
                   what="the other call ended or waiting")
        other_ended_first = not other_thread.is_alive()
        go.set()
        held_thread.join(30)
        other_thread.join(30)
    finally:
        go.set()
        del store.db._take_write_turn
        event.remove(store.engine, "before_cursor_execute", hook)
    for name in (HELD, OTHER):
        if isinstance(results.get(name), BaseException):
            raise results[name]
    return Race(results.get(HELD), results.get(OTHER), other_ended_first)
