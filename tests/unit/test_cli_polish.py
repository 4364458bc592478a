"""Command-line polish: help that reads well at 80 columns, shell completion, ISO times, the
heartbeat behind the worker's and beat's liveness probes, and the build's setuptools floor.

`status --model <unknown>` and `baseline list`'s times need Redis: tests/integration/
test_cli_formats.py. The heartbeat against real processes and the chart's probes:
tests/chart/test_probes.py.
"""

from __future__ import annotations

import itertools
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from celery import Celery
from celery.signals import task_postrun, task_prerun
from cli_main import run_main as run

from monitor import cli
from monitor.cli.common import ExitCode, iso_utc, tidy_help, with_iso_time
from monitor.worker.heartbeat import Heartbeat, HeartbeatScheduler, worker_step

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 80


def _walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


PATHS = list(_walk(typer.main.get_command(cli.app), ()))


@pytest.fixture(autouse=True)
def _terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    monkeypatch.delenv("COLLAPSE_REDIS_URL", raising=False)
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None)  # the console follows COLUMNS


# --- help at 80 columns -------------------------------------------------------------------


def _breaks(lines: list[str], width: int) -> list[str]:
    """Line breaks inside one paragraph that greedy wrapping would not make: a short line
    (under half the width) whose successor's first word would have fitted on it. A line that
    starts with `[` (typer's `[default: ...]`, `[required]`) is a separate item, not a break."""
    found = []
    for cur, nxt in itertools.pairwise(lines):
        if not cur.strip() or not nxt.strip() or nxt.lstrip().startswith("["):
            continue
        word = nxt.split()[0]
        if len(cur.strip()) < width / 2 and len(cur.rstrip()) + 1 + len(word) <= width:
            found.append(f"{cur.strip()!r} / {nxt.strip()!r}")
    return found


def jagged(text: str) -> list[str]:
    """Jagged breaks in typer's rich help: in the free text (one space of padding each side)
    and in each panel's last column (commands' and options' descriptions), entry by entry."""
    found: list[str] = []
    plain: list[str] = []
    panel: list[str] = []

    def flush_plain() -> None:
        found.extend(_breaks([line[1:] for line in plain], WIDTH - 2))
        plain.clear()

    def flush_panel() -> None:
        rows = [line[1:-1] for line in panel]
        panel.clear()
        if not rows:
            return
        help_row = next((r for r in rows if "Show this message and exit." in r), None)
        if help_row is not None:  # options: the help column is where --help's text starts
            start = help_row.index("Show this message and exit.")
        else:  # commands: after the name column
            match = re.match(r"^ \S+\s+", rows[0])
            assert match, rows[0]
            start = match.end()
        entry: list[str] = []
        for row in [*rows, "X"]:  # "X": a sentinel that closes the last entry
            if row[:5].strip() and entry:
                found.extend(_breaks(entry, len(rows[0]) - 1 - start))
                entry = []
            entry.append(row[start : len(row) - 1])

    for line in text.splitlines():
        if line.startswith("│"):
            flush_plain()
            panel.append(line)
        elif line.startswith(("╭", "╰")):
            flush_plain()
            flush_panel()
        elif line.strip():
            plain.append(line)
        else:
            flush_plain()
    flush_plain()
    flush_panel()
    return found


HARD_WRAPPED = typer.Typer(add_completion=False)


@HARD_WRAPPED.command()
def sample(
    count: int = typer.Option(1, help="How many. [env: 7]"),
) -> None:
    """Run a sample command: `ingest` (statistics of feature batches), `embed` (forward pass of
    mirrored texts) and `maintenance`.

    A second paragraph, wrapped at the width of the source file rather than at the terminal's,
    so that its lines break where the source broke them and again at the terminal's width.
    """


def _help_of(app: typer.Typer, tidy: bool, capsys: pytest.CaptureFixture[str]) -> str:
    command = typer.main.get_command(app)
    if tidy:
        tidy_help(command)
    with pytest.raises(SystemExit):
        command(["sample", "--help"], prog_name="x")
    out: str = capsys.readouterr().out
    return out


