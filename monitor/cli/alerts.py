"""The `rules` commands: `collapse-monitor rules render [--format rules|prometheusrule] ...`.

A module of its own so rendering rules needs neither torch nor Redis: a Helm hook or
a CI job renders them from thresholds alone. Bad input raises `InvalidInput`, which the main CLI
prints as one line with exit code 2.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class RulesFormat(StrEnum):
    """`rules`: a Prometheus rules file; `prometheusrule`: the prometheus-operator CRD."""

    rules = "rules"
    prometheusrule = "prometheusrule"


def register(app: typer.Typer) -> None:
    """Add the `rules` sub-app (with `render`) to the main typer app."""
    rules_app = typer.Typer(
        name="rules",
        help="Prometheus alerting rules from the configured thresholds.",
        epilog="Example: collapse-monitor rules render --out rules.yaml",
        no_args_is_help=True,
    )

    @rules_app.command(
        "render",
        epilog=(
            "Example: collapse-monitor rules render --format prometheusrule "
            "--namespace monitoring --release kube-prometheus-stack --out rules.yaml"
        ),
    )
    def render(
        output_format: Annotated[
            RulesFormat, typer.Option("--format", help="rules or prometheusrule.")
        ] = RulesFormat.rules,
        out: Annotated[
            Path | None, typer.Option("--out", help="Write here instead of standard output.")
        ] = None,
        namespace: Annotated[
            str | None, typer.Option(help="metadata.namespace of the PrometheusRule.")
        ] = None,
        release: Annotated[
            str,
            typer.Option(
                help="`release` label the Prometheus ruleSelector matches (the chart's "
                "monitoring.releaseLabel default too)."
            ),
        ] = "kube-prometheus-stack",
        name: Annotated[
            str, typer.Option(help="metadata.name of the PrometheusRule.")
        ] = "collapse-monitor",
        config: Annotated[
            Path | None,
            typer.Option(help="Thresholds as JSON or YAML (default: the built-in defaults)."),
        ] = None,
        label: Annotated[
            list[str] | None,
            typer.Option(
                "--label",
                help="Static label k=v on every rule (repeatable), like the chart's "
                "prometheusRule.additionalRuleLabels; added to the thresholds' rule_labels.",
            ),
        ] = None,
    ) -> None:
        """Render alerting rules (with runbook links) for Prometheus or prometheus-operator.

        The output is a YAML file for Prometheus (`--format rules`) or a PrometheusRule
        manifest (`--format prometheusrule`), so it has no json or table form.
        """
        from monitor.alerts.rules import render_prometheus_rule, render_rules, to_yaml
        from monitor.alerts.thresholds import load_alerting
        from monitor.config import Settings

        alerting = Settings().alert_thresholds() if config is None else load_alerting(config)
        if label:
            alerting = load_alerting(
                {
                    **alerting.model_dump(by_alias=True),
                    "rule_labels": {**alerting.rule_labels, **_labels(label)},
                }
            )
        if output_format is RulesFormat.rules:
            doc = render_rules(alerting)
        else:
            doc = render_prometheus_rule(alerting, name, namespace, release=release)
        text = to_yaml(doc)
        if out is None:
            typer.echo(text, nl=False)
            return
        from monitor.data.output import write_file

        write_file(out, text)  # a link at --out is refused; the file is replaced atomically

    app.add_typer(rules_app, name="rules")


def _labels(pairs: list[str]) -> dict[str, str]:
    """`k=v` options as a dict; a pair without `=` is bad input (exit 2)."""
    from monitor.errors import InvalidInput

    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidInput("bad_label", f"--label {pair!r} is not name=value")
        out[name.strip()] = value
    return out
