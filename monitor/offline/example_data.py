"""A generated example data set for `make demo`: Zipf-distributed next tokens, clustered states.

Classes get random means, samples scatter around them, and the head is a noisy copy of the
centred means, so the metrics land in a plausible, partly collapsed range. Deterministic per
seed. Usage: `python -m monitor.offline.example_data --out DIR`.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np

from monitor.data.output import OutputDir
from monitor.errors import ExitCode, InvalidInput


def make_example(
    *,
    vocab_size: int = 4_000,
    dim: int = 128,
    samples: int = 60_000,
    spread: float = 0.6,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab_size + 1)
    freq = 1.0 / ranks**1.1  # Zipf's law, like next-token frequencies in text
    labels = rng.choice(vocab_size, size=samples, p=freq / freq.sum())
    means = rng.normal(size=(vocab_size, dim)) / np.sqrt(dim)
    shared = rng.normal(size=dim) * 0.1  # a common offset: real hidden states are anisotropic
    features = means[labels] + shared + spread * rng.normal(size=(samples, dim)) / np.sqrt(dim)
    classifier = (means - means.mean(axis=0)) + 0.3 * rng.normal(size=(vocab_size, dim)) / np.sqrt(
        dim
    )
    bias = 0.1 * np.log(freq / freq.sum())
    return {
        "features": features.astype(np.float32),
        "labels": labels.astype(np.int64),
        "classifier": classifier.astype(np.float32),
        "bias": bias.astype(np.float32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # A link at --out is refused (exit 2, one line); each file is written whole, then renamed.
    try:
        with OutputDir(args.out) as out:
            for name, array in make_example(seed=args.seed).items():
                out.write_with(f"{name}.npy", partial(np.save, arr=array, allow_pickle=False))
    except InvalidInput as exc:
        parser.exit(ExitCode.BAD_INPUT, f"error: {exc}\n")
    print(f"example data written to {args.out}/")


if __name__ == "__main__":
    main()
