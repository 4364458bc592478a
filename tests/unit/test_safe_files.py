"""Output files the user names (`--out`) are never written through a symbolic link.

Each attack plants a link where a write would go: at the `--out` path itself (to a file or a
directory outside), at a temporary name (the old predictable `.report.html.tmp`, or the name the
random generator will produce), at a final name inside the output directory, or swapped in
after the directory was opened. The target outside must stay byte for byte as it was, and a
refusal must be one `error:` line with exit code 2. Ordinary writes still work, atomically.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_main import run_main as run_cli

from monitor.cli.common import ExitCode
from monitor.data import output
from monitor.data.output import OutputDir, check_output_path, write_file
from monitor.errors import InvalidInput
from monitor.report import ReportData, write_report
from monitor.snapshot import Snapshot

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"precious: must survive every test\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the output area that an attacker would like overwritten."""
    path = tmp_path / "victim" / "precious.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def untouched(victim: Path) -> bool:
    return victim.read_bytes() == SECRET and sorted(victim.parent.iterdir()) == [victim]


def report_data() -> ReportData:
    snaps = [
        Snapshot(model="m", window="1h", window_seconds=3600, timestamp=1.7e9 + 60 * i,
                 status="ok", reason=None, duration_seconds=0.1, sample_count=500,
                 class_count=20, metrics={"nc1_cdnv": value})
        for i, value in enumerate([0.3, 0.2])
    ]  # fmt: skip
    return ReportData("m", "1h", snaps)


# --- a link at the path the user named --------------------------------------------------------


def test_link_at_out_directory_is_refused_and_its_target_untouched(
    tmp_path: Path, victim: Path
) -> None:
    link = tmp_path / "report"
    link.symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(InvalidInput) as refused:
        write_report(report_data(), link)
    assert refused.value.reason == "unsafe_output"
    assert "symbolic link" in str(refused.value)
    assert untouched(victim)
    # The same refusal before any work (study, demo), and a dangling link is a link too.
    with pytest.raises(InvalidInput, match="symbolic link"):
        check_output_path(link, directory=True)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InvalidInput, match="symbolic link"):
        OutputDir(dangling).__enter__()
    assert not (tmp_path / "nowhere").exists()


