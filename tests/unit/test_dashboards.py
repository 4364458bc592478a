"""Dashboards pass checks equivalent to grafana dashboard-linter; `push_dashboards` is idempotent.

Why a home-made linter: the dashboard-linter binary is a Go tool we cannot install here, and the
rules that matter are few and simple (datasource variable, panel datasource, `$__rate_interval`,
stable uids, units and descriptions). Rules of ours, for every file in dashboards/ (including
any added later): every query names only families the exporter exports (a renamed metric
breaks this test instead of a graph in production), filters on the `cluster`, `namespace` and
`job` variables with regex matchers (absent labels match `.*`), never sums per-replica series,
titles are words rather than metric names, and a panel showing an alert's metric links to the
alert's runbook. Whether each query parses, returns data and counts two exporter replicas once
is checked against a real Prometheus in tests/integration/test_dashboards_e2e.py.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import typer
from typer.testing import CliRunner

from monitor.alerts.rules import render_rules
from monitor.alerts.thresholds import default_alerting
from monitor.cli import dashboards as cli_dashboards
from monitor.errors import InvalidInput
from monitor.exporter import COUNTERS, FAMILY_HELP, METRIC_HELP, PREFIX, gauge_name
from monitor.grafana import push as push_module
from monitor.grafana.push import push_dashboards

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
EXPECTED_UIDS = {
    "overview.json": "collapse-overview",
    "drift.json": "collapse-drift",
    "pipeline.json": "collapse-pipeline",
    "ab.json": "collapse-ab",
}
UIDS = sorted(json.loads(p.read_text(encoding="utf-8"))["uid"] for p in DASHBOARDS)
PANEL_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every selector carries these (regex matchers: a label the deployment lacks matches `.*`).
SCOPE = ('cluster=~"$cluster"', 'namespace=~"$namespace"', 'job=~"$job"')
SCOPE_VARIABLES = ("cluster", "namespace", "job")
OPERATIONS = ROOT / "docs" / "operations.md"
# A metric name in snake_case, or any label-ish token: what a readable title does not show.
SNAKE = re.compile(r"\b[a-z0-9]+_[a-z0-9_]+\b")
# `sum` straight over a selector or its rate adds the replicas' identical series up.
SUM_OVER_REPLICAS = re.compile(
    r"\bsum\s*(?:(?:by|without)\s*\([^)]*\))?\s*\(\s*(?:(?:rate|irate|increase)\s*\(\s*)?"
    r"[A-Za-z_:][A-Za-z0-9_:]*\s*[{\[)]"
)
EXPORTED = (
    {gauge_name(key) for key in METRIC_HELP}
    | {PREFIX + name for name in FAMILY_HELP if name not in COUNTERS}
    | {PREFIX + name + "_total" for name in COUNTERS}
    | {"ALERTS"}
)
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, including those nested in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def exprs(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the board: panel targets and query annotations."""
    out = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    out += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return out


