"""Train a family of tiny causal LMs on the King James Bible and run `collapse-monitor study`.

A small-scale check of Wu & Papyan's finding (lower CDNV and higher NC4 agreement go with lower
validation loss): several widths and depths, each snapshotted at several training lengths, on
CPU. Nothing is downloaded: the corpus comes from the Debian packages `bible-kjv` and
`bible-kjv-text` (public domain); when `bible` is missing the script prints the apt-get command.

Corpus and split: `bible -f "gen1:1-rev22:21"` prints one verse per line ("Ge1:1 In the ...").
The verse references are stripped and the verses of a chapter joined into one document (one
line of train.txt / val.txt). Every tenth chapter in canonical order (chapters 10, 20, ..., of
the 1,189) is validation, the rest is training: the validation set spans every part of the
Bible, and no chapter is split between the two.

Training: one byte-level BPE tokenizer (2,048 tokens) on the training chapters, shared by all
models; GPT-2 models trained with AdamW, 100 warmup steps then a constant learning rate, one
seed. Each size is one run, saved at several step counts (the "training lengths" are snapshots
of that run, not separately scheduled runs). Resumable: a checkpoint that exists is not
rebuilt, and a size whose checkpoints all exist is skipped.

    OMP_NUM_THREADS=1 python benchmarks/study_family.py [--out DIR] [--quick] [--no-study]

Then the study runs over every checkpoint and writes benchmarks/results/study.{csv,json} and
docs/study/*.png (with --quick, into OUT/study only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

from monitor.capture.tinymodel import _token_stream, _windows, train_tokenizer  # noqa: E402

APT_COMMAND = "sudo apt-get install -y bible-kjv bible-kjv-text"
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")
VOCAB = 2048
SEQ_LEN = 64
BATCH = 16
LR = 2e-3
WARMUP = 100
SEED = 0
DONE = "study_family.json"


@dataclass(frozen=True)
class Size:
    """One architecture of the family."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int


FAMILY = (
    Size("d32-l1", 32, 1, 2),
    Size("d64-l2", 64, 2, 2),
    Size("d96-l2", 96, 2, 4),
    Size("d128-l3", 128, 3, 4),
    Size("d192-l4", 192, 4, 4),
)
STEPS = (100, 250, 600, 1200, 2500)
STUDY_MAX_TOKENS = 131_072
STUDY_MAX_EVAL_TOKENS = 65_536
PUBLISHED_PLOTS = ("overview.png", "nc1_cdnv2.png", "nc4_ncc_agreement.png")
QUICK_FAMILY = (Size("d32-l1", 32, 1, 2), Size("d64-l1", 64, 1, 2))
QUICK_STEPS = (20, 60)


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


