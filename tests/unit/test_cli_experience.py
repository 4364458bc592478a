"""The command line's conventions, checked over every registered command (docs/cli.md).

Every command: `--help` exits 0 and shows an `Example:`; a command that prints data takes
`--format json|table`; errors are one `error: ...` line with the documented exit code and a
traceback only with `--debug`; `--version` prints the package version; docs/cli.md names every
command and every exit code. The command list is walked from the typer app itself, so a command
added later is held to the same rules (and must be classified below as printing data or not).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import typer.main
from cli_main import run_main as run

from monitor import __version__, cli
from monitor.cli.common import ExitCode
from monitor.metrics.report import COLLAPSE_KEYS, GEOMETRY_KEYS, REPORT_KEYS

ROOT = Path(__file__).resolve().parents[2]
CLI_DOC = ROOT / "docs" / "cli.md"

# Commands whose output is data: they must take `--format json|table`.
DATA_COMMANDS = {
    "analyze",
    "status",
    "replay",
    "evaluate",
    "baseline pin",
    "baseline list",
    "compare",
    "report",
    "study",
}
# Commands that print no data, with the reason (a new command must be put in one of the two).
NO_DATA_COMMANDS = {
    "worker": "a long-running Celery worker; it logs",
    "beat": "a long-running scheduler; it logs",
    "api": "an HTTP server; it logs",
    "exporter": "an HTTP server; it logs",
    "baseline unpin": "prints one confirmation line",
    "store migrate": "prints one summary line per model converted",
    "rules render": "its output is a Prometheus rules file (YAML), --format rules|prometheusrule",
    "dashboards push": "prints the uploaded dashboards' URLs, one per line",
    "demo": "a live run in the foreground; its results go to --out and its HTTP endpoints",
}


def _walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


def _all_commands() -> list[tuple[tuple[str, ...], Any]]:
    return list(_walk(typer.main.get_command(cli.app), ()))


ALL = _all_commands()
PATHS = [path for path, _ in ALL]
LEAVES = [" ".join(path) for path, cmd in ALL if path and not hasattr(cmd, "commands")]


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    monkeypatch.delenv("COLLAPSE_REDIS_URL", raising=False)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "(root)")
def test_help_has_a_purpose_and_an_example(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *path, "--help")
    assert code == ExitCode.OK, err
    assert "Usage: collapse-monitor" in out
    assert re.search(r"Example: collapse-monitor|Example: \S+=\S* collapse-monitor", out), (
        f"`collapse-monitor {' '.join(path)} --help` shows no `Example: collapse-monitor ...`"
    )
    command = dict(ALL)[path]
    assert (command.help or "").strip(), f"{' '.join(path)} has no docstring / help text"


def test_every_command_is_classified() -> None:
    unknown = sorted(set(LEAVES) - DATA_COMMANDS - set(NO_DATA_COMMANDS))
    assert not unknown, f"classify as printing data or not (then --format json|table): {unknown}"


@pytest.mark.parametrize("name", sorted(DATA_COMMANDS & set(LEAVES)))
def test_data_commands_take_format_json_or_table(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, *name.split(), "--help")
    assert code == ExitCode.OK
    assert re.search(r"--format\s+<(json\|table|table\|json)>", out), (
        f"`{name}` prints data but has no --format json|table"
    )
    code, _, err = run(capsys, *name.split(), "--format", "yaml")
    assert code == ExitCode.BAD_INPUT
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == ExitCode.OK
    assert out.strip() == f"collapse-monitor {__version__}"
    assert __version__ == importlib.metadata.version("collapse-monitor")


def _arrays(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(6), 20)
    features = rng.normal(size=(120, 5)) + 4.0 * rng.normal(size=(6, 5))[labels]
    np.save(tmp_path / "h.npy", features)
    np.save(tmp_path / "y.npy", labels)
    return tmp_path / "h.npy", tmp_path / "y.npy", features, labels


def test_analyze_prints_json_and_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h, y, features, labels = _arrays(tmp_path)
    code, out, err = run(capsys, "analyze", "--features", str(h), "--labels", str(y),
                         "--format", "json")  # fmt: skip
    assert code == ExitCode.OK, err
    assert err == ""  # stderr is not a terminal here: no progress bar in logs
    doc = json.loads(out)
    assert set(doc) == set(REPORT_KEYS)
    assert doc["sample_count"] == len(labels)
    assert doc["class_count"] == len(np.unique(labels))
    # Brute force float64: mean cosine over distinct pairs of samples.
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cos = unit @ unit.T
    n = len(features)
    assert doc["anisotropy_mean_cos"] == pytest.approx((cos.sum() - n) / (n * (n - 1)), rel=1e-9)
    code, out, err = run(capsys, "analyze", "--features", str(h), "--labels", str(y))
    assert code == ExitCode.OK, err
    for key in COLLAPSE_KEYS + GEOMETRY_KEYS:
        assert key in out, f"table lacks {key}"
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal_and_clean_json(tmp_path: Path) -> None:
    import os
    import pty

    h, y, _, labels = _arrays(tmp_path)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "analyze", "--features", str(h),
             "--labels", str(y), "--format", "json"],
            stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
        )  # fmt: skip
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the pty closes when the child exits
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.returncode == ExitCode.OK
    assert b"accumulating" in seen  # the bar, on the terminal
    assert f"/{len(labels)}".encode() in seen
    assert json.loads(out)["sample_count"] == len(labels)  # stdout untouched by the bar


@pytest.mark.parametrize(
    ("args", "ours"),
    [
        (["analyze", "--features", "missing.npy", "--labels", "missing.npy"], True),
        (["status"], True),  # needs COLLAPSE_REDIS_URL
        (["analyze", "--features", "missing.npy"], False),  # typer: a required option is missing
        (["analyze", "--features", "a", "--labels", "b", "--format", "xml"], False),
        (["replay", "--model", "m", "--corpus", "missing.txt"], False),  # typer: no such file
        (["no-such-command"], False),
    ],
    ids=["missing-file", "no-redis", "missing-option", "bad-choice", "no-such-file", "unknown"],
)
def test_bad_input_is_one_line_with_exit_2(
    args: list[str], ours: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *args)
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    code, _, err = run(capsys, "--debug", *args)
    assert code == ExitCode.BAD_INPUT  # --debug adds the traceback, never changes the code
    assert err.strip().splitlines()[-1].startswith("error: ")
    if ours:  # our refusals have a traceback worth showing; a usage error has none
        assert "Traceback (most recent call last)" in err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COLLAPSE_MODELS": "[not json"}, "error: invalid settings: "),
        ({"COLLAPSE_MIN_COUNT": "many"}, "error: invalid settings: min_count: "),
        ({"COLLAPSE_CONFIG_FILE": "missing.toml"}, "error: COLLAPSE_CONFIG_FILE=missing.toml"),
    ],
    ids=["not-json", "not-an-int", "no-config-file"],
)
def test_bad_settings_are_one_line_with_exit_2(
    env: dict[str, str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(capsys, "rules", "render")
    assert code == ExitCode.BAD_INPUT, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(message), err


def test_the_real_entry_point_in_a_subprocess(tmp_path: Path) -> None:
    def cm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "monitor.cli", *args],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
        )  # fmt: skip

    done = cm("analyze", "--features", "nope.npy", "--labels", "nope.npy")
    assert done.returncode == ExitCode.BAD_INPUT
    assert done.stderr.strip() == "error: features: no such file: nope.npy"
    done = cm("--debug", "analyze", "--features", "nope.npy", "--labels", "nope.npy")
    assert done.returncode == ExitCode.BAD_INPUT
    assert "Traceback (most recent call last)" in done.stderr
    done = cm("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"collapse-monitor {__version__}")


def _toy_app(exc: BaseException) -> typer.Typer:
    toy = typer.Typer()

    @toy.callback()
    def root(debug: bool = typer.Option(False, "--debug")) -> None:
        del debug  # read by cli.main from the arguments

    @toy.command(epilog="Example: collapse-monitor boom")
    def boom() -> None:
        """Raise the exception under test."""
        raise exc

    return toy


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (RuntimeError("disk on fire\nsecond line"), ExitCode.FAILURE,
         "error: RuntimeError: disk on fire second line"),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, "interrupted"),
    ],
    ids=["unexpected", "interrupted"],
)  # fmt: skip
def test_unexpected_errors_and_interrupts(
    exc: BaseException, code: int, line: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(cli, "app", _toy_app(exc))
    got, _, err = run(capsys, "boom")
    assert (got, err.strip()) == (code, line)
    if code == ExitCode.FAILURE:
        got, _, err = run(capsys, "--debug", "boom")
        assert got == code
        assert "Traceback (most recent call last)" in err


def test_cli_doc_lists_every_command_and_exit_code() -> None:
    doc = CLI_DOC.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} `collapse-monitor ([a-z -]+)`", doc, flags=re.M))
    assert headings == set(LEAVES), (
        f"docs/cli.md headings differ from the commands: missing {sorted(set(LEAVES) - headings)}"
        f", stale {sorted(headings - set(LEAVES))}"
    )
    for name in LEAVES:
        section = doc.split(f"`collapse-monitor {name}`", 1)[1].split("\n#", 1)[0]
        assert f"collapse-monitor {name}" in section, f"docs/cli.md: no example for {name}"
    rows = set(re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", doc, flags=re.M))
    assert rows == {(str(int(c)), c.name) for c in ExitCode}, "docs/cli.md exit-code table"


def test_metrics_doc_explains_every_key() -> None:
    from monitor.metrics.drift import DRIFT_KEYS

    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", doc, flags=re.M))
    missing = [k for k in (*COLLAPSE_KEYS, *GEOMETRY_KEYS, *DRIFT_KEYS) if k not in rows]
    assert not missing, f"docs/metrics.md has no row for {missing}"
    stderr_keys = [k for k in REPORT_KEYS if k.endswith("_stderr")]
    for key in stderr_keys:
        assert f"`{key}`" in doc or "`<key>_stderr`" in doc, key


def test_architecture_doc_has_every_redis_key() -> None:
    import inspect

    from monitor.store.keys import LEVELS, ModelKeys, models_key

    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M))
    keys = ModelKeys("cm", "m")
    expected = {models_key("cm")}
    for name, member in inspect.getmembers(ModelKeys):
        if name.startswith("_") or name in ("prefix", "model", "base"):
            continue
        if isinstance(member, property):
            expected.add(getattr(keys, name))
            continue
        params = list(inspect.signature(member).parameters)[1:]
        generic = getattr(keys, name)(*(f"<{p}>" for p in params))
        if generic in table or "level" not in params:
            expected.add(generic)
            continue
        for level in LEVELS:  # one documented row per level (their TTLs differ)
            expected.add(
                getattr(keys, name)(*(level if p == "level" else f"<{p}>" for p in params))
            )
    missing = sorted(expected - table)
    assert not missing, f"docs/architecture.md's Redis key table lacks {missing}"


def test_readme_links_and_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", readme)
    assert links
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README links to missing pages: {missing}"
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S))
    code += "\n" + "\n".join(re.findall(r"`([^`\n]+)`", readme))
    word = r"([a-z]+)(?![\w/.-])"  # a command word, not a path such as helm/collapse-monitor
    shown = set(re.findall(rf"collapse-monitor {word}(?: {word})?", code))
    groups = {path[0] for path in PATHS if len(path) == 2}
    named = {f"{cmd} {sub}" if cmd in groups else cmd for cmd, sub in shown}
    unknown = sorted(named - set(LEAVES))
    assert not unknown, f"README shows commands that do not exist: {unknown}"
