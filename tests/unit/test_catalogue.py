"""The metric catalogue: one entry per key of keys.py, read by the exporter, the alert rules and
docs/metrics.md, whose generated table must be current."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor import exporter
from monitor.alerts.rules import render_rules
from monitor.alerts.thresholds import AbsoluteBound, AlertingSettings, default_alerting
from monitor.metrics import catalogue_docs as docs
from monitor.metrics import keys
from monitor.metrics.catalogue import BY_KEY, CATALOGUE, MetricInfo, keys_of

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "metrics.md"
# METRICS.md's "healthy direction" column, written out here (the contract), as bad directions.
CONTRACT_BAD = {
    "nc1_cdnv": "up",
    "nc1_cdnv2": "up",
    "nc1_trace_ratio": "up",
    "nc2_equinorm_cv": "up",
    "nc2_equiangularity_std": "up",
    "nc2_log_energy_mean": "up",
    "nc2_log_energy_std": "up",
    "nc3_duality_mean_cos": "down",
    "nc3_uniform_duality_cv": "up",
    "nc4_ncc_agreement": "down",
}


def test_every_key_of_keys_py_has_one_entry_and_no_other() -> None:
    listed = (
        *keys.COLLAPSE_KEYS,
        *keys.GEOMETRY_KEYS,
        *keys.DRIFT_KEYS,
        *keys.STDERR_KEYS,
        *keys.TRAFFIC_STDERR_KEYS,
        *keys.RATIO_STDERR_KEYS,
    )
    assert tuple(m.key for m in CATALOGUE) == listed  # same keys, same (export) order
    assert len(BY_KEY) == len(CATALOGUE)
    assert set(keys.REPORT_KEYS) <= set(BY_KEY)
    assert keys_of("collapse") == keys.COLLAPSE_KEYS
    assert keys_of("geometry") == keys.GEOMETRY_KEYS
    assert keys_of("drift") == keys.DRIFT_KEYS
    assert keys_of("stderr") == keys.STDERR_KEYS
    assert keys_of("traffic_stderr") == keys.TRAFFIC_STDERR_KEYS
    assert keys_of("ratio_stderr") == keys.RATIO_STDERR_KEYS


def test_estimated_flags_are_the_keys_with_a_sampling_stderr() -> None:
    assert tuple(m.key for m in CATALOGUE if m.estimated) == keys.ESTIMATED_KEYS


def test_directions_follow_the_contract_and_the_help_text() -> None:
    for key, bad in CONTRACT_BAD.items():
        assert BY_KEY[key].bad_direction == bad, key
    for m in CATALOGUE:
        words = {"up": ("rising", "above", "upward"), "down": ("falling", "below")}
        if m.bad_direction is None:
            assert "(bad)" not in m.help, m.key
        else:
            assert any(w in m.help for w in words[m.bad_direction]), m.key
        assert m.help.strip(), m.key
        assert "\n" not in m.help, m.key
        assert m.unit.strip(), m.key


def test_gauge_names_are_the_contract() -> None:
    assert BY_KEY["sample_count"].gauge == "collapse_window_samples"
    assert BY_KEY["class_count"].gauge == "collapse_window_classes"
    assert BY_KEY["nc1_cdnv"].gauge == "collapse_nc1_cdnv"
    assert exporter.gauge_name("effective_rank_traffic_stderr") == (
        "collapse_effective_rank_traffic_stderr"
    )


def test_exporter_help_is_the_catalogue() -> None:
    assert list(exporter.METRIC_HELP.items()) == [(m.key, m.help) for m in CATALOGUE]
    assert not set(exporter.METRIC_HELP) & set(exporter.FAMILY_HELP)


def _bounded_rules(alerting: AlertingSettings) -> list[dict[str, object]]:
    groups = render_rules(alerting)["groups"]
    return [r for g in groups if g["name"].endswith(".collapse") for r in g["rules"]]


def test_rules_speak_with_the_catalogues_words() -> None:
    alerting = default_alerting()
    bounds = [*alerting.absolute, *alerting.relative, *alerting.predictive]
    rules = _bounded_rules(alerting)
    assert len(rules) == len(bounds)
    for bound, rule in zip(bounds, rules, strict=True):
        text = BY_KEY[bound.metric].alert
        assert text is not None, f"{bound.metric} is alerted on but has no alert wording"
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["description"].endswith(" " + text.meaning)
        subject = text.subject[:1].upper() + text.subject[1:]
        assert annotations["summary"].startswith(subject), annotations["summary"]
    # Alert wording only where a bad direction exists to explain.
    assert all(m.bad_direction for m in CATALOGUE if m.alert)


def test_a_metric_without_wording_is_named_by_its_gauge() -> None:
    bound = AbsoluteBound(alert="CollapseSamplesLow", metric="sample_count", min=10)
    assert BY_KEY["sample_count"].alert is None
    alerting = AlertingSettings(absolute=[bound], relative=[], predictive=[])
    (rule,) = _bounded_rules(alerting)
    annotations = rule["annotations"]
    assert isinstance(annotations, dict)
    assert annotations["summary"].startswith("Collapse_window_samples below 10")
    assert annotations["description"].endswith("below 10 for 15m.")


def test_docs_catalogue_section_is_current() -> None:
    documented = docs.docs_section(DOCS.read_text())
    assert documented == docs.catalogue_markdown(), (
        "docs/metrics.md's catalogue table is stale: run "
        "`python -m monitor.metrics.catalogue_docs --write docs/metrics.md`"
    )
    for m in CATALOGUE:
        assert f"| `{m.key}` | `{m.gauge}` |" in documented


def test_generator_prints_and_writes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs.main([])
    table = capsys.readouterr().out
    assert table == docs.catalogue_markdown()
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\n{docs.START}\nold | table\n{docs.END}\n\nAfter.\n")
    docs.main(["--write", str(page)])
    text = page.read_text()
    assert text == f"# Title\n\n{docs.START}\n{table}{docs.END}\n\nAfter.\n"
    assert docs.docs_section(text) == table


def test_table_cells_escape_pipes() -> None:
    entry = MetricInfo("x_y", "drift", "a | b (bad), rising", "bits", "up")
    row = docs.catalogue_markdown([entry]).splitlines()[-1]
    assert row == "| `x_y` | `collapse_x_y` | a \\| b (bad), rising | bits | rising |  |"