def train_size(
    size: Size, steps: tuple[int, ...], tokenizer: Any, stream: torch.Tensor, out: Path
) -> None:
    """Train one architecture and save it at each step count in `steps` (skipping done ones)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    targets = {s: out / "checkpoints" / f"{size.name}-s{s:05d}" for s in steps}
    todo = [s for s, p in targets.items() if not (p / DONE).exists()]
    if not todo:
        say(f"{size.name}: all {len(steps)} checkpoints exist, skipped")
        return
    torch.manual_seed(SEED)
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
    gen = torch.Generator().manual_seed(SEED)
    high = int(stream.numel()) - SEQ_LEN
    start = time.monotonic()
    running = 0.0
    for step in range(1, max(todo) + 1):
        for group in optim.param_groups:
            group["lr"] = LR * min(1.0, step / WARMUP)
        batch = _windows(stream, torch.randint(0, high, (BATCH,), generator=gen), SEQ_LEN)
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if step % 100 == 0:
            elapsed = time.monotonic() - start
            say(f"{size.name} step {step}: train loss ~{running:.3f} ({elapsed:.0f}s)")
        if step in targets and step in todo:
            path = targets[step]
            model.eval()
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            info = {
                "size": dataclasses.asdict(size),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    cache = Path(os.environ.get("COLLAPSE_CACHE_DIR", Path.home() / ".cache" / "collapse-monitor"))
    parser.add_argument("--out", type=Path, default=cache / "study-family")
    parser.add_argument("--quick", action="store_true", help="two tiny sizes, few steps")
    parser.add_argument("--no-study", action="store_true", help="train only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tables-only", action="store_true", help="print the tables of an existing study"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    family, steps = (QUICK_FAMILY, QUICK_STEPS) if args.quick else (FAMILY, STEPS)
    if args.tables_only:
        print(markdown_tables(json.loads((out / "study" / "study.json").read_text()), out))
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
    for size in family:
        train_size(size, steps, tokenizer, stream, out)
    if args.no_study:
        return 0
    return run_study(out, train_file, val_file, quick=args.quick)


def run_study(out: Path, train_file: Path, val_file: Path, *, quick: bool) -> int:
    """`collapse-monitor study` over every checkpoint; publish the results unless --quick."""
    study_dir = out / "study"
    cmd = [
        sys.executable, "-m", "monitor.cli", "study",
        "--checkpoints", str(out / "checkpoints"),
        "--corpus", str(train_file),
        "--eval-corpus", str(val_file),
        "--out", str(study_dir),
        "--max-tokens", str(STUDY_MAX_TOKENS // (8 if quick else 1)),
        "--max-eval-tokens", str(STUDY_MAX_EVAL_TOKENS // (8 if quick else 1)),
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
    print(markdown_tables(doc, out))
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


def markdown_tables(doc: dict[str, Any], out: Path) -> str:
    """The per-checkpoint table and the correlation table, in Markdown, for docs/study.md."""

    def num(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| checkpoint | parameters | steps | tokens seen | val loss | CDNV2 | CDNV | NC4 | "
        "equiang. std | log-energy std | NC3 cos |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(doc["checkpoints"], key=lambda r: (r["parameters"], r["name"])):
        info = json.loads((out / "checkpoints" / row["name"] / DONE).read_text())
        m = row["metrics"]
        lines.append(
            f"| {row['name']} | {row['parameters']:,} | {info['steps']} | "
            f"{info['tokens_seen']:,} | {row['val_loss']:.3f} | {num(m['nc1_cdnv2'], '.3g')} | "
            f"{num(m['nc1_cdnv'], '.3g')} | {num(m['nc4_ncc_agreement'], '.3f')} | "
            f"{num(m['nc2_equiangularity_std'], '.3f')} | {num(m['nc2_log_energy_std'], '.3f')} | "
            f"{num(m['nc3_duality_mean_cos'], '.3f')} |"
        )
    lines += [
        "",
        "| metric | n | scale | Pearson r | R^2 | Spearman rho | expected sign | agrees |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for c in doc["correlations"]:
        sign = {1: "+", -1: "-", None: "none"}[c["expected_sign"]]
        agrees = {True: "yes", False: "**no**", None: "-"}[c["agrees"]]
        lines.append(
            f"| `{c['metric']}` | {c['n']} | {c['scale']} | {num(c['pearson_r'], '+.3f')} | "
            f"{num(c['r2'], '.3f')} | {num(c['spearman_rho'], '+.3f')} | {sign} | {agrees} |"
        )
    lines += ["", *subgroup_table(doc, out)]
    return "\n".join(lines)


def subgroup_table(doc: dict[str, Any], out: Path) -> list[str]:
    """Spearman's rho with loss inside groups that hold one factor fixed.

    The pooled correlation mixes two factors, training length and model size; within one
    training length only size varies, within one size only length. Each cell: the rho of each
    group of five (n/a where a side is constant).
    """
    from monitor.offline.correlation import spearman

    rows = doc["checkpoints"]
    info = {
        r["name"]: json.loads((out / "checkpoints" / r["name"] / DONE).read_text()) for r in rows
    }
    by_steps: dict[int, list[dict[str, Any]]] = {}
    by_size: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_steps.setdefault(info[r["name"]]["steps"], []).append(r)
        by_size.setdefault(info[r["name"]]["size"]["name"], []).append(r)
    keys = ("nc1_cdnv2", "nc1_cdnv", "nc4_ncc_agreement", "nc2_equiangularity_std",
            "nc3_uniform_duality_cv")  # fmt: skip

    def rho(group: list[dict[str, Any]], key: str) -> str:
        pairs = [(r["metrics"][key], r["val_loss"]) for r in group if r["metrics"][key] is not None]
        value = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) > 2 else None
        return "n/a" if value is None else f"{value:+.2f}"

    head = "| group | " + " | ".join(f"`{k}`" for k in keys) + " |"
    lines = [head, "|---|" + "---:|" * len(keys)]
    for steps, group in sorted(by_steps.items()):
        lines.append(
            f"| {steps} steps, 5 sizes | " + " | ".join(rho(group, k) for k in keys) + " |"
        )
    for size, group in sorted(by_size.items(), key=lambda kv: kv[1][0]["parameters"]):
        lines.append(f"| {size}, 5 lengths | " + " | ".join(rho(group, k) for k in keys) + " |")
    late = [r for r in rows if info[r["name"]]["steps"] >= 600]
    lines.append(
        f"| >= 600 steps, pooled ({len(late)}) | " + " | ".join(rho(late, k) for k in keys) + " |"
    )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
