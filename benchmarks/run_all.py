"""Run every benchmark script in `benchmarks/` and record their tables in docs/benchmarks.md.

The scripts: every `bench_*.py`, `profile_hotspots.py`, `probe_overhead.py` and
`alert_quality.py`, and, on a machine where torch sees a CUDA device, `gpu.sh` (the CUDA tests
and CUDA variants).

Each script prints Markdown on stdout (progress on stderr, passed through). The tables go,
verbatim and under the command that produced them, into the section of the output file between
`<!-- bench:begin -->` and `<!-- bench:end -->`, after a description of the machine. The rest of
the file (a hand-written summary, other engineers' sections) is left as it is; a file without
the markers gets the section appended, a missing file is created.

    .venv/bin/python benchmarks/run_all.py            # full sizes -> docs/benchmarks.md
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run -> build/benchmarks-quick.md

`--quick` passes `--quick` to every script and, unless `--output` is given, writes to
build/benchmarks-quick.md so a smoke run never overwrites the recorded results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def torch_info() -> tuple[str, str, str]:
    """(torch version, intra-op threads, GPU) as the benchmark scripts will see them."""
    code = (
        "import torch;"
        "print(torch.__version__);"
        "print(torch.get_num_threads());"
        "print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = proc.stdout.split("\n")
    if proc.returncode != 0 or len(lines) < 3:
        return "unknown", "unknown", "unknown"
    return lines[0], lines[1], lines[2]


def machine_description() -> str:
    version, threads, gpu = torch_info()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"- CPU: {cpu_model()}, {os.cpu_count()} cores ({threads} torch threads)",
            f"- RAM: {ram_gib()}",
            f"- GPU: {gpu}",
            f"- torch {version}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}",
            f"- Date: {now}",
        ]
    )


# Scripts besides bench_*.py, and the arguments of their smoke runs (default: --quick).
EXTRA_SCRIPTS = ("profile_hotspots.py", "probe_overhead.py", "alert_quality.py")
QUICK_ARGS = {
    "probe_overhead.py": ["--reps", "3", "--big-reps", "2", "--tiny-random"],
    "bench_store_scale.py": ["--tiny"],
}


def run_script(script: Path, quick: bool) -> tuple[str, str]:
    """Run one script; returns (the Markdown block for it, its display command)."""
    extra = QUICK_ARGS.get(script.name, ["--quick"]) if quick else []
    if script.suffix == ".sh":  # gpu.sh: its smoke run is --dry-run
        extra = ["--dry-run"] if quick else []
        args = ["bash", str(script), *extra]
        shown = " ".join(["bash", str(script.relative_to(ROOT)), *extra])
    else:
        args = [sys.executable, str(script), *extra]
        shown = " ".join([".venv/bin/python", str(script.relative_to(ROOT)), *extra])
    log(f"== {shown}")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    status = "" if proc.returncode == 0 else f" **FAILED with exit code {proc.returncode}**"
    block = [
        f"<!-- bench-script:{script.name} -->",
        f"### {script.name}",
        "",
        f"Command: `{shown}`, run {when}, {elapsed:.0f} s; 1-minute load average "
        f"{load_before:.1f} before, {load_after:.1f} after.{status}",
        "",
        proc.stdout.rstrip(),
        f"<!-- /bench-script:{script.name} -->",
        "",
    ]
    log(f"   {elapsed:.0f} s, exit {proc.returncode}")
    return "\n".join(block), ("" if proc.returncode == 0 else shown)


def previous_blocks(existing: str) -> dict[str, str]:
    """Per-script blocks already in the marked section, by script name."""
    if BEGIN not in existing or END not in existing:
        return {}
    body = existing.split(BEGIN, 1)[1].split(END, 1)[0]
    blocks = {}
    for match in re.finditer(
        r"<!-- bench-script:(\S+) -->\n.*?<!-- /bench-script:\1 -->\n", body, flags=re.S
    ):
        blocks[match.group(1)] = match.group(0)
    return blocks


def splice(existing: str, section: str) -> str:
    """Replace the marked section of `existing` (or append one) with `section`."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + block + tail
    if not existing.strip():
        return f"# Benchmarks\n\n{block}\n"
    return existing.rstrip() + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pass --quick to every script")
    p.add_argument("--output", type=Path, default=None, help="Markdown file to update")
    p.add_argument("--only", type=str, default=None, help="run only scripts containing this")
    args = p.parse_args(argv)
    output: Path = args.output or (
        ROOT / ("build/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")
    )

    scripts = sorted(BENCH_DIR.glob("bench_*.py")) + [BENCH_DIR / name for name in EXTRA_SCRIPTS]
    if torch_info()[2] not in ("none", "unknown"):  # CUDA: the CUDA tests and variants too
        scripts.append(BENCH_DIR / "gpu.sh")
    if args.only:
        scripts = [s for s in scripts if args.only in s.name]
    if not scripts:
        log("no benchmark scripts found")
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    existing = output.read_text() if output.exists() else ""
    # With --only, the other scripts' blocks from the last run stay (each says when it ran).
    by_name = previous_blocks(existing) if args.only else {}
    failed = []
    for script in scripts:
        block, failure = run_script(script, args.quick)
        by_name[script.name] = block + "\n"
        if failure:
            failed.append(failure)
    blocks = [by_name[name].rstrip() + "\n" for name in sorted(by_name)]

    command = shlex.join([".venv/bin/python", "benchmarks/run_all.py", *(argv or sys.argv[1:])])
    section = "\n".join(
        [
            "## Results",
            "",
            f"Last written by `{command}` (`make bench` runs it without arguments). Everything "
            "between the bench markers is rewritten on each run; with `--only`, the other "
            "scripts' blocks are kept from their last run (each block gives its command and "
            "date).",
            "",
            machine_description(),
            "",
            *blocks,
        ]
    )
    # Read again: the file may have been edited (summary, other sections) while the scripts ran.
    existing = output.read_text() if output.exists() else ""
    output.write_text(splice(existing, section))
    log(f"wrote {output}")
    if failed:
        log("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
