"""The learning-rate schedule of a stage: linear warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math


def lr_factor(cfg, total: int, step: int) -> float:
    """The schedule's multiplier of cfg.lr at optimizer step `step` (from 0) of `total`."""
    warm = cfg.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return 1.0 - frac if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
