"""The learning-rate schedule: a pure function of the optimizer step.

Two kinds, both after a linear warmup from `warmup_start_lr` to the peak `lr` over `warmup_steps`:

    cosine   cosine from lr down to min_lr, reached at step `decay_steps`; min_lr afterwards (the paper's schedule).
    wsd      warmup-stable-decay: lr held constant, then a linear decay over the last `decay_fraction` of the
             `decay_steps` steps (round(decay_fraction * decay_steps) steps, never into the warmup) whose last step uses
             min_lr; min_lr afterwards.

Why wsd: its stable phase does not depend on where the run will end, so runs of several lengths share it. A run of
N steps is the stable run up to `wsd_decay_start(N, ...)` plus its own decay: `upcycle experiment` trains one stable
run and takes each budget off it as a short decay branch (as scaling-law studies do), instead of training every budget
from the start, and every budget still ends its own schedule.

Nothing to run here: `upcycle.train.trainer` asks `schedule_of(config)` for each step's learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULE_KINDS = ("cosine", "wsd")


def wsd_decay_start(decay_steps: int, *, warmup_steps: int, decay_fraction: float) -> int:
    """The first step of a wsd schedule's decay (the first below the peak): `decay_steps` minus
    round(decay_fraction * decay_steps), and not before the end of the warmup. Steps before it use the peak learning
    rate whatever `decay_steps` is."""
    return max(warmup_steps, decay_steps - round(decay_fraction * decay_steps))


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, warmup_start_lr: float,
          kind: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate of optimizer step `step` (0-based); see the module docstring for the two kinds."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    if step >= decay_steps:
        return min_lr
    if kind == "wsd":
        start = wsd_decay_start(decay_steps, warmup_steps=warmup_steps, decay_fraction=decay_fraction)
        if step < start:
            return lr
        # the decay's k-th step (k = 1 .. its length) is k / length of the way down: the last one is exactly min_lr
        return min_lr + (lr - min_lr) * (1 - (step - start + 1) / (decay_steps - start))
    if kind != "cosine":
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_of(config) -> Callable[[int], float]:
    """A training config's schedule (its optim, schedule and train sections) as a function step -> learning rate."""
    o, s = config.optim, config.schedule
    decay = config.train.max_steps if s.decay_steps is None else s.decay_steps
    start = o.min_lr if s.warmup_start_lr is None else s.warmup_start_lr
    return lambda step: lr_at(step, lr=o.lr, min_lr=o.min_lr, warmup_steps=s.warmup_steps, decay_steps=decay,
                              warmup_start_lr=start, kind=s.kind, decay_fraction=s.decay_fraction)