def selectors(expr: str) -> list[str]:
    """Each metric selector of an expression: the name with its `{...}` (empty when none)."""
    out = []
    for name in metric_names(expr):
        for match in re.finditer(rf"(?<![A-Za-z0-9_:]){re.escape(name)}(?![A-Za-z0-9_:])", expr):
            rest = expr[match.end() :]
            braces = re.match(r"\s*\{[^}]*\}", rest)
            out.append(name + (braces.group().strip() if braces else ""))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and strings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def test_the_dashboards_exist_with_stable_uids() -> None:
    assert set(EXPECTED_UIDS) <= {p.name for p in DASHBOARDS}
    assert len(set(UIDS)) == len(UIDS)
    for path in DASHBOARDS:
        board = load(path)
        assert board["uid"] == EXPECTED_UIDS.get(path.name, board["uid"])
        assert board["uid"].startswith("collapse-")
        assert board["schemaVersion"] >= 36
        assert board.get("id") is None  # ids are per Grafana instance; uids are ours


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_template_variables(path: Path) -> None:
    variables = {v["name"]: v for v in load(path)["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    order = list(variables)
    assert order[:4] == ["datasource", *SCOPE_VARIABLES]  # scope first: the others follow it
    for name in SCOPE_VARIABLES:
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == PANEL_DATASOURCE
        assert variable["definition"].startswith("label_values(")
        assert "collapse_build_info" in variable["definition"]  # every replica exports it
        assert variable["definition"].endswith(f", {name})")
        assert variable["query"]["query"] == variable["definition"]
        # All = `.*`, which also matches a series without the label (no cluster label at all).
        assert (variable["includeAll"], variable["allValue"]) == (True, ".*"), name
        assert variable["current"]["value"] == ["$__all"], name
    # The A/B board puts two models side by side: a variable for each instead of `model`.
    names = ("reference", "candidate") if path.name == "ab.json" else ("model",)
    for name in (n for n in names if n in variables or path.name in EXPECTED_UIDS):
        assert variables[name]["type"] == "query"
        assert "label_values(collapse_window_samples" in variables[name]["definition"]
        assert variables[name]["datasource"] == PANEL_DATASOURCE
    if "window" in variables or path.name in ("overview.json", "drift.json", "ab.json"):
        assert variables["window"]["type"] == "query"
        assert variables["window"]["datasource"] == PANEL_DATASOURCE
    for name, variable in variables.items():  # the model and window lists follow the scope too
        if name not in ("datasource", *SCOPE_VARIABLES):
            series = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["definition"])
            for selector in selectors(series):
                assert all(m in selector for m in SCOPE), f"{name}: {selector}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_follow_the_linter_rules(path: Path) -> None:
    board = load(path)
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in panels(board):
        title = panel["title"]
        assert panel["datasource"] == PANEL_DATASOURCE, title
        assert len(panel.get("description", "")) > 30, f"{title}: no useful description"
        if panel["type"] in ("timeseries", "stat", "gauge", "bargauge"):
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target.get("datasource", PANEL_DATASOURCE) == PANEL_DATASOURCE, title
            assert target["expr"].strip(), title


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_rates_use_rate_interval(path: Path) -> None:
    for expr in exprs(load(path)):
        for match in re.finditer(r"\b(rate|irate|increase)\s*\(", expr):
            window = re.search(r"\[([^\]]*)\]", expr[match.end() :])
            assert window is not None, expr
            assert window.group(1) == "$__rate_interval", expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_queries_name_only_exported_families(path: Path) -> None:
    """Our families (collapse_*) must exist; other exporters' (a worker dashboard's) are theirs."""
    for expr in exprs(load(path)):
        names = metric_names(expr)
        assert names, f"no metric in {expr}"
        ours = {n for n in names if n.startswith(PREFIX) or n == "ALERTS"}
        assert ours <= EXPORTED, f"{expr}: unknown {sorted(ours - EXPORTED)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_is_scoped_by_cluster_namespace_and_job(path: Path) -> None:
    for expr in exprs(load(path)):
        for selector in selectors(expr):
            missing = [m for m in SCOPE if m not in selector]
            assert not missing, f"{selector} in {expr}: no {missing}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_no_sum_over_exporter_replicas(path: Path) -> None:
    """Replicas export identical series: dedupe them (max/min without instance) before a sum."""
    for expr in exprs(load(path)):
        assert not SUM_OVER_REPLICAS.search(expr), expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_titles_are_words_not_metric_names(path: Path) -> None:
    board = load(path)
    titles = [p["title"] for p in board["panels"]] + [p["title"] for p in panels(board)]
    for title in titles:
        assert title.strip(), path.name
        assert not SNAKE.search(title), f"{path.name}: title {title!r} reads like a metric name"
        assert "{" not in title, title
        assert PREFIX not in title, title


def alert_metrics() -> dict[str, str]:
    """Alert name -> the metric its default rule judges (the first one in its expression;
    `collapse_window_samples` is a guard of the absolute bounds, not what they judge)."""
    out: dict[str, str] = {}
    for group in render_rules(default_alerting())["groups"]:
        for rule in group["rules"]:
            names = re.findall(r"\bcollapse_[a-z0-9_]+", rule["expr"])
            judged = [n for n in names if n != "collapse_window_samples"]
            out.setdefault(rule["alert"], judged[0])
    return out


def runbook_anchors() -> set[str]:
    """GitHub's anchor of each heading of docs/operations.md (lower case, spaces to dashes)."""
    headings = re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.M)
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_link_to_the_runbooks_of_their_alerts(path: Path) -> None:
    base = default_alerting().runbook_base_url
    judged = alert_metrics()
    anchors = runbook_anchors()
    for panel in panels(load(path)):
        shown = set().union(*(metric_names(t["expr"]) for t in panel["targets"]))
        expected = {alert for alert, metric in judged.items() if metric in shown}
        urls = [link["url"] for link in panel.get("links", [])]
        assert len(urls) == len(set(urls)), panel["title"]
        linked = {url.removeprefix(f"{base}#") for url in urls if url.startswith(f"{base}#")}
        assert {a.lower() for a in expected} <= linked, f"{panel['title']}: links {urls}"
        for link in panel.get("links", []):
            anchor = link["url"].removeprefix(f"{base}#")
            assert anchor in anchors, f"{panel['title']}: no section #{anchor} in operations.md"
            assert link["title"].startswith("Runbook: "), link


def test_runbook_links_cover_every_alert_with_a_panel() -> None:
    """Each default alert's metric is on some dashboard, and that panel links its runbook."""
    linked = {
        link["url"].rsplit("#", 1)[1]
        for path in DASHBOARDS
        for panel in panels(load(path))
        for link in panel.get("links", [])
    }
    assert {a.lower() for a in alert_metrics()} <= linked


