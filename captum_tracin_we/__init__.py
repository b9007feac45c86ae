r"""
captum-tracin-we: TracIn-WE training-data influence through the word-embedding
layer, with word-level scores, as a Captum influence method.
"""

from captum_tracin_we._core.index import (
    CorruptIndexError,
    GradientIndex,
    IndexBuildInProgressError,
    IndexMismatchError,
)
from captum_tracin_we._core.token_gradients import TokenGradients, TokenPostings
from captum_tracin_we._core.tracin_we import TracInWE, WordInfluence
from captum_tracin_we._utils.captum_compat import KMostInfluentialResults
from captum_tracin_we._utils.checkpoints import load_checkpoint, save_checkpoint
from captum_tracin_we.models import HuggingFaceClassifier

__version__ = "0.1.0"

__all__ = [
    "TracInWE",
    "WordInfluence",
    "TokenGradients",
    "TokenPostings",
    "GradientIndex",
    "IndexMismatchError",
    "CorruptIndexError",
    "IndexBuildInProgressError",
    "KMostInfluentialResults",
    "load_checkpoint",
    "save_checkpoint",
    "HuggingFaceClassifier",
]
