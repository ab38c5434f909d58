"""LeaseKeeper (flows/lease.py): the one rule every lease holder follows, on a fake clock, then once on real
threads with a renewal that hangs."""
from __future__ import annotations

import threading

import pytest

from flows.lease import LAPSED, TAKEN, LeaseKeeper, keep_one
from tests.support.waiting import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def keeper_of(clock: Clock, answers: list, lease: float = 9.0) -> tuple[LeaseKeeper, list[tuple[str, str]]]:
    """A keeper whose renewals answer from `answers` (a set of held keys, or an exception to raise)."""
    lost: list[tuple[str, str]] = []

    def renew(keys: list[str]) -> set[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return LeaseKeeper("test", renew, lease, lambda key, why: lost.append((key, why)), clock=clock), lost


def test_a_lease_renewed_every_third_is_kept_for_ever(clock):
    keeper, lost = keeper_of(clock, [{"a"}] * 100)
    keeper.hold("a")
    for _ in range(100):
        clock.now += keeper.renew_every
        keeper.renew_once()
        keeper.check()
    assert lost == [] and keeper.held() == ["a"]


def test_a_renewal_that_says_not_held_loses_the_lease_at_once(clock):
    keeper, lost = keeper_of(clock, [{"b"}])
    keeper.hold("a")
    keeper.hold("b")
    keeper.renew_once()
    assert lost == [("a", TAKEN)] and keeper.held() == ["b"]


def test_failed_renewals_lose_the_lease_after_two_thirds_of_it_not_before(clock):
    keeper, lost = keeper_of(clock, [ConnectionError("database unreachable")] * 3)
    keeper.hold("a")
    for _ in range(2):
        clock.now += keeper.renew_every
        keeper.renew_once()
        keeper.check()
    assert lost == []  # exactly 2/3 of the lease: still held
    clock.now += 0.01
    keeper.check()
    assert lost == [("a", LAPSED)]


def test_a_renewal_that_hangs_still_loses_the_lease_on_time(clock):
    """The fence is the clock's business, not the renewal's: nothing answers, and the lease is lost all the same."""
    keeper, lost = keeper_of(clock, [])
    keeper.hold("a")
    clock.now += keeper.fence_after + 0.01  # no renewal ever returned
    keeper.check()
    assert lost == [("a", LAPSED)]


def test_a_renewal_counts_from_when_it_was_sent_not_when_it_answered(clock):
    sent_at = []

    def slow_renew(keys: list[str]) -> set[str]:
        sent_at.append(clock.now)
        clock.now += 5.0  # the answer took 5 s of a 9 s lease
        return set(keys)

    lost: list = []
    keeper = LeaseKeeper("test", slow_renew, 9.0, lambda key, why: lost.append((key, why)), clock=clock)
    keeper.hold("a")
    clock.now += 1.0
    keeper.renew_once()
    clock.now = sent_at[0] + keeper.fence_after + 0.01
    keeper.check()
    assert lost == [("a", LAPSED)]


def test_a_key_released_while_its_renewal_was_under_way_is_never_reported_lost(clock):
    """A run that ended (its end recorded) as a renewal of it was in flight: the renewal finds it not held."""
    keeper: LeaseKeeper

    def renew_as_the_run_ends(keys: list[str]) -> set[str]:
        keeper.release("a")
        return set()

    lost: list = []
    keeper = LeaseKeeper("test", renew_as_the_run_ends, 9.0, lambda key, why: lost.append((key, why)), clock=clock)
    keeper.hold("a")
    keeper.renew_once()
    clock.now += 100
    keeper.check()
    assert lost == []


def test_a_lease_is_counted_from_when_its_claim_was_sent(clock):
    keeper, lost = keeper_of(clock, [])
    keeper.hold("a", since=clock.now - 5.0)  # the claim took 5 s to answer
    clock.now += keeper.fence_after - 5.0 + 0.01
    keeper.check()
    assert lost == [("a", LAPSED)]


def test_a_hung_renewal_on_real_threads_sets_lost_while_it_still_hangs():
    """What a database that stops answering without closing the connection does to a renewal."""
    hanging, release = threading.Event(), threading.Event()

    def renew() -> bool:
        hanging.set()
        release.wait(60)
        return True

    lost = threading.Event()
    keeper = keep_one("connector:x", renew, lease_seconds=0.6, lost=lost)
    try:
        assert hanging.wait(30), "no renewal was sent"
        wait_until(lost.is_set, what="the lease fenced while its renewal hangs")
        assert not release.is_set()
    finally:
        release.set()
        keeper.close()
