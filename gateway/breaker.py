"""A circuit breaker per named upstream (SPEC §13): closed, open, half-open.

Closed: every request goes through; `failures` consecutive failures open it. Open: skipped
for `open_secs`, doubled on each re-open up to `max_open_secs`. Then half-open: exactly one
trial goes through (its outcome is decided by the first-byte deadline, so it always comes;
a trial never reported within `trial_secs` of its start is presumed lost and another may go);
its success closes the breaker, its failure re-opens it. Apart from the state, an upstream's
`Retry-After` skips it for that long without counting as a failure.

Outcomes are reported with the `Permit` a request was given; a permit from before the last
change of state (a request that started while closed and fails after the breaker opened) has
no effect on it. Time is the caller's (`now`, monotonic seconds): pure, no I/O, no asyncio.
One event loop per process and no await inside: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CLOSED, HALF_OPEN, OPEN = 0, 1, 2  # the circuit_state gauge's values
MAX_OPEN_SECS = 300.0
TRIAL_GRACE_SECS = 1.0  # past the trial's own deadline, before it is presumed lost


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to send one request; reported back with its outcome."""

    epoch: int
    trial: bool = False


OnChange = Callable[[str, int], None]  # (event: "open" | "half_open" | "close", new state)


class Breaker:
    __slots__ = (
        "_base_secs",
        "_epoch",
        "_failures",
        "_limit",
        "_max_secs",
        "_on_change",
        "_open_secs",
        "_open_until",
        "_skip_until",
        "_trial",
        "_trial_expires",
        "state",
    )

    def __init__(
        self,
        failures: int,
        open_secs: float,
        max_open_secs: float = MAX_OPEN_SECS,
        on_change: OnChange | None = None,
    ) -> None:
        self._limit = failures
        self._base_secs = open_secs
        self._max_secs = max(max_open_secs, open_secs)
        self._on_change = on_change
        self.state = CLOSED
        self._epoch = 0
        self._failures = 0  # consecutive, while closed
        self._open_secs = open_secs  # this opening's length
        self._open_until = 0.0
        self._trial: Permit | None = None  # half-open: the trial in flight
        self._trial_expires = 0.0
        self._skip_until = 0.0  # Retry-After

    def available(self, now: float) -> bool:
        """Whether `acquire` would give a permit now (nothing changes)."""
        if now < self._skip_until:
            return False
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self._open_until
        return self._trial is None or now >= self._trial_expires

    def ready_at(self, now: float) -> float:
        """When a permit may next be given (`now` if now)."""
        at = now
        if self.state == OPEN:
            at = self._open_until
        elif self.state == HALF_OPEN and self._trial is not None:
            at = self._trial_expires
        return max(at, self._skip_until, now)

    def acquire(self, now: float, trial_secs: float) -> Permit | None:
        """A permit, or None: the upstream is to be skipped. An open breaker whose time is up
        turns half-open here and gives its one trial (`trial_secs`: that attempt's deadline)."""
        if not self.available(now):
            return None
        if self.state == CLOSED:
            return Permit(self._epoch)
        if self.state == OPEN:
            self._change(HALF_OPEN, "half_open")
        self._epoch += 1  # a trial presumed lost reports into an epoch gone by
        self._trial = Permit(self._epoch, trial=True)
        self._trial_expires = now + trial_secs + TRIAL_GRACE_SECS
        return self._trial

    def success(self, permit: Permit) -> None:
        if permit.epoch != self._epoch:
            return
        if permit.trial:
            self._open_secs = self._base_secs
            self._change(CLOSED, "close")
        else:
            self._failures = 0

    def failure(self, permit: Permit, now: float) -> None:
        if permit.epoch != self._epoch:
            return
        if permit.trial:
            self._open_secs = min(self._open_secs * 2, self._max_secs)
            self._open(now)
            return
        self._failures += 1
        if self._failures >= self._limit:
            self._open_secs = self._base_secs
            self._open(now)

    def skip(self, permit: Permit, now: float, secs: float) -> None:
        """The upstream said when to come back (Retry-After): skipped until then, no failure
        counted. A trial that got this answer frees its place for the next."""
        self._skip_until = max(self._skip_until, now + secs)
        self.release(permit)

    def release(self, permit: Permit) -> None:
        """A permit whose request ended without an outcome (the client left first)."""
        if permit.trial and self._trial is permit:
            self._trial = None

    def _open(self, now: float) -> None:
        self._open_until = now + self._open_secs
        self._failures = 0
        self._change(OPEN, "open")

    def _change(self, state: int, event: str) -> None:
        self.state = state
        self._epoch += 1
        self._trial = None
        if self._on_change is not None:
            self._on_change(event, state)


class Breakers:
    """One breaker per upstream name, made on first use; they outlive a routes reload, so an
    upstream that keeps its name keeps its state, and one the reload no longer names is
    forgotten (`keep`)."""

    __slots__ = ("_breakers", "_clock", "_failures", "_in_force", "_on_change", "_on_gone", "_open_secs")

    def __init__(
        self,
        failures: int,
        open_secs: float,
        on_change: Callable[[str, str | None, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self._failures = failures
        self._open_secs = open_secs
        self._on_change = on_change  # (upstream, event or None at creation, state)
        self._on_gone = on_gone  # (upstream): forgotten
        self._clock = clock
        self._breakers: dict[str, Breaker] = {}
        self._in_force: frozenset[str] | None = None  # the names of the routes in force; None: any

    def keep(self, names: Iterable[str]) -> None:
        """Routes a reload put in force name these upstreams: the breakers of the others are
        forgotten (`on_gone`: their circuit_state series leaves /metrics), theirs are made."""
        kept = frozenset(names)
        for name in [name for name in self._breakers if name not in kept]:
            del self._breakers[name]
            if self._on_gone is not None:
                self._on_gone(name)
        self._in_force = kept
        for name in kept:
            self[name]

    def now(self) -> float:
        return self._clock()

    def __getitem__(self, name: str) -> Breaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            if self._in_force is not None and name not in self._in_force:
                # Asked by a request still under routes a reload replaced, or by the routes of
                # one still being read: a breaker of its own, neither kept nor reported.
                return Breaker(self._failures, self._open_secs)
            on_change = self._on_change
            report: OnChange | None = None
            if on_change is not None:

                def report(event: str, state: int) -> None:
                    on_change(name, event, state)

                on_change(name, None, CLOSED)
            breaker = self._breakers[name] = Breaker(self._failures, self._open_secs, on_change=report)
        return breaker
