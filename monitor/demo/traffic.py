"""Live-looking traffic: prompts cut from the held-out corpus, completed with `generate()`.

Why generation and not teacher-forced forwards: the probe's real path is a serving process
calling `generate()`, where prompt positions and completion positions are labelled
differently; the demo exercises exactly that path. A rate limit keeps the CPU use sane (the
loop sleeps between requests), and one torch thread per process is set by the caller.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monitor.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrafficShape:
    """One request = `batch` prompts of one length in [min_prompt, max_prompt] tokens."""

    batch: int = 4
    min_prompt: int = 24
    max_prompt: int = 64
    new_tokens: int = 16
    tokens_per_second: float = 2000.0  # prompt + completion tokens; a ceiling, not a promise
    seed: int = 0


class Traffic:
    """A background thread that sends generation requests to `model` until `stop()`."""

    def __init__(
        self, model: Any, tokenizer: Any, documents: Sequence[str], shape: TrafficShape
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.shape = shape
        self._rng = random.Random(shape.seed)
        self._docs = [ids for ids in (self._encode(d) for d in documents) if ids]
        longest = max((len(ids) for ids in self._docs), default=0)
        if longest < shape.min_prompt + 1:
            raise InvalidInput(
                "corpus_too_short",
                f"the traffic corpus needs documents of at least {shape.min_prompt + 1} tokens",
            )
        self.requests = 0
        self.tokens = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompts(self) -> torch.Tensor:
        """(batch, L) token ids: random windows of random documents, one length L per batch."""
        shape = self.shape
        usable = [d for d in self._docs if len(d) > shape.min_prompt]
        length = self._rng.randint(shape.min_prompt, shape.max_prompt)
        length = min(length, max(len(d) for d in usable) - 1)
        rows = []
        for _ in range(shape.batch):
            doc = self._rng.choice([d for d in usable if len(d) > length])
            start = self._rng.randrange(0, len(doc) - length)
            rows.append(doc[start : start + length])
        return torch.tensor(rows, dtype=torch.int64)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to stop after its current request and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        torch.manual_seed(self.shape.seed)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        while not self._stop.is_set():
            ids = self.prompts()
            started = time.monotonic()
            try:
                with torch.no_grad():
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=self.shape.new_tokens,
                        do_sample=True,
                        top_k=40,
                        pad_token_id=pad,
                    )
            except Exception as exc:  # a broken request must not end the demo's traffic
                self.errors += 1
                self.last_error = repr(exc)
                log.warning("demo traffic request failed: %r", exc)
                self._stop.wait(1.0)
                continue
            self.requests += 1
            tokens = int(out.numel())
            self.tokens += tokens
            # Pace to the token budget: a request "costs" tokens / rate seconds.
            budget = tokens / self.shape.tokens_per_second
            self._stop.wait(max(0.0, budget - (time.monotonic() - started)))
