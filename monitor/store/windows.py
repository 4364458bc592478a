"""Which states a compaction adds to, and how maintenance moves windows: shared by both stores.

Semantics (docs/architecture.md, "Windows"): a window of `seconds` on level L holds exactly the
buckets of L whose start is at or after `start(L, now - seconds)`, as of its last maintenance.
Compaction adds new data to the window when the data's bucket is inside it; maintenance
subtracts the buckets that slid out. A window is rebuilt from its buckets, exactly, when it is
new, when its configuration changed, when a slide was interrupted (it is marked dirty first),
when a bucket it must subtract is gone, and every `rebuild_seconds` against float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from monitor.store.base import BucketPolicy, WindowState, bucket_state, window_state


@dataclass(frozen=True)
class WindowStep:
    """One window's maintenance: add or subtract `sources` into `target`, then record `state`."""

    label: str
    target: str
    rebuild: bool  # the target is emptied first
    sources: list[tuple[str, int]]  # (bucket state, +1 or -1)
    state: WindowState

    def dirty_state(self) -> WindowState:
        """Recorded before the work starts: a holder that dies midway leaves it to rebuild."""
        return replace(self.state, dirty=True)


class WindowPlanner:
    def __init__(self, policy: BucketPolicy) -> None:
        self.policy = policy

    def _current(self, label: str, seconds: int, windows: Mapping[str, WindowState]) -> bool:
        w = windows.get(label)
        level = self.policy.level_for(seconds)
        return w is not None and not w.dirty and w.seconds == seconds and w.level == level

    def targets(self, fine: int, coarse: int, windows: Mapping[str, WindowState]) -> list[str]:
        """States that new data of buckets (`fine`, `coarse`) is added to."""
        out = [bucket_state("fine", fine), bucket_state("coarse", coarse)]
        for label, seconds in self.policy.windows:
            if not self._current(label, seconds, windows):
                continue  # maintenance builds it from the buckets
            w = windows[label]
            if (fine if w.level == "fine" else coarse) >= w.since:
                out.append(window_state(label))
        return out

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