def test_selector_parser() -> None:
    expr = 'max without (instance) (rate(a_total{x="1"}[5m])) / b + sum by (m) (c{y="2"})'
    assert sorted(selectors(expr)) == ['a_total{x="1"}', "b", 'c{y="2"}']
    assert SUM_OVER_REPLICAS.search('sum by (model) (rate(x_total{a="b"}[1m]))')
    assert SUM_OVER_REPLICAS.search("sum(x)")
    assert not SUM_OVER_REPLICAS.search("sum by (model) (max without (instance) (rate(x[1m])))")


def test_metric_name_parser() -> None:
    expr = 'sum by (model, reason) (rate(collapse_x_total{reason="a b"}[$__rate_interval])) / y'
    assert metric_names(expr) == {"collapse_x_total", "y"}


def test_overview_covers_every_metric_and_draws_default_thresholds() -> None:
    board = load(ROOT / "dashboards" / "overview.json")
    text = " ".join(exprs(board))
    for key in METRIC_HELP:
        if not key.endswith("_stderr"):
            assert f"{gauge_name(key)}{{" in text, key
    lines = {
        p["title"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
        for p in panels(board)
        if p["fieldConfig"]["defaults"].get("custom", {}).get("thresholdsStyle", {}).get("mode")
        == "line"
    }
    assert 1.5 in lines["Class blur against the baseline (CDNV ratio)"]
    assert 0.8 in lines["NC4 agreement against the baseline"]
    alerts = [a for a in board["annotations"]["list"] if "ALERTS" in a.get("expr", "")]
    assert alerts
    assert 'alertname=~"Collapse.*"' in alerts[0]["expr"]


def test_drift_dashboard_tables() -> None:
    board = load(ROOT / "dashboards" / "drift.json")
    tables = {p["title"]: p for p in panels(board) if p["type"] == "table"}
    top = tables["Top drifting tokens"]["targets"][0]
    assert "collapse_top_drift_cosine_distance" in top["expr"]
    assert top["instant"] is True
    assert top["format"] == "table"
    assert "collapse_baseline_info" in tables["Pinned baseline"]["targets"][0]["expr"]
    mmd = [p for p in panels(board) if len(p["targets"]) == 2]
    assert set().union(*(metric_names(t["expr"]) for t in mmd[0]["targets"])) == {
        "collapse_drift_mmd",
        "collapse_drift_mmd_threshold",
    }


# ----------------------------------------------------------------------- push
TOKEN = "glsa_secret_token_value"


class FakeApi:
    """Just enough of GrafanaApi: folders by title, dashboards by uid (overwrite semantics)."""

    def __init__(self, folders: list[dict[str, Any]] | None = None) -> None:
        self.folders = list(folders or [])
        self.boards: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.folder = self
        self.dashboard = self

    def get_all_folders(self) -> list[dict[str, Any]]:
        return self.folders

    def create_folder(self, title: str) -> dict[str, Any]:
        self.created.append(title)
        folder = {"uid": f"f{len(self.folders)}", "title": title}
        self.folders.append(folder)
        return folder

    def update_dashboard(self, payload: dict[str, Any]) -> dict[str, Any]:
        uid = payload["dashboard"]["uid"]
        if uid in self.boards and not payload["overwrite"]:
            raise AssertionError("would be refused: dashboard exists")
        assert payload["dashboard"]["id"] is None
        self.boards[uid] = payload
        return {"status": "success", "uid": uid, "url": f"/d/{uid}/slug"}


def test_push_creates_the_folder_once_and_overwrites_idempotently() -> None:
    api = FakeApi([{"uid": "other", "title": "Other"}])
    factory_calls: list[tuple[str, str]] = []

    def factory(url: str, token: str) -> FakeApi:
        factory_calls.append((url, token))
        return api

    first = push_dashboards("http://g:3000/", TOKEN, "Collapse", DASHBOARDS, api_factory=factory)
    second = push_dashboards("http://g:3000/", TOKEN, "Collapse", DASHBOARDS, api_factory=factory)
    assert first == second
    assert sorted(first) == sorted(f"http://g:3000/d/{u}/slug" for u in UIDS)
    assert api.created == ["Collapse"]  # found by title the second time
    assert set(api.boards) == set(UIDS)
    assert {b["folderUid"] for b in api.boards.values()} == {"f1"}
    assert all(b["overwrite"] for b in api.boards.values())
    assert factory_calls == [("http://g:3000/", TOKEN)] * 2


def _grafana_error(status: int) -> Exception:
    from grafana_client.client import GrafanaClientError, GrafanaException

    if status == 0:
        return GrafanaException(0, None, f"broke, Authorization: Bearer {TOKEN}")  # type: ignore[no-untyped-call]
    return GrafanaClientError(status, {"message": TOKEN}, f"Error {status}: {TOKEN}")  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (lambda: _grafana_error(401), "grafana_auth"),
        (lambda: _grafana_error(403), "grafana_auth"),
        (lambda: _grafana_error(404), "grafana_error"),
        (lambda: _grafana_error(0), "grafana_unreachable"),
        (lambda: ConnectionRefusedError(f"refused {TOKEN}"), "grafana_unreachable"),
    ],
)
def test_push_errors_are_one_line_and_never_show_the_token(error: Any, reason: str) -> None:
    class Failing(FakeApi):
        def get_all_folders(self) -> list[dict[str, Any]]:
            raise error()

    with pytest.raises(InvalidInput) as info:
        push_dashboards("http://g", TOKEN, "F", DASHBOARDS, api_factory=lambda u, t: Failing())
    assert info.value.reason == reason
    assert TOKEN not in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_push_refuses_a_broken_file_before_sending_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"title": "no uid"}')
    api = FakeApi()
    with pytest.raises(InvalidInput) as info:
        push_dashboards("http://g", TOKEN, "F", [*DASHBOARDS, bad], api_factory=lambda u, t: api)
    assert info.value.reason == "bad_dashboard"
    assert api.boards == {}
    assert api.created == []
    with pytest.raises(InvalidInput) as info:
        push_dashboards("http://g", "", "F", DASHBOARDS, api_factory=lambda u, t: api)
    assert info.value.reason == "grafana_auth"