def test_link_at_out_file_is_refused_and_its_target_untouched(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "rules.yaml"
    link.symlink_to(victim)
    with pytest.raises(InvalidInput) as refused:
        write_file(link, "groups: []\n")
    assert refused.value.reason == "unsafe_output"
    assert untouched(victim)
    assert link.is_symlink()  # refused, not replaced either: the user sees what is there
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_rules_render_refuses_a_link_at_out_with_one_line_and_exit_2(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "rules.yaml"
    link.symlink_to(victim)
    code, out, err = run_cli(capsys, "rules", "render", "--out", str(link))
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert err.startswith("error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert "symbolic link" in err
    assert untouched(victim)
    real = tmp_path / "real.yaml"
    code, _, err = run_cli(capsys, "rules", "render", "--out", str(real))
    assert code == ExitCode.OK, err
    assert real.read_text().startswith("groups:")


def test_cli_report_and_study_refuse_a_link_at_out(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "analyze.json"
    source.write_text(json.dumps({"nc1_cdnv": 0.2, "sample_count": 9, "class_count": 3}))
    link = tmp_path / "out"
    link.symlink_to(victim.parent, target_is_directory=True)
    code, out, err = run_cli(capsys, "report", "--from-json", str(source), "--out", str(link))
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert "symbolic link" in err
    assert len(err.strip().splitlines()) == 1
    # study refuses before it measures: these checkpoints and corpora do not even exist.
    missing = str(tmp_path / "missing")
    code, out, err = run_cli(capsys, "study", "--checkpoints", missing, "--corpus", missing,
                             "--eval-corpus", missing, "--out", str(link))  # fmt: skip
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert "symbolic link" in err
    assert untouched(victim)
    code, _, err = run_cli(capsys, "report", "--from-json", str(source), "--out",
                           str(tmp_path / "real"))  # fmt: skip
    assert code == ExitCode.OK, err
    assert (tmp_path / "real" / "report.html").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "monitor.offline.example_data", "--out"],
        [sys.executable, "-m", "monitor.cli", "demo", "--port", "0", "--plain", "--out"],
    ],
    ids=["example-data", "demo"],
)
def test_scripts_refuse_a_link_at_out_before_any_work(
    argv: list[str], tmp_path: Path, victim: Path
) -> None:
    link = tmp_path / "out"
    link.symlink_to(victim.parent, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAPSE_")}
    done = subprocess.run(
        [*argv, str(link)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
        check=False,
    )  # fmt: skip
    assert done.returncode == ExitCode.BAD_INPUT, done.stdout + done.stderr
    assert "symbolic link" in done.stderr
    assert untouched(victim)


def test_example_data_writes_its_arrays(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "monitor.offline.example_data", "--out", str(tmp_path / "ex")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "ex").iterdir())
    assert names == ["bias.npy", "classifier.npy", "features.npy", "labels.npy"]


# --- links at temporary and final names inside the output directory ---------------------------


def test_links_at_the_old_predictable_temporary_names_are_not_followed(
    tmp_path: Path, victim: Path
) -> None:
    out = tmp_path / "report"
    out.mkdir()
    planted = [out / ".report.html.tmp", out / ".nc1.png.tmp", out / ".class_means_pca.png.tmp"]
    for link in planted:
        link.symlink_to(victim)
    files = write_report(report_data(), out)
    assert untouched(victim)
    assert files.html.read_text(encoding="utf-8").lower().startswith("<!doctype html>")
    assert all(link.is_symlink() for link in planted)  # never opened, never renamed


def test_a_link_at_the_next_random_temporary_name_is_refused_not_followed(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a link at the exact name the generator will give: O_EXCL fails, follows nothing."""
    monkeypatch.setattr(output.secrets, "token_hex", lambda n: "0" * (2 * n))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".report.html.0000000000000000.tmp").symlink_to(victim)
    with OutputDir(out) as d, pytest.raises(InvalidInput) as refused:
        d.write_text("report.html", "attacker wins if this lands in the victim")
    assert refused.value.reason == "bad_output"
    assert untouched(victim)
    assert not (out / "report.html").exists()


def test_temporary_names_are_unpredictable(tmp_path: Path) -> None:
    names = {output._tmp_name("report.html") for _ in range(64)}
    assert len(names) == 64
    assert all(n.startswith(".report.html.") and n.endswith(".tmp") for n in names)


def test_links_at_final_names_inside_the_directory_are_replaced_not_followed(
    tmp_path: Path, victim: Path
) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.html").symlink_to(victim)
    (out / "nc1.png").symlink_to(victim)
    (out / "drift.png").symlink_to(victim)  # stale figure: removed, the link not its target
    files = write_report(report_data(), out)
    assert untouched(victim)
    assert not files.html.is_symlink()
    assert files.html.is_file()
    assert not (out / "nc1.png").is_symlink()
    assert not (out / "drift.png").is_symlink()
    assert not (out / "drift.png").exists()


def test_a_link_swapped_in_after_opening_is_not_followed(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "out"
    with OutputDir(out) as d:
        moved = tmp_path / "moved"
        out.rename(moved)
        out.symlink_to(victim.parent, target_is_directory=True)
        d.write_text("study.json", "{}\n")  # into the directory opened, not through the link
    assert untouched(victim)
    assert (moved / "study.json").read_text() == "{}\n"


# --- ordinary writes ---------------------------------------------------------------------------


def test_normal_writes_are_whole_atomic_and_leave_no_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"  # parents created
    with OutputDir(out) as d:
        first = d.write_text("x.json", "old\n")
        inode = first.stat().st_ino
        assert d.write_bytes("x.json", b"new\n") == out / "x.json"
        assert first.read_text() == "new\n"
        assert first.stat().st_ino != inode  # a new file renamed over, not rewritten in place

        def fail(handle: object) -> None:
            raise RuntimeError("disk on fire")

        with pytest.raises(RuntimeError):
            d.write_with("x.json", fail)
    assert first.read_text() == "new\n"  # the failed write changed nothing
    assert sorted(p.name for p in out.iterdir()) == ["x.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(first.stat().st_mode) == 0o666 & ~umask  # as open() would create it
    single = write_file(tmp_path / "rules.yaml", "groups: []\n")
    assert single.read_text() == "groups: []\n"


def test_wrong_kinds_of_output_path_are_one_line_refusals(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        OutputDir(a_file).__enter__()
    with pytest.raises(InvalidInput, match="is a directory"):
        write_file(tmp_path, "x")
    with pytest.raises(InvalidInput, match="No such file or directory"):
        write_file(tmp_path / "no" / "such" / "rules.yaml", "x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "report.html").mkdir()
    with OutputDir(tmp_path / "d") as d, pytest.raises(InvalidInput, match="is a directory"):
        d.write_text("report.html", "x")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["report.html"]
