"""The learning-rate schedule of a stage. Every stage has a fresh optimizer and its own schedule,
so a decaying schedule re-warms and re-decays at each stage.

    constant  warmup, then the peak lr
    linear    warmup, then a linear decay towards min_lr_ratio * lr
    cosine    warmup, then a cosine decay towards min_lr_ratio * lr. With warmup_fraction 0.01
              and min_lr_ratio 0.1 this is the "re-warming and re-decaying" of Ibrahim et al.
              2024 ("Simple and Scalable Strategies to Continually Pre-train Large Language
              Models", arXiv 2403.08763): each new dataset re-warms linearly over 1% of its
              steps to the peak lr and decays by cosine to 0.1 of it.
    wsd       warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv 2404.06395; Hagele et al.
              2024, arXiv 2405.18392): warmup, the peak lr held, then a decay over the last
              decay_fraction of the stage's steps (default 0.1: MiniCPM found ~10% of the tokens
              enough to match cosine) towards min_lr_ratio * lr, shaped by decay_shape
              (linear, cosine or 1-sqrt; Hagele et al. found 1-sqrt best).

Warmup is linear over warmup_steps (or round(warmup_fraction * steps), at least one): step s < W
has factor (s + 1) / W, so no step is taken at lr 0. A decay phase of D steps starting at step S
has progress p = (s - S) / D at step s (0 at its first step, never 1), the convention of
transformers' get_wsd_schedule, whose factors these equal when there is no warmup (tested).
"""

from __future__ import annotations

import math

WSD_DECAY_FRACTION = 0.1  # MiniCPM's ~10% of the tokens


def phases(cfg, total: int) -> tuple[int, int]:
    """(warmup steps, decay steps) of a stage of `total` optimizer steps; decay steps 0 = constant."""
    warm = max(1, round(cfg.warmup_fraction * total)) if cfg.warmup_fraction else cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return warm, 0
    if cfg.lr_schedule == "wsd":
        frac = cfg.decay_fraction if cfg.decay_fraction is not None else WSD_DECAY_FRACTION
        return warm, max(1, round(frac * total))
    return warm, max(1, total - warm)


def check(cfg, total: int) -> str | None:
    """Why the schedule does not fit a stage of `total` steps (the config keys named), or None."""
    warm, decay = phases(cfg, total)
    if cfg.lr_schedule == "wsd" and warm + decay > total:
        return (f"train.lr_schedule wsd: {warm} warmup steps (train.warmup_steps / warmup_fraction) + {decay} decay "
                f"steps (train.decay_fraction) exceed the stage's {total} steps")
    if warm > total:
        return f"train.warmup_steps {warm} exceeds the stage's {total} steps"
    return None


def _shape(name: str, p: float) -> float:
    if name == "linear":
        return 1.0 - p
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - math.sqrt(p)  # 1-sqrt


def lr_factor(cfg, total: int, step: int) -> float:
    """The schedule's multiplier of cfg.lr at optimizer step `step` (from 0) of `total`."""
    warm, decay = phases(cfg, total)
    if warm and step < warm:
        return (step + 1) / warm
    if not decay:
        return 1.0
    start = total - decay if cfg.lr_schedule == "wsd" else warm
    if step < start:
        return 1.0
    p = min(1.0, (step - start) / decay)
    shape = (cfg.decay_shape or "linear") if cfg.lr_schedule == "wsd" else cfg.lr_schedule
    floor = cfg.min_lr_ratio
    return floor + (1.0 - floor) * _shape(shape, p)


def describe(cfg, total: int) -> dict:
    """A stage's schedule as results.json records it: the settings, its phases and the lr of its
    first and last step."""
    warm, decay = phases(cfg, total)
    out = {"lr_schedule": cfg.lr_schedule, "peak_lr": cfg.lr, "steps": total, "warmup_steps": warm,
           "decay_steps": decay, "min_lr_ratio": cfg.min_lr_ratio}
    if cfg.lr_schedule == "wsd":
        out["decay_shape"] = cfg.decay_shape or "linear"
    out["lr_first"], out["lr_last"] = (cfg.lr * lr_factor(cfg, total, s) for s in (0, max(0, total - 1)))
    return out