def test_push_against_a_closed_port_is_unreachable() -> None:
    """The real grafana-client against nothing listening: one line, reason unreachable."""
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(InvalidInput) as info:
            push_dashboards(url, TOKEN, "F", DASHBOARDS)
    assert info.value.reason == "grafana_unreachable"
    assert TOKEN not in str(info.value)


def test_cli_push_uses_the_env_token_and_prints_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_push(url: str, token: str, folder: str, paths: list[Path]) -> list[str]:
        seen.update(url=url, token=token, folder=folder, paths=[p.name for p in paths])
        return [f"{url}/d/x"]

    monkeypatch.setattr(push_module, "push_dashboards", fake_push)
    app = typer.Typer()
    app.command("noop")(lambda: None)
    cli_dashboards.register(app)
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["dashboards", "push", "--url", "http://g", "--folder", "F"],
        env={"COLLAPSE_GRAFANA_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "http://g/d/x"
    assert seen == {"url": "http://g", "token": TOKEN, "folder": "F",
                    "paths": [p.name for p in DASHBOARDS]}  # fmt: skip
    monkeypatch.setattr(push_module, "push_dashboards", push_dashboards)
    result = runner.invoke(
        app, ["dashboards", "push", "--url", "http://127.0.0.1:9", "--token", TOKEN]
    )
    assert result.exit_code == 2
    assert TOKEN not in result.output


class _FakeGrafana(BaseHTTPRequestHandler):
    """Grafana's folder and dashboard endpoints, in memory, behind a bearer token."""

    folders: ClassVar[list[dict[str, Any]]] = []
    boards: ClassVar[dict[str, dict[str, Any]]] = {}

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._reply(401, {"message": "invalid API key"})
        return False

    def do_GET(self) -> None:
        if self._authorised():
            self._reply(200, self.folders)

    def do_POST(self) -> None:
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/folders":
            folder = {"uid": f"uid-{len(self.folders)}", "title": body["title"]}
            self.folders.append(folder)
            self._reply(200, folder)
            return
        uid = body["dashboard"]["uid"]
        if uid in self.boards and not body.get("overwrite"):
            self._reply(412, {"message": "A dashboard with the same uid already exists"})
            return
        self.boards[uid] = body
        self._reply(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x"})

    def log_message(self, *args: object) -> None:
        """Quiet: the test output stays readable."""


def test_push_through_the_real_client_to_a_fake_grafana() -> None:
    """grafana-client's real HTTP calls: paths, bearer auth, payload shape, 401 handling."""
    _FakeGrafana.folders, _FakeGrafana.boards = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for _ in range(2):
            links = push_dashboards(url, TOKEN, "Collapse", DASHBOARDS)
            assert sorted(links) == sorted(f"{url}/d/{u}/x" for u in UIDS)
        assert _FakeGrafana.folders == [{"uid": "uid-0", "title": "Collapse"}]
        assert {b["folderUid"] for b in _FakeGrafana.boards.values()} == {"uid-0"}
        with pytest.raises(InvalidInput) as info:
            push_dashboards(url, "wrong-token", "Collapse", DASHBOARDS)
        assert info.value.reason == "grafana_auth"
        assert "wrong-token" not in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
