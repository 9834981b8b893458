"""Learning-rate schedules as plain functions of the optimizer step.

Both trainers read their learning rates from lr_table (PyTorch sets each step's rate on the
optimizer, JAX indexes the table inside optax), so a run has the same learning rates in either
framework. The formulas are those of diffusers.optimization, which a test checks value by value.
"""

import math

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

_POLYNOMIAL_LR_END = 1e-7
_POLYNOMIAL_POWER = 1.0


def lr_multiplier(name, step, warmup_steps, total_steps, num_cycles=1, base_lr=1.0):
    """Factor applied to the base learning rate at optimizer step ``step`` (0-based)."""
    if name == "constant":
        return 1.0
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if name == "constant_with_warmup":
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    if name == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))
    if name == "polynomial":
        if base_lr <= _POLYNOMIAL_LR_END:
            raise ValueError(f"polynomial schedule needs a learning rate above {_POLYNOMIAL_LR_END}")
        if step > total_steps:
            return _POLYNOMIAL_LR_END / base_lr
        remaining = 1 - (step - warmup_steps) / max(1, total_steps - warmup_steps)
        decay = (base_lr - _POLYNOMIAL_LR_END) * remaining**_POLYNOMIAL_POWER + _POLYNOMIAL_LR_END
        return decay / base_lr
    raise ValueError(f"unknown lr scheduler {name!r}; use one of {', '.join(LR_SCHEDULERS)}")


def lr_table(name, warmup_steps, total_steps, num_cycles, base_lr):
    """Learning rate for each optimizer step 0..total_steps (inclusive), as a list of floats."""
    if base_lr == 0:  # --learning_rate 0 (exporting the initializer's embedding): every schedule is 0
        return [0.0] * (total_steps + 1)
    return [base_lr * lr_multiplier(name, s, warmup_steps, total_steps, num_cycles, base_lr)
            for s in range(total_steps + 1)]
