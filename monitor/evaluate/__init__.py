"""Evaluation (docs/architecture.md): window statistics -> metric snapshots, per model, window."""
