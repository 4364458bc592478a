"""Grafana integration: upload the shipped dashboards (`dashboards/*.json`) to a Grafana.

Kept apart from the exporter so pushing dashboards needs neither Redis nor torch: a CI job or a
Helm hook can run `collapse-monitor dashboards push` with a service-account token alone.
"""

from __future__ import annotations

from monitor.grafana.push import push_dashboards

__all__ = ["push_dashboards"]
