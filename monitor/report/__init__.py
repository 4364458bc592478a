"""Static reports: PNG figures and one self-contained HTML page of a model's metric history."""

from monitor.report.data import AlertPeriod, ReportData, ReportFiles
from monitor.report.render import write_report

__all__ = ["AlertPeriod", "ReportData", "ReportFiles", "write_report"]
