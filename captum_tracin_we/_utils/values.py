r"""Plain Python forms of values that users pass as tensors, numpy arrays or lists."""

from typing import Any, Iterable


def plain(value: Any) -> Any:
    r"""Tensors and numpy arrays or scalars, nested anyhow, as Python lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [plain(item) for item in value]
    return value