def test_the_jagged_check_catches_hard_wrapped_help(capsys: pytest.CaptureFixture[str]) -> None:
    raw = _help_of(HARD_WRAPPED, False, capsys)
    assert jagged(raw), raw  # typer alone keeps the docstring's breaks and wraps again
    assert "[env: 7]" not in raw  # ... and takes `[env: 7]` for rich markup
    tidy = _help_of(HARD_WRAPPED, True, capsys)
    assert not jagged(tidy), tidy
    assert "[env: 7]" in tidy


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "(root)")
def test_help_is_not_jagged_at_80_columns(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *path, "--help")
    assert code == ExitCode.OK, err
    assert max(len(line) for line in out.splitlines()) <= WIDTH, out
    breaks = jagged(out)
    assert not breaks, f"`collapse-monitor {' '.join(path)} --help`: {breaks}\n{out}"


def test_analyze_help_points_at_docs_metrics_and_shows_env_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "analyze", "--help")
    assert code == ExitCode.OK
    flat = " ".join(out.split())
    assert "docs/metrics.md" in flat
    assert "METRICS.md" not in flat
    assert (ROOT / "docs" / "metrics.md").is_file()
    assert "[env: N] shows the built-in default" in flat  # was eaten as rich markup
    assert re.search(r"\[env:\s+(│\s+)*\d", out), out


# --- shell completion ---------------------------------------------------------------------


def test_show_completion_prints_a_script(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--show-completion", "bash")
    assert code == ExitCode.OK, err
    assert "_COLLAPSE_MONITOR_COMPLETE=complete_bash" in out
    assert "complete " in out
    assert "collapse-monitor" in out


def test_completion_completes_commands_and_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("_COLLAPSE_MONITOR_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "collapse-monitor sta")
    monkeypatch.setenv("COMP_CWORD", "1")
    code, out, _ = run(capsys)
    assert code == ExitCode.OK
    assert out.split() == ["status"]
    monkeypatch.setenv("COMP_WORDS", "collapse-monitor baseline list --fo")
    monkeypatch.setenv("COMP_CWORD", "3")
    code, out, _ = run(capsys)
    assert (code, out.split()) == (ExitCode.OK, ["--format"])


def test_install_completion_writes_the_shell_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = run(capsys, "--install-completion", "bash")
    assert code == ExitCode.OK, err
    assert "completion installed" in out.lower()
    rc = (tmp_path / ".bashrc").read_text()
    scripts = list(tmp_path.glob(".bash_completions/*"))
    assert len(scripts) == 1
    assert str(scripts[0].name) in rc or ".bash_completions" in rc
    assert "_COLLAPSE_MONITOR_COMPLETE" in scripts[0].read_text()


# --- ISO-8601 times -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0.0, "1970-01-01T00:00:00Z"), (1_796_208_140.9, None), (951_782_400.0, None)],
)
def test_iso_utc(epoch: float, expected: str | None) -> None:
    reference = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))  # no datetime
    assert iso_utc(epoch) == (expected or reference)


def test_with_iso_time_adds_a_field_and_keeps_the_epoch() -> None:
    stamp = {"source": "window:1h", "created": 1_796_208_140.25, "dim": 8}
    out = with_iso_time(stamp)
    assert list(out) == ["source", "created", "created_iso", "dim"]
    assert out["created"] == 1_796_208_140.25  # same value, same type
    assert out["created_iso"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_796_208_140))
    assert with_iso_time({"source": "x"}) == {"source": "x"}
    assert "created_iso" not in with_iso_time({"created": "yesterday"})


# --- heartbeat ------------------------------------------------------------------------------


def test_heartbeat_touch_and_reset(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path / "hb")
    beat.touch()
    first = (tmp_path / "hb").stat().st_mtime_ns
    time.sleep(0.02)
    beat.touch()
    assert (tmp_path / "hb").stat().st_mtime_ns > first
    beat.reset()
    assert not (tmp_path / "hb").exists()
    beat.reset()  # nothing to remove: no error


