"""Evaluation (DESIGN.md step 5): window statistics -> metric snapshots, per model and window."""
