"""Offline analysis of saved features: `analyze` now; the regression gate and studies later."""
