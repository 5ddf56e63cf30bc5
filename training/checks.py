"""Type and range checks of configuration values, each error naming the argument and the value.

Shared by the training configs' `__post_init__` and the collators; the loss-specific checks
(temperature, margin, k) live next to their formula in `losses.py`."""

import math
import numbers


def check_int(name, value, minimum=1, optional=False):
    """Raise naming `name` unless `value` is an int >= `minimum` (or None when `optional`); bools are refused."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_number(name, value, positive=False):
    """Raise naming `name` unless `value` is a finite real number (> 0 when `positive`); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")


def check_bool(name, value):
    """Raise naming `name` unless `value` is True or False (a string such as "false" would read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
