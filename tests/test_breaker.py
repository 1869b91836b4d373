"""gateway/breaker.py: SPEC §13's circuit breaker, by example and as a state machine property."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, TRIAL_GRACE_SECS, Breaker, Breakers, Permit

DEADLINE = 5.0


def recorded(failures: int = 3, open_secs: float = 10.0) -> tuple[Breaker, list[str]]:
    events: list[str] = []
    breaker = Breaker(failures, open_secs, max_open_secs=60.0, on_change=lambda event, state: events.append(event))
    return breaker, events


def fail(breaker: Breaker, now: float) -> None:
    permit = breaker.acquire(now, DEADLINE)
    assert permit is not None
    breaker.failure(permit, now)


def test_consecutive_failures_open_it_and_a_success_in_between_resets_the_count() -> None:
    breaker, events = recorded(failures=3)
    fail(breaker, 0)
    fail(breaker, 0)
    ok = breaker.acquire(0, DEADLINE)
    assert ok is not None
    breaker.success(ok)
    fail(breaker, 0)
    fail(breaker, 0)
    assert breaker.state == CLOSED and events == []
    fail(breaker, 1)
    assert breaker.state == OPEN and events == ["open"]
    assert breaker.acquire(10.9, DEADLINE) is None and not breaker.available(10.9)
    assert breaker.ready_at(5) == 11


def test_one_trial_when_half_open_success_closes() -> None:
    breaker, events = recorded(failures=1)
    fail(breaker, 0)
    trial = breaker.acquire(10, DEADLINE)
    assert trial is not None and trial.trial and breaker.state == HALF_OPEN
    assert breaker.acquire(10, DEADLINE) is None  # exactly one trial
    assert breaker.acquire(10 + DEADLINE, DEADLINE) is None  # still within its deadline
    breaker.success(trial)
    assert breaker.state == CLOSED and events == ["open", "half_open", "close"]
    assert breaker.acquire(10, DEADLINE) is not None


def test_a_failed_trial_reopens_for_twice_as_long_up_to_the_cap_and_a_close_resets_it() -> None:
    breaker, _events = recorded(failures=1, open_secs=10)
    fail(breaker, 0)
    now, lengths = 0.0, []
    for _ in range(5):
        now = breaker.ready_at(now)
        trial = breaker.acquire(now, DEADLINE)
        assert trial is not None and trial.trial
        breaker.failure(trial, now)
        lengths.append(breaker.ready_at(now) - now)
    assert lengths == [20, 40, 60, 60, 60]
    now = breaker.ready_at(now)
    trial = breaker.acquire(now, DEADLINE)
    assert trial is not None
    breaker.success(trial)
    fail(breaker, now)
    assert breaker.ready_at(now) - now == 10


def test_a_lost_trial_lets_another_go_and_its_late_outcome_changes_nothing() -> None:
    breaker, _ = recorded(failures=1)
    fail(breaker, 0)
    lost = breaker.acquire(10, DEADLINE)
    assert lost is not None
    later = 10 + DEADLINE + TRIAL_GRACE_SECS
    second = breaker.acquire(later, DEADLINE)
    assert second is not None and second.trial
    breaker.failure(lost, later)  # the first trial's outcome arrives at last: ignored
    assert breaker.state == HALF_OPEN
    breaker.success(second)
    assert breaker.state == CLOSED


def test_outcomes_of_requests_from_before_a_change_are_ignored() -> None:
    breaker, events = recorded(failures=2)
    early = [breaker.acquire(0, DEADLINE) for _ in range(4)]
    assert all(p is not None for p in early)
    for permit in early:
        assert permit is not None
        breaker.failure(permit, 0)
    assert events == ["open"]  # the third and fourth failures fall on an open breaker
    trial = breaker.acquire(10, DEADLINE)
    assert trial is not None
    breaker.success(early[0])  # type: ignore[arg-type]
    assert breaker.state == HALF_OPEN  # only the trial decides


def test_retry_after_skips_without_counting_a_failure() -> None:
    breaker, events = recorded(failures=1)
    permit = breaker.acquire(0, DEADLINE)
    assert permit is not None
    breaker.skip(permit, 0, 7)
    assert breaker.state == CLOSED and events == []
    assert breaker.acquire(6.9, DEADLINE) is None and breaker.ready_at(1) == 7
    assert breaker.acquire(7, DEADLINE) is not None


def test_a_trial_answered_with_retry_after_frees_its_place() -> None:
    breaker, _events = recorded(failures=1)
    fail(breaker, 0)
    trial = breaker.acquire(10, DEADLINE)
    assert trial is not None
    breaker.skip(trial, 10, 2)
    assert breaker.state == HALF_OPEN and breaker.acquire(11, DEADLINE) is None
    again = breaker.acquire(12, DEADLINE)
    assert again is not None and again.trial
    breaker.release(again)  # the client left: no outcome, the next request may try
    assert breaker.acquire(12, DEADLINE) is not None


def test_breakers_are_made_per_name_and_reported() -> None:
    seen: list[tuple[str, str | None, int]] = []
    breakers = Breakers(1, 5, lambda name, event, state: seen.append((name, event, state)), clock=lambda: 0.0)
    assert breakers["a"] is breakers["a"] and breakers["b"] is not breakers["a"]
    permit = breakers["a"].acquire(0, 1)
    assert permit is not None
    breakers["a"].failure(permit, 0)
    assert seen == [("a", None, CLOSED), ("b", None, CLOSED), ("a", "open", OPEN)]


def test_an_upstream_a_reload_no_longer_names_is_forgotten_and_comes_back_fresh() -> None:
    seen: list[tuple[str, str | None, int]] = []
    gone: list[str] = []
    breakers = Breakers(1, 5, lambda name, event, state: seen.append((name, event, state)), lambda: 0.0, gone.append)
    a, b = breakers["a"], breakers["b"]
    permit = b.acquire(0, 1)
    assert permit is not None
    b.failure(permit, 0)  # b is open
    seen.clear()
    breakers.keep(["a"])
    assert gone == ["b"] and breakers["a"] is a
    # A request still under the replaced routes asks for b: a breaker of its own, not reported.
    stray = breakers["b"]
    assert stray is not b and breakers["b"] is not stray and stray.state == CLOSED
    permit = stray.acquire(0, 1)
    assert permit is not None
    stray.failure(permit, 0)
    assert seen == []
    breakers.keep(["a", "b"])  # back: closed, reported, kept
    assert seen == [("b", None, CLOSED)] and breakers["b"] is breakers["b"] and breakers["b"].state == CLOSED


# --- the property: every sequence of requests and outcomes keeps SPEC §13's rules ----------

FAILURES, OPEN_SECS, MAX_SECS = 3, 4.0, 20.0
ALLOWED = {(CLOSED, "open"), (OPEN, "half_open"), (HALF_OPEN, "open"), (HALF_OPEN, "close")}


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.breaker = Breaker(FAILURES, OPEN_SECS, MAX_SECS, on_change=lambda e, s: self.events.append((e, s)))
        self.now = 0.0
        self.outstanding: list[Permit] = []
        self.state = CLOSED  # what the events say
        self.streak = 0  # consecutive failures reported on permits given while closed, since the last change
        self.closed_permits: set[int] = set()  # ids of permits given in the current closed period
        self.open_length = OPEN_SECS
        self.open_until = 0.0
        self.skip_until = 0.0
        self.live_trial: Permit | None = None
        self.trial_expires = 0.0

    def _observe_events(self, before: int) -> list[str]:
        new = self.events[before:]
        for event, state in new:
            assert (self.state, event) in ALLOWED, (self.state, event)
            self.state = state
            self.streak = 0
            self.closed_permits.clear()
            self.live_trial = None
        assert self.breaker.state == self.state
        return [event for event, _ in new]

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 4.0, 7.0]))
    def request(self, dt: float) -> None:
        self.now += dt
        before = len(self.events)
        state = self.state
        permit = self.breaker.acquire(self.now, DEADLINE)
        events = self._observe_events(before)
        if self.now < self.skip_until:
            assert permit is None and events == []
            return
        if state == CLOSED:
            assert permit is not None and not permit.trial and events == []
            self.closed_permits.add(id(permit))
        elif state == OPEN:
            if self.now < self.open_until:
                assert permit is None and events == []
                return
            assert permit is not None and permit.trial and events == ["half_open"]
        else:
            trial_busy = self.live_trial is not None and self.now < self.trial_expires
            assert (permit is None) == trial_busy and events == []
            if permit is None:
                return
            assert permit.trial
        if permit.trial:
            self.live_trial = permit
            self.trial_expires = self.now + DEADLINE + TRIAL_GRACE_SECS
        self.outstanding.append(permit)

    @precondition(lambda self: self.outstanding)
    @rule(which=st.integers(min_value=0), outcome=st.sampled_from(["success", "failure", "skip", "release"]))
    def report(self, which: int, outcome: str) -> None:
        permit = self.outstanding.pop(which % len(self.outstanding))
        before = len(self.events)
        state = self.state
        current_trial = permit is self.live_trial and state == HALF_OPEN
        current_closed = id(permit) in self.closed_permits and state == CLOSED
        if outcome == "success":
            self.breaker.success(permit)
        elif outcome == "failure":
            self.breaker.failure(permit, self.now)
        elif outcome == "skip":
            self.breaker.skip(permit, self.now, 2.0)
            self.skip_until = max(self.skip_until, self.now + 2.0)
        else:
            self.breaker.release(permit)
        streak = self.streak
        events = self._observe_events(before)
        if current_trial and outcome == "success":
            assert events == ["close"]
            self.open_length = OPEN_SECS
        elif current_trial and outcome == "failure":
            assert events == ["open"]
            self.open_length = min(self.open_length * 2, MAX_SECS)
            self.open_until = self.now + self.open_length
        elif current_closed and outcome == "failure":
            if streak + 1 == FAILURES:
                assert events == ["open"]
                self.open_length = OPEN_SECS
                self.open_until = self.now + OPEN_SECS
            else:
                assert events == []
                self.streak = streak + 1
        else:
            assert events == []  # stale permits, skips and releases change no state
            if current_closed and outcome == "success":
                self.streak = 0
            if current_trial and outcome in ("skip", "release"):
                self.live_trial = None

    @invariant()
    def open_is_open_until_its_time(self) -> None:
        if self.state == OPEN:
            assert self.breaker.ready_at(self.now) == max(self.open_until, self.skip_until, self.now)


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
