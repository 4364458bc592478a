"""A real (tiny) causal LM for the demo and the tests, built offline from the bundled corpus.

Nothing can be downloaded from a model hub where this runs, and random weights have no class
geometry worth measuring. So: train a byte-level BPE tokenizer with `tokenizers` on the bundled
public-domain fables, train a small GPT-2 on them for a few minutes of CPU (keeping the
checkpoint with the best validation loss), and save a normal `from_pretrained` directory. The
artefact is not committed; it is built on first use into a cache directory
(`$COLLAPSE_CACHE_DIR`, else `~/.cache/collapse-monitor`) under a file lock, so two processes
never build at once, and rebuilt when the corpus or the recipe changes.

    python -m monitor.capture.tinymodel [--out DIR] [--seconds 240] [--steps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.data import corpus_bytes, read_corpus

EOS = "<|endoftext|>"
RECIPE_VERSION = 2
INFO_FILE = "collapse_build.json"


@dataclass(frozen=True)
class TinyModelSpec:
    """The recipe; its fingerprint (with the corpus) names the cached artefact."""

    vocab_size: int = 1024
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 256
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    max_steps: int = 200
    max_seconds: float = 240.0
    eval_every: int = 25
    seed: int = 0

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        h.update(str(RECIPE_VERSION).encode())
        h.update(corpus_bytes("train"))
        return h.hexdigest()[:16]


DEFAULT_SPEC = TinyModelSpec()


def default_cache_root() -> Path:
    root = os.environ.get("COLLAPSE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "collapse-monitor"


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    wrapper: Any = PreTrainedTokenizerFast  # untyped in transformers 5
    return wrapper(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
    )


def _token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    offsets = torch.arange(seq_len)
    return stream[starts[:, None] + offsets[None, :]]


@torch.no_grad()
def _eval_loss(model: Any, stream: torch.Tensor, seq_len: int) -> float:
    n = (int(stream.numel()) - 1) // seq_len
    if n < 1:
        return float("nan")
    batch = stream[: n * seq_len].view(n, seq_len)
    mask = torch.ones_like(batch)
    return float(model(input_ids=batch, attention_mask=mask, labels=batch).loss)


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    spec: TinyModelSpec = DEFAULT_SPEC,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train tokenizer and model per `spec` and save both into `out_dir` (created)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    texts = read_corpus("train")
    tokenizer = train_tokenizer(texts, spec.vocab_size, spec.n_positions)
    # The last tenth of the training documents picks the checkpoint (early stopping): the
    # corpus is small, and a model trained to memorise it generalises worse to demo traffic.
    n_val = max(1, len(texts) // 10)
    stream = _token_stream(tokenizer, texts[:-n_val])
    val = _token_stream(tokenizer, texts[-n_val:])
    heldout = _token_stream(tokenizer, read_corpus("heldout"))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_positions=spec.n_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model: Any = GPT2LMHeadModel(config)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(spec.seed)
    high = int(stream.numel()) - spec.seq_len
    start = time.monotonic()
    step, loss_value = 0, float("nan")
    best_loss, best_step = _eval_loss(model, val, spec.seq_len), 0
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    warmup = max(1, min(100, spec.max_steps // 10))
    while step < spec.max_steps and time.monotonic() - start < spec.max_seconds:
        scale = min(1.0, (step + 1) / warmup)
        scale *= 0.5 * (1 + math.cos(math.pi * step / max(spec.max_steps, 1)))
        for group in optim.param_groups:
            group["lr"] = spec.lr * max(scale, 0.05)
        batch = _windows(
            stream, torch.randint(0, high, (spec.batch_size,), generator=gen), spec.seq_len
        )
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        step += 1
        loss_value = float(loss.detach())
        if step % spec.eval_every == 0 or step == spec.max_steps:
            model.eval()
            val_loss = _eval_loss(model, val, spec.seq_len)
            model.train()
            if val_loss < best_loss:
                best_loss, best_step = val_loss, step
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elapsed = time.monotonic() - start
            say(f"step {step}: train {loss_value:.3f} val {val_loss:.3f} ({elapsed:.0f}s)")
    model.load_state_dict(best)
    model.eval()
    info = {
        "fingerprint": spec.fingerprint(),
        "spec": dataclasses.asdict(spec),
        "steps": step,
        "seconds": round(time.monotonic() - start, 1),
        "train_loss": loss_value,
        "best_step": best_step,
        "val_loss": best_loss,
        "heldout_loss": _eval_loss(model, heldout, spec.seq_len),
        "train_tokens": int(stream.numel()),
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    say(f"saved {out}: step {best_step} of {step}, heldout loss {info['heldout_loss']:.3f}")
    return out


def build_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The build record of a saved tiny model, or None when there is none."""
    file = Path(path) / INFO_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_tiny_model(
    cache_root: str | os.PathLike[str] | None = None,
    spec: TinyModelSpec = DEFAULT_SPEC,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Path of the cached tiny model for `spec`, building it first if needed (under a lock).

    The build goes to a temporary sibling directory and is renamed into place, so a crash never
    leaves a half-written model that later callers would load.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    name = f"tiny-gpt2-{spec.fingerprint()}"
    target = root / name
    if (build_info(target) or {}).get("fingerprint") == spec.fingerprint():
        return target
    with _file_lock(root / f"{name}.lock"):
        if (build_info(target) or {}).get("fingerprint") == spec.fingerprint():
            return target  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build_tiny_model(tmp, spec, progress=progress)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help="save here (default: the shared cache)")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SPEC.max_seconds)
    parser.add_argument("--steps", type=int, default=DEFAULT_SPEC.max_steps)
    parser.add_argument("--seed", type=int, default=DEFAULT_SPEC.seed)
    args = parser.parse_args(argv)
    spec = dataclasses.replace(
        DEFAULT_SPEC, max_seconds=args.seconds, max_steps=args.steps, seed=args.seed
    )

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.out is not None:  # save_pretrained writes the files: at least no link at --out
        from monitor.data.output import check_output_path
        from monitor.errors import InvalidInput

        try:
            check_output_path(args.out, directory=True)
        except InvalidInput as exc:
            parser.exit(2, f"error: {exc}\n")
    path = (
        build_tiny_model(args.out, spec, progress=say)
        if args.out is not None
        else ensure_tiny_model(spec=spec, progress=say)
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
