"""Data in and out: the bundled corpus, arrays read from user files (`arrays`), safe paths
(`files`) and written results (`output`).

The bundled corpus is a small English corpus of public-domain fables retold in plain words.

`train` builds the tiny demo model's tokenizer and weights; `heldout` is demo traffic the model
never saw. Documents are separated by blank lines.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

Split = Literal["train", "heldout"]


def read_corpus(split: Split = "train") -> list[str]:
    """The documents of one split, in file order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown corpus split {split!r}; use 'train' or 'heldout'")
    text = resources.files("monitor.data").joinpath("corpus", f"{split}.txt").read_text("utf-8")
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def corpus_bytes(split: Split = "train") -> bytes:
    """The raw file (for content hashes of cached artefacts)."""
    return resources.files("monitor.data").joinpath("corpus", f"{split}.txt").read_bytes()
