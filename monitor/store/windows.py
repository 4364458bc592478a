"""Which states a compaction adds to, and how maintenance moves windows: shared by both stores.

Semantics (docs/architecture.md, "Windows"): a window of `seconds` on level L holds exactly the
buckets of L whose start is at or after `start(L, now - seconds)`, as of its last maintenance.
Compaction adds new data to the window when the data's bucket is inside it; maintenance
subtracts the buckets that slid out. A window is rebuilt from its buckets, exactly, when it is
new, when its configuration changed, when a slide was interrupted (it is marked dirty first),
when a bucket it must subtract is gone, and every `rebuild_seconds` against float rounding.

In decayed mode (`policy.window_mode`) a window takes every new partial, weighted by the store's
algebra with the window's time constant; buckets take only their globals (MMD calibration), and
maintenance only starts windows afresh (new, reconfigured, other mode) and deletes the rows that
decayed below `decay_min_weight`. A window recorded in the other mode means the mode was
switched: the store drops the buckets and the windows start again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from monitor.store.base import (
    BucketPolicy,
    FieldAlgebra,
    WindowState,
    bucket_state,
    window_state,
)


@dataclass(frozen=True)
class Target:
    """A state that new data is added to."""

    state: str
    tau: float | None = None  # a decayed window's time constant: a weighted merge
    globals_only: bool = False  # a bucket in decayed mode keeps only its globals
    # a decayed window not recorded yet starts with this data: (label, record to write with it)
    record: tuple[str, WindowState] | None = None

    def fields_of(self, delta: Mapping[bytes, bytes], algebra: FieldAlgebra) -> dict[bytes, bytes]:
        """The fields of new data this target takes."""
        return algebra.summary(delta) if self.globals_only else dict(delta)

    def merge(
        self,
        algebra: FieldAlgebra,
        names: Sequence[bytes],
        current: Sequence[bytes | None],
        values: Sequence[bytes],
        at: float,
    ) -> list[bytes | None]:
        """The target's new values of `names` after adding data of time `at`."""
        if self.tau is None:
            return algebra.combine(names, current, values, 1)
        return algebra.combine_decayed(names, current, values, at, self.tau)


@dataclass(frozen=True)
class WindowStep:
    """One window's maintenance: add or subtract `sources` into `target`, then record `state`;
    or, for a decayed window (`prune_tau` set), delete the rows that weigh less than the
    policy's `decay_min_weight` at `at`."""

    label: str
    target: str
    rebuild: bool  # the target is emptied first
    sources: list[tuple[str, int]]  # (bucket state, +1 or -1)
    state: WindowState
    prune_tau: float | None = None
    at: float = 0.0

    def dirty_state(self) -> WindowState:
        """Recorded before the work starts: a holder that dies midway leaves it to rebuild."""
        return replace(self.state, dirty=True)


class WindowPlanner:
    def __init__(self, policy: BucketPolicy) -> None:
        self.policy = policy

    def _current(self, label: str, seconds: int, windows: Mapping[str, WindowState]) -> bool:
        w = windows.get(label)
        if w is None or w.dirty or w.seconds != seconds or w.mode != self.policy.window_mode:
            return False
        return self.policy.decayed or w.level == self.policy.level_for(seconds)

    def mode_changed(self, windows: Mapping[str, WindowState]) -> bool:
        """A window recorded in the other mode: the buckets do not hold what this mode needs."""
        return any(w.mode != self.policy.window_mode for w in windows.values())

    def targets(self, fine: int, coarse: int, windows: Mapping[str, WindowState]) -> list[Target]:
        """States that new data of buckets (`fine`, `coarse`) is added to."""
        decayed = self.policy.decayed
        out = [
            Target(bucket_state(level, start), globals_only=decayed)
            for level, start in (("fine", fine), ("coarse", coarse))
        ]
        for label, seconds in self.policy.windows:
            tau = self.policy.time_constant(seconds)
            if decayed and label not in windows:  # nothing to rebuild from: it starts here
                fresh = WindowState(seconds, "fine", 0, built=fine, mode="decayed")
                out.append(Target(window_state(label), tau=tau, record=(label, fresh)))
                continue
            if not self._current(label, seconds, windows):
                continue  # maintenance builds it (exact) or starts it again (decayed)
            w = windows[label]
            if decayed:
                out.append(Target(window_state(label), tau=tau))
            elif (fine if w.level == "fine" else coarse) >= w.since:
                out.append(Target(window_state(label)))
        return out

    def _plan_decayed(
        self, label: str, seconds: int, windows: Mapping[str, WindowState], now: float
    ) -> WindowStep | None:
        w = windows.get(label)
        if not self._current(label, seconds, windows) or w is None:
            fresh = WindowState(seconds, "fine", 0, built=now, mode="decayed")
            return WindowStep(label, window_state(label), True, [], fresh)
        if now - w.built >= self.policy.prune_interval(seconds) or now < w.built:
            tau = self.policy.time_constant(seconds)
            return WindowStep(
                label, window_state(label), False, [], replace(w, built=now), tau, now
            )
        return None

    def plan(
        self,
        windows: Mapping[str, WindowState],
        starts: Mapping[str, list[int]],
        now: float,
        exists: Callable[[str], bool],
    ) -> list[WindowStep]:
        """The steps that bring every configured window to `now` (none when all are current)."""
        steps = []
        for label, seconds in self.policy.windows:
            if self.policy.decayed:
                step = self._plan_decayed(label, seconds, windows, now)
                steps += [] if step is None else [step]
                continue
            level = self.policy.level_for(seconds)
            since = self.policy.start(level, now - seconds)
            fresh = WindowState(seconds, level, since, built=now)
            rebuild = WindowStep(
                label,
                window_state(label),
                True,
                [(bucket_state(level, s), 1) for s in starts[level] if s >= since],
                fresh,
            )
            w = windows.get(label)
            if (
                w is None
                or not self._current(label, seconds, windows)
                or now - w.built >= self.policy.rebuild_seconds
                or w.since > since  # the clock went back
            ):
                steps.append(rebuild)
            elif w.since < since:
                gone = [bucket_state(level, s) for s in starts[level] if w.since <= s < since]
                if all(exists(b) for b in gone):
                    moved = replace(fresh, built=w.built)
                    steps.append(
                        WindowStep(
                            label, window_state(label), False, [(b, -1) for b in gone], moved
                        )
                    )
                else:  # a bucket expired before it was subtracted: recount from what is left
                    steps.append(rebuild)
        return steps

    def unconfigured(self, windows: Mapping[str, WindowState]) -> list[str]:
        configured = {label for label, _ in self.policy.windows}
        return sorted(label for label in windows if label not in configured)
