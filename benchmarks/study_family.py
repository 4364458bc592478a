"""Train a family of tiny causal LMs on the King James Bible and run `collapse-monitor study`.

A small-scale check of Wu & Papyan's finding (lower CDNV and higher NC4 agreement go with lower
validation loss): several widths and depths, several seeds each, on CPU. Nothing is
downloaded: the corpus comes from the Debian packages `bible-kjv` and `bible-kjv-text` (public
domain); when `bible` is missing the script prints the apt-get command.

Corpus and split: `bible -f "gen1:1-rev22:21"` prints one verse per line ("Ge1:1 In the ...").
The verse references are stripped and the verses of a chapter joined into one document (one
line of train.txt / val.txt). Every tenth chapter in canonical order (chapters 10, 20, ..., of
the 1,189) is validation, the rest is training: the validation set spans every part of the
Bible, and no chapter is split between the two.

Training: one byte-level BPE tokenizer (2,048 tokens) on the training chapters, shared by all
models; GPT-2 models trained with AdamW and 100 warmup steps. Per size and seed, two kinds of
run: one "const" run at a constant learning rate, saved at every length of STEPS (snapshots of
one run, as the paper's checkpoints are not), and one "cos" run per length of SCHEDULED,
trained to exactly that many steps with its own cosine decay to 10% of the rate (a separately
scheduled run). The seed sets both the initialisation and the batch order. Resumable: a
checkpoint that exists is not rebuilt, and a run whose checkpoints all exist is skipped.

    OMP_NUM_THREADS=1 python benchmarks/study_family.py [--out DIR] [--seeds N] [--quick]
        [--no-study] [--tables-only]

Then the study runs over every checkpoint (runs as clusters, tokens seen as the length; the
file study_meta.csv says which) and writes benchmarks/results/study.{csv,json} and
docs/study/*.png (with --quick, into OUT/study only).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from study_family_tables import markdown_tables  # noqa: E402

from monitor.capture.tinymodel import _token_stream, _windows, train_tokenizer  # noqa: E402

APT_COMMAND = "sudo apt-get install -y bible-kjv bible-kjv-text"
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")
VOCAB = 2048
SEQ_LEN = 64
BATCH = 16
LR = 2e-3
WARMUP = 100
FINAL_LR_FRACTION = 0.1  # a scheduled run's cosine decays to this fraction of LR
DONE = "study_family.json"
META = "study_meta.csv"


@dataclass(frozen=True)
class Size:
    """One architecture of the family."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int


@dataclass(frozen=True)
class Grid:
    """What to train: sizes x seeds, const-run snapshots at `steps`, cos runs at `scheduled`."""

    family: tuple[Size, ...]
    steps: tuple[int, ...]
    scheduled: tuple[int, ...]
    max_tokens: int
    max_eval_tokens: int


