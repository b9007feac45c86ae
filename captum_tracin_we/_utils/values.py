r"""Plain Python forms and checks of values that users pass as ints, tensors, numpy arrays or lists."""

import math
import numbers
import operator
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch


def plain(value: Any) -> Any:
    r"""Tensors and numpy arrays or scalars, nested anyhow, as Python lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [plain(item) for item in value]
    return value


def is_int(value: Any, minimum: Optional[int] = None) -> bool:
    r"""
    Whether `value` is an integer (Python, numpy or 0-d tensor; not a bool),
    and >= `minimum` if given.
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return False
    try:
        number = operator.index(value)
    except TypeError:
        return False
    return minimum is None or number >= minimum


def check_int(value: Any, arg_name: str, minimum: int = 1, alternative: str = "") -> int:
    r"""
    `value` as an int if it is an integer >= `minimum` (see `is_int`), else a
    ValueError naming `arg_name`; `alternative` adds what else it may be
    (e.g. " or None").
    """
    if not is_int(value, minimum):
        raise ValueError(f"`{arg_name}` must be an int >= {minimum}{alternative}, got {value!r}.")
    return operator.index(value)


def check_choice(value: Any, arg_name: str, choices: Sequence[Any]) -> Any:
    r"""`value` if it is one of `choices`, else a ValueError naming `arg_name` and listing them."""
    if not any(value is choice or (isinstance(value, str) and value == choice) for choice in choices):
        valid = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"`{arg_name}` must be one of {valid}; got {value!r}.")
    return value


def check_number(
    value: Any, arg_name: str, minimum: float = 0.0, alternative: str = "", strict: bool = False
) -> float:
    r"""
    `value` as a float if it is a finite real number >= `minimum` (> with
    `strict`), else a ValueError naming `arg_name`.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))  # numpy scalars too
    if not ok and isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        value, ok = float(value), True
    if not ok or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"`{arg_name}` must be a finite number {bound}{alternative}, got {value!r}.")
    return float(value)
