r"""
The only module that imports Captum's private helpers, so that a change in them
breaks one place. Tested against the Captum range pinned in ``setup.cfg``.
"""

import warnings
from contextlib import contextmanager
from typing import Iterator

from captum.influence._utils.common import (
    _format_inputs_dataset,
    _influence_route_to_helpers,
    KMostInfluentialResults,
)

__all__ = [
    "integer_input_warnings_ignored",
    "_format_inputs_dataset",
    "_influence_route_to_helpers",
    "KMostInfluentialResults",
]


@contextmanager
def integer_input_warnings_ignored() -> Iterator[None]:
    r"""
    Captum's TracIn methods try to make every model input require grad, and
    warn that integer token ids cannot; for text models that is expected.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Input Tensor \d+ has a dtype of torch.int")
        yield
