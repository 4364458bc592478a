"""The demo's parts on their own: the phase plan, the injection, alert states, the log, /metrics.

The end-to-end run is tests/integration/test_demo.py; these pin down the pieces it relies on
with small, fast cases whose expected values are worked out by hand here.
"""

from __future__ import annotations

import io
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
from capture_fixtures import FAMILIES, make_model

from monitor.config import Settings
from monitor.demo.alerting import (
    DRIFT_FACTOR,
    AlertBoard,
    AlertState,
    demo_alerting,
    rule_names,
)
from monitor.demo.http import MetricsServer
from monitor.demo.inject import NormCollapse, final_norm
from monitor.demo.state import MIN_DURATION, DemoState, Phase, Plan
from monitor.demo.view import LiveView, PlainLog
from monitor.errors import InvalidInput
from monitor.snapshot import Snapshot
from monitor.store.memory import MemoryStore


@pytest.mark.parametrize("duration", [MIN_DURATION, 45.0, 60.0, 120.0, 600.0])
def test_plan_leaves_time_for_every_phase(duration: float) -> None:
    plan = Plan.for_duration(duration)
    assert plan.inject_at is not None
    assert plan.recover_at is not None
    assert 6 <= plan.window_seconds <= 20
    # The baseline is pinned from a full window. Injected samples have left the window at most
    # one window plus one bucket (the window reaches back into a partial bucket) plus one
    # evaluation tick after the restore; 3 s more leave time to see the alert resolve.
    assert plan.pin_at >= plan.window_seconds + 1
    assert plan.pin_at < plan.inject_at < plan.recover_at < duration
    recovery = duration - plan.recover_at
    assert recovery >= plan.window_seconds + 2 * plan.bucket_seconds + 3
    # The injected phase is long enough for the alert to get through its hold.
    assert plan.recover_at - plan.inject_at >= 4 * plan.hold_seconds


