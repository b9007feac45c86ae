r"""
The only module that imports Captum's private helpers, so that a change in them
breaks one place. Tested against the Captum range pinned in ``setup.cfg``.
"""

from captum._utils.progress import progress
from captum.influence._utils.common import (
    _format_inputs_dataset,
    _influence_route_to_helpers,
    KMostInfluentialResults,
)

__all__ = [
    "progress",
    "_format_inputs_dataset",
    "_influence_route_to_helpers",
    "KMostInfluentialResults",
]
