"""Learning-rate schedules: linear warm-up, then constant, cosine or linear ("poly") decay.

The rate is a pure function of the step, so a schedule has no state to checkpoint beyond the step.
Steps are counted from 0 to ``steps - 1``; with ``W = warmup_steps`` and ``floor = 1e-8``:

- warm-up, ``k < W``:   ``lr = floor + (peak - floor) k / W``  (starts at 1e-8, reaches peak at W);
- then with ``p = (k - W) / (steps - 1 - W)`` going from 0 to 1 at the last step,
  constant ``lr = peak``, cosine ``lr = floor + (peak - floor) (1 + cos(pi p)) / 2``,
  poly ``lr = peak + (floor - peak) p``.

"poly" is the polynomial (degree 1) decay of the Flow Matching paper (Lipman et al. 2022, Table 3):
linear warm-up from 1e-8 to the peak, then linear decay to 1e-8 at the last step.
"""

from __future__ import annotations

import math

LR_FLOOR = 1e-8


def learning_rate(step: int, *, peak: float, steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate of step ``step`` (0-based) of a run of ``steps`` steps."""
    if step < warmup_steps:
        return LR_FLOOR + (peak - LR_FLOOR) * step / warmup_steps
    decay_steps = steps - 1 - warmup_steps
    if schedule == "constant" or decay_steps <= 0:
        return peak
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "cosine":
        return LR_FLOOR + (peak - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return peak + (LR_FLOOR - peak) * progress
    raise ValueError(f"unknown lr schedule {schedule!r}; use constant, cosine or poly")