def test_plan_phases_in_order() -> None:
    plan = Plan.for_duration(120.0)
    assert (plan.window_seconds, plan.pin_at, plan.inject_at, plan.recover_at) == (20, 24, 48, 78)
    assert plan.phase(100.0, pinned=False) is Phase.warmup  # no baseline yet: still warming up
    assert plan.phase(30.0, pinned=True) is Phase.steady
    assert plan.phase(48.0, pinned=True) is Phase.inject
    assert plan.phase(78.0, pinned=True) is Phase.recover
    assert plan.phase(120.0, pinned=True) is Phase.done
    quiet = Plan.for_duration(120.0, inject=False)
    assert quiet.inject_at is None
    assert quiet.phase(119.0, pinned=True) is Phase.steady


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_collapse_squeezes_states_and_restores_exactly(family: str) -> None:
    model = make_model(family).eval()
    norm = final_norm(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[torch.Tensor] = []
    hook = norm.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    ids = torch.randint(3, 61, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        collapse = NormCollapse(model, keep=3, seed=0)
        collapse.apply()
        collapse.apply()  # idempotent: a second apply must not lose the saved gains
        model(input_ids=ids)
        gains = norm.weight.detach()
        assert int((gains != 0).sum()) <= 3
        # Every state now lies in span(3 gain axes) + the norm's bias: rank of the centred
        # states is at most 3 (float64 SVD of the hooked output, computed here).
        states = seen[-1].reshape(-1, seen[-1].shape[-1]).to(torch.float64)
        singular = torch.linalg.svdvals(states - states.mean(0))
        assert int((singular > 1e-6 * singular[0]).sum()) <= 3
        collapse.restore()
        after = model(input_ids=ids).logits
    hook.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert torch.equal(before, after)
    assert not collapse.active


def test_model_without_a_final_norm_is_refused() -> None:
    with pytest.raises(InvalidInput, match="--no-inject"):
        final_norm(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def _snap(ts: float, ratio: float, mmd: float = 0.0, threshold: float = 1.0) -> Snapshot:
    return Snapshot(
        model="demo",
        window="8s",
        window_seconds=8,
        timestamp=ts,
        status="ok",
        reason=None,
        duration_seconds=0.0,
        sample_count=100,
        class_count=10,
        metrics={"drift_nc1_cdnv_ratio": ratio, "drift_mmd": mmd, "drift_mmd_threshold": threshold},
    )


def test_alert_board_pending_firing_resolved() -> None:
    board = AlertBoard(demo_alerting(hold_seconds=2))
    cdnv, drift = "CollapseCDNVRisingVsBaseline", "CollapseDriftAboveThreshold"
    assert rule_names(board.alerting) == [cdnv, drift]
    # (timestamp, cdnv ratio, mmd) and the expected CDNV state: the rule is ratio > 1.5 for 2 s.
    timeline = [
        (0.0, 1.0, 0.0, AlertState.inactive),
        (1.0, 1.6, 0.0, AlertState.pending),  # holds since 1
        (2.0, 1.7, 0.0, AlertState.pending),  # 1 s < 2 s
        (3.0, 1.8, 0.0, AlertState.firing),  # 2 s
        (4.0, 1.0, 0.0, AlertState.resolved),
        (5.0, 1.6, 0.0, AlertState.pending),  # holds again, from 5
        (6.0, 1.0, 0.0, AlertState.inactive),  # pending that never fired: inactive again
    ]
    for ts, ratio, mmd, want in timeline:
        board.update([_snap(ts, ratio, mmd)], ts)
        assert board.states[cdnv] is want, ts
        assert board.states[drift] is AlertState.inactive  # mmd 0 never exceeds the threshold
    assert [(p.alert, p.start, p.end) for p in board.periods] == [(cdnv, 3.0, 4.0)]
    # MMD above DRIFT_FACTOR x its threshold fires the drift alert after its own hold; a value
    # between 1x and DRIFT_FACTOR x does not count.
    board.update([_snap(7.0, 1.0, mmd=0.97 * DRIFT_FACTOR)], 7.0)
    assert board.states[drift] is AlertState.inactive
    for ts in (8.0, 9.0, 10.0):
        changes = board.update([_snap(ts, 1.0, mmd=1.03 * DRIFT_FACTOR)], ts)
    assert board.states[drift] is AlertState.firing
    assert [(c.alert, c.old, c.new) for c in changes] == [
        (drift, AlertState.pending, AlertState.firing)
    ]
    assert board.periods[-1].end is None


def _state() -> DemoState:
    return DemoState(
        elapsed=13.0,
        duration=45.0,
        phase=Phase.inject,
        model="demo",
        window="8s",
        metrics_url="http://127.0.0.1:1/metrics",
        samples_per_second=480.4,
        samples_total=9000,
        metrics={
            "drift_nc1_cdnv_ratio": 2.5,
            "sample_count": 4000,
            "drift_mmd": 0.03,
            "drift_mmd_threshold": 0.0002,
        },
        alerts={"CollapseDriftAboveThreshold": AlertState.firing},
    )


def test_plain_log_lines_are_stable() -> None:
    out = io.StringIO()
    log = PlainLog(out, status_every=5.0)
    log.event(12.34, "ALERT FIRING CollapseDriftAboveThreshold")
    state = _state()
    log.update(state)
    log.update(state)  # within status_every: no second status line
    lines = out.getvalue().splitlines()
    assert lines[0] == "[  12.3s] ALERT FIRING CollapseDriftAboveThreshold"
    assert len(lines) == 2
    assert re.match(
        r"^\[  13\.0s\] status phase=inject samples/s=480 window_samples=4000 ", lines[1]
    )
    assert "cdnv_ratio=2.5 " in lines[1]
    assert "mmd=0.03 mmd_threshold=0.0002 mmd_ratio=150 " in lines[1]  # 0.03 / 0.0002
    assert lines[1].endswith("alerts=CollapseDriftAboveThreshold:firing")


def test_live_view_shows_phase_metrics_and_alert_states() -> None:
    from rich.console import Console

    out = io.StringIO()
    view = LiveView(Console(file=out, force_terminal=True, width=120, color_system=None))
    view.event(12.0, "phase inject - collapse injected")
    view.update(_state())
    view.close()
    view.close()  # twice is harmless (the command closes on every path)
    text = out.getvalue()
    assert "phase inject - collapse injected" in text
    assert "CollapseDriftAboveThreshold" in text
    assert "firing" in text
    assert re.search(r"MMD\^2 / threshold\s+│\s+-\s+│\s+150\s+│\s+> 5", text), text


def test_metrics_server_free_port_and_port_in_use() -> None:
    settings = Settings(redis_url=None, windows={"8s": 8})
    server = MetricsServer(MemoryStore(), settings, 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as response:
            page = response.read().decode()
        assert "collapse_store_up 1.0" in page
        with pytest.raises(InvalidInput) as refused:
            MetricsServer(MemoryStore(), settings, server.port)
        assert refused.value.reason == "port_unavailable"
    finally:
        server.close()
    with socket.socket() as probe:  # closed: the port can be bound again (Linux refuses a
        # listening port even with SO_REUSEADDR, which only skips the client's TIME_WAIT)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "10"], "greater than or equal to 40"),
        (["--port", "70000"], "--port"),
        (["--model", "{empty}"], "no config.json"),
    ],
)
def test_bad_options_are_one_line_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from monitor.cli import main

    argv = ["demo", *(a.replace("{empty}", str(tmp_path)) for a in args), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert message in err[0]


def test_a_port_in_use_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from monitor.cli import main

    (tmp_path / "config.json").write_text("{not a model config")  # loading it would fail
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["demo", "--port", str(port), "--model", str(tmp_path), "--out", str(tmp_path)]
        with pytest.raises(SystemExit) as exited:
            main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "cannot serve /metrics" in err[0], err