# Sized for a ~60-minute rerun on one shared CPU thread: 5 seeds, ~40 min of training.
FULL = Grid(
    family=(Size("d32-l1", 32, 1, 2), Size("d64-l2", 64, 2, 2), Size("d128-l3", 128, 3, 4)),
    steps=(150, 300, 600, 1200),
    scheduled=(300, 600),
    max_tokens=65_536,
    max_eval_tokens=32_768,
)
QUICK = Grid(
    family=(Size("d32-l1", 32, 1, 2), Size("d64-l1", 64, 1, 2)),
    steps=(20, 60),
    scheduled=(60,),
    max_tokens=16_384,
    max_eval_tokens=8_192,
)
PUBLISHED_PLOTS = (
    "overview.png",
    "nc1_cdnv2.png",
    "nc1_cdnv2_scale_free.png",
    "nc4_ncc_agreement.png",
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kjv_chapters() -> list[str]:
    """The chapters of the KJV in canonical order, verse references stripped."""
    if shutil.which("bible") is None:
        print(f"the `bible` command is missing; install the corpus with:\n  {APT_COMMAND}")
        raise SystemExit(2)
    text = subprocess.run(
        ["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    chapters: list[list[str]] = []
    last: tuple[str, str] | None = None
    for line in text.splitlines():
        m = VERSE.match(line.strip())
        if m is None:
            continue
        key = (m.group(1), m.group(2))
        if key != last:
            chapters.append([])
            last = key
        chapters[-1].append(m.group(4).strip())
    return [" ".join(verses) for verses in chapters]


def write_corpus(out: Path) -> tuple[Path, Path]:
    """train.txt and val.txt under `out`: one chapter per line, every tenth chapter validation."""
    train_file, val_file = out / "train.txt", out / "val.txt"
    if train_file.exists() and val_file.exists():
        return train_file, val_file
    chapters = kjv_chapters()
    val = [c for i, c in enumerate(chapters) if i % 10 == 9]
    train = [c for i, c in enumerate(chapters) if i % 10 != 9]
    say(f"KJV: {len(chapters)} chapters, {len(train)} train, {len(val)} validation")
    train_file.write_text("\n".join(train) + "\n")
    val_file.write_text("\n".join(val) + "\n")
    return train_file, val_file


def run_name(size: Size, seed: int, schedule: str) -> str:
    """A training run: one size, one seed, one schedule ("const", or "cos<L>" for length L)."""
    return f"{size.name}-seed{seed}-{schedule}"


def learning_rate(step: int, total: int | None) -> float:
    """Linear warmup, then constant (`total` None) or a cosine decay ending at step `total`.

    A scheduled run shorter than 2 x WARMUP (only --quick's) warms up for half its length.
    """
    warmup = WARMUP if total is None else max(1, min(WARMUP, total // 2))
    warm = LR * min(1.0, step / warmup)
    if total is None or step <= warmup:
        return warm
    progress = (step - warmup) / (total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return LR * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)


def train_run(
    size: Size,
    seed: int,
    steps: tuple[int, ...],
    total: int | None,
    tokenizer: Any,
    stream: torch.Tensor,
    out: Path,
) -> None:
    """One run of `size` from `seed`, saved at each step count in `steps` (skipping done ones).

    `total` None: constant rate after warmup; otherwise a cosine schedule ending at `total`.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    schedule = "const" if total is None else f"cos{total:05d}"
    run = run_name(size, seed, schedule)
    targets = {s: out / "checkpoints" / f"{run}-s{s:05d}" for s in steps}
    todo = [s for s, p in targets.items() if not (p / DONE).exists()]
    if not todo:
        say(f"{run}: all {len(steps)} checkpoints exist, skipped")
        return
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        n_positions=SEQ_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model: Any = GPT2LMHeadModel(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optim = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    high = int(stream.numel()) - SEQ_LEN
    start = time.monotonic()
    running = 0.0
    for step in range(1, max(todo) + 1):
        for group in optim.param_groups:
            group["lr"] = learning_rate(step, total)
        batch = _windows(stream, torch.randint(0, high, (BATCH,), generator=gen), SEQ_LEN)
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if step % 300 == 0:
            elapsed = time.monotonic() - start
            say(f"{run} step {step}: train loss ~{running:.3f} ({elapsed:.0f}s)")
        if step in todo:
            path = targets[step]
            model.eval()
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            info = {
                "size": dataclasses.asdict(size),
                "seed": seed,
                "schedule": schedule,
                "run": run,
                "parameters": params,
                "steps": step,
                "tokens_seen": step * BATCH * SEQ_LEN,
                "train_loss_ema": running,
                "seconds": round(time.monotonic() - start, 1),
                "recipe": {"vocab": VOCAB, "seq_len": SEQ_LEN, "batch": BATCH, "lr": LR},
            }
            (path / DONE).write_text(json.dumps(info, indent=2) + "\n")
            model.train()
            say(f"saved {path.name} ({params:,} parameters)")


def write_meta(out: Path) -> Path:
    """study_meta.csv: each checkpoint's run (the bootstrap's cluster) and tokens seen."""
    rows = []
    for done in sorted((out / "checkpoints").glob(f"*/{DONE}")):
        info = json.loads(done.read_text())
        rows.append([done.parent.name, info["run"], str(info["tokens_seen"])])
    path = out / META
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["checkpoint", "run", "tokens_seen"], *rows])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    cache = Path(os.environ.get("COLLAPSE_CACHE_DIR", Path.home() / ".cache" / "collapse-monitor"))
    parser.add_argument("--out", type=Path, default=cache / "study-family")
    parser.add_argument("--quick", action="store_true", help="two tiny sizes, few steps")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per configuration (5; --quick: 2)"
    )
    parser.add_argument("--no-study", action="store_true", help="train only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tables-only", action="store_true", help="print the tables of an existing study"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    out: Path = args.out / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    grid = QUICK if args.quick else FULL
    if args.tables_only:
        print(markdown_tables(json.loads((out / "study" / "study.json").read_text())))
        return 0
    train_file, val_file = write_corpus(out)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    else:
        train_texts = [ln for ln in train_file.read_text().splitlines() if ln.strip()]
        tokenizer = train_tokenizer(train_texts, VOCAB, SEQ_LEN)
        tokenizer.save_pretrained(tok_dir)
    train_texts = [ln for ln in train_file.read_text().splitlines() if ln.strip()]
    stream = _token_stream(tokenizer, train_texts)
    say(f"training stream: {int(stream.numel()):,} tokens")
    # Seed by seed, so an interrupted rerun leaves whole seeds of the grid.
    for seed in range(seeds):
        for size in grid.family:
            train_run(size, seed, grid.steps, None, tokenizer, stream, out)
            for length in grid.scheduled:
                train_run(size, seed, (length,), length, tokenizer, stream, out)
    write_meta(out)
    if args.no_study:
        return 0
    return run_study(out, train_file, val_file, grid, quick=args.quick)


def run_study(out: Path, train_file: Path, val_file: Path, grid: Grid, *, quick: bool) -> int:
    """`collapse-monitor study` over every checkpoint; publish the results unless --quick."""
    study_dir = out / "study"
    cmd = [
        sys.executable, "-m", "monitor.cli", "study",
        "--checkpoints", str(out / "checkpoints"),
        "--corpus", str(train_file),
        "--eval-corpus", str(val_file),
        "--meta", str(out / META),
        "--out", str(study_dir),
        "--max-tokens", str(grid.max_tokens),
        "--max-eval-tokens", str(grid.max_eval_tokens),
        "--format", "json",
    ]  # fmt: skip
    say("running: " + " ".join(cmd[1:]))
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    say(f"study took {time.monotonic() - started:.0f}s")
    doc = json.loads(proc.stdout)
    print(markdown_tables(doc))
    if not quick:
        results, figures = ROOT / "benchmarks" / "results", ROOT / "docs" / "study"
        results.mkdir(parents=True, exist_ok=True)
        figures.mkdir(parents=True, exist_ok=True)
        shutil.copy(study_dir / "study.csv", results / "study.csv")
        shutil.copy(study_dir / "study.json", results / "study.json")
        for name in PUBLISHED_PLOTS:
            shutil.copy(study_dir / name, figures / name)
        say(f"wrote {results}/study.{{csv,json}} and {len(PUBLISHED_PLOTS)} plots in {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