def test_an_inline_task_keeps_the_heartbeat_alive_for_a_bounded_time(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path / "hb", max_task_seconds=100.0)
    assert not beat.task_keeps_alive(0.0)
    beat.task_started(now=1000.0)
    assert beat.task_keeps_alive(1099.0)
    assert not beat.task_keeps_alive(1100.0)  # running past the visibility timeout: stuck
    beat.task_finished()
    assert not beat.task_keeps_alive(1001.0)
    other = Heartbeat(tmp_path / "hb", pid=-1)  # signals from another process (prefork child)
    other.task_started(now=0.0)
    assert not other.task_keeps_alive(1.0)


def test_keepalive_thread_touches_only_during_a_task(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    beat = Heartbeat(path, interval=0.02, max_task_seconds=60.0)
    beat.start_keepalive()
    try:
        time.sleep(0.15)
        assert not path.exists(), "touched without a running task"
        beat.task_started()
        deadline = time.monotonic() + 5
        while not path.exists():
            assert time.monotonic() < deadline, "no touch during a task"
            time.sleep(0.01)
        seen = path.stat().st_mtime_ns
        while path.stat().st_mtime_ns == seen:
            assert time.monotonic() < deadline, "touched once only"
            time.sleep(0.01)
        beat.task_finished()
        time.sleep(0.1)  # a touch already under way may land
        settled = path.stat().st_mtime_ns
        time.sleep(0.15)
        assert path.stat().st_mtime_ns == settled, "touched after the task ended"
    finally:
        beat.stop_keepalive()


class FakeTimer:
    """The two calls the step makes on the worker's timer, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, Any]] = []

    def call_after(self, secs: float, fun: Any) -> None:
        self.calls.append(("after", secs, fun))

    def call_repeatedly(self, secs: float, fun: Any) -> Any:
        self.calls.append(("repeatedly", secs, fun))
        return FakeEntry()


class FakeEntry:
    cancelled = False

    def cancel(self) -> None:
        FakeEntry.cancelled = True


@pytest.mark.parametrize("inline", [True, False])
def test_worker_step_puts_the_touch_on_the_timer_and_follows_inline_tasks(
    tmp_path: Path, inline: bool
) -> None:
    beat = Heartbeat(tmp_path / "hb", interval=10.0)
    step_class = worker_step(beat, inline_tasks=inline)
    assert step_class.requires == ("celery.worker.components:Timer",)
    try:
        worker = type("Worker", (), {"timer": FakeTimer()})()
        step = step_class(worker)
        step.start(worker)
        calls = worker.timer.calls
        assert [(kind, secs) for kind, secs, _ in calls] == [("after", 0.0), ("repeatedly", 10.0)]
        calls[0][2]()  # what the event loop will run
        assert (tmp_path / "hb").exists()
        task_prerun.send(sender=None)
        assert beat.task_keeps_alive(time.monotonic()) is inline  # solo: a task vouches
        task_postrun.send(sender=None)
        assert not beat.task_keeps_alive(time.monotonic())
        step.stop(worker)
        assert FakeEntry.cancelled
    finally:
        for signal, receiver in zip((task_prerun, task_postrun), step_class.receivers, strict=True):
            signal.disconnect(receiver)
        beat.stop_keepalive()


def test_scheduler_touches_on_every_tick_and_wakes_often_enough(tmp_path: Path) -> None:
    app = Celery("heartbeat-test", broker="memory://")
    app.conf.beat_schedule = {}
    path = tmp_path / "hb"
    HeartbeatScheduler.heartbeat = Heartbeat(path, interval=7.0)
    try:
        scheduler = HeartbeatScheduler(app=app, max_interval=300)
        delay = scheduler.tick()
        assert path.exists()
        assert delay == 7.0  # nothing due for 300 s, but the heartbeat must stay fresh
        HeartbeatScheduler.heartbeat = None
        assert scheduler.tick() == 300
    finally:
        HeartbeatScheduler.heartbeat = None


# --- build ----------------------------------------------------------------------------------


def test_build_requires_a_setuptools_that_reads_spdx_license_strings() -> None:
    """`license = "Apache-2.0"` (PEP 639) needs setuptools 77; older ones refuse the string."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    requires = project["build-system"]["requires"]
    (setuptools,) = [r for r in requires if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools.replace(" ", ""))
    assert match, setuptools
    assert int(match.group(1)) >= 77
