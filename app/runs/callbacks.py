"""Run callbacks in the store: deliveries claimed by one process at a time, and every attempt recorded."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from app.runs.models import CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_PENDING, Run, RunCallback, utcnow
from flows.database import Database, rowcount
from flows.outcome import TERMINAL


class CallbackStore:
    """Pending deliveries of ended runs; a claim holds one for a while so two senders never send it twice."""

    def __init__(self, database: Database):
        self.database = database

    def claim(self, owner: str, lease_seconds: float) -> tuple[RunCallback, Run] | None:
        """Take the next due delivery of an ended run (held for `lease_seconds`); None when none is due."""

        def attempt() -> tuple[RunCallback, Run] | None:
            now = utcnow()
            with self.database.session(write=True) as session:
                found = session.execute(
                    select(RunCallback, Run).join(Run, Run.id == RunCallback.run_id)
                    .where(RunCallback.status == CALLBACK_PENDING, Run.status.in_(TERMINAL),
                           RunCallback.next_attempt_at <= now,
                           (RunCallback.claimed_until.is_(None)) | (RunCallback.claimed_until < now))
                    .order_by(RunCallback.next_attempt_at).limit(1)
                    .with_for_update(skip_locked=True, of=RunCallback)).first()
                if found is None:
                    return None
                callback, run = found
                callback.claimed_by, callback.claimed_until = owner, now + timedelta(seconds=lease_seconds)
                return callback, run

        return self.database.retry(attempt)

    def extend_claim(self, run_id: str, owner: str, lease_seconds: float) -> bool:
        """Hold a claimed delivery `lease_seconds` longer (while it is in flight); False when `owner` lost it."""

        def attempt() -> bool:
            with self.database.session(write=True) as session:
                return rowcount(session.execute(update(RunCallback).where(
                    RunCallback.run_id == run_id, RunCallback.claimed_by == owner)
                    .values(claimed_until=utcnow() + timedelta(seconds=lease_seconds)))) == 1

        return self.database.retry(attempt)

    def record_delivery(self, run_id: str, owner: str, attempt: dict[str, Any], delivered: bool,
                        retry_at: datetime | None) -> None:
        """Add one delivery attempt; `retry_at` None without delivery means the callback gave up."""

        def write() -> None:
            with self.database.session(write=True) as session:
                # Row-locked: a sender whose claim lapsed must not write over the claim another sender took since.
                callback = session.get(RunCallback, run_id, with_for_update=True)
                if callback is None or callback.claimed_by != owner:
                    return
                callback.attempts = [*(callback.attempts or []), attempt]
                callback.claimed_by, callback.claimed_until = None, None
                if delivered:
                    callback.status = CALLBACK_DELIVERED
                elif retry_at is None:
                    callback.status = CALLBACK_FAILED
                else:
                    callback.next_attempt_at = retry_at

        self.database.retry(write)
